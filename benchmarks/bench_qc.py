"""Precision and recall of each QC flag (`pathapp.tiles.qc`) on labelled real tiles and on real
tissue tiles damaged by a known amount (`pathapp.tiles.qc_cases`): the README's QC table.

Tissue tiles are read the way `pathapp infer` reads them (tissue mask, grid at 0.5 µm/px, 224 px)
from three real slides, CMU-1-Small-Region (H&E, Aperio JPEG q30), OS-1-detail (H&E, Hamamatsu via
OME-TIFF) and luna-1065626 (H-DAB, Aperio JPEG 2000), plus the nine NCT-CRC-HE tiles (H&E,
0.5 µm/px; the BACK tile is background, not tissue, and is left out). Compression is judged only on
the OS-1 and luna tiles: the others were JPEG-compressed on the scanner's 8 px grid already.

    python benchmarks/bench_qc.py                      # prints the table, writes benchmarks/results/qc.txt
    python benchmarks/bench_qc.py --per-slide 8        # fewer tiles per slide: a quick look
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
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qc.txt")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tiles = [t for k in SLIDES for t in slide_tiles(k, args.per_slide)] + nct_tiles()
    jpeg_ok = {n for n, _ in tiles if n.startswith(UNCOMPRESSED)}
    cases = (qc_cases.histolab_cases(DATA / "tiles" / "histolab-qc-tiles")
             + qc_cases.synthetic_cases(tiles, MPP, jpeg_sources=jpeg_ok))
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
    finish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
