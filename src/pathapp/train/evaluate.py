"""Honest evaluation: splits grouped by slide/patient, metrics with bootstrap CIs, plots, report.json.

Tiles of one slide (or one patient) are correlated, so every split keeps a group on one side and the
bootstrap resamples whole groups: a tile-level split or bootstrap would overstate accuracy and
understate the interval.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pathapp.atomic import atomic_path, atomic_write_text
from pathapp.errors import PathappError

FEWSHOT_SHOTS: tuple[int | None, ...] = (1, 5, 10, 25, 100, None)  # None = all labelled tiles

# fit(X_train, y_train, groups_train) -> predict_proba(X) -> (N, C) probabilities over all classes
FitFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


class SplitError(PathappError):
    """The data cannot be split as asked (too few groups or classes)."""


def grouped_folds(
    labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over groups: no group appears in both the train and test side of a fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_folds < 2:
        raise SplitError(f"--folds must be at least 2 (got {n_folds})")
    if n_groups < n_folds:
        raise SplitError(
            f"only {n_groups} groups (slides/patients) for {n_folds} folds; use --folds {max(2, n_groups)} or fewer"
        )
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [(tr, te) for tr, te in skf.split(np.zeros(len(labels)), labels, groups)]
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
    return folds


def holdout_split(
    labels: np.ndarray, groups: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One grouped train/test split with about `test_fraction` of the groups held out (more when a
    class is too rare to be stratified into that many folds)."""
    rarest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    k = max(2, min(round(1 / test_fraction), len(np.unique(groups)), rarest))
    return grouped_folds(labels, groups, k, seed)[0]


def _full_probs(probs: np.ndarray, n_classes: int) -> np.ndarray:
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probabilities must be (N, {n_classes}), got {probs.shape}")
    return probs


def point_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float | list[float]]:
    """Accuracy, balanced accuracy, macro-F1, per-class sensitivity/specificity, macro AUROC (OvR)."""
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    probs = _full_probs(probs, n_classes)
    pred = probs.argmax(1)
    labels = np.arange(n_classes)
    cm = confusion_matrix(y, pred, labels=labels)
    tp = np.diag(cm).astype(float)
    pos = cm.sum(1).astype(float)
    fp = cm.sum(0) - tp
    tn = cm.sum() - pos - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / pos
        spec = tn / (tn + fp)
    present = pos > 0
    out: dict[str, float | list[float]] = {
        "n": int(len(y)),
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "balanced_accuracy": float(np.mean(sens[present])),
        "macro_f1": float(f1_score(y, pred, labels=labels[present], average="macro", zero_division=0)),
        "sensitivity": [float(v) for v in sens],
        "specificity": [float(v) for v in spec],
    }
    out["auroc_ovr"] = float("nan")
    if present.sum() >= 2:
        p = probs[:, present]
        mass = p.sum(1, keepdims=True)
        # rescore among the classes present; a row that put all its mass on absent classes ties
        p = np.where(mass > 1e-12, p / np.where(mass > 1e-12, mass, 1.0), 1.0 / p.shape[1])
        yy = np.searchsorted(labels[present], y)
        if present.sum() == 2:
            out["auroc_ovr"] = float(roc_auc_score(yy, p[:, 1]))
        else:
            out["auroc_ovr"] = float(roc_auc_score(yy, p, multi_class="ovr", average="macro"))
    return out


def bootstrap_ci(
    y: np.ndarray,
    probs: np.ndarray,
    n_classes: int,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list]:
    """Percentile (1-alpha) CIs of every metric (per class for sensitivity/specificity), resampling
    whole groups when groups are given."""
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr", "sensitivity", "specificity")

    def metrics(idx: np.ndarray) -> dict:
        m = point_metrics(y[idx], probs[idx], n_classes)
        return {k: m[k] for k in keys}

    return group_bootstrap(metrics, np.arange(len(y)) if groups is None else groups, n_boot, seed, alpha)


