"""Attention-MIL for slide labels: a gated-attention ABMIL head trained on per-slide embedding bags.

The head is `models.heads` "abmil", so the bundle that inference runs is the module trained here;
inference applies it to the slide's tile embeddings and exports the attention per tile
(SlideResult.extra["attention"]) through the ordinary writers (measurement + heatmap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pathapp.train.fit import FitError, FittedHead, class_weights


def fit_abmil(
    bags: Sequence[np.ndarray],
    y: np.ndarray,
    n_classes: int,
    groups: np.ndarray | None = None,
    *,
    hidden_dim: int = 128,
    attn_dim: int = 64,
    dropout: float = 0.25,
    epochs: int = 40,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    patience: int = 10,
    seed: int = 0,
) -> FittedHead:
    """Train ABMIL with class-weighted cross-entropy (one bag per step, AdamW). With enough groups a
    grouped validation split (about a fifth of the groups) picks the epoch by validation loss and
    stops after `patience` epochs without improvement; otherwise all epochs run on all bags."""
    import torch

    from pathapp.models.heads import build_head, head_state
    from pathapp.train.evaluate import SplitError, holdout_split

    y = np.asarray(y, np.int64)
    if len(np.unique(y)) < 2:
        raise FitError("attention-MIL needs slides of at least two classes")
    bags = [np.asarray(b, np.float32) for b in bags]
    if any(len(b) == 0 for b in bags):
        raise FitError("a slide has no tiles (no tissue found); remove it from the slide list")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    train_idx, val_idx = np.arange(len(y)), np.zeros(0, int)
    if len(np.unique(groups)) >= 5 and np.bincount(y).min() >= 3:
        try:
            train_idx, val_idx = holdout_split(y, groups, 0.2, seed)
        except SplitError:
            pass
    torch.manual_seed(seed)
    cfg: dict[str, Any] = {
        "in_dim": int(bags[0].shape[1]),
        "num_classes": int(n_classes),
        "hidden_dim": hidden_dim,
        "attn_dim": attn_dim,
        "dropout": dropout,
    }
    head = build_head("abmil", cfg)
    weights = torch.as_tensor(class_weights(y[train_idx], n_classes), dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    tensors = [torch.from_numpy(b) for b in bags]
    rng = np.random.default_rng(seed)
    best = (float("inf"), 0, head_state(head)[2])
    history = []
    for epoch in range(epochs):
        head.train()
        total = 0.0
        for i in rng.permutation(train_idx):
            loss = torch.nn.functional.cross_entropy(
                head.logits(tensors[i])[None], torch.tensor([y[i]]), weight=weights
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        head.eval()
        if len(val_idx):
            with torch.no_grad():
                val = float(
                    np.mean(
                        [
                            torch.nn.functional.cross_entropy(head.logits(tensors[i])[None], torch.tensor([y[i]])).item()
                            for i in val_idx
                        ]
                    )
                )
            history.append({"epoch": epoch, "train_loss": total / len(train_idx), "val_loss": val})
            if val < best[0]:
                best = (val, epoch, head_state(head)[2])
            elif epoch - best[1] >= patience:
                break
        else:
            history.append({"epoch": epoch, "train_loss": total / len(train_idx)})
    tensors_out = best[2] if len(val_idx) else head_state(head)[2]
    info = {"method": "abmil", "epochs_run": len(history), "best_epoch": best[1] if len(val_idx) else len(history) - 1,
            "n_slides": len(y), "n_val": int(len(val_idx)), "history": history[-5:]}
    return FittedHead("abmil", dict(head.config), {k: v.numpy() for k, v in tensors_out.items()}, info)


def predict_bags(head: FittedHead, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide probabilities (S, C) and per-tile attention for each bag, through the bundle's head."""
    import torch

    module = head.build()
    probs, attn = [], []
    with torch.no_grad():
        for b in bags:
            p, a = module(torch.as_tensor(np.asarray(b), dtype=torch.float32))
            probs.append(p.double().numpy())
            attn.append(a.double().numpy())
    return np.stack(probs), attn


def abmil_fitter(n_classes: int, **options: Any):
    """A FitFn over an object array of bags, for evaluate.cross_validate."""

    def fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray):
        head = fit_abmil(list(X), y, n_classes, groups, **options)
        return lambda Z: predict_bags(head, list(Z))[0]

    return fit
