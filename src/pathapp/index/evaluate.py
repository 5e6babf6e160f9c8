"""`pathapp evaluate-search`: how well does search find tissue of the same class?

Protocol (leave one case out): every labelled image is indexed through `pathapp index add` (the
images run through `pathapp infer` as small slides). Each image, and each of its tiles, is then a
query ranked by `search.rank` (the code `pathapp search` runs) against the whole index with the
query's own case excluded, so no hit can come from the same patient. Per query, from the labels of
its hits: top-1 accuracy (first hit has the query's label), majority vote at 5 (mMV@5: the most
frequent label among the first 5, ties to the better-ranked, as Yottixel, RetCCL and SISH report) and
average precision at 10 (AP@10: the mean of precision@i over the ranks i ≤ 10 that hold the query's
label; 0 when none do). Each metric is the mean over queries with a 95 % percentile-bootstrap
interval that resamples cases. The same protocol runs in the same call on a 512-bin colour
histogram of the same tiles (the floor any model must beat), with paired model − colour
differences, and the top-1 a random ranking would get (the label mix of the other cases)."""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.atomic import atomic_path, atomic_write_text
from pathapp.index.base import (
    CASE_COLUMNS,
    IndexModel,
    IndexStoreError,
    SlideEntry,
    open_index,
)
from pathapp.index.search import rank
from pathapp.index.sources import add_sources, read_csv, slide_key

if TYPE_CHECKING:
    from pathapp.infer.options import InferOptions

K = 10
METRICS = ("top1", "mMV@5", "mAP@10")
HIST_BINS = 8  # per RGB channel: 512 joint bins


@dataclass
class LabelledImages:
    """The images of a labels.csv with their label and case."""

    paths: list[Path]
    labels: list[str]
    cases: list[str]
    case_column: str


def read_labelled(path: Path, group_by: str | None = None) -> LabelledImages:
    """labels.csv: image (relative to the CSV), label, and a case column (group_by, or the first of
    case, case_prefix, patient, patient_id; else each image is its own case)."""
    rows, header = read_csv(path)
    if "image" not in header or "label" not in header:
        raise IndexStoreError(f"{path}: needs columns image,label[,case_prefix|patient] (found {', '.join(header)})")
    column = group_by or next((c for c in CASE_COLUMNS if c in header), None)
    if column is not None and column not in header:
        raise IndexStoreError(f"{path}: --group-by column {column!r} not found (has {', '.join(header)})")
    from pathapp.train.labels import listed_images

    paths = listed_images(path, [r["image"] for r in rows])
    if len({r["label"] for r in rows}) < 2:
        raise IndexStoreError(f"{path}: fewer than two labels; retrieval accuracy needs at least two")
    cases = [r[column] if column else str(p) for r, p in zip(rows, paths)]
    return LabelledImages(paths, [r["label"] for r in rows], cases, column or "image")


def query_scores(hit_labels: Sequence[str], label: str) -> dict[str, float]:
    """top1, mMV@5 and mAP@10 of one query from its hits' labels, best first."""
    rel = [h == label for h in hit_labels[:K]]
    votes = Counter(hit_labels[:5])
    most = max(votes.values()) if votes else 0
    winner = next((h for h in hit_labels[:5] if votes[h] == most), None)  # ties go to the better-ranked label
    hits_so_far, precisions = 0, []
    for i, r in enumerate(rel):
        if r:
            hits_so_far += 1
            precisions.append(hits_so_far / (i + 1))
    return {"top1": float(bool(rel) and rel[0]), "mMV@5": float(winner == label),
            "mAP@10": float(np.mean(precisions)) if precisions else 0.0}


