"""Stream the tiles of a grid from a slide, as a torch map-style dataset for DataLoader workers.

torch is imported only when an item is made (the `tiles` package is used by commands that must
start without torch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pathapp.engine.workers import SlideHandle
from pathapp.slide import Slide
from pathapp.tiles.grid import TileGrid, read_tile_at


def read_tile(slide: Slide, grid: TileGrid, i: int) -> np.ndarray:
    """Tile i of `grid` as uint8 (tile_size, tile_size, 3) (see `read_tile_at`)."""
    x, y = grid.coords[i]
    return read_tile_at(slide, grid.geometry, x, y)


def read_tiles(slide: Slide, grid: TileGrid, indices: Sequence[int]) -> list[np.ndarray]:
    """Tiles `indices` of `grid`. The slide is told about all of them first, so a DICOMweb slide
    fetches their frames in one request instead of one per tile."""
    g = grid.geometry
    slide.prefetch([(int(x), int(y), g.read_size, g.read_size) for x, y in grid.coords[list(indices)]], g.level)
    return [read_tile(slide, grid, i) for i in indices]


class TileDataset:
    """Item i → (tile, i). Without a transform the tile is a uint8 tensor (3, tile_size, tile_size);
    with one, it is `transform(PIL.Image)` (torchvision-style transforms take PIL images). With
    `measure` (e.g. `qc.TileMeasurer`), item i → (tile, i, measure(tile pixels)): quality control
    computed in the worker on the very pixels the model gets.

    Holds the slide in an `engine.workers.SlideHandle` (each worker process opens its own copy,
    once) and the grid's arrays, so it is safe with num_workers > 0 (fork or spawn).
    It is a map-style dataset by protocol (__len__, __getitem__), which DataLoader, Subset and
    ConcatDataset accept, rather than a torch Dataset subclass: importing it does not import torch."""

    def __init__(self, slide: Slide, grid: TileGrid, transform: Callable | None = None,
                 measure: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.handle = SlideHandle(slide)
        self.grid = grid
        self.transform = transform
        self.measure = measure

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, ...]]:
        """A batch of items (DataLoader asks for a batch at once when this exists): the tiles are
        read together, which lets a DICOMweb slide fetch their frames in one request."""
        import torch

        for i in indices:
            if not 0 <= i < len(self.grid):
                raise IndexError(i)
        items: list[tuple[Any, ...]] = []
        for tile, i in zip(read_tiles(self.handle.slide, self.grid, indices), indices):
            extra = () if self.measure is None else (self.measure(tile),)
            if self.transform is not None:
                from PIL import Image

                items.append((self.transform(Image.fromarray(tile)), i, *extra))
                continue
            if not tile.flags.writeable:  # backends may hand out read-only buffers; torch wants to own one
                tile = tile.copy()
            items.append((torch.from_numpy(tile).permute(2, 0, 1).contiguous(), i, *extra))
        return items
