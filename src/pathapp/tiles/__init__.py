"""Which pixels: tissue detection, tile grids at a target µm/px, and a streaming tile dataset."""

from pathapp.tiles.dataset import TileDataset, read_tile
from pathapp.tiles.grid import (TileGeometry, TileGrid, make_grid, read_tile_at, tile_boxes, tile_geometry,
                               tile_polygons, why_empty)
from pathapp.tiles.tissue import DEFAULT_MIN_TISSUE, TissueMask, detect_tissue, tissue_fraction_rgb

__all__ = [
    "DEFAULT_MIN_TISSUE",
    "TileDataset",
    "TileGeometry",
    "TileGrid",
    "TissueMask",
    "detect_tissue",
    "make_grid",
    "read_tile",
    "read_tile_at",
    "tile_boxes",
    "tile_geometry",
    "tile_polygons",
    "tissue_fraction_rgb",
    "why_empty",
]
