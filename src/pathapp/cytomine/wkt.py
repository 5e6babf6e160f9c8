"""Cytomine's coordinate convention: annotation WKT has its origin at the image's BOTTOM-left
(y grows upwards), while slides, QuPath and our results use the top-left (y grows downwards).

The flip y' = height - y is its own inverse, so one function converts both ways; the named
wrappers only say at the call site which way the data is going.
"""

from __future__ import annotations

import shapely
from shapely.geometry.base import BaseGeometry


def flip_y(geom: BaseGeometry, height: float) -> BaseGeometry:
    """Mirror a geometry about the image's horizontal mid-line: y' = height - y."""
    return shapely.transform(geom, lambda xy: xy * (1.0, -1.0) + (0.0, float(height)))


def to_cytomine_wkt(geom: BaseGeometry, height: float, precision: int = 2) -> str:
    """WKT of a top-left-origin geometry in Cytomine's bottom-left frame, rounded to `precision`
    decimals. Polygons are re-oriented (mirroring reverses ring order) so that exteriors stay
    counter-clockwise as OGC simple features expect."""
    flipped = flip_y(geom, height)
    if isinstance(flipped, (shapely.Polygon, shapely.MultiPolygon)):
        flipped = shapely.orient_polygons(flipped)
    return shapely.to_wkt(flipped, rounding_precision=precision, trim=True)


def from_cytomine_wkt(wkt: str, height: float) -> BaseGeometry:
    """A top-left-origin geometry from Cytomine WKT (bottom-left origin)."""
    return flip_y(shapely.from_wkt(wkt), height)
