"""LoRA fine-tuning of the ViT with a linear head, exported as a plain bundle.

Only the adapters (models/lora.py) and the head train; the backbone stays bit-identical until
export, where the adapters are merged into its weights, so `pathapp infer` runs the result like any
other bundle. AdamW with linear warm-up then cosine decay, early stopping on a grouped validation
split, pathology augmentation (flips, 90° rotations, HED stain jitter, colour jitter; the same
transforms as SSL pretraining), and a checkpoint after every epoch that `resume=True` continues.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.atomic import atomic_torch_save
from pathapp.errors import PathappError
from pathapp.models.lora import DEFAULT_TARGETS


LORA_MAX_AUTO_BATCH = 32


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
    batch_size: int | None = None  # None: the largest power of two ≤ LORA_MAX_AUTO_BATCH that fits (engine.memory)
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
    from tqdm import tqdm

    cfg = config or LoraConfig()
    y = np.asarray(y, np.int64)
    if len(np.unique(y)) < 2:
        raise FinetuneError("LoRA fine-tuning needs labelled tiles of at least two classes")
    train_idx, val_idx = _holdout(y, np.asarray(groups), cfg.seed)
    run = _LoraRun(bundle, cfg, len(class_names), y, train_idx, device)
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if resume and ckpt is not None and ckpt.exists():
        run.load(ckpt)

    state = run.state
    bar = tqdm(total=run.total, initial=state["step"], unit="step", desc="LoRA", disable=not progress, leave=False)
    while state["epoch"] < cfg.epochs and state["step"] < run.total:
        entry = run.train_epoch(tiles, y, train_idx, bar)
        if len(val_idx):
            entry["val_loss"], entry["val_balanced_accuracy"] = run.validate(tiles, y, val_idx)
            run.keep_if_best(entry["val_loss"])
        state["history"].append(entry)
        state["epoch"] += 1
        if ckpt is not None:
            run.save(ckpt)
        if len(val_idx) and state["epoch"] - 1 - state["best_epoch"] >= cfg.patience:
            break
    bar.close()
    out = run.export(bundle, class_names)
    return out, {"history": state["history"], "best_epoch": state["best_epoch"], "n_val": int(len(val_idx))}


def _holdout(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A grouped fifth for early stopping when there are at least 5 groups, else no validation."""
    from pathapp.train.evaluate import SplitError, holdout_split

    if len(np.unique(groups)) >= 5:
        try:
            return holdout_split(y, groups, 0.2, seed)
        except SplitError:
            pass
    return np.arange(len(y)), np.zeros(0, np.int64)


