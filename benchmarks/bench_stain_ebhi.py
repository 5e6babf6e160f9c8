"""Cross-validated balanced accuracy on EBHI-Seg with and without each stain normalisation, through
`pathapp evaluate` as a user runs it: 5 folds grouped by case, linear probe, bootstrap 95 % CI over
cases, each image tiled at the bundle's µm/px from 1.0 µm/px (--image-mpp). The reference is an H&E tile
from another data set (NCT-CRC-HE TUM), so no evaluation image decides the target; every EBHI image is
fitted on its own tissue tiles.

    python benchmarks/bench_stain_ebhi.py                        # random ViT-S/14 (LayerScale 1)
    python benchmarks/bench_stain_ebhi.py --model m.pathapp --methods none macenko
    python benchmarks/bench_stain_ebhi.py --cases 0.33 --methods none vahadane --out benchmarks/results/stain_ebhi_third.txt

Vahadane fits each of the 694 images on its own pixels (dictionary learning, ≈ 4 s a fit on this
machine), so its full row takes about an hour; `--cases F` scores every method on the images of a
seeded random fraction F of the cases of each class (a paired subset: every method sees the same images).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = ROOT / "labeled" / "ebhi-seg" / "labels.csv"
REF = ROOT / "tiles" / "nct-crc-he-100k-nonorm-samples" / "TUM" / "TUM-AACHEHDV.tif"


def case_subset(fraction: float, out: Path, seed: int = 0) -> tuple[Path, int]:
    """labels.csv restricted to a seeded random `fraction` of the cases of each class (absolute image
    paths), written to `out`; returns it and its number of images."""
    import numpy as np

    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for label in sorted({r["label"] for r in rows}):
        cases = sorted({r["case_prefix"] for r in rows if r["label"] == label})
        keep.update(rng.permutation(cases)[: max(2, round(fraction * len(cases)))].tolist())
    chosen = [dict(r, image=str(DATA.parent / r["image"]), mask=str(DATA.parent / r["mask"]))
              for r in rows if r["case_prefix"] in keep]
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(chosen)
    return out, len(chosen)


def paired(method_csv: Path, none_csv: Path) -> dict:
    """method − none balanced accuracy on the same images (evaluate's predictions.csv, out of fold),
    with evaluate's paired bootstrap over cases."""
    import numpy as np

    from pathapp.train.floors import paired_difference

    def read(path: Path) -> dict[str, list[str]]:
        with path.open(newline="") as f:
            return {r["item"]: r for r in csv.DictReader(f)}

    a, b = read(method_csv), read(none_csv)
    items = sorted(a)
    classes = [k for k in next(iter(a.values())) if k.startswith("prob: ")]
    y = np.array([classes.index(f"prob: {a[i]['label']}") for i in items])
    probs = [np.array([[float(r[i][k]) for k in classes] for i in items]) for r in (a, b)]
    groups = np.array([a[i]["group"] for i in items])
    return paired_difference(y, probs[0], probs[1], groups, len(classes), 1000, 0)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_stain_scanners import random_bundle
    from report import finish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=["none", "macenko", "reinhard", "vahadane"])
    ap.add_argument("--cases", type=float, default=1.0,
                    help="score every method on this seeded random fraction of each class's cases (default all)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep each method's finished run in --work (report.json, seconds.txt) instead of rerunning it")
    ap.add_argument("--work", type=Path, default=Path("bench-stain-ebhi"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stain_ebhi.txt")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or random_bundle(args.work / "vits14-random.pathapp")
    data, n = (DATA, 694) if args.cases >= 1 else case_subset(args.cases, args.work / f"labels-cases-{args.cases}.csv")
    subset = "" if args.cases >= 1 else f" (the images of a seeded random {args.cases:.0%} of each class's cases)"
    lines = [f"# python benchmarks/bench_stain_ebhi.py --methods {' '.join(args.methods)}"
             + (f" --model {args.model}" if args.model else "") + (f" --cases {args.cases}" if args.cases < 1 else ""),
             f"# model: {model.name}; reference: {REF.name}; {n} images{subset} at 1.0 µm/px, "
             "5 folds grouped by case_prefix, linear", "",
             "| stain normalisation | balanced accuracy [95 % CI] | accuracy | macro-F1 | seconds |", "|---|---|---|---|---|"]
    for method in args.methods:
        out = args.work / method
        cmd = [sys.executable, "-m", "pathapp", "evaluate", "--data", str(data), "--model", str(model), "--folds", "5",
               "--method", "linear", "--group-by", "case_prefix", "--image-mpp", "1.0", "--cache", str(args.work / "cache"),
               "--out", str(out)]
        if method != "none":
            cmd += ["--stain-norm", method, "--stain-ref", str(REF)]
        seconds = out / "seconds.txt"
        if not (args.reuse and seconds.exists() and (out / "report.json").exists()):
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds.write_text(f"{time.perf_counter() - t:.0f}\n")
        m = json.loads((out / "report.json").read_text())["metrics"]
        lo, hi = m["ci95"]["balanced_accuracy"]
        lines.append(f"| {method} | {m['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {m['accuracy']:.3f} | "
                     f"{m['macro_f1']:.3f} | {seconds.read_text().strip()} |")
        print(lines[-1], flush=True)
    if "none" in args.methods and len(args.methods) > 1:
        lines += ["", "| paired difference on the same images | balanced accuracy [95 % CI over cases] |", "|---|---|"]
        for method in args.methods:
            if method != "none":
                d = paired(args.work / method / "predictions.csv", args.work / "none" / "predictions.csv")
                lo, hi = d["ci95"]["balanced_accuracy"]
                lines.append(f"| {method} − none | {d['balanced_accuracy']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    finish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
