"""Files of an explanation, into the slide's folder (each written atomically):

- `explain-<method>.png`: a mosaic, one row per explained tile: the tile, its saliency map, the overlay;
- `saliency-<method>.png`: the maps on the slide, aligned with the thumbnail (colour bar, scale bar);
- `saliency-<method>.geojson`: one QuPath detection per patch token with a `saliency` measurement,
  for a measurement map in QuPath;
- `explain.npz`: the raw maps (method -> tiles × rows × cols), tile coordinates and classes;
- `explain.json`: what was explained, how, how long, and the faithfulness scores when measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pathapp.atomic import atomic_path
from pathapp.explain.api import SlideExplanation
from pathapp.qupath.geojson import tile_objects, write_objects
from pathapp.results.heatmap import thumbnail_um_per_px
from pathapp.results.pictures import ColourBar, blend, colourise, muted, save_figure

LABELS = {"vitcx": "ViT-CX saliency", "rollout": "attention rollout", "attention": "last-layer CLS attention"}
CMAP = "inferno"
MOSAIC_ROWS = 24  # tiles shown in one mosaic (all are in the npz, GeoJSON and slide map)
MOSAIC_PX = 224  # side of each mosaic panel
DPI = 100  # of the mosaic figure


def per_tile(maps: np.ndarray) -> np.ndarray:
    """Each tile's map scaled to 0..1 between its own min and max. Pictures show these: ViT-CX's level
    differs from tile to tile (it is divided by the number of masks), its pattern inside a tile is the
    explanation; the raw values stay in explain.npz and the GeoJSON's `saliency`."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    lo, hi = flat.min(axis=1, initial=0.0)[:, None], flat.max(axis=1, initial=0.0)[:, None]
    return ((flat - lo) / np.where(hi > lo, hi - lo, 1.0)).reshape(maps.shape)


