"""Attention-MIL: gated ABMIL learns a key-instance task and its attention finds the key tiles."""

from __future__ import annotations

import numpy as np
import torch

from pathapp.train.evaluate import cross_validate
from pathapp.train.mil import abmil_fitter, fit_abmil, predict_bags


def _bags(n=40, d=16, seed=0):
    """Class 1 bags hold a few 'tumour' tiles (a shifted direction) among background tiles."""
    rng = np.random.default_rng(seed)
    key = np.zeros(d, np.float32)
    key[0] = 4.0
    bags, y, keys = [], [], []
    for i in range(n):
        m = int(rng.integers(20, 40))
        b = rng.normal(size=(m, d)).astype(np.float32)
        label = i % 2
        pos = rng.choice(m, 3, replace=False) if label else np.zeros(0, int)
        b[pos] += key
        bags.append(b)
        y.append(label)
        keys.append(pos)
    return bags, np.asarray(y), keys


def test_abmil_learns_and_attends_to_key_tiles():
    torch.set_num_threads(1)
    bags, y, keys = _bags(60)
    head = fit_abmil(bags, y, 2, np.arange(len(y)) // 2, epochs=30, lr=2e-3)
    assert head.kind == "abmil" and head.info["n_val"] > 0
    test_bags, ty, tkeys = _bags(seed=1)
    probs, attn = predict_bags(head, test_bags)
    assert (probs.argmax(1) == ty).mean() > 0.85
    assert all(np.isclose(a.sum(), 1) and len(a) == len(b) for a, b in zip(attn, test_bags))
    # in positive bags the key tiles get far more than their uniform share of attention
    share = np.mean([a[k].sum() for a, k, t in zip(attn, tkeys, ty) if t == 1])
    uniform = np.mean([len(k) / len(a) for a, k, t in zip(attn, tkeys, ty) if t == 1])
    assert share > 3 * uniform


def test_abmil_cross_validation_over_bags():
    torch.set_num_threads(1)
    bags, y, _ = _bags(30)
    X = np.empty(len(bags), dtype=object)
    X[:] = bags
    res = cross_validate(X, y, np.arange(len(y)), 2, abmil_fitter(2, epochs=15, lr=1e-3), n_folds=3, n_boot=50)
    assert res.metrics["balanced_accuracy"] > 0.75


def test_abmil_regression_head_predicts_in_the_targets_units():
    """A value carried by a few key tiles per bag (their count): the head learns it on standardised
    targets and the bundle's head answers in the target's own units and offset."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    def bags(n):
        out, y = [], []
        for _ in range(n):
            b = rng.normal(size=(30, 16)).astype(np.float32)
            k = int(rng.integers(0, 11))
            b[:k, 0] += 4.0
            out.append(b)
            y.append(1000.0 + 50.0 * k)  # far from 0 and 1: a head that forgot the scaling is far off
        return out, np.asarray(y)

    train_bags, y = bags(80)
    head = fit_abmil(train_bags, y, task="regression", loss="mse", epochs=30)
    assert head.config["task"] == "regression" and head.info["loss"] == "mse"
    test_bags, ty = bags(40)
    pred = predict_bags(head, test_bags)[0][:, 0]
    assert np.corrcoef(pred, ty)[0, 1] > 0.8
    assert abs(pred.mean() - ty.mean()) < 0.5 * ty.std()