def group_bootstrap(
    metrics: Callable[[np.ndarray], dict],
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list]:
    """Percentile (1-alpha) CIs of each value `metrics(indices)` returns (a number, or a list of
    numbers: one interval each), over resamples of whole groups. NaN (a metric undefined in a
    resample) is left out."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    samples: dict[str, list] = {}
    for _ in tqdm(range(n_boot), desc="bootstrap 95% CI", unit="resample", leave=False, mininterval=1.0):
        pick = rng.integers(0, len(uniq), len(uniq))
        for k, v in metrics(np.concatenate([members[g] for g in pick])).items():
            samples.setdefault(k, []).append(v)
    lo, hi = alpha / 2, 1 - alpha / 2
    ci: dict[str, list] = {}
    for k, v in samples.items():
        arr = np.asarray(v, dtype=float)
        if arr.ndim == 1:
            arr = arr[np.isfinite(arr)]
            ci[k] = [float(np.quantile(arr, lo)), float(np.quantile(arr, hi))] if len(arr) else [float("nan")] * 2
        else:  # (n_boot, K): a class absent from a resample gives NaN there, ignored
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ci[k] = [[float(a), float(b)] for a, b in zip(np.nanquantile(arr, lo, axis=0), np.nanquantile(arr, hi, axis=0))]
    return ci


@dataclass
class EvalResult:
    """Out-of-fold predictions for every sample plus the metrics computed from them."""

    y: np.ndarray
    probs: np.ndarray
    groups: np.ndarray
    fold: np.ndarray  # fold index of each sample (its test fold)
    metrics: dict
    per_fold: list[dict]
    index: np.ndarray | None = None  # which of the evaluated items each row is (None: all, in order)


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    fit: FitFn,
    n_folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
) -> EvalResult:
    """Grouped k-fold: fit on k-1 folds, predict the held-out fold; metrics on pooled predictions."""
    folds = grouped_folds(y, groups, n_folds, seed)
    probs = np.zeros((len(y), n_classes), np.float64)
    fold_of = np.full(len(y), -1)
    per_fold = []
    for f, (tr, te) in enumerate(tqdm(folds, desc="cross-validation", unit="fold", leave=False)):
        predict = fit(X[tr], y[tr], groups[tr])
        probs[te] = predict(X[te])
        fold_of[te] = f
        per_fold.append(point_metrics(y[te], probs[te], n_classes))
    metrics = point_metrics(y, probs, n_classes)
    metrics["ci95"] = bootstrap_ci(y, probs, n_classes, groups, n_boot=n_boot, seed=seed)
    return EvalResult(y, probs, groups, fold_of, metrics, per_fold)


def holdout_evaluate(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    fit: FitFn,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_boot: int = 1000,
) -> EvalResult:
    """Fit on one grouped train part, score the held-out groups (no group on both sides)."""
    tr, te = holdout_split(y, groups, test_fraction, seed)
    probs = fit(X[tr], y[tr], groups[tr])(X[te])
    metrics = point_metrics(y[te], probs, n_classes)
    metrics["ci95"] = bootstrap_ci(y[te], probs, n_classes, groups[te], n_boot=n_boot, seed=seed)
    metrics["n_train"] = int(len(tr))
    return EvalResult(y[te], probs, groups[te], np.zeros(len(te), int), metrics, [], te)


def transfer_evaluate(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_classes: int,
    fit: FitFn,
    seed: int = 0,
    n_boot: int = 1000,
) -> EvalResult:
    """Fit on one labelled set (X, y, groups) and score another: `evaluate --holdout other.csv`."""
    X, y, groups = train
    Xt, yt, gt = test
    probs = fit(X, y, groups)(Xt)
    metrics = point_metrics(yt, probs, n_classes)
    metrics["ci95"] = bootstrap_ci(yt, probs, n_classes, gt, n_boot=n_boot, seed=seed)
    metrics["n_train"] = int(len(y))
    return EvalResult(yt, probs, gt, np.zeros(len(yt), int), metrics, [])


def subsample_per_class(y: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most `n` samples of each class (all when n is None)."""
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(idx if n is None or n >= len(idx) else rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(keep))


