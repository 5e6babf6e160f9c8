"""Evidence that `pathapp pretrain` learns on real tissue (a benchmark, not a CI test).

1. Pretrain a small ViT (registry dinov2_vits14 shrunk, LayerScale 1) with the full DINOv2 objective
   for --minutes of CPU time on tiles sampled online from the H&E slides in ../shared/data/wsi
   (default, --data slides: CMU-1-Small-Region, luna-1065626, OS-1-detail), or — clearly a
   different, transductive setting — on the 694 EBHI-Seg images themselves as unlabelled data
   (--data ebhi: labels and masks are never read by pretraining).
2. Embed the 694 EBHI-Seg images (6 classes, colorectal biopsies; labels.csv) with the teacher and
   with the same architecture at random init (same seed, LayerScale 1), plus a 512-bin RGB colour
   histogram, and score each by 5-fold cross-validation grouped by case_prefix (StratifiedGroupKFold
   from pathapp.train.evaluate): logistic regression and 20-NN cosine, balanced accuracy, mean and 95%
   t-interval over the folds. Floors measured earlier: random ViT-S/14 0.367 / 0.252, colour
   histogram 0.373 / 0.302 (logistic / 20-NN).

The number of steps is set from a 3-step calibration so that the cosine schedules finish inside the
budget; one "epoch" is 1% of the steps (warm-up 10%, teacher-temperature warm-up 30%).

    .venv/bin/python benchmarks/bench_pretrain_knn.py --minutes 30 --out /tmp/bench-pretrain   # the evidence run
    .venv/bin/python benchmarks/bench_pretrain_knn.py --minutes 1 --batch-size 16 --out /tmp/bench-smoke  # smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EBHI = DATA / "labeled" / "ebhi-seg"
HE_SLIDES = ["wsi/aperio/CMU-1-Small-Region.svs", "wsi/aperio/luna-1065626.svs", "wsi/ome-tiff/OS-1-detail.ome.tif"]


def link_folder(folder: Path, files: list[Path], names: list[str]) -> Path:
    """A folder of symlinks (the shared data is never copied)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f, n in zip(files, names):
        (folder / n).symlink_to(f)
    return folder


