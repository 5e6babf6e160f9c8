"""LoRA fine-tuning of the ViT with a linear head, exported as a plain bundle.

Only the adapters (models/lora.py) and the head train; the backbone stays bit-identical until
export, where the adapters are merged into its weights, so `pathapp infer` runs the result like any
other bundle. AdamW with linear warm-up then cosine decay, early stopping on a grouped validation
split, pathology augmentation (flips, 90° rotations, HED stain jitter, colour jitter; the same
transforms as SSL pretraining), and a checkpoint after every epoch that `resume=True` continues.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.atomic import atomic_torch_save
from pathapp.errors import PathappError
from pathapp.models.lora import DEFAULT_TARGETS


class FinetuneError(PathappError):
    """Fine-tuning cannot run with these data or options."""


@dataclass
class LoraConfig:
    """Everything that shapes a LoRA run (stored in the bundle's provenance)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps in total (tests, smoke runs)
    batch_size: int = 16
    lr: float = 1e-3
    head_lr: float | None = None  # default: lr
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    patience: int = 3
    augment: bool = True
    hed_sigma: float = 0.05
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _batches(tiles, indices: np.ndarray, batch_size: int):
    import torch

    for s in range(0, len(indices), batch_size):
        idx = indices[s : s + batch_size]
        arr = np.stack([tiles[int(i)] for i in idx])
        yield idx, torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def finetune_lora(
    bundle,
    tiles,
    y: np.ndarray,
    groups: np.ndarray,
    class_names: Sequence[str],
    config: LoraConfig | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
):
    """Fine-tune `bundle`'s backbone with LoRA on `tiles` (item i -> uint8 HxWx3) labelled `y`.

    Returns (merged Bundle with a linear head, history dict). A grouped fifth of the groups is held out
    for early stopping when there are at least 5 groups; otherwise every epoch runs and the last wins."""
    import torch
    from tqdm import tqdm

    from pathapp.models.bundle import Bundle
    from pathapp.models.heads import build_head, head_state
    from pathapp.models.lora import apply_lora, lora_parameters, lora_state_dict, merge_lora
    from pathapp.engine.augment import augment_tiles
    from pathapp.engine.schedules import CosineSchedule
    from pathapp.models.device import resolve_device
    from pathapp.train.evaluate import SplitError, holdout_split, point_metrics
    from pathapp.train.fit import class_weights

    cfg = config or LoraConfig()
    y = np.asarray(y, np.int64)
    n_classes = len(class_names)
    if len(np.unique(y)) < 2:
        raise FinetuneError("LoRA fine-tuning needs labelled tiles of at least two classes")
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    train_idx, val_idx = np.arange(len(y)), np.zeros(0, np.int64)
    if len(np.unique(groups)) >= 5:
        try:
            train_idx, val_idx = holdout_split(y, np.asarray(groups), 0.2, cfg.seed)
        except SplitError:
            pass

    model = bundle.build("cpu")
    backbone = model.backbone
    apply_lora(backbone, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout)
    head = build_head("linear", {"in_dim": bundle.embedding_dim, "num_classes": n_classes})
    model.head = head
    model.to(dev)
    params = [
        {"params": lora_parameters(backbone), "lr": cfg.lr},
        {"params": list(head.parameters()), "lr": cfg.head_lr or cfg.lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(train_idx) // cfg.batch_size))
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    schedule = CosineSchedule(1.0, 0.01, total, warmup=min(cfg.warmup_steps, total // 2))
    weights = torch.as_tensor(class_weights(y[train_idx], n_classes), dtype=torch.float32, device=dev)

    state = {"epoch": 0, "step": 0, "best_loss": float("inf"), "best_epoch": -1, "best": None, "history": []}
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if resume and ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved["config"] != asdict(cfg) | {"targets": list(cfg.targets)}:
            raise FinetuneError(f"{ckpt}: checkpoint was made with other LoRA options; drop --resume or reuse them")
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]

    def evaluate_val() -> tuple[float, float]:
        model.eval()
        probs = np.zeros((len(val_idx), n_classes))
        with torch.no_grad():
            for k, (idx, x) in enumerate(_batches(tiles, val_idx, cfg.batch_size)):
                probs[k * cfg.batch_size : k * cfg.batch_size + len(idx)] = model(x.to(dev))[1].double().cpu().numpy()
        loss = float(-np.log(np.clip(probs[np.arange(len(val_idx)), y[val_idx]], 1e-12, None)).mean())
        return loss, float(point_metrics(y[val_idx], probs, n_classes)["balanced_accuracy"])

    bar = tqdm(total=total, initial=state["step"], unit="step", desc="LoRA", disable=not progress, leave=False)
    while state["epoch"] < cfg.epochs and state["step"] < total:
        model.train()
        rng = np.random.default_rng([cfg.seed, state["epoch"]])  # per epoch, so a resumed run draws the same
        order = rng.permutation(train_idx)
        losses = []
        for idx, x in _batches(tiles, order, cfg.batch_size):
            if state["step"] >= total:
                break
            if cfg.augment:
                x = augment_tiles(x, rng, cfg.hed_sigma)
            for g in opt.param_groups:
                g["lr"] = g.setdefault("initial_lr", g["lr"]) * schedule[state["step"]]
            emb = model.embed(x.to(dev))
            loss = torch.nn.functional.cross_entropy(head.logits(emb), torch.as_tensor(y[idx], device=dev), weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            state["step"] += 1
            bar.update(1)
        entry = {"epoch": state["epoch"], "step": state["step"], "train_loss": float(np.mean(losses)) if losses else None}
        if len(val_idx):
            entry["val_loss"], entry["val_balanced_accuracy"] = evaluate_val()
            if entry["val_loss"] < state["best_loss"]:
                state["best_loss"], state["best_epoch"] = entry["val_loss"], state["epoch"]
                state["best"] = {"lora": lora_state_dict(backbone), "head": head_state(head)[2]}
        state["history"].append(entry)
        state["epoch"] += 1
        if ckpt is not None:
            trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head.")}
            atomic_torch_save({"model": trainable, "optimizer": opt.state_dict(), "state": state,
                               "config": asdict(cfg) | {"targets": list(cfg.targets)}}, ckpt)
        if len(val_idx) and state["epoch"] - 1 - state["best_epoch"] >= cfg.patience:
            break
    bar.close()

    if state["best"] is not None:
        backbone.load_state_dict(state["best"]["lora"], strict=False)
        head.load_state_dict(state["best"]["head"])
    model.eval().cpu()
    merged = merge_lora(backbone)
    out = Bundle.from_model(
        merged,
        bundle.spec,
        head=head,
        class_names=list(class_names),
        mpp=bundle.mpp,
        tile_size=bundle.tile_size,
        mean=bundle.mean,
        std=bundle.std,
        recipe=bundle.recipe,
        provenance={**bundle.provenance, "training": {"method": "lora", **asdict(cfg), "targets": list(cfg.targets),
                                                      "best_epoch": state["best_epoch"], "steps": state["step"]}},
    )
    return out, {"history": state["history"], "best_epoch": state["best_epoch"], "n_val": int(len(val_idx))}