def fewshot_curve(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    fit: FitFn,
    shots: Sequence[int | None] = FEWSHOT_SHOTS,
    n_folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Balanced accuracy vs labelled tiles per class, on grouped folds (test folds always complete)."""
    folds = grouped_folds(y, groups, n_folds, seed)
    rng = np.random.default_rng(seed)
    curve = []
    for n in tqdm(shots, desc="few-shot curve", unit="point", leave=False):
        scores = []
        for tr, te in folds:
            for _ in range(1 if n is None else repeats):
                sub = tr[subsample_per_class(y[tr], n, rng)]
                predict = fit(X[sub], y[sub], groups[sub])
                scores.append(point_metrics(y[te], predict(X[te]), n_classes)["balanced_accuracy"])
        curve.append(
            {
                "shots": "all" if n is None else int(n),
                "balanced_accuracy": float(np.mean(scores)),
                "std": float(np.std(scores)),
                "runs": len(scores),
            }
        )
    return curve


def save_plots(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str], out_dir: Path) -> list[Path]:
    """confusion.png (row-normalised counts) and roc.png (one-vs-rest curve per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, roc_curve

    n = len(class_names)
    cm = confusion_matrix(y, probs.argmax(1), labels=np.arange(n))
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2))
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    paths = [out_dir / "confusion.png", out_dir / "roc.png"]
    save_fig(fig, paths[0])
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(class_names):
        if 0 < (y == c).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, paths[1])
    return paths


def save_fewshot_plot(curve: Sequence[dict], path: Path, x: str = "shots", y: str = "balanced_accuracy",
                      xlabel: str = "labelled tiles per class", ylabel: str = "balanced accuracy") -> Path:
    """Balanced accuracy (or the curve's `y`; ± std over folds and draws) vs labelled tiles per class
    (or its `x`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(c[x]) for c in curve]
    mean = np.array([c[y] for c in curve])
    std = np.array([c["std"] for c in curve])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pos = np.arange(len(curve))
    ax.errorbar(pos, mean, yerr=std, marker="o", capsize=3)
    ax.set_xticks(pos, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_fig(fig, path)
    return path


def save_fig(fig, path: Path) -> None:
    """Save a matplotlib figure atomically (100 dpi) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_json(obj: dict, path: Path) -> Path:
    """Write JSON atomically (NaN written as null so strict readers accept it)."""

    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    return atomic_write_text(path, json.dumps(clean(obj), indent=2))


def write_predictions(result: EvalResult, items: Sequence[str], class_names: Sequence[str], path: Path) -> Path:
    """predictions.csv: per evaluated item its name, group, true class and the probability of each
    class (what `pathapp infer` reports for the same image with the same head)."""
    import csv
    import io

    rows = np.arange(len(result.y)) if result.index is None else result.index
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["item", "group", "label", "fold", *[f"prob: {c}" for c in class_names]])
    for k, i in enumerate(rows):
        w.writerow([items[i], result.groups[k], class_names[result.y[k]], int(result.fold[k]),
                    *[f"{v:.7g}" for v in result.probs[k]]])
    return atomic_write_text(path, buf.getvalue())


def write_report(result: EvalResult, class_names: Sequence[str], out_dir: Path, extra: dict | None = None,
                 items: Sequence[str] | None = None) -> Path:
    """report.json + confusion.png + roc.png (+ fewshot.png when extra has a curve, predictions.csv
    when the evaluated `items` are named) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if items is not None:
        write_predictions(result, items, class_names, out_dir / "predictions.csv")
    save_plots(result.y, result.probs, class_names, out_dir)
    if extra and extra.get("fewshot"):
        save_fewshot_plot(extra["fewshot"], out_dir / "fewshot.png")
    report = {
        "class_names": list(class_names),
        "n_samples": int(len(result.y)),
        "n_groups": int(len(np.unique(result.groups))),
        "n_folds": int(result.fold.max() + 1),
        "support": [int((result.y == c).sum()) for c in range(len(class_names))],
        "metrics": result.metrics,
        "per_fold": result.per_fold,
        **(extra or {}),
    }
    return write_json(report, out_dir / "report.json")
