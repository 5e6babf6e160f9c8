"""Which pixels: a grid of tiles at a target µm/px, restricted to tissue and ROIs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from pathapp.errors import PathappError
from pathapp.slide import Slide
from pathapp.tiles.tissue import DEFAULT_MIN_TISSUE, TissueMask, detect_tissue, require_brightfield

# A level up to this much coarser than the target still counts as the target resolution: scanners
# round µm/px (a 4× level of a 0.5026 µm/px scan is 2.01 µm/px, and serves a 2.0 µm/px request).
LEVEL_TOLERANCE = 0.02
# A slide coarser than the target µm/px is upsampled: interpolated pixels, so the model sees less detail
# than it was trained on, on (factor)² as many tiles. Beyond UPSAMPLE_WARN× that is said once per scale
# pair (a 20× scan at a 40× model is 2×); beyond MAX_UPSAMPLE× (a 224 px tile from < 56 slide px) it is
# refused unless the slide's µm/px was stated (--slide-mpp, --image-mpp, a QuPath calibration): a 16.8
# µm/px overview at a 0.5 µm/px model is 34× and ~10⁵ tiles of blur, or a wrong µm/px in the file.
UPSAMPLE_WARN = 1.5
MAX_UPSAMPLE = 4.0
PADDING, PADDING_VALUE = "padding fraction", "padding value"  # tile measurements of edge tiles
MIN_COUNTED = 0.5  # the least part of a tile its tissue fraction is taken over (see make_grid)


@dataclass(frozen=True)
class TileGeometry:
    """How a square tile of `tile_size` px at a target `mpp` µm/px maps onto a slide scanned at
    `slide_mpp` µm/px: it covers `footprint` × `footprint` level-0 px and is read as `read_size` ×
    `read_size` px at pyramid `level` (the coarsest level at least as fine as the target, within
    LEVEL_TOLERANCE), then resized once to `tile_size`. Tiling, inference, training and pretraining
    all read tiles through this one rule.

    Tile i along an axis starts exactly at i × `stride` level-0 px (`stride` = footprint less the
    overlap) and is read from the whole pixel below (`positions`); `origins` gives back the exact
    starts, so tiles drawn for QuPath neither overlap nor leave gaps by a fraction of a pixel."""

    mpp: float
    slide_mpp: float
    tile_size: int
    footprint: float
    level: int
    read_size: int
    stride: float = 0.0  # level-0 px between neighbouring tiles; 0 means the footprint (no overlap)

    @property
    def step(self) -> float:
        return self.stride or self.footprint

    def positions(self, extent: int) -> np.ndarray:
        """Whole-pixel starts of the tiles along an axis of `extent` level-0 px: every pixel of the
        axis lies in a tile, the last one may reach past the edge (read as background, `padding`);
        none when one tile is larger than the whole axis."""
        if self.footprint > extent:
            return np.zeros(0, np.int64)
        n = int(np.ceil((extent - self.footprint) / self.step - 1e-9)) + 1
        return np.floor(np.arange(n) * self.step + 1e-9).astype(np.int64)

    def origins(self, coords: np.ndarray) -> np.ndarray:
        """The exact (fractional) level-0 starts of tiles read at whole-pixel `coords` (from `positions`)."""
        xy = np.asarray(coords, dtype=np.float64)
        if self.step <= 1:  # a tile narrower than a pixel: the pixel is as exact as it gets
            return xy
        return np.ceil(xy / self.step - 1e-7) * self.step

    def padding(self, coords: np.ndarray, slide_size: tuple[int, int]) -> np.ndarray:
        """Fraction of each tile's footprint that lies outside the slide (read as background)."""
        lo = self.origins(coords).reshape(-1, 2)
        hi = np.minimum(lo + self.footprint, np.asarray(slide_size, np.float64))
        inside = np.clip(hi - np.maximum(lo, 0), 0, None).prod(axis=1)
        outside = (1.0 - inside / self.footprint**2).clip(0, 1)
        return np.where(outside < 1e-9, 0.0, outside)  # a whole tile is 0, not a rounding error above it


