"""Attention-MIL on slide-level targets: a gated-attention ABMIL head trained on per-slide embedding bags.

The head is `models.heads` "abmil", so the bundle that inference runs is the module trained here;
inference applies it to the slide's tile embeddings and exports the attention per tile
(SlideResult.extra["attention"]) through the ordinary writers (measurement + heatmap).

Targets (`task`): classes (class-weighted cross-entropy, one bag per step); survival (Cox partial
likelihood with Breslow's handling of tied times over a batch of bags, since a bag's risk only means
something against the others still at risk); a continuous value (Huber or squared error on the
standardised target, one bag per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.train.fit import FitError, FittedHead, class_weights

if TYPE_CHECKING:
    from torch import Tensor

# per task: bags per optimiser step, random tiles per bag and step (None: all), learning rate
BAGS_PER_STEP = {"classification": 1, "survival": 16, "regression": 8}
MAX_TILES = {"classification": None, "survival": 2048, "regression": None}
LEARNING_RATE = {"classification": 2e-4, "survival": 1e-3, "regression": 3e-3}
PADDED_TILES = 65536  # tile rows per padded forward pass (bounds memory when bags differ in size)


def cox_nll(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood per event, Breslow ties: each event's risk set is every
    slide whose time is at least the event's time (tied events share one full risk set).

    -1/d * sum over events i of [risk_i - log sum_{j: t_j >= t_i} exp(risk_j)], d = number of events."""
    import torch

    order = torch.argsort(time, descending=True)
    r, t, e = risk[order], time[order], event[order]
    log_risk_set = torch.logcumsumexp(r, dim=0)
    # in descending order the risk set of position k ends at the last position with the same time
    last = torch.searchsorted(-t, -t, right=True) - 1
    return -((r - log_risk_set[last]) * e).sum() / e.sum().clamp(min=1)


def _objective(task: str, y: np.ndarray, n_classes: int, train_idx: np.ndarray, loss: str):
    """loss(outputs (B, C), bag indices, for_validation) -> scalar tensor, for the task."""
    import torch
    import torch.nn.functional as F

    if task == "classification":
        target = torch.as_tensor(y, dtype=torch.long)
        weights = torch.as_tensor(class_weights(y[train_idx], n_classes), dtype=torch.float32)
        return lambda out, idx, val: F.cross_entropy(out, target[idx], weight=None if val else weights)
    if task == "survival":
        time = torch.as_tensor(y[:, 0], dtype=torch.float32)
        event = torch.as_tensor(y[:, 1], dtype=torch.float32)
        return lambda out, idx, val: cox_nll(out[:, 0], time[idx], event[idx])
    mean, std = float(y[train_idx].mean()), float(y[train_idx].std())
    z = torch.as_tensor((y - mean) / std, dtype=torch.float32)
    fn = {"huber": F.huber_loss, "mse": F.mse_loss}[loss]
    return lambda out, idx, val: fn(out[:, 0], z[idx])


def _check_targets(task: str, y: np.ndarray, train_idx: np.ndarray) -> None:
    if task == "classification" and len(np.unique(y)) < 2:
        raise FitError("attention-MIL needs slides of at least two classes")
    if task == "survival" and y[train_idx, 1].sum() < 2:
        raise FitError(f"only {int(y[train_idx, 1].sum())} observed events among the training slides; "
                       f"a Cox model needs at least 2")
    if task == "regression" and not y[train_idx].std() > 0:
        raise FitError("every training slide has the same target value; nothing to learn")


