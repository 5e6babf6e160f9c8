"""Pretraining throughput on this machine's CPU (a benchmark, not a timed test).

With the recipe of --config (default pretrain_cpu30.yaml) on real multi-crop views of the H&E slides
of he_slides.csv (those bench_pretrain_knn.py uses), one process, --threads torch threads:

1. optimiser steps (student forward + backward, teacher forward, AdamW, EMA) in tiles/s for fp32,
   bf16 autocast with PyTorch's fused attention, and bf16 autocast with explicit q·kᵀ attention
   (what `pathapp pretrain` runs for `precision: bf16` on a CPU), and the ratios between them;
2. the data pipeline (online patching from the slides + multi-crop + masks) in samples/s per
   worker process, the rate the model can be fed at with `num_workers` workers.

On CPUs with AVX-512-BF16 or AMX (AMD Zen 4, Intel Sapphire Rapids and later) bf16 matmuls run faster
than fp32; without them bf16 is slower and the recipe should say `precision: fp32`.

    .venv/bin/python benchmarks/bench_pretrain_speed.py [--batch-size 64] [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def step_rate(cfg, batch: dict, precision: str, fused: bool, steps: int) -> float:
    """Median tiles/s of full optimiser steps (after two warm-up steps)."""
    import torch

    from pathapp.engine.distributed import DistInfo
    from pathapp.ssl.train import Criterion, _autocast, _build_models, _unfuse_attention

    info = DistInfo(0, 1, torch.device("cpu"))
    cfg = dataclasses.replace(cfg, precision=precision)
    cfg, _, student, teacher, wrapped, optimizer = _build_models(cfg, info)
    if not fused:
        _unfuse_attention(student, teacher)
    criterion = Criterion.build(cfg, info.device)
    autocast = _autocast(cfg, info.device)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss, _ = criterion(wrapped, teacher, batch, cfg.teacher_temp, autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.ema_update(student, 0.99)
        times.append(time.perf_counter() - t0)
    return cfg.batch_size / float(np.median(times[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "pretrain_cpu30.yaml")
    ap.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch_size")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per precision")
    ap.add_argument("--samples", type=int, default=128, help="samples timed for the data pipeline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pathapp.ssl.config import SSLConfig
    from pathapp.ssl.data import SSLDataset, collate, open_sources

    d = yaml.safe_load(args.config.read_text())
    d.update(slides=str(HERE / "he_slides.csv"), steps=100, epoch_length=1)
    if args.batch_size:
        d["batch_size"] = args.batch_size
    cfg = SSLConfig.from_dict(d, str(args.config))
    source = open_sources(cfg.slides, mpps=cfg.mpp, tile_size=cfg.tile_size, min_tissue=cfg.min_tissue,
                          balance=cfg.balance)
    dataset = SSLDataset(source, cfg, patch_size=14)
    t0 = time.perf_counter()
    items = [dataset[i] for i in range(args.samples)]
    data_rate = args.samples / (time.perf_counter() - t0)
    batch = collate(items[:cfg.batch_size])

    rates = {"fp32": step_rate(cfg, batch, "fp32", True, args.steps),
             "bf16, fused attention": step_rate(cfg, batch, "bf16", True, args.steps),
             "bf16, explicit attention": step_rate(cfg, batch, "bf16", False, args.steps)}
    print(f"recipe {args.config.name}: {cfg.backbone} {dict(cfg.backbone_overrides)}, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} torch thread(s)")
    for name, r in rates.items():
        print(f"  optimiser steps, {name:26s} {r:7.1f} tiles/s   ×{r / rates['fp32']:.2f} fp32")
    print(f"  data pipeline, one worker             {data_rate:7.1f} samples/s  "
          f"(×{data_rate / rates['bf16, explicit attention']:.2f} the bf16 step rate)")
    if args.json:
        args.json.write_text(json.dumps({"config": str(args.config), "batch_size": cfg.batch_size,
                                         "steps_tiles_per_s": rates, "data_samples_per_s_per_worker": data_rate},
                                        indent=2))


if __name__ == "__main__":
    main()
