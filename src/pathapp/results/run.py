"""Write every output of one slide into its folder, each file atomically, and mark the folder
complete with `.done` last: a rerun trusts `.done` and nothing else. `.done` holds the settings
that decide the results (model fingerprint, µm/px, tile size, ROIs, ...), so a rerun can tell a
finished run of the same settings from one of other settings."""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from pathapp.atomic import atomic_path, atomic_write_text, mark_output_folder, writer_alive
from pathapp.results.embeddings import write_embeddings
from pathapp.results.geojson import class_regions, qc_summary, write_annotations_geojson, write_tiles_geojson
from pathapp.results.heatmap import (
    heatmap_scale,
    heatmap_shape,
    pca_rgb,
    raw_heatmaps,
    write_class_heatmaps,
    write_overlay,
    write_pca,
    write_qc_overlay,
    write_thumbnail,
)
from pathapp.results.pictures import pictures_in_threads
from pathapp.results.report import write_report
from pathapp.results.result import SlideResult
from pathapp.results.segmentation import write_label_image, write_segmentation_overlay

DONE = ".done"


# Files pathapp writes into a slide's folder whatever the model (heatmaps and the rest are listed in
# run.json): with the previous run.json's list, what --overwrite replaces and nothing else.
OWN_FILES = ("tiles.geojson", "annotations.geojson", "overlay.png", "overlay-segmentation.png", "labels.ome.tif",
             "pca.png", "embeddings.h5", "run.json")


def is_done(out_dir: str | Path) -> bool:
    """True when a previous run finished writing this slide's folder."""
    return (Path(out_dir) / DONE).is_file()


def read_done(out_dir: str | Path) -> dict | None:
    """The settings a finished run recorded in `.done`; None when the folder is not complete, {} for
    a `.done` that records none (a run of an earlier version, or an unreadable marker)."""
    try:
        text = (Path(out_dir) / DONE).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        settings = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}


def previous_files(out_dir: Path) -> set[str]:
    """Names of the files an earlier run wrote here: its run.json list, and the fixed names."""
    names = set(OWN_FILES)
    try:
        names.update(json.loads((out_dir / "run.json").read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        pass
    return {n for n in names if n and "/" not in n and n not in {"..", "."}}


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
    qc = qc_summary(result)
    if qc:
        counts.update({f"qc: {k}": n for k, n in qc["tiles"].items()})
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
        "qc": result.qc or None,
        "heatmap": {
            "scale": heatmap_scale(result),
            "width": cols,
            "height": rows,
            "encoding": "embeddings.h5 /heatmaps/<name>: float32 grid, NaN where no tile; cell (i, j) covers "
            "level-0 [j*scale, (j+1)*scale) x [i*scale, (i+1)*scale). heatmap-<name>.png are pictures of them",
        },
        **({"qc": qc} if qc else {}),
        "files": sorted(p.name for p in files),
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(result: SlideResult, out_dir: str | Path, object_type: str = "tile",
                  settings: dict | None = None) -> list[Path]:
    """Write tiles.geojson, annotations.geojson, heatmaps, thumbnail, overlay, overlay-qc.png (when QC
    ran), embeddings.h5, pca.png (headless), run.json, report.html, then `.done` recording `settings`,
    into `out_dir` (the slide's own folder). Returns the paths.

    Any earlier `.done` is removed first, so a run interrupted while overwriting is not mistaken
    for a finished one; an earlier run's files that this run does not write again (a pca.png of an
    embeddings-only run, another model's heatmaps) are removed once the new ones are in place."""
    out = mark_output_folder(out_dir)
    earlier = previous_files(out)
    (out / DONE).unlink(missing_ok=True)
    for stale in out.glob(".*.tmp*"):  # temporary files of a run that was killed while writing here
        if not writer_alive(stale):
            stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    regions = class_regions(result)
    with pictures_in_threads():
        files: list[Path] = [
            # a segmentation's overlapping tiles carry nothing per tile: its regions are the annotations
            *([] if result.segmentation is not None else [write_tiles_geojson(result, out / "tiles.geojson", object_type)]),
            write_annotations_geojson(result, out / "annotations.geojson", regions),
            *write_class_heatmaps(result, out),
        ]
        headless = result.probs is None and result.embeddings is not None and len(result) > 0
        pca = pca_rgb(result.embeddings) if headless else None
        files += [p for p in (write_thumbnail(result, out), write_overlay(result, out, pca),
                              write_qc_overlay(result, out), write_segmentation_overlay(result, out),
                              write_label_image(result, out),
                              write_embeddings(result, out / "embeddings.h5", raw_heatmaps(result))) if p]
        if headless:
            files += [p for p in [write_pca(result, out, pca)] if p]
    result.timings["write"] = time.perf_counter() - t0
    with atomic_path(out / "run.json") as tmp:
        record = run_record(result, files + [out / "run.json", out / "report.html"])
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False, default=str))
    files.append(out / "run.json")
    files.append(write_report(result, out, files, regions, record))
    for stale in earlier - {p.name for p in files}:
        (out / stale).unlink(missing_ok=True)
    atomic_write_text(out / DONE, json.dumps(settings or {}, sort_keys=True, allow_nan=False))
    return files
