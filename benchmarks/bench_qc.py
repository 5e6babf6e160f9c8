"""Precision and recall of each QC flag (`pathapp.tiles.qc`) on labelled real tiles and on real
tissue tiles damaged by a known amount (`pathapp.tiles.qc_cases`): the README's QC table.

Tissue tiles are read the way `pathapp infer` reads them (tissue mask, grid at 0.5 µm/px, 224 px)
from three real slides, CMU-1-Small-Region (H&E, Aperio JPEG q30), OS-1-detail (H&E, Hamamatsu via
OME-TIFF) and luna-1065626 (H-DAB, Aperio JPEG 2000), plus the nine NCT-CRC-HE tiles (H&E,
0.5 µm/px; the BACK tile is background, not tissue, and is left out). Compression is judged only on
the OS-1 and luna tiles: the others were JPEG-compressed on the scanner's 8 px grid already.

    python benchmarks/bench_qc.py                      # prints the table, writes benchmarks/results/qc.txt
    python benchmarks/bench_qc.py --per-slide 8        # fewer tiles per slide: a quick look
    python benchmarks/bench_qc.py --fold-measures      # other fold cues on the same cases (qc_fold_measures.txt)
    python benchmarks/bench_qc.py --speed              # ms per 224 px tile of measure_tile and its parts
    python benchmarks/bench_qc.py --speed --before main     # ... against a git revision (qc_speed.txt)

The fold flag's two thresholds were fitted on these cases; the default run also writes
results/qc_fold_cv.txt: the same fit made on some groups of cases and scored on the others (grouped by
source tile, and by slide), with bootstrap 95 % CIs over source tiles, beside the flag it replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SLIDES = {"cmu": "wsi/aperio/CMU-1-Small-Region.svs", "os1": "wsi/ome-tiff/OS-1-detail.ome.tif",
          "luna": "wsi/aperio/luna-1065626.svs"}
UNCOMPRESSED = ("os1", "luna")  # sources whose tiles carry no 8 px JPEG grid of their own
MPP, TILE = 0.5, 224


def slide_tiles(key: str, n: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Up to n random tissue tiles (≥ 50 % tissue) of one slide, read as inference reads them."""
    from pathapp.slide import open_slide
    from pathapp.tiles import detect_tissue, make_grid, read_tile

    slide = open_slide(DATA / SLIDES[key])
    grid = make_grid(slide, MPP, TILE, tissue=detect_tissue(slide), min_tissue=0.5)
    pick = np.random.default_rng(seed).permutation(len(grid))[:n]
    return [(f"{key}#{i}", read_tile(slide, grid, int(i))) for i in sorted(pick)]


def nct_tiles() -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    paths = sorted((DATA / "tiles" / "nct-crc-he-100k-nonorm-samples").glob("*/*.tif"))
    return [(f"nct#{p.parent.name}", np.asarray(Image.open(p).convert("RGB"))) for p in paths if p.parent.name != "BACK"]


