"""A segmentation bundle over one slide: overlapping tiles, logits blended without seams.

Tiles overlap by `overlap` px (default a quarter tile, whole patches). Each tile's per-pixel
logits are resized to the map's resolution (`MAP_STRIDE` model px per map pixel) and added into
a band of rows with a weight that falls off towards the tile's border (a tent: a tile's centre
counts, its edge, where the ViT sees least context, hardly does); the blended logits are the
weighted mean, so neighbouring tiles hand over smoothly and no tile border shows. Tiles come in
row order, so rows above the next tile are final: they are turned into class and probability
there and then, and only a band one tile high is ever held in floating point. What grows with
the slide is the uint8 map (two bytes per map pixel, 2·16² bytes per 224 px tile area), far less
than the per-tile embeddings inference keeps anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pathapp.infer.pipeline import Runtime, default_workers, plan_tiles
from pathapp.results import SlideResult
from pathapp.results.segmentation import SegMap
from pathapp.slide import Slide


def map_stride(rt: Runtime) -> int:
    """Model px per map pixel: half a patch (7 px for /14 ViTs, 3.5 µm at 0.5 µm/px)."""
    return max(1, int(rt.bundle.spec.patch_size) // 2)


def default_overlap(tile_size: int, patch: int) -> int:
    """A quarter tile, in whole patches (56 px of 224), so overlapping tiles share the patch grid."""
    return max(patch, tile_size // 4 // patch * patch) if tile_size > 2 * patch else 0


def tent(n: int) -> np.ndarray:
    """(n, n) blending weights: the product of two tents peaking at the centre, > 0 at the border."""
    u = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5) / (n / 2)
    w = np.maximum(u, 1e-3)
    return np.outer(w, w).astype(np.float32)


class BandBlender:
    """Weighted sums of logits over a band of map rows; finished rows become class + probability."""

    def __init__(self, n_classes: int, size: tuple[int, int], tile_px: int) -> None:
        self.h, self.w = size
        self.labels = np.zeros(size, np.uint8)
        self.prob = np.zeros(size, np.uint8)
        self.top = 0
        self.acc = np.zeros((n_classes, tile_px + 1, self.w), np.float32)
        self.weight = np.zeros((tile_px + 1, self.w), np.float32)
        self.window = tent(tile_px)

    def flush(self, until: int) -> None:
        """Finalise map rows [top, until): no later tile reaches them."""
        until = min(until, self.h)
        n = until - self.top
        if n <= 0:
            return
        n_band = min(n, self.acc.shape[1])
        wt = self.weight[:n_band]
        seen = wt > 0
        logits = self.acc[:, :n_band] / np.where(seen, wt, 1)
        logits -= logits.max(axis=0, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=0, keepdims=True)
        self.labels[self.top:self.top + n_band] = np.where(seen, p.argmax(axis=0), 0)
        self.prob[self.top:self.top + n_band] = np.where(seen, np.round(p.max(axis=0) * 255), 0)
        self.acc = np.roll(self.acc, -n_band, axis=1)
        self.weight = np.roll(self.weight, -n_band, axis=0)
        self.acc[:, -n_band:] = 0
        self.weight[-n_band:] = 0
        self.top = until

    def add(self, logits: np.ndarray, row: int, col: int) -> None:
        """Blend one tile's (C, t, t) map-resolution logits in at map (row, col)."""
        self.flush(row)
        t = logits.shape[-1]
        r0, c0 = row - self.top, col
        r1, c1 = min(r0 + t, self.acc.shape[1], self.h - self.top), min(c0 + t, self.w)
        if r1 <= r0 or c1 <= c0:
            return
        win = self.window[: r1 - r0, : c1 - c0]
        self.acc[:, r0:r1, c0:c1] += logits[:, : r1 - r0, : c1 - c0] * win
        self.weight[r0:r1, c0:c1] += win


def segment_slide(
    slide: Slide,
    rt: Runtime,
    *,
    mpp: float | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    rois: Any = None,
    min_tissue: float | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SlideResult:
    """Run `rt`'s segmentation head over the tissue of `slide` (and `rois`) and return a SlideResult
    whose `segmentation` holds the blended map; `coords` are the tiles that were run."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from pathapp.tiles import TileDataset

    bundle = rt.bundle
    mpp = float(mpp or bundle.mpp)
    tile_size = int(tile_size or bundle.tile_size)
    patch = int(bundle.spec.patch_size)
    overlap = default_overlap(tile_size, patch) if overlap is None else int(overlap)
    slide_mpp = slide.require_mpp()
    timings: dict[str, float] = {}
    grid, thumbnail, empty = plan_tiles(slide, mpp, tile_size, rois, min_tissue, timings, overlap=overlap)
    stride = map_stride(rt)
    tile_px = max(1, round(tile_size / stride))
    scale = grid.footprint / tile_px  # level-0 px per map pixel
    w0, h0 = slide.size
    blender = BandBlender(bundle.num_classes, (int(np.ceil(h0 / scale)), int(np.ceil(w0 / scale))), tile_px)
    n_workers = default_workers(rt.device) if workers is None else workers
    t0 = time.perf_counter()
    if len(grid):
        loader = DataLoader(TileDataset(slide, grid), batch_size=batch_size, num_workers=n_workers,
                            prefetch_factor=4 if n_workers else None)
        cells = np.rint(np.asarray(grid.coords, np.float64) / scale).astype(np.int64)
        with torch.inference_mode(), tqdm(total=len(grid), unit="tile", desc=slide.name, leave=False,
                                          disable=not progress) as bar:
            for x, idx in loader:
                logits = rt.model.segment(x.to(rt.device))
                logits = F.interpolate(logits.float(), size=(tile_px, tile_px), mode="area").cpu().numpy()
                for lg, i in zip(logits, idx.numpy()):
                    blender.add(lg, int(cells[i, 1]), int(cells[i, 0]))
                bar.update(len(idx))
    blender.flush(blender.h)
    timings["model"] = time.perf_counter() - t0
    seg = SegMap(blender.labels, blender.prob, float(scale), list(bundle.class_names), list(bundle.class_colors),
                 roi=rois)
    if log is not None and len(grid):
        log(f"segment: {slide.name}: {len(grid)} tiles ({overlap} px overlap), map {blender.w}×{blender.h} "
            f"at {scale * slide_mpp:.2f} µm/px")
    return SlideResult(
        slide_path=str(slide.path), slide_name=slide.name, coords=np.asarray(grid.coords, np.int64).reshape(-1, 2),
        footprint=float(grid.footprint), tile_size=tile_size, mpp=mpp, slide_mpp=float(slide_mpp),
        slide_size=tuple(slide.size), thumbnail=thumbnail, model_name=rt.name, model_fingerprint=rt.fingerprint,
        params={"batch_size": batch_size, "workers": n_workers, "device": str(rt.device), "level": grid.level,
                "read_size": grid.read_size, "overlap": overlap, "map_um_per_px": scale * slide_mpp,
                "min_tissue": min_tissue, "rois": rois is not None, "empty": empty},
        timings=timings, segmentation=seg,
    )
