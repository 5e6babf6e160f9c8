"""Evaluation: grouped splits never leak a group, metrics and CIs agree with scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from pathapp.train.evaluate import (
    SplitError,
    bootstrap_ci,
    cross_validate,
    fewshot_curve,
    grouped_folds,
    holdout_split,
    point_metrics,
    write_report,
)


def _fixed(n=300, c=3, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_metrics_match_sklearn():
    y, p = _fixed()
    m = point_metrics(y, p, 3)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auroc_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["sensitivity"] == pytest.approx(list(recall_score(y, pred, average=None)))
    # specificity of class c = recall of "not c"
    spec = [recall_score(y != c, pred != c) for c in range(3)]
    assert m["specificity"] == pytest.approx(spec)
    assert 0.4 < m["accuracy"] < 0.95  # the fixed data is neither trivial nor random


def test_binary_auroc_and_missing_class():
    y, p = _fixed(c=2)
    assert point_metrics(y, p, 2)["auroc_ovr"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    # a class absent from y: balanced accuracy averages only the present classes
    y3, p3 = _fixed(c=3)
    keep = y3 != 2
    m = point_metrics(y3[keep], p3[keep], 3)
    assert m["balanced_accuracy"] == pytest.approx(
        np.mean([recall_score(y3[keep] == c, p3[keep].argmax(1) == c) for c in (0, 1)])
    )


def test_bootstrap_ci_brackets_point_and_matches_manual():
    y, p = _fixed()
    groups = np.arange(len(y)) // 10
    ci = bootstrap_ci(y, p, 3, groups, n_boot=200, seed=3)
    m = point_metrics(y, p, 3)
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr"):
        lo, hi = ci[k]
        assert lo < m[k] < hi
    # manual group bootstrap with the same generator gives the same interval
    rng = np.random.default_rng(3)
    accs = []
    for _ in range(200):
        pick = rng.integers(0, 30, 30)
        idx = np.concatenate([np.flatnonzero(groups == g) for g in pick])
        accs.append(accuracy_score(y[idx], p[idx].argmax(1)))
    assert ci["accuracy"] == pytest.approx([np.quantile(accs, 0.025), np.quantile(accs, 0.975)])
    for c in range(3):  # per-class intervals bracket the per-class point values
        for key in ("sensitivity", "specificity"):
            assert ci[key][c][0] <= m[key][c] <= ci[key][c][1]
    # group resampling is wider than tile resampling when tiles within a group agree
    yg = np.repeat(np.arange(30) % 3, 10)
    pg = np.repeat(np.eye(3)[(np.arange(30) + (np.arange(30) % 4 == 0)) % 3], 10, axis=0) * 0.8 + 0.1
    wide = np.diff(bootstrap_ci(yg, pg, 3, np.repeat(np.arange(30), 10), n_boot=200)["accuracy"])
    narrow = np.diff(bootstrap_ci(yg, pg, 3, None, n_boot=200)["accuracy"])
    assert wide > 1.5 * narrow


def test_grouped_folds_never_share_a_group():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 500).astype(str)
    y = rng.integers(0, 4, 500)
    folds = grouped_folds(y, groups, 5)
    assert len(folds) == 5
    seen = np.zeros(500, int)
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        seen[te] += 1
    assert (seen == 1).all()
    tr, te = holdout_split(y, groups, 0.2)
    assert not set(groups[tr]) & set(groups[te])
    with pytest.raises(SplitError, match="groups"):
        grouped_folds(y[:20], np.zeros(20), 5)


def _nearest_mean_fit(X, y, g):
    means = np.stack([X[y == c].mean(0) for c in range(3)])

    def predict(Z):
        d = -((Z[:, None, :] - means[None]) ** 2).sum(-1)
        e = np.exp(d - d.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    return predict


def test_cross_validate_fewshot_and_report(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    X = rng.normal(size=(180, 4)) + 2.0 * np.eye(3, 4)[y]
    groups = np.arange(180) // 6
    res = cross_validate(X, y, groups, 3, _nearest_mean_fit, n_folds=5, n_boot=50)
    assert (res.fold >= 0).all() and res.metrics["balanced_accuracy"] > 0.7
    curve = fewshot_curve(X, y, groups, 3, _nearest_mean_fit, shots=(1, 5, None), n_folds=3, repeats=2)
    assert [c["shots"] for c in curve] == [1, 5, "all"]
    assert curve[-1]["balanced_accuracy"] > curve[0]["balanced_accuracy"] - 0.05
    path = write_report(res, ["a", "b", "c"], tmp_path, {"fewshot": curve})
    rep = json.loads(path.read_text())
    assert rep["n_groups"] == 30 and rep["metrics"]["ci95"]["accuracy"][0] <= rep["metrics"]["accuracy"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("confusion.png", "roc.png", "fewshot.png"))
    assert not list(tmp_path.glob("*.tmp*"))


def test_auroc_when_predictions_sit_on_absent_classes():
    # test split holds classes 0 and 1 only; one row put all its votes on class 2 (a kNN can)
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1, 0], [0, 0, 1.0], [0.2, 0.8, 0], [0.4, 0.6, 0], [0.3, 0.3, 0.4]])
    m = point_metrics(y, p, 3)
    q = np.array([0.1, 0.5, 0.8, 0.6, 0.5])  # P(class 1) among present classes, ties for the empty row
    assert m["auroc_ovr"] == pytest.approx(roc_auc_score(y, q))
