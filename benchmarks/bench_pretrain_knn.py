"""Evidence that `pathapp pretrain` learns on real tissue (a benchmark, not a CI test).

1. Pretrain a small ViT with the recipe in --config (default pretrain_cpu30.yaml next to this file:
   dinov2_vits14 shrunk to depth 6 / dim 192 / 3 heads, LayerScale 1, DINO + iBOT + KoLeo) for
   --minutes of CPU time on tiles sampled online from the H&E slides in ../shared/data/wsi
   (default, --data slides: the slides.csv he_slides.csv next to this file), or — clearly a
   different, transductive setting — on the 694 EBHI-Seg images themselves as unlabelled data
   (--data ebhi: labels and masks are never read by pretraining).
2. Score the teacher with `pathapp evaluate` exactly as a user runs it (no private protocol):
   `pathapp evaluate --data EBHI/labels.csv --image-mpp 1.0 --model run/teacher.pathapp --folds 5
   --method M` for each --methods M (default linear and knn): the 694 EBHI-Seg images (6 classes,
   colorectal biopsies) at 1.0 µm/px (estimated from nucleus size), each tiled at the bundle's µm/px
   and tile size as `pathapp infer` tiles it and pooled by the mean tile embedding, 5 folds grouped
   by case_prefix, balanced accuracy with a 95 % CI over resampled cases, and the floors evaluate
   measures in the same run on the same folds (standardised 512-bin colour histogram of the same
   tiles; the same architecture at random init) with paired model − floor differences.
3. Show how far the teacher's DINO head tells images apart at init and at the end (head_spread): in
   a short CPU run it sends every image to nearly the same point, the DINO loss's plateau at ln K.

The number of steps is set from a 6-step calibration so that the cosine schedules finish inside the
budget; one "epoch" is 1% of the steps (warm-up 10%, teacher-temperature warm-up 30%). On a shared
machine the pace can change after calibration; --minutes × 1.1 then stops the run early (the report
gives steps done and planned).

    .venv/bin/python benchmarks/bench_pretrain_knn.py --minutes 30 --out /tmp/bench-30   # the 30-minute run
    .venv/bin/python benchmarks/bench_pretrain_knn.py --steps 150 --batch-size 64 --set n_prototypes=512 --out /tmp/t  # a trial
    .venv/bin/python benchmarks/bench_pretrain_knn.py --minutes 1 --batch-size 16 --out /tmp/bench-smoke  # smoke
    .venv/bin/python benchmarks/bench_pretrain_knn.py --eval-only --out /tmp/bench-smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EBHI = DATA / "labeled" / "ebhi-seg"
# The H&E slides of ../shared/data as a slides.csv for `pathapp pretrain --slides`, with the µm/px
# given where the file has none: tcga-cr-7395 records none, and 1.0 is estimated from its nuclei
# (8-10 px across; lymphocytes are 7-8 µm). luna-1065626.svs is left out: looked at, it is
# haematoxylin + DAB immunohistochemistry, not H&E.
HE_SLIDES = Path(__file__).resolve().with_name("he_slides.csv")


def link_folder(folder: Path, files: list[Path], names: list[str]) -> Path:
    """A folder of symlinks (the shared data is never copied)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f, n in zip(files, names):
        (folder / n).symlink_to(f)
    return folder


def image_paths() -> list[Path]:
    """The EBHI-Seg images (for pretraining on them with --data ebhi, and the head-spread check)."""
    with open(EBHI / "labels.csv", newline="") as f:
        return [EBHI / r["image"] for r in csv.DictReader(f)]