def tile_geometry(slide: Slide, mpp: float, tile_size: int, overlap: int = 0) -> TileGeometry:
    """The geometry of `tile_size` px tiles at `mpp` µm/px on `slide`, neighbours overlapping by
    `overlap` target px (MissingMppError when the slide has no µm/px: never guessed)."""
    slide_mpp = slide.require_mpp()
    if not mpp > 0 or tile_size < 1:
        raise PathappError(f"{slide.path}: tiling needs --mpp > 0 and --tile-size ≥ 1 (got mpp={mpp}, "
                           f"tile size={tile_size})")
    if not 0 <= overlap < tile_size:
        raise PathappError(f"{slide.path}: --overlap must be at least 0 and smaller than the tile size "
                           f"(got overlap={overlap}, tile size={tile_size})")
    downsample = mpp / slide_mpp
    _check_upsampling(slide, slide_mpp, mpp, tile_size)
    footprint = tile_size * downsample
    level = slide.best_level_for_downsample(downsample * (1 + LEVEL_TOLERANCE))
    read_size = max(1, int(round(footprint / slide.levels[level].downsample)))
    return TileGeometry(float(mpp), float(slide_mpp), int(tile_size), float(footprint), level, read_size,
                        float((tile_size - overlap) * downsample))


_UPSAMPLING_SAID: set[tuple[float, float]] = set()  # (slide µm/px, target µm/px) pairs warned about


def _check_upsampling(slide: Slide, slide_mpp: float, mpp: float, tile_size: int) -> None:
    """The rule of UPSAMPLE_WARN and MAX_UPSAMPLE for `tile_size` px tiles at `mpp` µm/px on `slide`."""
    factor = slide_mpp / mpp
    if factor <= UPSAMPLE_WARN:
        return
    scales = (f"the slide is {slide_mpp:g} µm/px at its finest level, {factor:.1f}× coarser than the "
              f"{mpp:g} µm/px tiles are read at")
    if factor > MAX_UPSAMPLE and slide.mpp_source != "override":
        w, h = slide.size
        side = tile_size / factor  # slide px per tile side
        n = int(np.ceil(w / side) * np.ceil(h / side))
        raise PathappError(f"{slide.path}: {scales}: every tile would be upsampled {factor:.1f}× (about {n:,} tiles "
                           f"of interpolated pixels); use a model or --mpp near the slide's scale, give the right "
                           f"scale with --slide-mpp if the file's is wrong, or state it to go ahead: --slide-mpp "
                           f"{slide_mpp:g}")
    if (float(slide_mpp), float(mpp)) not in _UPSAMPLING_SAID:
        _UPSAMPLING_SAID.add((float(slide_mpp), float(mpp)))
        print(f"warning: {slide.path}: {scales}: each tile is upsampled {factor:.1f}× (interpolated pixels: less "
              f"detail than the model was trained on); said once for every slide at this scale",
              file=sys.stderr, flush=True)


def read_tile_at(slide: Slide, geometry: TileGeometry, x: int, y: int) -> np.ndarray:
    """The tile whose level-0 top-left corner is (x, y), as uint8 (tile_size, tile_size, 3): `read_size`
    px read at `level`, resized once (bilinear with antialiasing, as Pillow does when shrinking)."""
    g = geometry
    region = slide.read(int(x), int(y), g.read_size, g.read_size, g.level)
    if g.read_size == g.tile_size:
        return np.ascontiguousarray(region)
    from PIL import Image

    img = Image.fromarray(region).resize((g.tile_size, g.tile_size), Image.BILINEAR)
    return np.array(img)  # writable, so torch.from_numpy takes it without a warning


@dataclass
class TileGrid:
    """Tiles of one geometry at level-0 top-left corners `coords` (N, 2) int64, with each tile's
    tissue fraction."""

    coords: np.ndarray
    geometry: TileGeometry
    slide_size: tuple[int, int]
    tissue_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,)

    def __len__(self) -> int:
        return int(len(self.coords))

    def subset(self, keep: np.ndarray) -> TileGrid:
        """The tiles selected by a boolean mask or index array, same geometry."""
        return TileGrid(self.coords[keep], self.geometry, self.slide_size, self.tissue_fraction[keep])

    @property
    def footprint(self) -> float:
        return self.geometry.footprint

    @property
    def level(self) -> int:
        return self.geometry.level

    @property
    def read_size(self) -> int:
        return self.geometry.read_size

    @property
    def tile_size(self) -> int:
        return self.geometry.tile_size

    @property
    def mpp(self) -> float:
        return self.geometry.mpp

    @property
    def slide_mpp(self) -> float:
        return self.geometry.slide_mpp

    def edge_measurements(self, background: int) -> dict[str, np.ndarray]:
        """Per-tile measurements of edge padding: the fraction of the tile beyond the slide, and the
        value it was filled with (`Slide.background`; NaN, so left out, where nothing was padded)."""
        padding = self.geometry.padding(self.coords, self.slide_size)
        return {PADDING: padding, PADDING_VALUE: np.where(padding > 0, float(background), np.nan)}


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