def main(argv: list[str] | None = None) -> int:
    from pathapp.tiles import qc_cases
    from pathapp.tiles.qc import ARTEFACTS, QCThresholds
    from report import finish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-slide", type=int, default=40, help="tissue tiles per slide (default 40)")
    ap.add_argument("--out", type=Path, default=None, help="default results/qc.txt (qc_fold_measures.txt)")
    ap.add_argument("--fold-measures", action="store_true",
                    help="instead: the best F1 each candidate fold cue reaches on the fold-judged cases")
    ap.add_argument("--speed", action="store_true", help="instead: ms per tile of measure_tile and its parts")
    ap.add_argument("--before", default=None,
                    help="with --speed: a git revision of this repository (or another checkout's src/ folder), "
                         "timed against this checkout in whole processes, alternated")
    ap.add_argument("--pairs", type=int, default=3, help="with --before: before/after process pairs (default 3)")
    ap.add_argument("--top-pad", type=int, default=0,
                    help="with --speed: also keep this many MiB at the top of malloc's heap (glibc M_TOP_PAD), to "
                         "see what the page faults of freeing and regrowing it cost")
    ap.add_argument("--speed-child", type=Path, default=None, help=argparse.SUPPRESS)  # tiles .npz -> JSON ms
    args = ap.parse_args(argv)
    if args.speed_child:
        with np.load(args.speed_child) as z:
            print(json.dumps(speed_parts([z[k] for k in z.files], args.top_pad)))
        return 0
    results = Path(__file__).parent / "results"
    t0 = time.perf_counter()
    tiles = [t for k in SLIDES for t in slide_tiles(k, args.per_slide)] + nct_tiles()
    if args.speed:
        cmd = f"# python benchmarks/bench_qc.py --speed --per-slide {args.per_slide}"
        if args.before:
            cmd += f" --before {args.before} --pairs {args.pairs}"
        if args.top_pad:
            cmd += f" --top-pad {args.top_pad}"
        lines = [cmd] + speed([t for _, t in tiles], args.before, args.pairs, args.top_pad)
        finish(lines, args.out or results / ("qc_speed_top_pad.txt" if args.top_pad else "qc_speed.txt"))
        return 0
    jpeg_ok = {n for n, _ in tiles if n.startswith(UNCOMPRESSED)}
    cases = (qc_cases.histolab_cases(DATA / "tiles" / "histolab-qc-tiles")
             + qc_cases.synthetic_cases(tiles, MPP, jpeg_sources=jpeg_ok))
    if args.fold_measures:
        lines = [f"# python benchmarks/bench_qc.py --fold-measures --per-slide {args.per_slide}"] + fold_measures(cases)
        finish(lines, args.out or results / "qc_fold_measures.txt")
        return 0
    thresholds = QCThresholds()
    measures = qc_cases.case_measures(cases, thresholds)
    scores, rows = qc_cases.evaluate(cases, thresholds, measures)
    cv = [f"# python benchmarks/bench_qc.py --per-slide {args.per_slide}"] + fold_cv(cases, measures, thresholds)
    finish(cv, (args.out.with_name(args.out.stem + "_fold_cv.txt") if args.out else results / "qc_fold_cv.txt"))

    lines = [f"# python benchmarks/bench_qc.py --per-slide {args.per_slide}",
             f"# {len(tiles)} tissue tiles, {len(cases)} cases, {time.perf_counter() - t0:.0f} s",
             f"# thresholds: {thresholds.to_dict()}", "",
             "| flag | precision | recall | TP | FP | FN | TN |", "|---|---|---|---|---|---|---|"]
    for k in ARTEFACTS:
        s = scores[k]
        lines.append(f"| {k} | {s.precision:.3f} | {s.recall:.3f} | {s.tp} | {s.fp} | {s.fn} | {s.tn} |")
    lines += ["", "| cases | n | flags raised (tiles) | any wrong flag |", "|---|---|---|---|"]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for g, rs in groups.items():
        fired: dict[str, int] = defaultdict(int)
        for r in rs:
            for f in r["fired"]:
                fired[f] += 1
        raised = ", ".join(f"{k} {v}" for k, v in sorted(fired.items())) or "none"
        lines.append(f"| {g} | {len(rs)} | {raised} | {sum(bool(r['wrong']) for r in rs)} |")
    lines += ["", "wrong flags (case: expected -> raised):"]
    lines += [f"  {r['name']}: {r['expected']} -> {r['fired']}" for r in rows if r["wrong"]]
    finish(lines, args.out or results / "qc.txt")
    return 0