def _bar(method: str) -> ColourBar:
    return ColourBar(f"{LABELS[method]} (each tile: min → max)", 0.0, 1.0, CMAP)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """A patch-grid map at `size` px, bilinear (for looking at, not for measuring)."""
    from PIL import Image

    return np.asarray(Image.fromarray(grid.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def patch_boxes(e: SlideExplanation) -> np.ndarray:
    """(n × rows × cols, 4) level-0 boxes of every patch token of every explained tile, tile-major."""
    rows, cols = e.grid
    step_y, step_x = e.result.footprint / rows, e.result.footprint / cols
    xy = e.result.coords[e.tiles].astype(np.float64)
    jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
    x0 = xy[:, None, 0] + (jj.ravel() * step_x)[None]
    y0 = xy[:, None, 1] + (ii.ravel() * step_y)[None]
    return np.stack([x0, y0, x0 + step_x, y0 + step_y], axis=-1).reshape(-1, 4)


def write_detections(e: SlideExplanation, method: str, path: Path) -> Path:
    """QuPath detections at patch resolution, classed by the explained class, with `saliency`,
    `saliency (0-1)` (scaled per tile, see per_tile), the tile's rank and score."""
    maps = e.saliency[method]
    n_patch = maps.shape[1] * maps.shape[2]
    names = e.class_names
    classes = [names[t] for t in np.repeat(e.targets, n_patch)] if names else None
    measurements = {"saliency": maps.reshape(-1).astype(np.float64), "saliency (0-1)": per_tile(maps).reshape(-1),
                    "tile rank": np.repeat(np.arange(1, len(e.tiles) + 1), n_patch).astype(np.float64),
                    f"tile {e.score_name}": np.repeat(e.scores, n_patch)}
    colours = dict(zip(names, map(tuple, e.class_colors)))
    write_objects(path, tile_objects(patch_boxes(e), object_type="detection", measurements=measurements,
                                     class_names=classes, colors=colours))
    return path


def slide_map(e: SlideExplanation, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The maps at the thumbnail's resolution: values (H, W) and where a tile was explained."""
    r = e.result
    th, tw = r.thumbnail.shape[:2]
    sx, sy = r.slide_size[0] / tw, r.slide_size[1] / th
    values = np.zeros((th, tw), np.float64)
    shown = np.zeros((th, tw), bool)
    maps = per_tile(e.saliency[method])
    rows, cols = maps.shape[1:]
    for k, (x, y) in enumerate(r.coords[e.tiles]):
        c0, c1 = int(np.floor(x / sx)), int(np.ceil((x + r.footprint) / sx))
        r0, r1 = int(np.floor(y / sy)), int(np.ceil((y + r.footprint) / sy))
        px = (np.arange(c0, min(c1, tw)) + 0.5) * sx - x  # level-0 offset of each pixel centre in the tile
        py = (np.arange(r0, min(r1, th)) + 0.5) * sy - y
        ok_x, ok_y = (px >= 0) & (px < r.footprint), (py >= 0) & (py < r.footprint)
        jx = (px[ok_x] / r.footprint * cols).astype(int)
        iy = (py[ok_y] / r.footprint * rows).astype(int)
        xs, ys = np.arange(c0, min(c1, tw))[ok_x], np.arange(r0, min(r1, th))[ok_y]
        values[np.ix_(ys, xs)] = maps[k][np.ix_(iy, jx)]
        shown[np.ix_(ys, xs)] = True
    return values, shown


def write_slide_map(e: SlideExplanation, method: str, path: Path) -> Path:
    """saliency-<method>.png: each explained tile's map over the greyed slide, at thumbnail resolution."""
    r = e.result
    bar = _bar(method)
    values, shown = slide_map(e, method)
    img = blend(muted(r.thumbnail), colourise(values, bar), np.where(shown, 0.85, 0.0))
    note = f"{r.slide_name} · {r.model_name} · {len(e.tiles)} tiles · {e.grid[0]}×{e.grid[1]} patches per tile"
    return save_figure(path, img, um_per_px=thumbnail_um_per_px(r), scale=r.slide_size[0] / r.thumbnail.shape[1],
                       title=f"{LABELS[method]}, top tiles by {e.score_name}", note=note, bar=bar)


def write_mosaic(e: SlideExplanation, method: str, path: Path) -> Path:
    """explain-<method>.png: per tile (up to MOSAIC_ROWS), the tile, its map and the overlay."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from PIL import Image

    maps = per_tile(e.saliency[method])
    bar = _bar(method)
    n = max(1, min(len(e.tiles), MOSAIC_ROWS))
    side = MOSAIC_PX
    fig = plt.figure(figsize=((3 * side + 150) / DPI, (n * (side + 30) + 60) / DPI), dpi=DPI, facecolor="white")
    names = e.class_names
    um = e.result.footprint * e.result.slide_mpp
    fig.suptitle(f"{LABELS[method]} — {e.result.slide_name}\n{e.grid[0]}×{e.grid[1]} patch tokens per tile, "
                 f"{um:.0f} µm wide", fontsize=11, y=1 - 6 / (n * (side + 30) + 60), va="top")
    try:
        for k in range(min(len(e.tiles), MOSAIC_ROWS)):
            tile = np.asarray(Image.fromarray(e.images[k]).resize((side, side), Image.BILINEAR))
            colour = colourise(_upsample(maps[k], side), bar)
            panels = [tile, colour, blend(tile, colour, 0.5)]
            x, y = e.result.coords[e.tiles[k]]
            label = names[e.targets[k]] if names else f"class {e.targets[k]}"
            for j, img in enumerate(panels):
                ax = fig.add_axes((j * side / (3 * side + 150), 1 - (k + 1) * (side + 30) / (n * (side + 30) + 60)
                                   - 40 / (n * (side + 30) + 60), side / (3 * side + 150),
                                   side / (n * (side + 30) + 60)))
                ax.imshow(img, interpolation="none")
                ax.set_axis_off()
                if j == 0:
                    ax.set_title(f"#{k + 1} {label}: {e.score_name} {e.scores[k]:.3f} at ({x}, {y})", fontsize=9,
                                 loc="left")
        cax = fig.add_axes(((3 * side + 40) / (3 * side + 150), 0.3, 20 / (3 * side + 150), 0.4))
        fig.colorbar(ScalarMappable(Normalize(bar.vmin, bar.vmax), bar.cmap), cax=cax).set_label("each tile: min → max")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _record(e: SlideExplanation, files: list[Path]) -> dict:
    r = e.result
    names = e.class_names
    tiles = []
    for k, i in enumerate(e.tiles):
        row = {"rank": k + 1, "x": int(r.coords[i, 0]), "y": int(r.coords[i, 1]),
               "class": names[e.targets[k]] if names else int(e.targets[k]), e.score_name: float(e.scores[k])}
        if e.faithfulness is not None:
            row["faithfulness"] = e.faithfulness[k]
        tiles.append(row)
    summary = None
    if e.faithfulness:
        summary = {m: {key: float(np.mean([f[m][key] for f in e.faithfulness]))
                       for key in ("deletion_auc", "insertion_auc")} for m in e.faithfulness[0]}
    return {"slide": r.slide_name, "slide_path": r.slide_path, "model": r.model_name, "mpp": r.mpp,
            "tile_size": r.tile_size, "footprint": r.footprint, "patch_grid": list(e.grid),
            "ranked_by": e.score_name, "parameters": e.params, "tiles": tiles,
            "faithfulness_mean": summary,
            "faithfulness_protocol": None if summary is None else (
                "deletion: patches -> mean colour, most salient first (lower is better); insertion: from a "
                "blurred tile, most salient first (higher is better); random: mean of 4 random orders; "
                "areas under the class-probability curve over the fraction of patches changed"),
            "timings": {k: round(v, 3) for k, v in e.timings.items()}, "files": sorted(p.name for p in files)}


def write_explanation(e: SlideExplanation, out_dir: Path) -> list[Path]:
    """Every file of one slide's explanation; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for method in e.saliency:
        files.append(write_detections(e, method, out / f"saliency-{method}.geojson"))
        if len(e.tiles):
            files.append(write_mosaic(e, method, out / f"explain-{method}.png"))
            if e.result.thumbnail is not None:
                files.append(write_slide_map(e, method, out / f"saliency-{method}.png"))
    with atomic_path(out / "explain.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, coords=e.result.coords[e.tiles], footprint=e.result.footprint,
                            targets=e.targets, scores=e.scores, **{f"saliency_{m}": v for m, v in e.saliency.items()})
    files.append(out / "explain.npz")
    files.append(out / "explain.json")
    with atomic_path(out / "explain.json") as tmp:
        tmp.write_text(json.dumps(_record(e, files), indent=2, allow_nan=False))
    return files
