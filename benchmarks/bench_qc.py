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
"""

from __future__ import annotations

import argparse
import sys
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
    return [(f"{key}-{i}", read_tile(slide, grid, int(i))) for i in sorted(pick)]


def nct_tiles() -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    paths = sorted((DATA / "tiles" / "nct-crc-he-100k-nonorm-samples").glob("*/*.tif"))
    return [(f"nct-{p.parent.name}", np.asarray(Image.open(p).convert("RGB"))) for p in paths if p.parent.name != "BACK"]


def main(argv: list[str] | None = None) -> int:
    from pathapp.tiles import qc_cases
    from pathapp.tiles.qc import ARTEFACTS, QCThresholds
    from report import finish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-slide", type=int, default=40, help="tissue tiles per slide (default 40)")
    ap.add_argument("--out", type=Path, default=None, help="default results/qc.txt (qc_fold_measures.txt)")
    ap.add_argument("--fold-measures", action="store_true",
                    help="instead: the best F1 each candidate fold cue reaches on the fold-judged cases")
    args = ap.parse_args(argv)
    results = Path(__file__).parent / "results"
    t0 = time.perf_counter()
    tiles = [t for k in SLIDES for t in slide_tiles(k, args.per_slide)] + nct_tiles()
    jpeg_ok = {n for n, _ in tiles if n.startswith(UNCOMPRESSED)}
    cases = (qc_cases.histolab_cases(DATA / "tiles" / "histolab-qc-tiles")
             + qc_cases.synthetic_cases(tiles, MPP, jpeg_sources=jpeg_ok))
    if args.fold_measures:
        lines = [f"# python benchmarks/bench_qc.py --fold-measures --per-slide {args.per_slide}"] + fold_measures(cases)
        finish(lines, args.out or results / "qc_fold_measures.txt")
        return 0
    thresholds = QCThresholds()
    scores, rows = qc_cases.evaluate(cases, thresholds)

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


FOLD_CUES = {  # name -> (what it thresholds, thresholds swept)
    "summed OD (pathapp's, HistoQC's dark tissue)": ("od", np.arange(0.8, 3.01, 0.1)),
    "saturation − value (Bautista & Yagi 2010, Palokangas 2007)": ("sv", np.arange(-0.5, 0.31, 0.05)),
    "summed OD ÷ the tile's 25th-percentile tissue OD": ("rel", np.arange(1.3, 3.01, 0.1)),
}
FOLD_WIDTHS_UM = (8, 12, 20)
FOLD_FRACTIONS = (0.05, 0.1, 0.2, 0.3)


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
