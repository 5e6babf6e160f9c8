"""Heads on frozen embeddings: logistic regression, kNN, prototypes, a small MLP.

Every fit returns a `FittedHead` = (kind, config, tensors) in the form `models.heads.build_head`
takes, and predictions always go through that same torch head, so what evaluation measures is
exactly what the bundle runs. Hyper-parameters (C for logistic regression, k for kNN) are chosen
by an inner cross-validation grouped like the outer one, scored by balanced accuracy. Class
imbalance: class-weighted losses (linear, MLP); prototypes are per-class means and so unaffected;
kNN votes are weighted by inverse class frequency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathapp.errors import PathappError

METHODS: tuple[str, ...] = ("linear", "knn", "prototype", "mlp")
C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
K_GRID: tuple[int, ...] = (1, 3, 5, 10, 20, 50)


class FitError(PathappError):
    """The labelled embeddings cannot train the requested head."""


@dataclass
class FittedHead:
    """A trained head as plain data, plus what the fit chose."""

    kind: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """The torch head (eval mode), as a bundle would rebuild it."""
        import torch

        from pathapp.models.heads import build_head

        return build_head(self.kind, self.config, {k: torch.as_tensor(v) for k, v in self.tensors.items()})

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        head = self.build()
        with torch.no_grad():
            return head(torch.as_tensor(X, dtype=torch.float32)).double().numpy()


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (C_present * count) per class (scikit-learn's "balanced"), 0 for absent classes."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def _inner_folds(y: np.ndarray, groups: np.ndarray, max_folds: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped inner folds, or [] when the data is too small to choose anything by CV."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    min_count = np.bincount(y)[np.unique(y)].min()
    k = min(max_folds, n_groups, int(min_count))
    if k < 2:
        return []
    return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=0).split(X=np.zeros(len(y)), y=y, groups=groups))


def _select(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    grid: Sequence,
    fit_one: Callable[[np.ndarray, np.ndarray, Any], FittedHead],
    default: Any,
) -> tuple[Any, dict[str, float]]:
    """The grid value with the best mean inner-CV balanced accuracy (default when CV is impossible)."""
    from pathapp.train.evaluate import point_metrics

    if len(grid) == 1:
        return grid[0], {}
    folds = _inner_folds(y, groups)
    if not folds:
        return default, {}
    scores = {}
    for value in grid:
        s = [
            point_metrics(y[te], fit_one(X[tr], y[tr], value).predict_proba(X[te]), n_classes)["balanced_accuracy"]
            for tr, te in folds
        ]
        scores[str(value)] = float(np.mean(s))
    best = max(grid, key=lambda v: scores[str(v)])
    return best, scores


def _base_config(X: np.ndarray, n_classes: int, **extra: Any) -> dict[str, Any]:
    return {"in_dim": int(X.shape[1]), "num_classes": int(n_classes), **extra}


def _standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(0)
    std = X.std(0)
    return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


def _fit_linear_once(X: np.ndarray, y: np.ndarray, n_classes: int, C: float) -> FittedHead:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean, std = _standardizer(X)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
    with threadpool_limits(1):  # BLAS threads only oversubscribe the CPU on problems this small
        clf.fit((X - mean) / std, y)
    coef, bias = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # sklearn's binary form: one row for classes_[1]
        coef = np.concatenate([-coef / 2, coef / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    weight = np.zeros((n_classes, X.shape[1]), np.float32)
    b = np.full(n_classes, -1e4, np.float32)  # a class absent from training is never predicted
    weight[clf.classes_] = coef
    b[clf.classes_] = bias
    cfg = _base_config(X, n_classes, standardize=True)
    tensors = {"weight": weight, "bias": b, "input_mean": mean, "input_std": std}
    return FittedHead("linear", cfg, tensors, {"C": C})


def _fit_knn_once(X: np.ndarray, y: np.ndarray, n_classes: int, k: int) -> FittedHead:
    cfg = _base_config(X, n_classes, l2_normalize=True, k=int(min(k, len(y))), num_train=int(len(y)),
                       class_weight=[float(w) for w in class_weights(y, n_classes)])
    return FittedHead("knn", cfg, {"embeddings": X.astype(np.float32), "labels": y.astype(np.int64)}, {"k": cfg["k"]})


def fit_prototype(X: np.ndarray, y: np.ndarray, n_classes: int, temperature: float = 0.05) -> FittedHead:
    """Class means of L2-normalised embeddings; confidence = softmax(cosine similarity / T)."""
    Xn = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    protos = np.zeros((n_classes, X.shape[1]), np.float32)
    for c in np.unique(y):
        protos[c] = Xn[y == c].mean(0)
    cfg = _base_config(X, n_classes, l2_normalize=True, temperature=temperature)
    return FittedHead("prototype", cfg, {"prototypes": protos}, {"temperature": temperature})


def fit_mlp(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    hidden: int = 256,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    dropout: float = 0.2,
    seed: int = 0,
) -> FittedHead:
    """One hidden layer on standardised embeddings, class-weighted cross-entropy, full-batch AdamW."""
    import torch

    from pathapp.models.heads import build_head, head_state

    mean, std = _standardizer(X)
    cfg = _base_config(X, n_classes, standardize=True, hidden=[hidden], dropout=dropout, activation="gelu")
    torch.manual_seed(seed)
    head = build_head("mlp", cfg)
    head.input_mean.copy_(torch.from_numpy(mean))
    head.input_std.copy_(torch.from_numpy(std))
    xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    weights = torch.as_tensor(class_weights(y, n_classes), dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head.logits(xt), yt, weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    kind, config, tensors = head_state(head)
    return FittedHead(kind, config, {k: v.numpy() for k, v in tensors.items()}, {"epochs": epochs, "loss": float(loss.detach())})


def fit_head(
    method: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, **options: Any
) -> FittedHead:
    """Train the head `method` on embeddings X (N, D) with labels y in 0..n_classes-1."""
    if method not in METHODS:
        raise FitError(f"unknown head method {method!r}; use one of {', '.join(METHODS)}")
    X = np.asarray(X, np.float32)
    y = np.asarray(y, np.int64)
    if len(np.unique(y)) < 2:
        raise FitError("need labelled examples of at least two classes to train a head")
    if method == "linear":
        grid = options.get("C", C_GRID)
        grid = grid if isinstance(grid, (list, tuple)) else (grid,)
        best, scores = _select(X, y, groups, n_classes, grid, lambda a, b, C: _fit_linear_once(a, b, n_classes, C), 1.0)
        head = _fit_linear_once(X, y, n_classes, best)
    elif method == "knn":
        grid = options.get("k", K_GRID)
        grid = grid if isinstance(grid, (list, tuple)) else (grid,)
        grid = [k for k in grid if k <= len(y) // 2] or [1]
        best, scores = _select(X, y, groups, n_classes, grid, lambda a, b, k: _fit_knn_once(a, b, n_classes, k), grid[0])
        head = _fit_knn_once(X, y, n_classes, best)
    elif method == "prototype":
        head, scores = fit_prototype(X, y, n_classes, float(options.get("temperature", 0.05))), {}
    else:
        head, scores = fit_mlp(X, y, n_classes, **{k: v for k, v in options.items() if k in ("hidden", "epochs", "lr")}), {}
    head.info.update({"method": method, "n_train": int(len(y)), "inner_cv": scores})
    return head


def head_fitter(method: str, n_classes: int, **options: Any):
    """A `FitFn` for evaluate.cross_validate / fewshot_curve."""

    def fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray):
        return fit_head(method, X, y, groups, n_classes, **options).predict_proba

    return fit
