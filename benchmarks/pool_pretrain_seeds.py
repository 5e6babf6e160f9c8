"""Pool the seeds of bench_pretrain_knn.py: one verdict from several 30-minute runs, not the luckiest.

Every run scores on the same 5 grouped folds, so each fold's balanced accuracy is averaged over the
seeds first and the 95 % t-interval is taken over the 5 seed-averaged folds; differences (pretrained −
random init, pretrained − colour histogram) are paired the same way. Only the metrics that every
report holds are pooled.

    python benchmarks/pool_pretrain_seeds.py benchmarks/results/pretrain_cpu30_*_t02_seed*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain_knn import METRICS, print_table, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", type=Path, nargs="+", help="--json files of bench_pretrain_knn.py runs")
    args = ap.parse_args()
    runs = [json.loads(p.read_text())["results"] for p in args.reports]
    rows = [r for r in runs[0] if all(r in run for run in runs)]
    metrics = [m for m in METRICS if all(m in run[r] for run in runs for r in rows)]
    # fold scores averaged over the seeds: {row: {metric: array of 5}}
    folds = {r: {m: np.mean([run[r][m]["folds"] for run in runs], axis=0) for m in metrics} for r in rows}

    diffs = {}
    for row in rows:
        if " pretrained/" in row:
            proto, recipe = row.split(" pretrained/")
            for other in (f"{proto} random_init/{recipe}", "colour_histogram_512"):
                diffs[f"{row} - {other.removeprefix(proto + ' ')}"] = {
                    m: summary(list(folds[row][m] - folds[other][m])) for m in metrics}
    print(f"{len(runs)} runs: " + ", ".join(p.name for p in args.reports))
    print_table("features, mean over seeds", {r: {m: summary(list(v[m])) for m in metrics} for r, v in folds.items()},
                metrics, signed=False)
    print_table("paired difference, mean over seeds", diffs, metrics, signed=True)

if __name__ == "__main__":
    main()
