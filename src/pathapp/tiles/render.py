"""A picture to check tiling by eye: the slide's thumbnail, the tissue outline, the tile grid."""

from __future__ import annotations

import os

import numpy as np
from shapely.geometry.base import BaseGeometry

from pathapp.atomic import atomic_path
from pathapp.slide import Slide
from pathapp.tiles.grid import TileGrid
from pathapp.tiles.tissue import TissueMask

OUTLINE = (0, 170, 0)  # tissue outline
TILE = (20, 60, 230)  # tile squares


def _rings(geom: BaseGeometry) -> list[np.ndarray]:
    """Every exterior and interior ring of a (Multi)Polygon as (n, 2) level-0 coordinates."""
    rings = []
    for poly in getattr(geom, "geoms", [geom]):
        if poly.is_empty or not hasattr(poly, "exterior"):
            continue
        rings.append(np.asarray(poly.exterior.coords))
        rings.extend(np.asarray(r.coords) for r in poly.interiors)
    return rings


def render_overview(
    path: str | os.PathLike,
    slide: Slide,
    tissue: TissueMask,
    grid: TileGrid | None = None,
    *,
    rois: BaseGeometry | None = None,
    max_px: int = 1200,
) -> float:
    """Write a PNG of the slide, read from its pyramid at the picture's own size (never an enlarged
    low-resolution image), with the tissue outline (green), optional ROIs (orange) and tile squares
    (blue). Returns its scale in level-0 px per PNG px, which is also stored in the PNG's text chunk
    "pathapp:scale" so the picture can be mapped back to the slide."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    img = Image.fromarray(slide.thumbnail(max_px))
    scale = slide.size[0] / img.width
    draw = ImageDraw.Draw(img)
    if grid is not None and len(grid):
        side = grid.footprint / scale
        for x, y in np.asarray(grid.coords, dtype=np.float64) / scale:
            draw.rectangle([x, y, x + side, y + side], outline=TILE)
    for geom, colour in ((tissue.geometry, OUTLINE), (rois, (255, 140, 0))):
        if geom is None:
            continue
        for ring in _rings(geom):
            draw.line([tuple(p) for p in ring / scale], fill=colour, width=2)
    info = PngInfo()
    info.add_text("pathapp:scale", f"{scale:.6f}")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return scale
