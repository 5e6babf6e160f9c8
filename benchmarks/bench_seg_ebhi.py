"""EBHI-Seg lesion/gland segmentation (binary masks): DINOv2 segmentation heads through `pathapp evaluate`
as a user runs it, beside a U-Net from segmentation-models-pytorch trained from scratch on the same
folds in the same CPU time.

Every run: K folds (5) grouped by case (case_prefix, stratified by the image's class), 224 px images,
Dice and mIoU over pooled pixels with 95 % CIs from 1000 bootstrap resamples of cases, and the floor
of calling every pixel the training side's most frequent class. Backbones: the pathapp-pretrained
teacher (`/work/artifacts/pretrain-cpu-b32-300steps/run/teacher.pathapp`, ViT depth 6 / dim 192 /
patch 14) and the same architecture at random init. The U-Net (ResNet-18 encoder, no pretrained
weights) gets, per fold, as many seconds of training as the slowest head run without the few-label
curve (its whole `pathapp evaluate`, patch features included) took per fold.

    flock /work/heavy.lock nice -n 10 python benchmarks/bench_seg_ebhi.py --epochs 10
    python benchmarks/bench_seg_ebhi.py --epochs 3 --folds 3 --heads linear   # a short CPU budget
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = ROOT / "labeled" / "ebhi-seg" / "labels.csv"
TEACHER = Path("/work/artifacts/pretrain-cpu-b32-300steps/run/teacher.pathapp")


def bundles(work: Path) -> dict[str, Path]:
    """The teacher at 224 px tiles, and its architecture at random init."""
    import dataclasses

    from pathapp.models.bundle import save_bundle
    from pathapp.models.loader import load_model
    from pathapp.models.registry import create_backbone

    teacher = load_model(TEACHER, tile_size=224, head=False)
    import torch

    torch.manual_seed(0)
    random = dataclasses.replace(teacher, backbone_state={k: v.contiguous() for k, v in
                                                          create_backbone(teacher.spec).state_dict().items()},
                                 provenance={"weights": "random init (timm), bench_seg_ebhi.py"})
    return {"pathapp-pretrained teacher": save_bundle(teacher, work / "teacher-224.pathapp"),
            "random init": save_bundle(random, work / "random-224.pathapp")}


def evaluate(model: Path, head: str, out: Path, epochs: int, fewshot: bool, folds: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "pathapp", "evaluate", "--data", str(DATA), "--model", str(model), "--method",
           "segment", "--seg-head", head, "--folds", str(folds), "--group-by", "case_prefix", "--epochs", str(epochs),
           "--out", str(out)] + (["--fewshot"] if fewshot else [])
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text()), time.perf_counter() - t


def unet(seconds_per_fold: float, folds: int, seed: int = 0) -> tuple[dict, int]:
    """smp U-Net (ResNet-18, random init) on the folds `pathapp evaluate` uses, `seconds_per_fold` each."""
    import segmentation_models_pytorch as smp
    import torch

    from pathapp.models.loader import load_model
    from pathapp.models.seg import seg_loss
    from pathapp.train.evaluate import grouped_folds
    from pathapp.train.segment import SegData, _scores, confusions, read_mask_data

    ms = read_mask_data([DATA], "case_prefix")
    data = SegData(ms, load_model(TEACHER, tile_size=224, head=False), 1, features=False, progress=False)
    x_all = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(255)
    x_all = (x_all - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    y_all = torch.from_numpy(data.masks)
    split = grouped_folds(np.asarray(ms.labels), ms.groups, folds, seed)
    pred = np.zeros(data.masks.shape, np.int16)
    steps = []
    for tr, te in split:
        torch.manual_seed(seed)
        model = smp.Unet("resnet18", encoder_weights=None, classes=len(ms.class_names))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        rng = np.random.default_rng(seed)
        model.train()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds_per_fold:
            b = torch.from_numpy(rng.choice(tr, 16, replace=False))
            loss = seg_loss(model(x_all[b]), y_all[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += 1
        steps.append(n)
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(te), 32):
                pred[te[i:i + 32]] = model(x_all[te[i:i + 32]]).argmax(1).numpy()
    return _scores(confusions(data.masks, pred, len(ms.class_names)), ms.groups, 1000, seed), int(np.mean(steps))


def row(name: str, m: dict, floor: dict | None, secs: float, note: str = "") -> str:
    lo, hi = m["ci95"]["mean_dice"]
    ilo, ihi = m["ci95"]["miou"]
    dice = " / ".join(f"{d:.3f}" for d in m["dice"])
    f = f"{floor['mean_dice']:.3f}" if floor else "–"
    return (f"| {name} | {m['mean_dice']:.3f} [{lo:.3f}, {hi:.3f}] | {m['miou']:.3f} [{ilo:.3f}, {ihi:.3f}] | "
            f"{dice} | {f} | {secs:.0f} {note}|")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from report import finish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--heads", nargs="+", default=["linear", "decoder"])
    ap.add_argument("--work", type=Path, default=Path("bench-seg-ebhi"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seg_ebhi.txt")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    models = bundles(args.work)
    lines = [f"# python benchmarks/bench_seg_ebhi.py --epochs {args.epochs} --folds {args.folds} --heads {' '.join(args.heads)}",
             f"# EBHI-Seg, 692 image+mask pairs (Background / Foreground), {args.folds} folds grouped by case_prefix, "
             f"224 px, heads {args.epochs} epochs, 95 % CI over cases", "",
             "| model | mean Dice [95 % CI] | mIoU [95 % CI] | Dice background / foreground | floor mean Dice "
             "(majority class) | seconds |", "|---|---|---|---|---|---|"]
    curves = {}
    budget = 0.0  # the U-Net's: the slowest head's run without the few-label curve (same ViT either way)
    for label, model in models.items():
        for head in args.heads:
            fewshot = label.startswith("pathapp") and head == "linear"
            report, secs = evaluate(model, head, args.work / f"{model.stem}-{head}", args.epochs, fewshot, args.folds)
            if fewshot:
                curves[f"{label}, {head}"] = report["fewshot"]
            if not fewshot:
                budget = max(budget, secs)
            lines.append(row(f"{label} + {head} head", report["metrics"], report["floors"]["majority_class"], secs))
            print(lines[-1], flush=True)
    t = time.perf_counter()
    m, steps = unet(budget / args.folds, args.folds)
    lines.append(row("U-Net (smp, ResNet-18, random init)", m, None, time.perf_counter() - t,
                     f"({steps} steps of 16 per fold) "))
    lines += ["", "few-label curve (mean Dice on the held-out folds vs labelled training images per fold):"]
    for label, curve in curves.items():
        lines.append(f"- {label}: " + ", ".join(f"{c['images']}: {c['mean_dice']:.3f}" for c in curve))
    finish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
