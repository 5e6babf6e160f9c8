"""DINOv2's per-step schedules (cosine with linear warm-up: `engine.schedules.CosineSchedule`) and its
AdamW parameter groups: layer-wise lr decay, a smaller lr for the patch embedding, no weight decay on
biases/norms/LayerScale, and the head's last layer flagged so it can be frozen during the first epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pathapp.engine.schedules import CosineSchedule


@dataclass
class Schedules:
    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """DINOv2's rule: lr grows with the square root of the total batch relative to 1024."""
    return base_lr * math.sqrt(total_batch / 1024)


def build_schedules(cfg, world_size: int = 1) -> Schedules:
    """All schedules of a run from its SSLConfig (steps are optimiser steps)."""
    total = cfg.total_steps
    lr = scaled_lr(cfg.base_lr, cfg.batch_size * cfg.grad_accum * world_size)
    warm = cfg.epochs_to_steps(cfg.warmup_epochs)
    ttemp_warm = min(cfg.epochs_to_steps(cfg.warmup_teacher_temp_epochs), total)
    return Schedules(
        lr=CosineSchedule(lr, cfg.min_lr, total, warm),
        last_layer_lr=CosineSchedule(lr, cfg.min_lr, total, warm, freeze=cfg.epochs_to_steps(cfg.freeze_last_layer_epochs)),
        wd=CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total),
        momentum=CosineSchedule(cfg.momentum_teacher, cfg.final_momentum_teacher, total),
        teacher_temp=CosineSchedule(cfg.teacher_temp, cfg.teacher_temp, total, ttemp_warm, start_warmup=cfg.warmup_teacher_temp),
    )


def _backbone_layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings and tokens, i+1 for block i, n_blocks+1 for what follows the blocks."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def param_groups(student: nn.Module, layer_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups with `lr_multiplier`, `wd_multiplier` and `is_last_layer` keys; parameters with
    identical multipliers share one group. `student` has `.backbone`, heads and `.mask_token`."""
    n_blocks = len(student.backbone.blocks)
    groups: dict[tuple[float, float, bool], list[torch.Tensor]] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            lr_mult = layer_decay ** (n_blocks + 1 - _backbone_layer_id(sub, n_blocks))
            if sub.startswith("patch_embed"):
                lr_mult *= patch_embed_lr_mult
        elif name == "mask_token":
            lr_mult = layer_decay ** (n_blocks + 1)
        else:
            lr_mult = 1.0
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
        is_last = "last_layer" in name
        groups.setdefault((lr_mult, 0.0 if no_wd else 1.0, is_last), []).append(p)
    return [
        {"params": ps, "lr_multiplier": lm, "wd_multiplier": wm, "is_last_layer": last}
        for (lm, wm, last), ps in groups.items()
    ]


def apply_schedules(optimizer: torch.optim.Optimizer, sched: Schedules, step: int) -> dict[str, float]:
    """Set every group's lr and weight decay for `step`; returns the scalar values for logging."""
    lr, last_lr, wd = sched.lr[step], sched.last_layer_lr[step], sched.wd[step]
    for g in optimizer.param_groups:
        g["lr"] = (last_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        g["weight_decay"] = wd * g["wd_multiplier"]
    return {"lr": lr, "last_layer_lr": last_lr, "wd": wd, "momentum": sched.momentum[step],
            "teacher_temp": sched.teacher_temp[step]}
