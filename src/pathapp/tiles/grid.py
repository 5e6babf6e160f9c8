"""Which pixels: a grid of tiles at a target µm/px, restricted to tissue and ROIs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from pathapp.errors import PathappError
from pathapp.slide import Slide
from pathapp.tiles.tissue import DEFAULT_MIN_TISSUE, TissueMask, detect_tissue

# A level up to this much coarser than the target still counts as the target resolution: scanners
# round µm/px (a 4× level of a 0.5026 µm/px scan is 2.01 µm/px, and serves a 2.0 µm/px request).
LEVEL_TOLERANCE = 0.02


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


def _coverage(integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact mask area inside fractional mask-pixel rectangles, from the (H+1, W+1) integral image.

    The area under a piecewise-constant mask up to a point (u, v) is bilinear in each cell, so
    bilinear interpolation of the integral image at the rectangle's corners is exact."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1

    def at(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u, v = np.clip(u, 0, w), np.clip(v, 0, h)
        c, r = np.minimum(np.floor(u).astype(np.int64), w - 1), np.minimum(np.floor(v).astype(np.int64), h - 1)
        fu, fv = u - c, v - r
        top = integral[r, c] * (1 - fu) + integral[r, c + 1] * fu
        bottom = integral[r + 1, c] * (1 - fu) + integral[r + 1, c + 1] * fu
        return top * (1 - fv) + bottom * fv

    return at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)


def tissue_fractions(coords: np.ndarray, footprint: float, tissue: TissueMask) -> np.ndarray:
    """Fraction of each tile's level-0 footprint covered by the tissue mask (vectorised)."""
    mask = np.asarray(tissue.mask, dtype=np.float64)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    x0 = coords[:, 0] / tissue.scale
    y0 = coords[:, 1] / tissue.scale
    side = footprint / tissue.scale
    return (_coverage(integral, x0, y0, x0 + side, y0 + side) / side**2).astype(np.float32)


def _positions(extent: int, footprint: float, stride: float) -> np.ndarray:
    """Level-0 starts of tiles along one axis, every tile fully inside [0, extent)."""
    if footprint > extent:
        return np.zeros(0, np.int64)
    n = int(np.floor((extent - footprint) / stride + 1e-9)) + 1
    return np.floor(np.arange(n) * stride + 1e-9).astype(np.int64)


def make_grid(
    slide: Slide,
    mpp: float,
    tile_size: int,
    *,
    overlap: int = 0,
    tissue: TissueMask | None = None,
    rois: BaseGeometry | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> TileGrid:
    """Square tiles of `tile_size` px at `mpp` µm/px over the slide, kept where tissue is.

    A tile's level-0 side is tile_size × mpp / slide µm/px (MissingMppError when the slide has no
    µm/px: never guessed); neighbours are (tile_size − overlap) target px apart; every tile lies
    fully inside the slide. A tile is kept when its tissue fraction (from `tissue`, detected when
    None) is ≥ `min_tissue` and, when `rois` (level-0 shapely geometry) is given, when its centre
    lies inside the ROIs — so each tile belongs to at most one of several touching ROIs.
    Tiles are read at the coarsest pyramid level at least as fine as the target (within
    LEVEL_TOLERANCE), as `read_size` px resized once to `tile_size`."""
    slide_mpp = slide.require_mpp()
    if not mpp > 0 or tile_size < 1 or not 0 <= overlap < tile_size:
        raise PathappError(
            f"{slide.path}: tiling needs --mpp > 0, --tile-size ≥ 1 and 0 ≤ --overlap < tile size "
            f"(got mpp={mpp}, tile size={tile_size}, overlap={overlap})"
        )
    downsample = mpp / slide_mpp
    footprint = tile_size * downsample
    stride = (tile_size - overlap) * downsample
    w, h = slide.size
    xs, ys = _positions(w, footprint, stride), _positions(h, footprint, stride)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.int64)
    if tissue is None:
        tissue = detect_tissue(slide)
    fraction = tissue_fractions(coords, footprint, tissue) if len(coords) else np.zeros(0, np.float32)
    keep = fraction >= min_tissue - 1e-6
    if rois is not None:
        keep &= shapely.contains_xy(rois, coords[:, 0] + footprint / 2, coords[:, 1] + footprint / 2)
    level = slide.best_level_for_downsample(downsample * (1 + LEVEL_TOLERANCE))
    return TileGrid(
        coords=coords[keep],
        footprint=float(footprint),
        level=level,
        read_size=max(1, int(round(footprint / slide.levels[level].downsample))),
        tile_size=int(tile_size),
        mpp=float(mpp),
        slide_mpp=float(slide_mpp),
        slide_size=(int(w), int(h)),
        tissue_fraction=fraction[keep],
    )


def tile_boxes(grid: TileGrid) -> np.ndarray:
    """(N, 4) float level-0 x0, y0, x1, y1 of each tile's footprint."""
    xy = np.asarray(grid.coords, dtype=np.float64).reshape(-1, 2)
    return np.column_stack([xy, xy + grid.footprint])


def tile_polygons(grid: TileGrid) -> list[Polygon]:
    """Each tile's level-0 footprint as a shapely box."""
    b = tile_boxes(grid)
    return list(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]))
