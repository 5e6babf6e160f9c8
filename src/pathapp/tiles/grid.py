"""Which pixels: a grid of tiles at a target µm/px, restricted to tissue and ROIs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TileGrid:
    """Tiles addressed at a target µm/px. Coordinates are level-0 pixels (top-left corners).

    A tile covers `footprint` × `footprint` level-0 pixels; it is read as `read_size` × `read_size`
    pixels at pyramid `level` and resized once to `tile_size` × `tile_size`.
    """

    coords: np.ndarray  # (N, 2) int64, level-0 x, y of each tile's top-left corner
    footprint: float  # level-0 px per tile side = tile_size * mpp / slide_mpp
    level: int
    read_size: int
    tile_size: int
    mpp: float  # target µm/px
    slide_mpp: float
    slide_size: tuple[int, int]
    tissue_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,)

    def __len__(self) -> int:
        return int(len(self.coords))