def make_grid(
    slide: Slide,
    mpp: float,
    tile_size: int,
    *,
    overlap: int = 0,
    tissue: TissueMask | None = None,
    rois: BaseGeometry | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    brightfield_only: bool = True,
) -> TileGrid:
    """Square tiles of `tile_size` px at `mpp` µm/px over the slide, kept where tissue is.

    A tile's level-0 side is tile_size × mpp / slide µm/px (MissingMppError when the slide has no
    µm/px: never guessed); neighbours are (tile_size − overlap) target px apart; the tiles cover the
    whole slide, those at the right and bottom edges reaching past it (read as background; the
    fraction is `TileGeometry.padding`). A tile is kept when its tissue fraction (from `tissue`,
    detected when None; of the part of the tile on the slide, or of half the tile when less is on
    it) is ≥ `min_tissue` and, when `rois` (level-0 shapely geometry) is given, when its centre lies
    inside the ROIs — so each tile belongs to at most one of several touching ROIs. Tiles are read
    at the coarsest pyramid level at least as fine as the target (within LEVEL_TOLERANCE), as `read_size` px resized once to `tile_size`.
    A fluorescence image is refused in one line (`require_brightfield`: the models, QC and stain
    tools read brightfield RGB) unless `brightfield_only` is False (`pathapp tile`, whose tissue
    detector is made for it)."""
    geometry = tile_geometry(slide, mpp, tile_size, overlap)
    footprint = geometry.footprint
    w, h = slide.size
    xs, ys = geometry.positions(w), geometry.positions(h)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.int64)
    if tissue is None:
        tissue = detect_tissue(slide)
    if brightfield_only:
        require_brightfield(slide, tissue)
    fraction = tissue_fractions(coords, footprint, tissue) if len(coords) else np.zeros(0, np.float32)
    # an edge tile's fraction is of its part on the slide, but never of less than half a tile, so
    # that a sliver of tissue does not make a tile of mostly padding
    inside = 1.0 - geometry.padding(coords, (w, h))
    fraction = np.minimum(fraction / np.maximum(inside, MIN_COUNTED), 1.0).astype(np.float32)
    keep = fraction >= min_tissue - 1e-6
    if rois is not None:
        keep &= shapely.contains_xy(rois, coords[:, 0] + footprint / 2, coords[:, 1] + footprint / 2)
    return TileGrid(coords=coords[keep], geometry=geometry, slide_size=(int(w), int(h)),
                    tissue_fraction=fraction[keep])


class Tiled(Protocol):
    """Anything with level-0 tile corners and a footprint: a TileGrid, a SlideResult (and, when they
    know it, the `geometry` that placed them)."""

    coords: np.ndarray
    footprint: float


def tile_boxes(tiles: Tiled, grow: float = 0.0) -> np.ndarray:
    """(N, 4) float level-0 x0, y0, x1, y1 of each tile's footprint, optionally grown by `grow` px:
    at the exact starts (`TileGeometry.origins`) when `tiles` carries its geometry."""
    geometry = getattr(tiles, "geometry", None)
    xy = np.asarray(tiles.coords, dtype=np.float64).reshape(-1, 2)
    if geometry is not None:
        xy = geometry.origins(xy)
    return np.column_stack([xy - grow, xy + float(tiles.footprint) + grow])


def tile_polygons(tiles: Tiled) -> list[Polygon]:
    """Each tile's level-0 footprint as a shapely box."""
    b = tile_boxes(tiles)
    return list(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]))


def why_empty(grid: TileGrid, tissue: TissueMask, rois: BaseGeometry | None = None,
              min_tissue: float = DEFAULT_MIN_TISSUE) -> str:
    """Why `grid` has no tile, in words a user can act on (an empty result must not pass for success)."""
    w, h = grid.slide_size
    f = grid.footprint
    if f > w or f > h:
        return (f"a tile ({grid.tile_size} px at {grid.mpp:g} µm/px = {f:.0f} level-0 px) is larger than the slide "
                f"({w}×{h} px at {grid.slide_mpp:g} µm/px); use a smaller --tile-size or --mpp")
    if rois is not None and not rois.intersects(shapely.box(0, 0, w, h)):
        b = ", ".join(f"{v:.0f}" for v in rois.bounds)
        return (f"the --roi annotations (level-0 bounds {b}) lie outside the slide ({w}×{h} px); "
                f"export them from this image")
    if tissue.geometry.is_empty:
        return "no tissue detected (see the picture); --min-tissue 0 keeps every tile"
    if rois is not None:
        return (f"no tile with at least {min_tissue:g} tissue has its centre inside the --roi annotations; "
                f"lower --min-tissue or check the ROIs")
    return f"no tile has at least {min_tissue:g} tissue; lower --min-tissue"