def fit_abmil(
    bags: Sequence[np.ndarray],
    y: np.ndarray,
    n_classes: int = 1,
    groups: np.ndarray | None = None,
    *,
    task: str = "classification",
    hidden_dim: int = 128,
    attn_dim: int = 64,
    dropout: float = 0.25,
    epochs: int = 40,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    patience: int = 10,
    bags_per_step: int | None = None,
    max_tiles: int | None = None,
    loss: str = "huber",
    seed: int = 0,
) -> FittedHead:
    """Train ABMIL (AdamW) on `y`: class indices, (time, event) rows for survival, or values.
    Defaults per task: BAGS_PER_STEP, MAX_TILES, LEARNING_RATE.

    With enough groups a grouped validation split (about a fifth of the groups, stratified by class,
    event or value tertile) picks the epoch by validation loss and stops after `patience` epochs
    without improvement; otherwise all epochs run on all bags. A survival head is then centred on the
    median risk of its training slides (heads.ABMILHead), a regression head scaled back to the
    target's units."""
    import torch

    from pathapp.models.heads import build_head, head_state
    from pathapp.train.evaluate import SplitError, holdout_split
    from pathapp.train.outcomes import outcome_strata

    y = np.asarray(y, np.int64 if task == "classification" else np.float64)
    bags = [np.asarray(b, np.float32) for b in bags]
    if any(len(b) == 0 for b in bags):
        raise FitError("a slide has no tiles (no tissue found); remove it from the slide list")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    _check_targets(task, y, np.arange(len(y)))
    strata = outcome_strata(task, y)
    train_idx, val_idx = np.arange(len(y)), np.zeros(0, int)
    if len(np.unique(groups)) >= 5 and np.unique(strata, return_counts=True)[1].min() >= 3:
        try:
            train_idx, val_idx = holdout_split(strata, groups, 0.2, seed)
        except SplitError:
            pass
        if task == "survival" and y[val_idx, 1].sum() < 2:  # a validation Cox loss needs events
            train_idx, val_idx = np.arange(len(y)), np.zeros(0, int)
    _check_targets(task, y, train_idx)
    torch.manual_seed(seed)
    cfg: dict[str, Any] = {
        "in_dim": int(bags[0].shape[1]),
        "num_classes": int(n_classes) if task == "classification" else 1,
        "hidden_dim": hidden_dim,
        "attn_dim": attn_dim,
        "dropout": dropout,
    }
    if task != "classification":
        cfg["task"] = task
    head = build_head("abmil", cfg)
    objective = _objective(task, y, cfg["num_classes"], train_idx, loss)
    per_step = bags_per_step or BAGS_PER_STEP[task]
    max_tiles = max_tiles or MAX_TILES[task]
    opt = torch.optim.AdamW(head.parameters(), lr=lr or LEARNING_RATE[task], weight_decay=weight_decay)
    tensors = [torch.from_numpy(b) for b in bags]

    def padded_outputs(chunk: list[Tensor]) -> Tensor:
        padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
        lengths = torch.as_tensor([len(b) for b in chunk])
        return head.attend(padded, torch.arange(padded.shape[1]) < lengths[:, None])[0]

    def outputs(idx, sample: bool = False) -> Tensor:
        """Raw outputs (B, C) of bags `idx`, padded into batches of at most PADDED_TILES tile rows;
        with `sample`, at most `max_tiles` random tiles of each bag (a new draw every step)."""
        out, chunk, longest = [], [], 0
        for i in idx:
            b = tensors[i]
            if sample and max_tiles and len(b) > max_tiles:
                b = b[torch.randperm(len(b))[:max_tiles]]
            if chunk and (len(chunk) + 1) * max(longest, len(b)) > PADDED_TILES:
                out.append(padded_outputs(chunk))
                chunk, longest = [], 0
            chunk.append(b)
            longest = max(longest, len(b))
        return torch.cat(out + [padded_outputs(chunk)])

    rng = np.random.default_rng(seed)
    best = (float("inf"), 0, head_state(head)[2])
    history = []
    for epoch in range(epochs):
        head.train()
        total, steps = 0.0, 0
        order = rng.permutation(train_idx)
        for s in range(0, len(order), per_step):
            idx = order[s : s + per_step]
            if task == "survival" and y[idx, 1].sum() == 0:
                continue  # no event in this batch: the partial likelihood is constant
            loss_value = objective(outputs(idx, sample=True), idx, False)
            opt.zero_grad()
            loss_value.backward()
            opt.step()
            total, steps = total + float(loss_value.detach()), steps + 1
        head.eval()
        record = {"epoch": epoch, "train_loss": total / max(1, steps)}
        if len(val_idx):
            with torch.no_grad():
                val = float(objective(outputs(val_idx), val_idx, True))  # survival: one risk set over them all
            record["val_loss"] = val
            if val < best[0]:
                best = (val, epoch, head_state(head)[2])
            elif epoch - best[1] >= patience:
                history.append(record)
                break
        history.append(record)
    if len(val_idx):
        head.load_state_dict(best[2])
    head.eval()
    config = dict(head.config)
    if task == "survival":
        with torch.no_grad():
            config["risk_offset"] = float(np.median(outputs(train_idx)[:, 0].numpy()))
    elif task == "regression":
        config["target_mean"], config["target_std"] = float(y[train_idx].mean()), float(y[train_idx].std())
    info = {"method": "abmil", "task": task, "epochs_run": len(history),
            "best_epoch": best[1] if len(val_idx) else len(history) - 1,
            "n_slides": len(y), "n_val": int(len(val_idx)), "history": history[-5:]}
    if task == "survival":
        info["n_events"] = int(y[:, 1].sum())
    elif task == "regression":
        info["loss"] = loss
    tensors_out = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    return FittedHead("abmil", config, tensors_out, info)


def predict_bags(head: FittedHead, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide outputs (S, C) (probabilities, risk or value) and per-tile attention for each bag,
    through the bundle's head."""
    import torch

    module = head.build()
    out, attn = [], []
    with torch.no_grad():
        for b in bags:
            p, a = module(torch.as_tensor(np.asarray(b), dtype=torch.float32))
            out.append(p.double().numpy())
            attn.append(a.double().numpy())
    return np.stack(out), attn


def abmil_fitter(n_classes: int = 1, task: str = "classification", **options: Any) -> Callable:
    """A FitFn over an object array of bags, for evaluate.cross_validate (class probabilities) or
    outcomes.cross_validate_outcome (risk or value per slide)."""

    def fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray):
        head = fit_abmil(list(X), y, n_classes, groups, task=task, **options)
        if task == "classification":
            return lambda Z: predict_bags(head, list(Z))[0]
        return lambda Z: predict_bags(head, list(Z))[0][:, 0]

    return fit
