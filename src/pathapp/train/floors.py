"""The floors a sceptic asks for, measured beside the model in every `pathapp evaluate` report.

A score means little alone: EBHI-Seg's classes differ in colour, so a colour histogram already sorts
a third of the images, and a ViT at random init is a fair feature extractor too. Each floor is fitted
and scored by the same protocol as the model (same folds, same split, same head method, same items
and tiles), and the model − floor difference is paired item by item, with a CI over resampled groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

HISTOGRAM = "colour histogram"
RANDOM_INIT = "random init"
BINS_PER_CHANNEL = 8  # 8 × 8 × 8 = 512 RGB bins


def colour_histogram(tiles: np.ndarray) -> np.ndarray:
    """(B, 512) RGB histograms (fractions of pixels, 8 levels per channel) of uint8 tiles (B, H, W, 3)."""
    q = (np.asarray(tiles) // (256 // BINS_PER_CHANNEL)).astype(np.int64)
    idx = (q[..., 0] * BINS_PER_CHANNEL + q[..., 1]) * BINS_PER_CHANNEL + q[..., 2]
    n = BINS_PER_CHANNEL**3
    return np.stack([np.bincount(i.ravel(), minlength=n) / i.size for i in idx]).astype(np.float32)


def histogram_features(lt, batch: int = 64) -> np.ndarray:
    """The colour histogram of each labelled item, from the very tiles the model sees: a tile's own,
    or an image's tiles pooled as its embedding is (`pool_tiles`)."""
    from pathapp.models.bundle import pool_tiles
    from pathapp.train.cache import SlideTiles

    def per_tile(slide, grid) -> np.ndarray:
        tiles = SlideTiles(slide, grid)
        return np.concatenate([colour_histogram(np.stack([tiles[i] for i in range(s, min(s + batch, len(tiles)))]))
                               for s in range(0, len(tiles), batch)])

    if lt.source == "images":
        return np.stack([pool_tiles(per_tile(im.open(), im.grid)) for im in lt.images])
    return np.concatenate([per_tile(s, g) for s, g in lt.parts])


def random_init_bundle(bundle, seed: int = 0):
    """The bundle's backbone architecture at random init (seeded, so its cached embeddings stay
    valid), without a head. LayerScale gammas are set to 1: timm starts DINOv2's at 1e-5, which makes
    every block nearly the identity and the floor a mere patch embedding."""
    import torch

    from pathapp.models.registry import create_backbone

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_backbone(bundle.spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "gamma", None), torch.Tensor):
                m.gamma.fill_(1.0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dataclasses.replace(bundle, backbone_state=state, head_kind=None, head_config={}, head_tensors={},
                               class_names=[], class_colors=[], provenance={"floor": f"random init, seed {seed}"})


def standardised(fit: Callable) -> Callable:
    """A FitFn on features z-scored with the training part's mean and std (how a histogram baseline
    is built: its bins differ in scale by orders of magnitude)."""

    def fitted(X: np.ndarray, y: np.ndarray, groups: np.ndarray):
        mean, std = X.mean(0), X.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        predict = fit((X - mean) / std, y, groups)
        return lambda Z: predict((Z - mean) / std)

    return fitted


def paired_difference(y: np.ndarray, model_probs: np.ndarray, floor_probs: np.ndarray, groups: np.ndarray,
                      n_classes: int, n_boot: int, seed: int, fold: np.ndarray | None = None) -> dict[str, Any]:
    """model − floor balanced accuracy and AUROC on the same items: the point difference, a 95 % CI
    over resampled groups (each resample scores both on the same items), and per fold when given."""
    from pathapp.train.evaluate import group_bootstrap, point_metrics

    keys = ("balanced_accuracy", "auroc_ovr")

    def diff(idx: np.ndarray) -> dict[str, float]:
        a, b = point_metrics(y[idx], model_probs[idx], n_classes), point_metrics(y[idx], floor_probs[idx], n_classes)
        return {k: float(a[k]) - float(b[k]) for k in keys}

    out: dict[str, Any] = {k: v for k, v in diff(np.arange(len(y))).items()}
    out["ci95"] = group_bootstrap(diff, groups, n_boot, seed)
    if fold is not None and fold.max() > 0:
        out["per_fold"] = [diff(np.flatnonzero(fold == f))["balanced_accuracy"] for f in range(int(fold.max()) + 1)]
    return out


def floor_features(lt, bundle, embed: Callable[[Any, Any], np.ndarray]) -> dict[str, np.ndarray]:
    """Each floor's features of the labelled items `lt`: the colour histogram, and the random-init
    backbone's embeddings through `embed(lt, bundle)` (the model's own embedding path)."""
    return {HISTOGRAM: histogram_features(lt), RANDOM_INIT: embed(lt, random_init_bundle(bundle))}


def floor_fitter(name: str, fit: Callable) -> Callable:
    """The fitter a floor uses: the model's, on standardised features for the histogram."""
    return standardised(fit) if name == HISTOGRAM else fit


def describe(name: str, bundle) -> str:
    """What a floor is, for the report."""
    if name == HISTOGRAM:
        return (f"{BINS_PER_CHANNEL ** 3}-bin RGB histogram of the same tiles (pooled per image as embeddings are), "
                f"standardised on the training part, same head method")
    return f"{bundle.spec.name} at random init (seed 0, LayerScale 1), same tiles, same head method"

