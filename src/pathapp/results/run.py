"""Write every output of one slide into its folder, each file atomically, and mark the folder
complete with `.done` last: a rerun trusts `.done` and nothing else."""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from pathapp.atomic import atomic_path, writer_alive
from pathapp.results.embeddings import write_embeddings
from pathapp.results.geojson import write_annotations_geojson, write_tiles_geojson
from pathapp.results.heatmap import (
    heatmap_scale,
    heatmap_shape,
    pca_rgb,
    write_class_heatmaps,
    write_overlay,
    write_pca,
)
from pathapp.results.result import SlideResult

DONE = ".done"


def is_done(out_dir: str | Path) -> bool:
    """True when a previous run finished writing this slide's folder."""
    return (Path(out_dir) / DONE).is_file()


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers (read from metadata: no torch import)."""
    out: dict[str, str | None] = {}
    for pkg in ("pathapp", "torch", "timm", "numpy", "shapely", "openslide-python", "wsidicom"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_record(result: SlideResult, files: list[Path]) -> dict:
    """The run.json content: what ran, on what, with which settings, how long, how many."""
    counts: dict[str, int] = {"tiles": len(result)}
    if result.probs is not None and len(result):
        labels = np.argmax(result.probs, axis=1)
        counts.update({f"class: {c}": int(np.count_nonzero(labels == k)) for k, c in enumerate(result.class_names)})
    rows, cols = heatmap_shape(result)
    return {
        "slide": result.slide_name,
        "slide_path": result.slide_path,
        "slide_size": list(result.slide_size),
        "slide_mpp": result.slide_mpp,
        "model": result.model_name,
        "classes": [{"name": n, "color": list(c)} for n, c in zip(result.class_names, result.class_colors)],
        "mpp": result.mpp,
        "tile_size": result.tile_size,
        "footprint": result.footprint,
        "parameters": result.params,
        "counts": counts,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "heatmap": {
            "scale": heatmap_scale(result),
            "width": cols,
            "height": rows,
            "encoding": "heatmap-<class>.png: grey = round(255*prob), alpha 0 where no tile; "
            "pixel (i, j) covers level-0 [i*scale, (i+1)*scale) x [j*scale, (j+1)*scale)",
        },
        "files": sorted(p.name for p in files),
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(result: SlideResult, out_dir: str | Path, object_type: str = "tile") -> list[Path]:
    """Write tiles.geojson, annotations.geojson, heatmaps, overlay, embeddings.h5, pca.png
    (headless), run.json, then `.done`, into `out_dir` (the slide's own folder). Returns the paths.

    Any earlier `.done` is removed first, so a run interrupted while overwriting is not mistaken
    for a finished one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).unlink(missing_ok=True)
    for stale in out.glob(".*.tmp*"):  # temporary files of a run that was killed while writing here
        if not writer_alive(stale):
            stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    files: list[Path] = [
        write_tiles_geojson(result, out / "tiles.geojson", object_type),
        write_annotations_geojson(result, out / "annotations.geojson"),
        *write_class_heatmaps(result, out),
    ]
    headless = result.probs is None and result.embeddings is not None and len(result) > 0
    pca = pca_rgb(result.embeddings) if headless else None
    files += [p for p in (write_overlay(result, out, pca), write_embeddings(result, out / "embeddings.h5")) if p]
    if headless:
        files += [p for p in [write_pca(result, out, pca)] if p]
    result.timings["write"] = time.perf_counter() - t0
    with atomic_path(out / "run.json") as tmp:
        record = run_record(result, files + [out / "run.json"])
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False, default=str))
    files.append(out / "run.json")
    with atomic_path(out / DONE) as tmp:
        tmp.write_text("")
    return files