def bootstrap(scores: np.ndarray, cases: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means of `scores` over queries, each over a resample of whole cases."""
    uniq, inv = np.unique(cases, return_inverse=True)
    sums = np.bincount(inv, weights=scores, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(uniq), (n_boot, len(uniq)))
    return sums[pick].sum(1) / counts[pick].sum(1)


def interval(samples: np.ndarray) -> list[float]:
    return [float(np.quantile(samples, 0.025)), float(np.quantile(samples, 0.975))]


def colour_histogram(tiles: np.ndarray) -> np.ndarray:
    """(N, 512) joint RGB histograms (8 levels per channel) of uint8 tiles (N, H, W, 3), as frequencies."""
    q = (np.asarray(tiles, np.uint8) // (256 // HIST_BINS)).astype(np.int64)
    codes = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    out = np.stack([np.bincount(c.ravel(), minlength=HIST_BINS**3) for c in codes]).astype(np.float32)
    return out / out.sum(1, keepdims=True)


def colour_entries(index: Any, slide_mpp: float | None) -> list[SlideEntry]:
    """The index's slides again, each tile described by the colour histogram of exactly the pixels
    the model saw (the same grid cells, read by the one tile reader)."""
    from pathapp.slide import open_slide
    from pathapp.tiles import read_tile_at, tile_geometry

    model = index.require_model()
    entries = []
    for key, rec in index.slides().items():
        tiles = index.tiles(key)
        with open_slide(rec.slide_path, slide_mpp=rec.slide_mpp or slide_mpp) as slide:
            geometry = tile_geometry(slide, model.mpp, model.tile_size)
            pixels = np.stack([read_tile_at(slide, geometry, x, y) for x, y in tiles.coords.tolist()])
        entries.append(SlideEntry(rec, colour_histogram(pixels), tiles.coords))
    return entries


def _queries(index: Any, level: str, k: int) -> tuple[list[float], list[str], dict[str, list[float]]]:
    """Run every query of `level` through `rank`, own case excluded: per-query scores and cases."""
    records = index.slides()
    by_case: dict[str, set[str]] = {}
    for key, r in records.items():
        by_case.setdefault(r.case, set()).add(key)
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    cases, chance = [], []
    label_of = {key: r.label for key, r in records.items()}
    counts = Counter(r.label for r in records.values() for _ in range(r.n_tiles if level == "tile" else 1))
    case_counts = {c: Counter(label_of[key] for key in keys for _ in range(records[key].n_tiles if level == "tile" else 1))
                   for c, keys in by_case.items()}
    for key, r in records.items():
        exclude = by_case[r.case]
        vectors = index.tiles(key, vectors=True).vectors
        if level == "tile":
            queries = [(v[None], None) for v in vectors]
        else:
            queries = [(vectors, SlideEntry(r, vectors, np.zeros((len(vectors), 2))).slide_vector())]
        others = counts - case_counts[r.case]
        for q, sv in queries:
            hits = rank(index, q, level, k, exclude, slide_vector=sv)
            s = query_scores([h.record.label for h in hits], r.label)
            for m in METRICS:
                scores[m].append(s[m])
            cases.append(r.case)
            chance.append(others[r.label] / max(1, sum(others.values())))
    return chance, cases, scores


def evaluate_index(index: Any, n_boot: int, seed: int) -> dict[str, Any]:
    """Scores and bootstrap samples per level (tile, slide) for one index."""
    out: dict[str, Any] = {}
    for level in ("tile", "slide"):
        chance, cases, scores = _queries(index, level, K)
        arr_cases = np.asarray(cases)
        out[level] = {"queries": len(cases), "cases": len(np.unique(arr_cases)),
                      "chance_top1": float(np.mean(chance)), "_cases": arr_cases}
        for m in METRICS:
            v = np.asarray(scores[m])
            out[level][m] = {"value": float(v.mean()), "_scores": v}
    return out


def evaluate_search(
    data: Path,
    infer: InferOptions,
    out: Path,
    *,
    group_by: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Index `data` with `infer.model` (results and index under `out`, reused by a rerun), evaluate
    leave-one-case-out retrieval for the model and the colour histogram, write report.json,
    report.md and evaluation.png into `out`. Returns the report."""
    images = read_labelled(Path(data), group_by)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "meta.csv"
    with atomic_path(meta) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["slide", "case", "label"])
        w.writerows([str(p.resolve()), c, lab] for p, c, lab in zip(images.paths, images.cases, images.labels))
    slide_mpp = infer.slide_mpp
    # one inference output folder per image folder: image names repeat across folders (EBHI-Seg does)
    folders: dict[Path, list[str]] = {}
    for p in images.paths:
        folders.setdefault(p.parent, []).append(str(p))
    failed = []
    for folder, files in folders.items():
        where, base = folder.resolve(), Path(data).parent.resolve()
        rel = where.relative_to(base) if where.is_relative_to(base) else Path(*where.parts[1:])
        summary = add_sources(out / "index", files, infer=replace(infer, out=out / "results" / rel), meta=meta,
                              kind="flat", echo=echo)
        failed += summary.failed
    if failed:
        raise IndexStoreError(f"{failed[0][0]}: {failed[0][1]} ({len(failed)} images failed); fix them or leave "
                              f"them out of {data}")
    with open_index(out / "index") as index:
        expected = {slide_key(p) for p in images.paths}
        stale = sorted(set(index.slides()) - expected)
        if stale:
            index.remove(stale)  # images dropped from the CSV since an earlier run
        echo(f"evaluate-search: {len(index.slides())} images, {len(np.unique(images.cases))} cases; model queries")
        model_scores = evaluate_index(index, n_boot, seed)
        example_mosaics(index, out / "examples", slide_mpp)
        im = index.require_model()
        colour_entries_ = colour_entries(index, slide_mpp)
    with tempfile.TemporaryDirectory() as tmp, open_index(Path(tmp) / "colour", create=True, kind="flat") as cindex:
        cindex.add(colour_entries_, IndexModel("colour histogram (512 bins)", "colour-histogram-512", HIST_BINS**3,
                                               im.mpp, im.tile_size))
        echo("evaluate-search: colour-histogram queries")
        colour_scores = evaluate_index(cindex, n_boot, seed)
    report = _report(images, data, infer.model, im, model_scores, colour_scores, n_boot, seed)
    _write_report(out, report)
    return report


