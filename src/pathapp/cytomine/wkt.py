"""Cytomine's coordinate convention: annotation WKT has its origin at the image's BOTTOM-left
(y grows upwards), while slides, QuPath and our results use the top-left (y grows downwards).

The flip y' = height - y is its own inverse. When the file pathapp reads has another size than
the image Cytomine shows (`scale_to_cytomine`), coordinates are also scaled, and the two
directions differ: `to_cytomine_wkt` scales then flips, `from_cytomine_wkt` undoes both.
"""

from __future__ import annotations

import shapely
from shapely.geometry.base import BaseGeometry

from pathapp.errors import PathappError

Scale = tuple[float, float]
NO_SCALE: Scale = (1.0, 1.0)
# Two axes whose scales differ by more than this are not one image shown at another size.
SCALE_TOLERANCE = 0.01


def flip_y(geom: BaseGeometry, height: float) -> BaseGeometry:
    """Mirror a geometry about the image's horizontal mid-line: y' = height - y."""
    return shapely.transform(geom, lambda xy: xy * (1.0, -1.0) + (0.0, float(height)))


def to_cytomine_wkt(geom: BaseGeometry, height: float, precision: int = 2, scale: Scale = NO_SCALE) -> str:
    """WKT of a top-left-origin geometry (file px) in Cytomine's bottom-left frame (Cytomine px,
    `height` being Cytomine's), rounded to `precision` decimals. Polygons are re-oriented
    (mirroring reverses ring order) so that exteriors stay counter-clockwise as OGC simple
    features expect."""
    if scale != NO_SCALE:
        geom = shapely.transform(geom, lambda xy: xy * scale)
    flipped = flip_y(geom, height)
    if isinstance(flipped, (shapely.Polygon, shapely.MultiPolygon)):
        flipped = shapely.orient_polygons(flipped)
    return shapely.to_wkt(flipped, rounding_precision=precision, trim=True)


def from_cytomine_wkt(wkt: str, height: float, scale: Scale = NO_SCALE) -> BaseGeometry:
    """A top-left-origin geometry in file px from Cytomine WKT (bottom-left origin, Cytomine px)."""
    geom = flip_y(shapely.from_wkt(wkt), height)
    if scale != NO_SCALE:
        geom = shapely.transform(geom, lambda xy: xy / scale)
    return geom


def scale_to_cytomine(file_size: tuple[int, int], cytomine_size: tuple[int, int], where: str) -> Scale:
    """(sx, sy) taking the file's level-0 px to the px of the image Cytomine shows.

    Cytomine places annotations in its own image's pixels; a file of another size (another
    pyramid level, a converted copy) would put every polygon in the wrong place, silently. The
    same picture at another size is scaled; different aspect ratios are refused."""
    (fw, fh), (cw, ch) = file_size, cytomine_size
    if (fw, fh) == (cw, ch):
        return NO_SCALE
    if min(fw, fh, cw, ch) <= 0:
        raise PathappError(f"{where}: image size unknown (file {fw}x{fh}, Cytomine {cw}x{ch}); re-upload the image")
    sx, sy = cw / fw, ch / fh
    if abs(sx / sy - 1) > SCALE_TOLERANCE:
        raise PathappError(
            f"{where}: the file is {fw}x{fh} px but Cytomine shows the image as {cw}x{ch} px (not the same "
            "picture at another size), so annotations would land in the wrong place; re-upload the image file"
        )
    return sx, sy