def speed_parts(tiles: list[np.ndarray], top_pad_mib: int = 0, rounds: int = 5) -> dict[str, dict[str, float]]:
    """CPU ms and minor page faults per tile of `measure_tile` and of each of its parts (medians over
    `rounds` passes, the parts timed in turn in each pass so that load affects all alike), with glibc
    malloc set as `pathapp infer` sets it for its tile readers (`steady_malloc`), and `top_pad_mib` MiB
    kept at the heap's top if asked. Only names that older checkouts also have, so the same function
    times a `--before` checkout."""
    import ctypes
    import resource

    from pathapp.infer.planner import steady_malloc
    from pathapp.tiles import qc, tissue

    steady_malloc()
    if top_pad_mib:
        ctypes.CDLL("libc.so.6").mallopt(-2, top_pad_mib << 20)  # M_TOP_PAD (glibc malloc.h)
    grey = getattr(tissue, "grey_levels", lambda rgb: rgb.astype(np.float32).mean(axis=2))  # before: inline
    greys = [grey(t) for t in tiles]
    hsvs = [tissue.hsv(t) for t in tiles]
    inks = [list(tissue.pen_colours(*h).values()) for h in hsvs]
    blur_um = qc.QCThresholds().blur_um
    parts = {
        "measure_tile (all QC measures)": lambda i: qc.measure_tile(tiles[i], MPP),
        "hsv": lambda i: tissue.hsv(tiles[i]),
        "pen_colours (of hsv's output)": lambda i: tissue.pen_colours(*hsvs[i]),
        "od_spread (glass)": lambda i: qc.od_spread(tiles[i]),
        "grey level": lambda i: grey(tiles[i]),
        "focus_measures": lambda i: qc.focus_measures(greys[i] / 255.0, MPP, blur_um),
        "eosin_level": lambda i: qc.eosin_level(tiles[i], MPP),
        "compression_score": lambda i: qc.compression_score(greys[i]),
        "ink_fraction (3 inks)": lambda i: [qc.ink_fraction(m, MPP) for m in inks[i]],
    }
    for f in parts.values():  # warm-up: imports, the density tables
        f(0)
    ms: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, f in parts.items():
            t, flt = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(len(tiles)):
                f(i)
            ms[name].append((time.process_time() - t) / len(tiles) * 1000)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt) / len(tiles))
    return {name: {"ms": float(np.median(ms[name])), "faults": float(np.median(faults[name]))} for name in parts}


