"""Are the explanations faithful? Deletion and insertion AUCs of ViT-CX, attention rollout and
last-layer CLS attention against random patch orders, on real EBHI-Seg tiles with a trained head
(a benchmark, not a CI test). Everything runs through the `pathapp` commands a user runs:

1. `pathapp model create --weights TEACHER --mpp 1.0 --tile-size 224`: the backbone from `pathapp
   pretrain` (its teacher bundle) made to take a whole 224 px EBHI image (≈1 µm/px) as one tile:
   16 × 16 patch tokens, position embeddings resampled.
2. Split the 694 EBHI-Seg images by case (GroupShuffleSplit on case_prefix, 25 % of cases held out,
   seed 0); `pathapp train --method linear` on the training cases; `pathapp evaluate` on the held-out
   cases (balanced accuracy with its bootstrap 95 % CI; floors: chance 1/6, and the colour histogram
   of bench_pretrain_knn.py).
3. `pathapp explain IMAGES... --slide-mpp 1.0 --top 1 --method vitcx --method rollout --method
   attention --faithfulness` on --images held-out images (each is one tile), explaining the
   predicted class. Each tile gets deletion (patches -> mean colour, most salient first; lower is
   better) and insertion (from a blurred tile; higher is better) AUCs per method, and the mean over 4
   random orders.
4. Mean AUC per method with a 95 % bootstrap CI over images, and paired differences (method − random,
   ViT-CX − each attention method) with their bootstrap CIs.

    python benchmarks/bench_explain_faithfulness.py --teacher /work/artifacts/.../teacher.pathapp --out /tmp/faith
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EBHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "labeled" / "ebhi-seg"
PATHAPP = Path(sys.executable).with_name("pathapp")
METHODS = ["vitcx", "rollout", "attention"]


def pathapp(*args: str) -> str:
    """Run a pathapp command as a user would; its stderr (the report lines) is returned."""
    cmd = [str(PATHAPP), *args]
    print("$ pathapp " + " ".join(args[:12]) + (" ..." if len(args) > 12 else ""), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd[:8])}\n{r.stderr[-3000:]}")
    return r.stderr


def split(seed: int, test_size: float) -> tuple[list[dict], list[dict]]:
    from sklearn.model_selection import GroupShuffleSplit

    with open(EBHI / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["image"] = str(EBHI / r["image"])
    groups = [r["case_prefix"] for r in rows]
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(rows, groups=groups))
    return [rows[i] for i in tr], [rows[i] for i in te]


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "case_prefix"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("image", "label", "case_prefix")} for r in rows)
    return path


def bootstrap(values: np.ndarray, n: int = 5000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile 95 % CI over images."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (n, len(values)))
    means = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="teacher.pathapp from `pathapp pretrain`")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-faithfulness"))
    ap.add_argument("--images", type=int, default=60, help="held-out images explained (evenly over classes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    base = args.out / "base224.pathapp"
    pathapp("model", "create", "--weights", str(args.teacher), "--mpp", "1.0", "--tile-size", "224", "--out", str(base))
    train_rows, test_rows = split(args.seed, 0.25)
    train_csv, test_csv = write_csv(train_rows, args.out / "train.csv"), write_csv(test_rows, args.out / "test.csv")
    model = args.out / "ebhi-linear.pathapp"
    cache = args.out / "cache"
    pathapp("train", "--data", str(train_csv), "--model", str(base), "--method", "linear", "--group-by", "case_prefix",
            "--cache", str(cache), "--out", str(model))
    pathapp("evaluate", "--data", str(test_csv), "--model", str(model), "--group-by", "case_prefix", "--cache",
            str(cache), "--out", str(args.out / "heldout"))
    heldout = json.loads((args.out / "heldout" / "report.json").read_text())["metrics"]

    rng = np.random.default_rng(args.seed)
    by_class: dict[str, list[dict]] = {}
    for r in test_rows:
        by_class.setdefault(r["label"], []).append(r)
    chosen: list[dict] = []
    while len(chosen) < min(args.images, len(test_rows)):  # round robin over classes: every class is seen
        for rows in by_class.values():
            if rows and len(chosen) < args.images:
                chosen.append(rows.pop(int(rng.integers(len(rows)))))
    folder = args.out / "images"
    folder.mkdir(exist_ok=True)
    links = []
    for i, r in enumerate(chosen):  # short names for the output folders; the images are only linked
        link = folder / f"{i:03d}.png"
        link.unlink(missing_ok=True)
        link.symlink_to(r["image"])
        links.append(link)
    t_explain = time.monotonic()
    explained = args.out / "explained"
    pathapp("explain", *map(str, links), "--model", str(model), "--slide-mpp", "1.0", "--top", "1",
            *[a for m in METHODS for a in ("--method", m)], "--faithfulness", "--batch-size", "32",
            "--seed", str(args.seed), "--workers", "0", "--out", str(explained))
    t_explain = time.monotonic() - t_explain

    auc: dict[str, dict[str, list[float]]] = {m: {"deletion_auc": [], "insertion_auc": []} for m in METHODS + ["random"]}
    kept = []
    for link, r in zip(links, chosen):
        rec = json.loads((explained / link.stem / "explain.json").read_text())
        if not rec["tiles"]:
            continue  # too little tissue for a tile
        kept.append({"image": r["image"], "label": r["label"], "explained": rec["tiles"][0]["class"],
                     "prob": rec["tiles"][0]["max prob"]})
        for m, v in rec["tiles"][0]["faithfulness"].items():
            for k in ("deletion_auc", "insertion_auc"):
                auc[m][k].append(v[k])
    arr = {m: {k: np.asarray(v) for k, v in d.items()} for m, d in auc.items()}
    summary = {m: {k: bootstrap(v) for k, v in d.items()} for m, d in arr.items()}
    pairs = [(m, "random") for m in METHODS] + [("vitcx", "rollout"), ("vitcx", "attention")]
    diffs = {f"{a} - {b}": {k: bootstrap(arr[a][k] - arr[b][k]) for k in ("deletion_auc", "insertion_auc")}
             for a, b in pairs}
    lo, hi = heldout["ci95"]["balanced_accuracy"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "teacher": str(args.teacher), "images": len(kept), "explain_seconds": round(t_explain, 1),
        "total_minutes": round((time.monotonic() - t0) / 60, 1),
        "head_heldout": {"balanced_accuracy": heldout["balanced_accuracy"], "ci95": [lo, hi],
                         "train_images": len(train_rows), "test_images": len(test_rows),
                         "split": "GroupShuffleSplit by case_prefix, 25% of cases held out, seed 0"},
        "protocol": "one held-out EBHI-Seg image = one 224 px tile (16 x 16 patches); class = the model's top "
                    "class; deletion: patches -> mean colour, most salient first; insertion: from a blurred "
                    "tile (sigma 5 px); 17 points (16 patches a step); AUC of the class probability over the fraction changed; "
                    "random = mean of 4 random orders; mean [95% bootstrap CI over images]",
        "auc": summary, "paired_differences": diffs, "per_image": kept,
    }
    print(f"\nhead on held-out cases: balanced accuracy {heldout['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
          f"({len(test_rows)} images; chance 0.167)")
    print(f"{len(kept)} held-out images, one 224 px tile each, explained in {t_explain / 60:.1f} min\n")
    print(f"{'method':28s}{'deletion AUC (lower better)':>32s}{'insertion AUC (higher better)':>34s}")
    for m, d in summary.items():
        print(f"{m:28s}" + "".join(f"{f'{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]':>32s}" for v in d.values()))
    for name, d in diffs.items():
        print(f"{name:28s}" + "".join(f"{f'{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]':>32s}" for v in d.values()))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