def read_labels() -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    with open(EBHI / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    paths = [EBHI / r["image"] for r in rows]
    y = np.array([classes.index(r["label"]) for r in rows])
    groups = np.array([r["case_prefix"] for r in rows])
    return paths, y, groups, classes


def make_config(args, data_dir: Path, steps: int):
    from pathapp.ssl.config import SSLConfig

    ebhi = args.data == "ebhi"
    return SSLConfig(
        backbone="dinov2_vits14",
        backbone_overrides={"depth": args.depth, "embed_dim": args.dim, "num_heads": args.heads, "img_size": args.crop},
        layerscale_init=1.0, drop_path=0.1, seed=args.seed,
        slides=None if ebhi else str(data_dir), tiles=str(data_dir) if ebhi else None,
        mpp=[0.5], tile_size=224 if ebhi else args.tile, min_tissue=0.6,
        global_crop_size=args.crop, local_crop_size=args.local_crop, n_local_crops=args.n_local,
        n_prototypes=args.prototypes, head_hidden_dim=1024, head_bottleneck_dim=256,
        batch_size=args.batch_size, base_lr=args.base_lr, num_workers=args.workers,
        steps=steps, epoch_length=max(1, steps // 100), checkpoint_every=max(steps // 4, 1), log_every=1,
    )


def calibrate(args, data_dir: Path, out: Path) -> float:
    """Seconds per optimiser step, from a short throw-away run (median of steps 2-4)."""
    from pathapp.ssl.train import pretrain

    cal = out / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    pretrain(make_config(args, data_dir, 1000), cal, progress=False, stop_at=4)
    rows = [json.loads(ln) for ln in (cal / "metrics.jsonl").read_text().splitlines()]
    per_step = [args.batch_size / r["tiles_per_s"] for r in rows[1:]]
    shutil.rmtree(cal, ignore_errors=True)
    return float(np.median(per_step))


def embed_all(model, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """CLS and CLS+mean-of-patches embeddings of uint8 images, from one forward pass."""
    import torch

    cls, both = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float().div(255)
            tokens = model.backbone.forward_features((x - model.mean) / model.std)
            c, m = tokens[:, 0], tokens[:, model.backbone.num_prefix_tokens:].mean(dim=1)
            cls.append(c.numpy())
            both.append(torch.cat([c, m], dim=-1).numpy())
    return {"cls": np.concatenate(cls), "cls+mean": np.concatenate(both)}


def colour_histogram(images: np.ndarray) -> np.ndarray:
    q = (images // 32).astype(np.int64)  # 8 levels per channel → 512 bins
    idx = q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]
    return np.stack([np.bincount(i.ravel(), minlength=512) / i.size for i in idx]).astype(np.float32)


def score(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict[str, list[float]]:
    """Balanced accuracy per grouped fold for logistic regression and 20-NN cosine."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pathapp.train.evaluate import grouped_folds

    res: dict[str, list[float]] = {"logreg": [], "knn20": []}
    for tr, te in grouped_folds(y, groups, 5, seed):
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
        res["logreg"].append(balanced_accuracy_score(y[te], lr.fit(X[tr], y[tr]).predict(X[te])))
        knn = KNeighborsClassifier(n_neighbors=20, metric="cosine", weights="distance")
        res["knn20"].append(balanced_accuracy_score(y[te], knn.fit(X[tr], y[tr]).predict(X[te])))
    return res


def summary(v: list[float]) -> dict[str, float]:
    from scipy import stats

    a = np.asarray(v)
    half = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return {"mean": float(a.mean()), "ci95": [float(a.mean() - half), float(a.mean() + half)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="pretraining budget (CPU wall clock)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-pretrain"))
    ap.add_argument("--data", choices=["slides", "ebhi"], default="slides")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--tile", type=int, default=128, help="px of tiles read from slides at 0.5 µm/px")
    ap.add_argument("--crop", type=int, default=98, help="global crop px (also the evaluation size)")
    ap.add_argument("--local-crop", type=int, default=42)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--prototypes", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--base-lr", type=float, default=0.004)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pathapp.models.bundle import Bundle, load_bundle
    from pathapp.ssl.train import build_backbone, pretrain
    from pathapp.train.cache import load_tile_image

    args.out.mkdir(parents=True, exist_ok=True)
    paths, y, groups, classes = read_labels()
    if args.data == "slides":
        files = [DATA / s for s in HE_SLIDES]
        data_dir = link_folder(args.out / "slides", files, [f.name for f in files])
    else:  # images only, anonymous names: pretraining sees neither labels nor masks
        data_dir = link_folder(args.out / "ebhi-unlabelled", paths, [f"{i:04d}.png" for i in range(len(paths))])

    t0 = time.monotonic()
    sec_per_step = calibrate(args, data_dir, args.out)
    steps = max(10, int(args.minutes * 60 * 0.95 / sec_per_step))
    print(f"calibration: {sec_per_step:.2f} s/step → {steps} steps in {args.minutes} min", flush=True)
    cfg = make_config(args, data_dir, steps)
    cfg.max_minutes = args.minutes * 1.1  # a safety net; the schedules are sized to finish before it
    run = args.out / "run"
    shutil.rmtree(run, ignore_errors=True)
    t1 = time.monotonic()
    pretrain(cfg, run, progress=True)
    train_minutes = (time.monotonic() - t1) / 60
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]

    images = np.stack([load_tile_image(p, args.crop) for p in paths])
    torch.manual_seed(cfg.seed)
    random_backbone, spec = build_backbone(cfg)  # exactly the pretraining start point
    models = {"random_init": Bundle.from_model(random_backbone.eval(), spec, tile_size=args.crop).build(),
              "pretrained": load_bundle(run / "teacher.pathapp").build()}
    results: dict[str, dict] = {"colour_histogram_512": {k: summary(v) for k, v in score(colour_histogram(images), y, groups).items()}}
    for name, model in models.items():
        for recipe, X in embed_all(model, images).items():
            per_fold = score(X, y, groups)
            results[f"{name}/{recipe}"] = {k: summary(v) | {"folds": v} for k, v in per_fold.items()}

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": args.data, "slides": HE_SLIDES if args.data == "slides" else None,
        "architecture": {"backbone": "dinov2_vits14", **cfg.backbone_overrides, "layerscale": 1.0},
        "steps": len(rows), "planned_steps": steps, "pretrain_minutes": round(train_minutes, 2),
        "total_minutes": round((time.monotonic() - t0) / 60, 2),
        "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]], "tiles_per_s_median": float(np.median([r["tiles_per_s"] for r in rows])),
        "eval": "EBHI-Seg 694 images, 6 classes, 5-fold StratifiedGroupKFold by case_prefix, balanced accuracy, mean [95% t-CI over folds]",
        "results": results,
    }
    print(f"\n{'features':28s} {'logistic regression':>26s} {'20-NN cosine':>26s}")
    for name, r in results.items():
        cells = [f"{r[k]['mean']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]" for k in ("logreg", "knn20")]
        print(f"{name:28s} {cells[0]:>26s} {cells[1]:>26s}")
    print(f"\n{len(rows)} steps in {train_minutes:.1f} min; loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