def speed(tiles: list[np.ndarray], before: str | None = None, pairs: int = 3, top_pad_mib: int = 0) -> list[str]:
    """CPU ms per tile of `measure_tile` and its parts (`speed_parts`) in this process; with `before` (a
    git revision, or another checkout's src/), in whole processes alternated before, after, …, each timing
    the same tiles: the medians over processes, the ratio, and every process's `measure_tile`."""
    pad = f" + M_TOP_PAD {top_pad_mib} MiB" if top_pad_mib else ""
    head = [f"# {len(tiles)} tiles of {TILE} px at {MPP} µm/px; CPU time (process_time) and minor page faults per "
            f"tile, medians of 5 passes per process, malloc as in `pathapp infer` (steady_malloc{pad})", ""]
    if before is None:
        return head + ["| part | ms per tile | page faults per tile |", "|---|---|---|"] + [
            f"| {k} | {v['ms']:.2f} | {v['faults']:.0f} |" for k, v in speed_parts(tiles, top_pad_mib).items()]
    root = Path(__file__).resolve().parents[1]
    after = root / "src"
    runs: dict[str, list[dict[str, dict[str, float]]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "tiles.npz"
        np.savez(npz, *tiles)
        old = Path(before)
        if not old.is_dir():  # a revision: its src/ unpacked
            rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", before], check=True, text=True,
                                 capture_output=True).stdout.strip()
            tar = subprocess.run(["git", "-C", str(root), "archive", rev, "src"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
            before, old = f"{before} ({rev})", Path(tmp) / "src"
        for _ in range(pairs):
            for label, src in (("before", old), ("after", after)):
                out = subprocess.run([sys.executable, __file__, "--speed-child", str(npz), "--top-pad", str(top_pad_mib)],
                                     check=True, text=True,
                                     capture_output=True, env={**os.environ, "PYTHONPATH": str(src)}).stdout
                runs[label].append(json.loads(out.strip().splitlines()[-1]))
    lines = head + [f"before: {before}, after: this checkout; {pairs} process pairs, alternated", "",
                    "| part | before ms per tile | after ms per tile | before ÷ after | page faults per tile, before / after |",
                    "|---|---|---|---|---|"]
    for k in runs["after"][0]:
        (b, fb), (a, fa) = ([float(np.median([r[k][q] for r in runs[label]])) for q in ("ms", "faults")]
                            for label in ("before", "after"))
        lines.append(f"| {k} | {b:.2f} | {a:.2f} | {b / a:.1f}× | {fb:.0f} / {fa:.0f} |")
    per = {label: " / ".join(f"{r['measure_tile (all QC measures)']['ms']:.2f}" for r in rs) for label, rs in runs.items()}
    return lines + ["", f"measure_tile ms per tile in each process, before: {per['before']}; after: {per['after']}"]


FOLD_CUES = {  # name -> (what it thresholds, thresholds swept)
    "summed OD (pathapp's, HistoQC's dark tissue)": ("od", np.arange(0.8, 3.01, 0.1)),
    "saturation − value (Bautista & Yagi 2010, Palokangas 2007)": ("sv", np.arange(-0.5, 0.31, 0.05)),
    "summed OD ÷ the tile's 25th-percentile tissue OD": ("rel", np.arange(1.3, 3.01, 0.1)),
}
FOLD_WIDTHS_UM = (8, 12, 20)
FOLD_FRACTIONS = (0.05, 0.1, 0.2, 0.3)


FOLD_RELATIVE = np.arange(1.2, 2.5, 0.04)  # `qc: fold` thresholds the fit chooses from
FOLD_EOSIN = np.arange(0.02, 0.08, 0.002)  # `qc: eosin` floors


def replaced_fold_flag(tile: np.ndarray, mpp: float) -> bool:
    """The fold flag before this one: ≥ 10 % of the tile under regions of summed log10 OD > 2 at
    least 12 µm wide (measured at 0.5 µm/px, as all these cases are)."""
    from pathapp.tiles.qc import open_disk, optical_densities
    from pathapp.tiles.tissue import to_rgb

    dense = optical_densities(to_rgb(tile)).sum(axis=2) > 2.0
    return bool(open_disk(dense, int(round(6.0 / mpp))).mean() >= 0.1)


def fold_cv(cases: list, measures: dict[str, np.ndarray], thresholds) -> list[str]:
    """Grouped cross-validation of the fold flag's fit: on the cases that judge `fold`, the
    (relative, eosin) thresholds of best F1 (ties: the lowest) chosen on the training groups and
    applied to the held-out group; groups are source tiles (5 folds, stratified) or slides (one
    left out at a time). Precision and recall of the held-out predictions, pooled, with bootstrap
    95 % CIs over source tiles; then the fit on every case (what ships) and the replaced flag."""
    from sklearn.model_selection import StratifiedGroupKFold

    judged = np.array(["fold" in c.judged for c in cases])
    y = np.array(["fold" in c.expected for c in cases])[judged]
    rel, eos = measures["fold"][judged], measures["eosin"][judged]
    source = np.array([c.name.split(" ")[0] for c in cases])[judged]
    slide = np.array(["histolab" if c.group == "histolab" else c.slide.split(" ")[0] for c in cases])[judged]
    grid = [(t, u) for t in FOLD_RELATIVE for u in FOLD_EOSIN]

    def flag(tu: tuple[float, float], idx: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (rel[idx] >= tu[0]) & (eos[idx] >= tu[1])

    def fit(idx: np.ndarray) -> tuple[float, float]:
        def f1(tu: tuple[float, float]) -> float:
            f, yy = flag(tu, idx), y[idx]
            tp = int((f & yy).sum())
            return 2 * tp / max(int(f.sum()) + int(yy.sum()), 1)
        return max(grid, key=lambda tu: (f1(tu), -tu[0], -tu[1]))

    def row(name: str, pred: np.ndarray) -> str:
        tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
        (plo, phi), (rlo, rhi) = _boot_pr(pred, y, source)
        return (f"| {name} | {tp / max(tp + fp, 1):.3f} [{plo:.3f}, {phi:.3f}] | {tp / max(int(y.sum()), 1):.3f} "
                f"[{rlo:.3f}, {rhi:.3f}] | {tp} | {fp} |")

    allidx = np.arange(len(y))
    old = np.array([replaced_fold_flag(c.tile, c.mpp) for c, j in zip(cases, judged) if j])
    lines = [f"# {len(y)} cases judge fold ({int(y.sum())} folded) from {len(set(source))} source tiles on "
             f"{len(set(slide))} slides; relative thresholds {FOLD_RELATIVE[0]:.2f}..{FOLD_RELATIVE[-1]:.2f}, "
             f"eosin floors {FOLD_EOSIN[0]:.3f}..{FOLD_EOSIN[-1]:.3f}", "",
             "| fold flag | precision [95 % CI] | recall [95 % CI] | TP | FP |", "|---|---|---|---|---|",
             row("replaced flag (summed OD > 2 over ≥ 10 % in 12 µm regions; fixed)", old)]
    for name, splits in (
            ("source tiles, 5 folds", StratifiedGroupKFold(5, shuffle=True, random_state=0).split(rel[:, None], y, source)),
            ("slides, one left out", [(np.where(slide != s)[0], np.where(slide == s)[0]) for s in sorted(set(slide))])):
        pred, chosen = np.zeros(len(y), bool), []
        for tr, te in splits:
            tu = fit(tr)
            chosen.append(f"{tu[0]:.2f}/{tu[1]:.3f}")
            pred[te] = flag(tu, te)
        lines.append(row(f"eosin ÷ slide median, fitted on the other {name.split(',')[0]} (held out by {name}; "
                         f"chosen {', '.join(chosen)})", pred))
    tu = fit(allidx)
    lines.append(row(f"eosin ÷ slide median ≥ {tu[0]:.2f} and eosin ≥ {tu[1]:.3f}, fitted on every case (in-sample)",
                     flag(tu, allidx)))
    lines.append(row(f"the product's thresholds ({thresholds.fold} / {thresholds.fold_eosin}; in-sample)",
                     flag((thresholds.fold, thresholds.fold_eosin), allidx)))
    return lines


def _boot_pr(pred: np.ndarray, y: np.ndarray, groups: np.ndarray, n: int = 2000, seed: int = 0):
    """Bootstrap 95 % CIs of precision and recall, resampling groups (source tiles) with all their cases."""
    ug = np.unique(groups)
    members = [np.where(groups == g)[0] for g in ug]
    rng = np.random.default_rng(seed)
    ps, rs = [], []
    for _ in range(n):
        s = np.concatenate([members[i] for i in rng.integers(0, len(ug), len(ug))])
        tp, fl, pos = int((pred[s] & y[s]).sum()), int(pred[s].sum()), int(y[s].sum())
        if fl:
            ps.append(tp / fl)
        if pos:
            rs.append(tp / pos)
    return np.percentile(ps, [2.5, 97.5]), np.percentile(rs, [2.5, 97.5])


def fold_measures(cases: list) -> list[str]:
    """For each candidate per-pixel fold cue, opened by a square of each width (a fold region is
    wider than that) at MPP: the threshold, width and tile fraction with the best F1 on the cases
    that judge `fold` (folded tiles against clean, pale, blurred, compressed and histolab tiles).
    Chosen on the cases themselves: an upper bound on what each cue can do here."""
    from scipy import ndimage as ndi

    from pathapp.tiles.qc import GLASS_CHROMA, optical_densities
    from pathapp.tiles.tissue import hsv, to_rgb

    judged = [c for c in cases if "fold" in c.judged]
    pos = np.array(["fold" in c.expected for c in judged])
    opened: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)  # sorted opened values per tile
    for c in judged:
        rgb = to_rgb(c.tile)
        od = optical_densities(rgb)
        _, sat, val = hsv(rgb)
        for w in FOLD_WIDTHS_UM:
            side = max(1, int(round(w / c.mpp)))
            o = {"od": ndi.grey_opening(od.sum(axis=2), size=(side, side)),
                 "sv": ndi.grey_opening(sat - val, size=(side, side))}
            tissue = o["od"][(od.max(axis=2) - od.min(axis=2) >= GLASS_CHROMA)]
            o["rel"] = o["od"] / max(float(np.percentile(tissue, 25)) if tissue.size > 100 else np.inf, 1e-3)
            for k, v in o.items():
                opened[(k, w)].append(np.sort(v.ravel()))
    lines = [f"# {len(judged)} cases judge fold, {int(pos.sum())} folded; best F1 per cue (chosen on these cases)", "",
             "| fold cue | width | threshold | tile fraction | precision | recall | F1 | FP |", "|---|---|---|---|---|---|---|---|"]
    for name, (key, grid) in FOLD_CUES.items():
        best = (-1.0,)
        for w in FOLD_WIDTHS_UM:
            for t in grid:
                frac = np.array([1 - np.searchsorted(v, t, side="right") / len(v) for v in opened[(key, w)]])
                for f in FOLD_FRACTIONS:
                    flag = frac >= f
                    tp, fp = int((flag & pos).sum()), int((flag & ~pos).sum())
                    p, r = tp / max(tp + fp, 1), tp / max(int(pos.sum()), 1)
                    best = max(best, (2 * p * r / max(p + r, 1e-9), w, float(t), f, p, r, fp))
        f1, w, t, f, p, r, fp = best
        lines.append(f"| {name} | {w} µm | {t:.2f} | {f} | {p:.3f} | {r:.3f} | {f1:.3f} | {fp} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