class _LoraRun:
    """The model with adapters and a linear head, its optimiser, schedule and resumable state."""

    def __init__(self, bundle, cfg: LoraConfig, n_classes: int, y: np.ndarray, train_idx: np.ndarray, device: str):
        import torch

        from pathapp.engine.schedules import CosineSchedule
        from pathapp.models.device import resolve_device
        from pathapp.models.heads import build_head
        from pathapp.models.lora import apply_lora, lora_parameters
        from pathapp.train.fit import class_weights

        self.cfg, self.n_classes = cfg, n_classes
        self.dev = resolve_device(device)
        torch.manual_seed(cfg.seed)
        self.model = bundle.build("cpu")
        self.backbone = self.model.backbone
        apply_lora(self.backbone, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout)
        self.head = self.model.head = build_head("linear", {"in_dim": bundle.embedding_dim, "num_classes": n_classes})
        self.backbone.set_grad_checkpointing(True)  # timm recomputes block activations in the backward pass
        self.model.to(self.dev)
        self.cfg = cfg = replace(cfg, batch_size=self._fit_batch(bundle.tile_size))
        self.opt = torch.optim.AdamW(
            [
                {"params": lora_parameters(self.backbone), "lr": cfg.lr},
                {"params": list(self.head.parameters()), "lr": cfg.head_lr or cfg.lr},
            ],
            weight_decay=cfg.weight_decay,
        )
        steps_per_epoch = max(1, -(-len(train_idx) // cfg.batch_size))
        self.total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
        self.schedule = CosineSchedule(1.0, 0.01, self.total, warmup=min(cfg.warmup_steps, self.total // 2))
        self.weights = torch.as_tensor(class_weights(y[train_idx], n_classes), dtype=torch.float32, device=self.dev)
        self.state = {"epoch": 0, "step": 0, "best_loss": float("inf"), "best_epoch": -1, "best": None, "history": []}

    def _fit_batch(self, tile_size: int) -> int:
        """The batch size: the one asked for when it fits in memory (else one line with the largest
        that does), or the largest power of two ≤ LORA_MAX_AUTO_BATCH that fits; two probe steps on
        random tiles measure it (engine.memory)."""
        import torch

        from pathapp.engine.memory import choose_batch, probe
        from pathapp.models.lora import lora_parameters

        gen = torch.Generator().manual_seed(self.cfg.seed)

        def step(b: int) -> None:
            x = torch.rand(b, 3, tile_size, tile_size, generator=gen).to(self.dev)
            self.head.logits(self.model.embed(x)).float().logsumexp(-1).sum().backward()
            self.model.zero_grad(set_to_none=True)

        trainable = [*lora_parameters(self.backbone), *self.head.parameters()]
        moments = 2 * sum(p.numel() * p.element_size() for p in trainable)  # AdamW's two moments
        fit = probe(step, self.dev, smallest=1, state_bytes=moments, image_bytes=4 * 3 * tile_size**2)
        return choose_batch(fit, self.cfg.batch_size, LORA_MAX_AUTO_BATCH, smallest=1, what="train --method lora",
                            fix="gradient checkpointing is on; fewer LoRA --lora-targets or a smaller --lora-rank "
                                "lower it a little")

    def _config(self) -> dict:
        return asdict(self.cfg) | {"targets": list(self.cfg.targets)}

    def load(self, ckpt: Path) -> None:
        import torch

        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved["config"] != self._config():
            raise FinetuneError(f"{ckpt}: checkpoint was made with other LoRA options; drop --resume or reuse them")
        self.model.load_state_dict(saved["model"], strict=False)
        self.opt.load_state_dict(saved["optimizer"])
        self.state = saved["state"]

    def save(self, ckpt: Path) -> None:
        trainable = {k: v for k, v in self.model.state_dict().items() if "lora_" in k or k.startswith("head.")}
        atomic_torch_save(
            {"model": trainable, "optimizer": self.opt.state_dict(), "state": self.state, "config": self._config()}, ckpt
        )

    def train_epoch(self, tiles, y: np.ndarray, train_idx: np.ndarray, bar) -> dict:
        import torch

        from pathapp.engine.augment import augment_tiles

        cfg, state = self.cfg, self.state
        self.model.train()
        rng = np.random.default_rng([cfg.seed, state["epoch"]])  # per epoch, so a resumed run draws the same
        losses = []
        for idx, x in _batches(tiles, rng.permutation(train_idx), cfg.batch_size):
            if state["step"] >= self.total:
                break
            if cfg.augment:
                x = augment_tiles(x, rng, cfg.hed_sigma)
            for g in self.opt.param_groups:
                g["lr"] = g.setdefault("initial_lr", g["lr"]) * self.schedule[state["step"]]
            logits = self.head.logits(self.model.embed(x.to(self.dev)))
            loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y[idx], device=self.dev), weight=self.weights)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(float(loss.detach()))
            state["step"] += 1
            bar.update(1)
        return {"epoch": state["epoch"], "step": state["step"], "train_loss": float(np.mean(losses)) if losses else None}

    def validate(self, tiles, y: np.ndarray, val_idx: np.ndarray) -> tuple[float, float]:
        """(cross-entropy, balanced accuracy) on the held-out tiles."""
        import torch

        from pathapp.train.evaluate import point_metrics

        bs = self.cfg.batch_size
        self.model.eval()
        probs = np.zeros((len(val_idx), self.n_classes))
        with torch.no_grad():
            for k, (idx, x) in enumerate(_batches(tiles, val_idx, bs)):
                probs[k * bs : k * bs + len(idx)] = self.model(x.to(self.dev))[1].double().cpu().numpy()
        loss = float(-np.log(np.clip(probs[np.arange(len(val_idx)), y[val_idx]], 1e-12, None)).mean())
        return loss, float(point_metrics(y[val_idx], probs, self.n_classes)["balanced_accuracy"])

    def keep_if_best(self, val_loss: float) -> None:
        from pathapp.models.heads import head_state
        from pathapp.models.lora import lora_state_dict

        if val_loss < self.state["best_loss"]:
            self.state["best_loss"], self.state["best_epoch"] = val_loss, self.state["epoch"]
            self.state["best"] = {"lora": lora_state_dict(self.backbone), "head": head_state(self.head)[2]}

    def export(self, bundle, class_names: Sequence[str]):
        """The best (or last) adapters merged into the backbone, as a plain bundle."""
        from pathapp.models.bundle import Bundle
        from pathapp.models.lora import merge_lora

        best = self.state["best"]
        if best is not None:
            self.backbone.load_state_dict(best["lora"], strict=False)
            self.head.load_state_dict(best["head"])
        self.model.eval().cpu()
        training = {"method": "lora", **self._config(), "best_epoch": self.state["best_epoch"], "steps": self.state["step"]}
        return Bundle.from_model(
            merge_lora(self.backbone),
            bundle.spec,
            head=self.head,
            class_names=list(class_names),
            mpp=bundle.mpp,
            tile_size=bundle.tile_size,
            mean=bundle.mean,
            std=bundle.std,
            recipe=bundle.recipe,
            provenance={**bundle.provenance, "training": training},
        )
