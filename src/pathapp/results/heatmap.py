"""Pictures of a SlideResult, at the thumbnail's resolution: per-class heatmaps (and attention), an
overlay of the predicted classes, and the classic DINOv2 PCA picture for a headless bundle.

The per-tile values are first put on the heatmap grid, one cell per tile footprint: cell (i, j)
covers level-0 [j*scale, (j+1)*scale) × [i*scale, (i+1)*scale) with scale = the footprint; run.json
records it. Those raw grids go to embeddings.h5 for programs (`raw_heatmaps`); the pictures look
each thumbnail pixel up in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathapp.results.pictures import ColourBar, blend, colourise, muted, save_figure
from pathapp.results.result import SlideResult

OVERLAY_ALPHA = 0.45  # weight of the class colours over the thumbnail where a tile was scored
HEATMAP_ALPHA = 0.8  # weight of the colour map over the greyed slide
PROB_LABEL = "prob: "  # as the QuPath measurement (results.geojson.PROB_PREFIX)


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


# per-tile model outputs besides class probabilities that get a map (tissue fraction and the like do not)
HEATMAP_EXTRAS = {"attention"}


def safe_name(name: str) -> str:
    """A class name usable in a file name on every OS."""
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip())
    return keep or "class"


def heatmap_values(result: SlideResult) -> dict[str, tuple[np.ndarray, ColourBar]]:
    """Per map name, the per-tile values and how to colour them: each class's probability on a fixed
    0..1 scale, and each of HEATMAP_EXTRAS present (attention) between its own min and max."""
    if len(result) == 0:
        return {}
    maps: dict[str, tuple[np.ndarray, ColourBar]] = {}
    if result.probs is not None:
        for k, name in enumerate(result.class_names):
            maps[name] = (result.probs[:, k], ColourBar(f"{PROB_LABEL}{name}", 0.0, 1.0, "viridis"))
    for name in sorted(HEATMAP_EXTRAS.intersection(result.extra)):
        v = np.asarray(result.extra[name], dtype=np.float64)
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        maps.setdefault(name, (v, ColourBar(name, lo, hi, "inferno")))
    return maps


def raw_heatmaps(result: SlideResult) -> dict[str, np.ndarray]:
    """The maps for programs: float32 (rows, cols) on the heatmap grid, NaN where no tile."""
    out = {}
    for name, (values, _) in heatmap_values(result).items():
        grid, mask = rasterise(result, values)
        out[name] = np.where(mask, grid, np.nan).astype(np.float32)
    return out


def thumbnail_um_per_px(result: SlideResult) -> float:
    """µm per thumbnail pixel (the thumbnail spans the whole slide)."""
    return float(result.slide_size[0] / result.thumbnail.shape[1] * result.slide_mpp)


def on_thumbnail(result: SlideResult, grid: np.ndarray) -> np.ndarray:
    """A heatmap-grid array looked up at every thumbnail pixel: each pixel takes the heatmap pixel
    under its level-0 centre (exact alignment, nothing interpolated). Two `take`s, columns then rows:
    a tenth of the time of one 2-D fancy index, which copies each pixel's cell on its own."""
    th, tw = result.thumbnail.shape[:2]
    w0, h0 = result.slide_size
    s = heatmap_scale(result)
    cols = np.minimum(((np.arange(tw) + 0.5) * (w0 / tw) // s).astype(np.int64), grid.shape[1] - 1)
    rows = np.minimum(((np.arange(th) + 0.5) * (h0 / th) // s).astype(np.int64), grid.shape[0] - 1)
    return grid.take(cols, axis=1).take(rows, axis=0)


def _paint(result: SlideResult, base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`base` (thumbnail-sized) with the heatmap-grid `colour` blended in, `alpha` (a grid too) strong.
    The grids go to float32, blend's type, while still one value per cell, not per pixel."""
    return blend(base, on_thumbnail(result, np.asarray(colour, np.float32)),
                 on_thumbnail(result, np.asarray(alpha, np.float32)))


def _figure(result: SlideResult, image: np.ndarray, path: Path, title: str, **kwargs) -> Path:
    note = f"{result.slide_name} · {result.model_name} · {result.mpp:g} µm/px · {len(result)} tiles"
    return save_figure(path, image, um_per_px=thumbnail_um_per_px(result),
                       scale=result.slide_size[0] / result.thumbnail.shape[1], title=title, note=note, **kwargs)


def write_class_heatmaps(result: SlideResult, out_dir: Path) -> list[Path]:
    """heatmap-<name>.png per class probability (and attention): the map at the thumbnail's
    resolution over the greyed slide, perceptual colour map, colour bar, scale bar."""
    if result.thumbnail is None:
        return []
    paths = []
    base = muted(result.thumbnail)
    for name, (values, bar) in heatmap_values(result).items():
        grid, mask = rasterise(result, values)
        img = _paint(result, base, colourise(grid, bar), np.where(mask & np.isfinite(grid), HEATMAP_ALPHA, 0.0))
        paths.append(_figure(result, img, Path(out_dir) / f"heatmap-{safe_name(name)}.png", bar.label, bar=bar))
    return paths


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
    k = min(3, embeddings.shape[1])
    pcs = principal_components(np.asarray(embeddings, dtype=np.float64), k)
    lo, hi = np.percentile(pcs, 1, axis=0), np.percentile(pcs, 99, axis=0)
    scaled = np.clip((pcs - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255
    if k < 3:
        scaled = np.concatenate([scaled, np.full((n, 3 - k), 128.0)], axis=1)
    return scaled


def principal_components(x: np.ndarray, k: int) -> np.ndarray:
    """(N, k) scores of x on its first k principal components, each signed so that its largest
    loading is positive (sklearn's PCA convention). From the D×D covariance, so memory stays at one
    copy of x however many tiles (importing sklearn for this alone cost inference 108 MB)."""
    centred = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, np.argsort(values)[::-1][:k]]
    top *= np.sign(top[np.abs(top).argmax(axis=0), np.arange(k)])
    return centred @ top


def write_pca(result: SlideResult, out_dir: Path, colours: np.ndarray | None = None) -> Path | None:
    """pca.png: the first three principal components of the embeddings as RGB at the thumbnail's
    resolution, over the greyed slide. `colours`: pca_rgb, if computed."""
    if result.embeddings is None or len(result) == 0 or result.thumbnail is None:
        return None
    rgb, mask = rasterise(result, pca_rgb(result.embeddings) if colours is None else colours)
    img = _paint(result, muted(result.thumbnail), rgb, mask)
    return _figure(result, img, Path(out_dir) / "pca.png", "embeddings: first 3 principal components as RGB")


def write_thumbnail(result: SlideResult, out_dir: Path) -> Path | None:
    """thumbnail.png: the slide as inference saw it, with a scale bar."""
    if result.thumbnail is None:
        return None
    return _figure(result, np.asarray(result.thumbnail)[..., :3], Path(out_dir) / "thumbnail.png", result.slide_name)


def write_overlay(result: SlideResult, out_dir: Path, pca_colours: np.ndarray | None = None) -> Path | None:
    """overlay.png: the thumbnail with the class colours (or the PCA colours of a headless bundle)
    blended in where tiles were scored, confident tiles stronger; a class legend and a scale bar.
    Without tiles it is the framed thumbnail, so that an empty result can be looked at to see why."""
    if result.thumbnail is None:
        return None
    if len(result) == 0:
        return _figure(result, np.asarray(result.thumbnail)[..., :3], Path(out_dir) / "overlay.png", result.slide_name)
    legend = None
    if result.probs is not None:
        rgb, weight = class_colour_map(result)
        legend = [(n, tuple(c)) for n, c in zip(result.class_names, result.class_colors)]
    elif result.embeddings is not None:
        rgb, mask = rasterise(result, pca_rgb(result.embeddings) if pca_colours is None else pca_colours)
        weight = mask.astype(np.float64)
    else:
        return None
    title = "predicted class (opacity = probability)" if legend else "embeddings: PCA colours"
    return _blend(result, rgb, weight, Path(out_dir) / "overlay.png", title, legend)


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
    return _blend(result, rgb / np.maximum(weight, 1e-9)[..., None], weight, Path(out_dir) / "overlay-qc.png",
                  "quality control: tiles flagged", [(k, tuple(int(v) for v in c)) for k, c in qc.colors.items()])


def _blend(result: SlideResult, rgb: np.ndarray, weight: np.ndarray, path: Path, title: str,
           legend: list[tuple[str, tuple[int, int, int]]] | None = None) -> Path:
    """The thumbnail with a heatmap-grid colour map blended in, OVERLAY_ALPHA × weight strong."""
    thumb = np.asarray(result.thumbnail, dtype=np.float32)[..., :3]
    img = _paint(result, thumb, rgb, OVERLAY_ALPHA * weight)
    return _figure(result, img, path, title, legend=legend)