def make_config(args, data_dir: Path, steps: int):
    """The recipe of --config with the data, the run length and the step-derived schedules filled in."""
    from pathapp.ssl.config import SSLConfig

    d = yaml.safe_load(args.config.read_text())
    ebhi = args.data == "ebhi"
    # EBHI images (≈1 µm/px, 224 px) are randomly cropped to tile_size, like slide tiles at the recipe's µm/px
    d.update(slides=None if ebhi else str(data_dir), tiles=str(data_dir) if ebhi else None,
             steps=steps, epoch_length=max(1, steps // 100), checkpoint_every=max(steps // 4, 1), log_every=1)
    if args.batch_size:
        d["batch_size"] = args.batch_size
    d.update(args.set)
    return SSLConfig.from_dict(d, str(args.config))


def calibrate(args, data_dir: Path, out: Path) -> float:
    """Seconds per optimiser step, from a short throw-away run (median of steps 4-6, after start-up)."""
    from pathapp.ssl.train import pretrain

    cal = out / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    pretrain(make_config(args, data_dir, 1000), cal, progress=False, stop_at=6)
    rows = [json.loads(ln) for ln in (cal / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["samples_seen"] / r["step"] / r["tiles_per_s"] for r in rows[3:]]
    shutil.rmtree(cal, ignore_errors=True)
    return float(np.median(per_step))


def head_spread(cfg, run: Path, images: np.ndarray) -> dict[str, dict[str, float]]:
    """How much the teacher's DINO head tells images apart, at init and at the end of the run: mean
    cosine between different images' L2-normalised bottleneck outputs, and the std of the prototype
    logits across images vs across prototypes. Near-equal outputs for every image mean the DINO
    targets do not depend on the image (the plateau at ln K)."""
    import torch
    import torch.nn.functional as F

    from pathapp.ssl.meta_arch import backbone_tokens
    from pathapp.engine.distributed import DistInfo
    from pathapp.ssl.train import _build_models

    cfg, _, _, teacher, _, _ = _build_models(cfg, DistInfo(0, 1, torch.device("cpu")))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    out = {}
    for when in ("init", "end"):
        if when == "end":
            teacher.load_state_dict(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["teacher"])
        with torch.inference_mode():
            z = F.normalize(teacher.dino_head.mlp(backbone_tokens(teacher.backbone, x)[:, 0]), dim=-1)
            logits = teacher.dino_head.last_layer(z)
        cos = z @ z.T
        out[when] = {"bottleneck_cosine_between_images": float(cos[~torch.eye(len(z), dtype=torch.bool)].mean()),
                     "logit_std_across_images": float(logits.std(0).mean()),
                     "logit_std_across_prototypes": float(logits.std(1).mean())}
    return out


def evaluate(teacher: Path, out: Path, methods: list[str], bootstrap: int) -> dict[str, dict]:
    """`pathapp evaluate` of the teacher on EBHI-Seg, one report per head method."""
    reports = {}
    for method in methods:
        cmd = [sys.executable, "-m", "pathapp", "evaluate", "--data", str(EBHI / "labels.csv"), "--image-mpp", "1.0",
               "--model", str(teacher), "--folds", "5", "--method", method, "--bootstrap", str(bootstrap),
               "--cache", str(out / "cache"), "--out", str(out / f"eval-{method}")]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        reports[method] = json.loads((out / f"eval-{method}" / "report.json").read_text())
    return reports


def table(reports: dict[str, dict]) -> list[str]:
    """Balanced accuracy [95 % CI] of the teacher and each floor, and the paired differences."""
    def ci(v: float, lo: float, hi: float, signed: bool = False) -> str:
        f = "+.3f" if signed else ".3f"
        return f"{v:{f}} [{lo:{f}}, {hi:{f}}]"

    floors = list(next(iter(reports.values()))["floors"])
    lines = ["| head | teacher | " + " | ".join(floors) + " | " + " | ".join(f"teacher − {f}" for f in floors) + " |",
             "|---" * (2 + 2 * len(floors)) + "|"]
    for method, r in reports.items():
        m = r["metrics"]
        cells = [ci(m["balanced_accuracy"], *m["ci95"]["balanced_accuracy"])]
        cells += [ci(r["floors"][f]["metrics"]["balanced_accuracy"], *r["floors"][f]["metrics"]["ci95"]["balanced_accuracy"])
                  for f in floors]
        cells += [ci(r["floors"][f]["model_minus_floor"]["balanced_accuracy"],
                     *r["floors"][f]["model_minus_floor"]["ci95"]["balanced_accuracy"], signed=True) for f in floors]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="pretraining budget (CPU wall clock)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-pretrain"))
    ap.add_argument("--data", choices=["slides", "ebhi"], default="slides")
    ap.add_argument("--config", type=Path, default=Path(__file__).with_name("pretrain_cpu30.yaml"),
                    help="pretraining recipe (SSLConfig YAML); data, steps and epoch_length are set here")
    ap.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch_size")
    ap.add_argument("--set", type=lambda kv: (kv.split("=", 1)[0], yaml.safe_load(kv.split("=", 1)[1])),
                    action="append", default=[], metavar="KEY=VALUE", help="override any recipe setting (YAML value)")
    ap.add_argument("--methods", nargs="+", default=["linear", "knn"], help="heads `pathapp evaluate` fits per fold")
    ap.add_argument("--bootstrap", type=int, default=1000, help="case resamples for the 95%% CIs")
    ap.add_argument("--steps", type=int, default=None,
                    help="fixed number of steps instead of calibrating to --minutes (which then only caps the run)")
    ap.add_argument("--eval-only", action="store_true", help="skip pretraining; score the run already in --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 leaves a core to the data worker and degrades gracefully on a busy machine")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pathapp.ssl.train import pretrain
    from pathapp.train.cache import load_tile_image

    args.out.mkdir(parents=True, exist_ok=True)
    paths = image_paths()
    if args.data == "slides":
        data_dir = HE_SLIDES
    else:  # images only, anonymous names: pretraining sees neither labels nor masks
        data_dir = link_folder(args.out / "ebhi-unlabelled", paths, [f"{i:04d}.png" for i in range(len(paths))])

    t0 = time.monotonic()
    run = args.out / "run"
    if args.eval_only:  # re-score a finished run (its own config.yaml)
        from pathapp.ssl.config import SSLConfig

        cfg = SSLConfig.load(run / "config.yaml")
        steps, train_minutes = cfg.total_steps, float("nan")
    else:
        if args.steps:
            steps = args.steps
        else:
            sec_per_step = calibrate(args, data_dir, args.out)
            steps = max(10, int(args.minutes * 60 * 0.95 / sec_per_step))
            print(f"calibration: {sec_per_step:.2f} s/step → {steps} steps in {args.minutes} min", flush=True)
        cfg = make_config(args, data_dir, steps)
        cfg.max_minutes = args.minutes * 1.1  # a safety net; the schedules are sized to finish before it
        shutil.rmtree(run, ignore_errors=True)
        t1 = time.monotonic()
        pretrain(cfg, run, progress=True)
        train_minutes = (time.monotonic() - t1) / 60
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]

    reports = evaluate(run / "teacher.pathapp", args.out, args.methods, args.bootstrap)

    spread = head_spread(cfg, run, np.stack([load_tile_image(p, cfg.global_crop_size) for p in paths[::7]]))
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": args.data, "slides": HE_SLIDES.read_text().splitlines()[1:] if args.data == "slides" else None,
        "config": cfg.to_dict(),
        "steps": len(rows), "planned_steps": steps, "pretrain_minutes": round(train_minutes, 2),
        "total_minutes": round((time.monotonic() - t0) / 60, 2),
        "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]],
        "tiles_per_s_median": float(np.median([r["tiles_per_s"] for r in rows])),
        "eval": "pathapp evaluate --folds 5 on EBHI-Seg (694 images at 1.0 µm/px, grouped by case_prefix); balanced "
                "accuracy [95% CI over resampled cases]; floors from the same run and folds, differences paired",
        "reports": reports, "teacher_head_spread": spread,
    }
    first, last = np.mean([r["loss"] for r in rows[:20]]), np.mean([r["loss"] for r in rows[-20:]])
    lines = [f"# {report['command']}", f"# {report['eval']}; {report['total_minutes']} min in all", "",
             *table(reports), "",
             f"{len(rows)} steps in {train_minutes:.1f} min ({report['tiles_per_s_median']:.1f} tiles/s); "
             f"loss, mean of first/last 20 steps: {first:.3f} → {last:.3f}",
             f"teacher DINO head on {len(paths[::7])} EBHI images, init → end: " + "; ".join(
                 f"{k.replace('_', ' ')} {spread['init'][k]:.3f} → {spread['end'][k]:.3f}" for k in spread["init"])]
    sys.path.insert(0, str(Path(__file__).parent))
    from report import finish

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    finish(lines, (args.json or args.out / "report.json").with_suffix(".txt"))  # the table and the lscpu flags


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
