"""Stream the tiles of a grid from a slide, as a torch map-style dataset for DataLoader workers.

torch is imported only when an item is made (the `tiles` package is used by commands that must
start without torch)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pathapp.engine.workers import SlideHandle
from pathapp.slide import Slide
from pathapp.tiles.grid import TileGrid, read_tile_at


def read_tile(slide: Slide, grid: TileGrid, i: int) -> np.ndarray:
    """Tile i of `grid` as uint8 (tile_size, tile_size, 3) (see `read_tile_at`)."""
    x, y = grid.coords[i]
    return read_tile_at(slide, grid.geometry, x, y)


class TileDataset:
    """Item i → (tile, i). Without a transform the tile is a uint8 tensor (3, tile_size, tile_size);
    with one, it is `transform(PIL.Image)` (torchvision-style transforms take PIL images).

    Holds the slide in an `engine.workers.SlideHandle` (each worker process opens its own copy,
    once) and the grid's arrays, so it is safe with num_workers > 0 (fork or spawn).
    It is a map-style dataset by protocol (__len__, __getitem__), which DataLoader, Subset and
    ConcatDataset accept, rather than a torch Dataset subclass: importing it does not import torch."""

    def __init__(self, slide: Slide, grid: TileGrid, transform: Callable | None = None) -> None:
        self.handle = SlideHandle(slide)
        self.grid = grid
        self.transform = transform

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        if not 0 <= i < len(self.grid):
            raise IndexError(i)
        tile = read_tile(self.handle.slide, self.grid, i)
        if self.transform is not None:
            from PIL import Image

            return self.transform(Image.fromarray(tile)), i
        if not tile.flags.writeable:  # backends may hand out read-only buffers; torch wants to own one
            tile = tile.copy()
        return torch.from_numpy(tile).permute(2, 0, 1).contiguous(), i
