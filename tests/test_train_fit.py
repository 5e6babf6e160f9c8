"""Heads on frozen embeddings: each method learns separable classes, and its bundle head predicts
exactly what evaluation measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathapp.train.fit import FitError, fit_head


def _blobs(n_per=(40, 40, 8), d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per)])
    centers = rng.normal(size=(len(n_per), d)) * 3
    X = centers[y] + rng.normal(size=(len(y), d))
    groups = np.arange(len(y)) // 2
    return X.astype(np.float32), y, groups


@pytest.mark.parametrize("method", ["linear", "knn", "prototype", "mlp"])
def test_heads_learn_and_match_torch(method):
    torch.set_num_threads(1)
    X, y, g = _blobs()
    Xt, yt, _ = _blobs(seed=0)  # same centres, fresh noise below
    rng = np.random.default_rng(5)
    Xt = Xt + rng.normal(size=Xt.shape).astype(np.float32) * 0.3
    head = fit_head(method, X, y, g, 3)
    p = head.predict_proba(Xt)
    assert p.shape == (len(yt), 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    recall_minority = (p.argmax(1)[yt == 2] == 2).mean()
    assert (p.argmax(1) == yt).mean() > 0.9 and recall_minority > 0.7
    if method == "linear":
        assert head.info["inner_cv"] and head.info["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    if method == "knn":
        assert head.info["inner_cv"] and head.config["k"] >= 1


def test_linear_matches_sklearn_and_handles_absent_class():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y, g = _blobs((30, 30))
    head = fit_head("linear", X, y, g, 3, C=0.1)  # 2 of 3 classes present: binary sklearn form
    sc = StandardScaler().fit(X)
    ref = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(sc.transform(X), y)
    p = head.predict_proba(X)
    assert np.allclose(p[:, :2], ref.predict_proba(sc.transform(X)), atol=1e-4)
    assert (p[:, 2] < 1e-6).all()


def test_single_class_rejected():
    X, y, g = _blobs((10,))
    with pytest.raises(FitError, match="two classes"):
        fit_head("linear", X, y, g, 2)


def test_knn_votes_are_class_balanced():
    """A rare class is not outvoted by sheer numbers: votes are weighted by inverse class frequency
    (n / (C × count)) and renormalised."""
    from pathapp.train.fit import _fit_knn_once

    angle = lambda deg, n: np.tile([np.cos(np.radians(deg)), np.sin(np.radians(deg))], (n, 1))  # noqa: E731
    X = np.vstack([angle(0, 15), angle(90, 75), angle(1, 5), angle(170, 5)]).astype(np.float32)
    y = np.array([0] * 90 + [1] * 10)
    # the query's 20 nearest by cosine: the 15 common at 0° and the 5 rare at 1° → raw votes 0.75 / 0.25
    probs = _fit_knn_once(X, y, 2, k=20).predict_proba(np.array([[1.0, 0.0]], np.float32))[0]
    w = np.array([100 / (2 * 90), 100 / (2 * 10)])
    expected = np.array([0.75, 0.25]) * w / (np.array([0.75, 0.25]) * w).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    assert probs[1] > probs[0]
