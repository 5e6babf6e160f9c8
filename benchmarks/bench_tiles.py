"""Tissue detection + tile grid: time and peak memory per real slide (not a timed test).

Each slide runs in its own process so that peak RSS belongs to that slide alone. Peak memory is
reported two ways: tracemalloc's peak of Python/numpy allocations during detection + grid, and
the process's peak RSS above what it held after imports and opening the slide (this also counts
the readers' C-side buffers). The last column divides peak memory by level-0 megapixels: if
memory scaled with slide area it would be about constant; it falls as slides grow instead.

    .venv/bin/python benchmarks/bench_tiles.py [--mpp 0.5] [--tile-size 224] [SLIDE ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SLIDES = [
    "wsi/aperio/CMU-1-Small-Region.svs",
    "wsi/aperio/luna-1065626.svs",
    "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs",
    "wsi/aperio/openslide-python-small.svs",
    "wsi/ome-tiff/OS-1-detail.ome.tif",
    "wsi/ome-tiff/OS-2-ndpi.ome.tif",
    "wsi/ome-tiff/OS-2-vsi.ome.tif",
    "wsi/qptiff/small_vectra.qptiff",
    "dicom/ez-wsi/multiframe_camelyon_challenge_image.dcm",
    "dicom/wsi2dcm-bone/jpeg.dicom",
    "dicom/cmu-1-small-region-wsi2dcm",
]
ASSUMED_MPP = 0.5  # only for slides whose file has no µm/px (shown with * in the table)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(path: str, mpp: float, tile_size: int) -> dict:
    """Run detection + grid on one slide in this process and return its numbers."""
    import warnings

    warnings.simplefilter("ignore")
    import scipy.ndimage  # noqa: F401 - imported before timing: import time and memory are not tiling
    import skimage.measure  # noqa: F401
    import skimage.morphology  # noqa: F401

    from pathapp.slide import open_slide
    from pathapp.tiles import detect_tissue, make_grid

    slide = open_slide(path)
    assumed = slide.mpp is None
    if assumed:
        slide = open_slide(path, slide_mpp=ASSUMED_MPP)
    base_rss = _rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    tissue = detect_tissue(slide)
    t1 = time.perf_counter()
    grid = make_grid(slide, mpp, tile_size, tissue=tissue)
    t2 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    w, h = slide.size
    return {
        "slide": Path(path).name + ("*" if assumed else ""),
        "backend": slide.backend,
        "level0_mp": w * h / 1e6,
        "levels": len(slide.levels),
        "mask_px": int(tissue.mask.size),
        "tissue_s": t1 - t0,
        "grid_s": t2 - t1,
        "tiles": len(grid),
        "level": grid.level,
        "traced_mb": peak / 2**20,
        "rss_mb": max(0.0, _rss_mb() - base_rss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", nargs="*", help="slides (default: the real slides in ../shared/data)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one slide, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.mpp, args.tile_size)))
        return
    paths = args.slides or [str(DATA / s) for s in SLIDES if (DATA / s).exists()]
    rows = []
    for p in paths:
        r = subprocess.run(
            [sys.executable, __file__, "--one", p, "--mpp", str(args.mpp), "--tile-size", str(args.tile_size)],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            print(f"{p}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    head = (f"{'slide':44} {'backend':9} {'L0 MP':>7} {'lv':>2} {'mask kpx':>8} {'tissue s':>8} "
            f"{'grid s':>6} {'tiles':>6} {'read lv':>7} {'traced MB':>9} {'RSS+ MB':>8} {'MB/L0 MP':>8}")
    print(f"tiling at {args.mpp} µm/px, {args.tile_size} px (* = no µm/px in file; {ASSUMED_MPP} assumed)")
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: r["level0_mp"]):
        peak = max(r["traced_mb"], r["rss_mb"])
        print(f"{r['slide'][:44]:44} {r['backend']:9} {r['level0_mp']:7.2f} {r['levels']:2d} "
              f"{r['mask_px'] / 1e3:8.1f} {r['tissue_s']:8.2f} {r['grid_s']:6.3f} {r['tiles']:6d} "
              f"{r['level']:7d} {r['traced_mb']:9.1f} {r['rss_mb']:8.1f} {peak / max(r['level0_mp'], 1e-6):8.2f}")
    big = [r for r in rows if r["level0_mp"] >= 1]
    if len(big) >= 2:
        small, large = min(big, key=lambda r: r["level0_mp"]), max(big, key=lambda r: r["level0_mp"])
        print(f"\nlevel-0 area grows {large['level0_mp'] / small['level0_mp']:.1f}× from {small['slide']} to "
              f"{large['slide']}; traced peak memory changes {large['traced_mb'] / small['traced_mb']:.2f}×.")


if __name__ == "__main__":
    main()
