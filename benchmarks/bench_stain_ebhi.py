"""Cross-validated balanced accuracy on EBHI-Seg with and without each stain normalisation, through
`pathapp evaluate` as a user runs it: 5 folds grouped by case, linear probe, bootstrap 95 % CI over
cases, each image tiled at the bundle's µm/px from 1.0 µm/px (--image-mpp). The reference is an H&E tile
from another data set (NCT-CRC-HE TUM), so no evaluation image decides the target; every EBHI image is
fitted on its own tissue tiles.

    python benchmarks/bench_stain_ebhi.py                        # random ViT-S/14 (LayerScale 1)
    python benchmarks/bench_stain_ebhi.py --model m.pathapp --methods none macenko
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = ROOT / "labeled" / "ebhi-seg" / "labels.csv"
REF = ROOT / "tiles" / "nct-crc-he-100k-nonorm-samples" / "TUM" / "TUM-AACHEHDV.tif"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_stain_scanners import random_bundle
    from report import finish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=["none", "macenko", "reinhard", "vahadane"])
    ap.add_argument("--work", type=Path, default=Path("bench-stain-ebhi"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stain_ebhi.txt")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or random_bundle(args.work / "vits14-random.pathapp")
    lines = [f"# python benchmarks/bench_stain_ebhi.py --methods {' '.join(args.methods)}"
             + (f" --model {args.model}" if args.model else ""),
             f"# model: {model.name}; reference: {REF.name}; 694 images at 1.0 µm/px, 5 folds grouped by case_prefix, linear", "",
             "| stain normalisation | balanced accuracy [95 % CI] | accuracy | macro-F1 | seconds |", "|---|---|---|---|---|"]
    for method in args.methods:
        out = args.work / method
        cmd = [sys.executable, "-m", "pathapp", "evaluate", "--data", str(DATA), "--model", str(model), "--folds", "5",
               "--method", "linear", "--group-by", "case_prefix", "--image-mpp", "1.0", "--cache", str(args.work / "cache"),
               "--out", str(out)]
        if method != "none":
            cmd += ["--stain-norm", method, "--stain-ref", str(REF)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        m = json.loads((out / "report.json").read_text())["metrics"]
        lo, hi = m["ci95"]["balanced_accuracy"]
        lines.append(f"| {method} | {m['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {m['accuracy']:.3f} | "
                     f"{m['macro_f1']:.3f} | {time.perf_counter() - t:.0f} |")
        print(lines[-1], flush=True)
    finish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