def example_mosaics(index: Any, folder: Path, slide_mpp: float | None) -> list[Path]:
    """For the first image of each label, the mosaic `pathapp search --level slide --exclude-case`
    writes: what the numbers look like."""
    from pathapp.index.query import QuerySpec, QueryTiles
    from pathapp.index.search import write_search_mosaic
    from pathapp.slide import open_slide

    records = index.slides()
    firsts = {}
    for key in sorted(records):
        firsts.setdefault(records[key].label, key)
    files = []
    for label, key in sorted(firsts.items()):
        rec = records[key]
        tiles = index.tiles(key, vectors=True)
        with open_slide(rec.slide_path, slide_mpp=rec.slide_mpp or slide_mpp) as slide:
            query = QueryTiles(QuerySpec(Path(rec.slide_path)), SlideEntry(rec, tiles.vectors, tiles.coords),
                               slide.thumbnail(384), tuple(slide.size))
        exclude = {k for k, r in records.items() if r.case == rec.case}
        hits = rank(index, tiles.vectors, "slide", K, exclude, slide_vector=query.entry.slide_vector())
        folder.mkdir(parents=True, exist_ok=True)
        files.append(write_search_mosaic(folder / f"{label}.png", query.spec, query, hits, "slide"))
    return files


def _report(images: LabelledImages, data: Path, model: Any, im: IndexModel, ms: dict, cs: dict,
            n_boot: int, seed: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "data": str(data), "model": str(model), "model_name": im.name, "mpp": im.mpp, "tile_size": im.tile_size,
        "case_column": images.case_column, "images": len(images.paths), "classes": dict(Counter(images.labels)),
        "protocol": "leave one case out: each image (slide level) and each of its tiles (tile level) queries the "
                    "whole index with every image of its own case excluded; top-1, majority vote at 5, AP@10 "
                    "per query, mean over queries, 95% percentile bootstrap over cases "
                    f"({n_boot} resamples, seed {seed}); colour histogram: 512 joint RGB bins of the same tiles",
        "levels": {}}
    for level in ("tile", "slide"):
        m, c = ms[level], cs[level]
        rows: dict[str, Any] = {"queries": m["queries"], "cases": m["cases"], "chance_top1": m["chance_top1"]}
        for metric in METRICS:
            a = bootstrap(m[metric]["_scores"], m["_cases"], n_boot, seed)
            b = bootstrap(c[metric]["_scores"], c["_cases"], n_boot, seed)
            d = bootstrap(m[metric]["_scores"] - c[metric]["_scores"], m["_cases"], n_boot, seed)
            rows[metric] = {"model": [m[metric]["value"], *interval(a)], "colour": [c[metric]["value"], *interval(b)],
                            "model_minus_colour": [m[metric]["value"] - c[metric]["value"], *interval(d)]}
        doc["levels"][level] = rows
    return doc


def _write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", "\n".join(report_table(report)) + "\n")
    _plot(out / "evaluation.png", report)


def report_table(report: dict[str, Any]) -> list[str]:
    """The report as a Markdown table: value [95 % CI] per level, metric and method."""
    lines = [(f"{report['images']} images, {report['model_name']} ({report['tile_size']} px at {report['mpp']:g} "
              f"µm/px); {report['protocol']}"), "",
             "| level | metric | model | colour histogram | model − colour |", "|---|---|---|---|---|"]
    for level, rows in report["levels"].items():
        for metric in METRICS:
            r = rows[metric]
            lines.append(f"| {level} ({rows['queries']} queries, {rows['cases']} cases) | {metric} | {_ci(r['model'])} | "
                         f"{_ci(r['colour'])} | {_ci(r['model_minus_colour'], signed=True)} |")
        lines.append(f"| {level} | top-1 of a random ranking | {rows['chance_top1']:.3f} | | |")
    return lines


def _ci(v: Sequence[float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def _plot(path: Path, report: dict[str, Any]) -> None:
    """Bars with 95 % intervals: model and colour histogram, per level and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (level, rows) in zip(axes, report["levels"].items()):
        x = np.arange(len(METRICS))
        for j, (name, colour) in enumerate((("model", "tab:blue"), ("colour", "tab:orange"))):
            vals = np.array([rows[m][name] for m in METRICS])
            ax.bar(x + (j - 0.5) * 0.38, vals[:, 0], 0.38, yerr=[vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]],
                   capsize=4, color=colour, label=report["model_name"] if name == "model" else "colour histogram")
        ax.axhline(rows["chance_top1"], color="grey", ls="--", lw=1, label="top-1, random ranking")
        ax.set_xticks(x, METRICS)
        ax.set_title(f"{level} level ({rows['queries']} queries, {rows['cases']} cases)")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("leave-one-case-out score, 95% CI over cases")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
