"""Pictures of a SlideResult: per-class heatmaps on a tile-stride grid aligned with level 0, an
overlay on the thumbnail for people, and the classic DINOv2 PCA picture for a headless bundle.

Heatmap pixel (i, j) covers level-0 [i*scale, (i+1)*scale) × [j*scale, (j+1)*scale) with
scale = the tile footprint; run.json records it so the maps can be put back on the slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pathapp.atomic import atomic_path
from pathapp.results.result import SlideResult

OVERLAY_ALPHA = 0.45  # weight of the map over the thumbnail where a tile was scored


def heatmap_scale(result: SlideResult) -> float:
    """Level-0 px per heatmap px: one heatmap pixel per tile footprint."""
    return float(result.footprint)


def heatmap_shape(result: SlideResult) -> tuple[int, int]:
    """(height, width) of the heatmap grid that covers the whole slide."""
    s = heatmap_scale(result)
    w, h = result.slide_size
    return max(1, int(np.ceil(h / s))), max(1, int(np.ceil(w / s)))


def tile_cells(result: SlideResult, coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the heatmap pixel holding each tile's centre (of `coords`, default the result's)."""
    s = heatmap_scale(result)
    rows, cols = heatmap_shape(result)
    centre = np.asarray(result.coords if coords is None else coords, dtype=np.float64) + result.footprint / 2
    c = np.clip((centre[:, 0] // s).astype(np.int64), 0, cols - 1)
    r = np.clip((centre[:, 1] // s).astype(np.int64), 0, rows - 1)
    return r, c


def rasterise(result: SlideResult, values: np.ndarray, coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean of `values` ((N,) or (N, K)) over the tiles in each heatmap pixel, and the
    mask of pixels that hold a tile (overlapping tiles can share a pixel). `coords`: the tiles'
    level-0 corners, default the result's."""
    rows, cols = heatmap_shape(result)
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(values), -1)
    r, c = tile_cells(result, coords)
    idx = r * cols + c
    total = np.zeros((rows * cols, flat.shape[1]))
    np.add.at(total, idx, flat)
    count = np.bincount(idx, minlength=rows * cols).astype(np.float64)
    mask = count > 0
    total[mask] /= count[mask, None]
    return total.reshape(rows, cols, *values.shape[1:]), mask.reshape(rows, cols)


def save_png(img: np.ndarray, path: Path) -> Path:
    """Write a uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)  # 3x faster than default, ~same size
    return Path(path)


# per-tile model outputs besides class probabilities that get a map (tissue fraction and the like do not)
HEATMAP_EXTRAS = {"attention"}


def write_class_heatmaps(result: SlideResult, out_dir: Path) -> list[Path]:
    """heatmap-<class>.png: grey value = round(255 × mean probability), alpha 0 where no tile; and
    heatmap-<name>.png for each of HEATMAP_EXTRAS present (attention), min-max scaled."""
    if len(result) == 0:
        return []
    maps: dict[str, np.ndarray] = {}
    if result.probs is not None:
        maps.update({name: result.probs[:, k] for k, name in enumerate(result.class_names)})
    for name in HEATMAP_EXTRAS.intersection(result.extra):
        v = np.asarray(result.extra[name], dtype=np.float64)
        span = float(v.max() - v.min()) if len(v) else 0.0
        maps.setdefault(name, (v - v.min()) / span if span > 0 else np.zeros_like(v))
    paths = []
    for name, values in maps.items():
        grid, mask = rasterise(result, values)
        grey = np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)
        alpha = np.where(mask, 255, 0).astype(np.uint8)
        paths.append(save_png(np.dstack([grey, alpha]), Path(out_dir) / f"heatmap-{safe_name(name)}.png"))
    return paths


def safe_name(name: str) -> str:
    """A class name usable in a file name on every OS."""
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip())
    return keep or "class"


def class_colour_map(result: SlideResult) -> tuple[np.ndarray, np.ndarray]:
    """RGB map of the argmax class colour, and per-pixel opacity = its probability."""
    probs, mask = rasterise(result, result.probs)
    colours = np.asarray(result.class_colors, dtype=np.float64).reshape(-1, 3)
    top = probs.argmax(axis=-1)
    rgb = colours[top]
    weight = np.where(mask, probs.max(axis=-1), 0.0)
    return rgb, weight


def pca_rgb(embeddings: np.ndarray) -> np.ndarray:
    """First three principal components of the embeddings, each stretched to 0..255 between its
    1st and 99th percentile (the classic DINOv2 picture). Fewer than 3 tiles: mid grey."""
    n = len(embeddings)
    if n < 3:
        return np.full((n, 3), 128.0)
    from sklearn.decomposition import PCA

    k = min(3, embeddings.shape[1])
    pcs = PCA(n_components=k).fit_transform(np.asarray(embeddings, dtype=np.float64))
    lo, hi = np.percentile(pcs, 1, axis=0), np.percentile(pcs, 99, axis=0)
    scaled = np.clip((pcs - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255
    if k < 3:
        scaled = np.concatenate([scaled, np.full((n, 3 - k), 128.0)], axis=1)
    return scaled


def write_pca(result: SlideResult, out_dir: Path, colours: np.ndarray | None = None) -> Path | None:
    """pca.png on the heatmap grid, transparent where no tile. `colours`: pca_rgb, if computed."""
    if result.embeddings is None or len(result) == 0:
        return None
    rgb, mask = rasterise(result, pca_rgb(result.embeddings) if colours is None else colours)
    img = np.dstack([np.round(rgb).astype(np.uint8), np.where(mask, 255, 0).astype(np.uint8)])
    return save_png(img, Path(out_dir) / "pca.png")


def write_overlay(result: SlideResult, out_dir: Path, pca_colours: np.ndarray | None = None) -> Path | None:
    """overlay.png: the thumbnail with the class colours (or the PCA colours of a headless bundle)
    blended in where tiles were scored; confident tiles show stronger."""
    if result.thumbnail is None or len(result) == 0:
        return None
    if result.probs is not None:
        rgb, weight = class_colour_map(result)
    elif result.embeddings is not None:
        rgb, mask = rasterise(result, pca_rgb(result.embeddings) if pca_colours is None else pca_colours)
        weight = mask.astype(np.float64)
    else:
        return None
    return _blend(result, rgb, weight, Path(out_dir) / "overlay.png")


def write_qc_overlay(result: SlideResult, out_dir: Path) -> Path | None:
    """overlay-qc.png: the thumbnail with each artefact kind's colour where QC flagged tiles
    (kept or excluded); tiles that passed are left as they are."""
    if result.thumbnail is None or result.qc is None or not len(result.qc.classes):
        return None
    qc = result.qc
    palette = {k: np.asarray(c, np.float64) for k, c in qc.colors.items()}
    flagged = np.array([c in palette for c in qc.classes])
    colours = np.array([palette.get(c, np.zeros(3)) for c in qc.classes]).reshape(-1, 3)
    rgb, _ = rasterise(result, colours, qc.coords)
    weight, _ = rasterise(result, flagged.astype(np.float64), qc.coords)
    return _blend(result, rgb / np.maximum(weight, 1e-9)[..., None], weight, Path(out_dir) / "overlay-qc.png")


def _blend(result: SlideResult, rgb: np.ndarray, weight: np.ndarray, path: Path) -> Path:
    """The thumbnail with a heatmap-grid colour map blended in, OVERLAY_ALPHA × weight strong."""
    thumb = np.asarray(result.thumbnail, dtype=np.float32)[..., :3]
    th, tw = thumb.shape[:2]
    # Each thumbnail pixel looks up the heatmap pixel under its level-0 position (exact alignment).
    w0, h0 = result.slide_size
    s = heatmap_scale(result)
    cols = np.minimum(((np.arange(tw) + 0.5) * (w0 / tw) // s).astype(np.int64), rgb.shape[1] - 1)
    rows = np.minimum(((np.arange(th) + 0.5) * (h0 / th) // s).astype(np.int64), rgb.shape[0] - 1)
    a = (OVERLAY_ALPHA * weight.astype(np.float32))[np.ix_(rows, cols)][..., None]
    blended = thumb + (rgb.astype(np.float32)[np.ix_(rows, cols)] - thumb) * a
    return save_png(np.round(blended).astype(np.uint8), path)
