"""Is a saliency map faithful to the model? Deletion and insertion curves (Petsiuk et al. 2018, RISE).

Deletion: patches are replaced by the dataset mean (0 in the normalised input), most salient first;
the probability of the explained class should fall fast (low area under the curve is good).
Insertion: starting from a blurred tile, the original patches come back, most salient first; the
probability should rise fast (high area is good). The same curves for random patch orders are the
floor any explanation must beat; both are computed on the same tile with the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pathapp.explain.saliency import Scorer

RANDOM_ORDERS = 4  # random orders averaged per tile for the floor
BLUR_SIGMA = 5.0 / 224  # RISE's insertion canvas: Gaussian blur, σ 5 px on a 224 px image


@dataclass
class Curves:
    """Deletion and insertion curves of one tile: probability at each fraction of patches changed."""

    fractions: np.ndarray  # (S,) from 0 to 1
    deletion: np.ndarray  # (S,)
    insertion: np.ndarray  # (S,)

    @property
    def deletion_auc(self) -> float:
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(np.trapezoid(self.insertion, self.fractions))


def blurred(x: Tensor) -> Tensor:
    """The insertion start: each tile Gaussian-blurred (σ scaled with the tile size, as RISE at 224 px)."""
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(BLUR_SIGMA * x.shape[-1], 0.5)
    k = int(2 * round(3 * sigma) + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def curves(scorer: Scorer, x: Tensor, target: int, order: np.ndarray, grid: tuple[int, int],
           steps: int = 16, batch_size: int = 32) -> Curves:
    """Deletion and insertion curves for ONE normalised tile x (1, 3, H, W), changing patches in
    `order` (flat indices into the rows × cols patch grid) in `steps` equal steps."""
    n = grid[0] * grid[1]
    counts = np.unique(np.round(np.linspace(0, n, steps + 1)).astype(int))
    rank = np.empty(n, np.int64)
    rank[np.asarray(order)] = np.arange(n)
    # (S, 1, H, W) masks: 1 where a patch is already changed after counts[s] patches
    changed = torch.from_numpy(rank[None, :] < counts[:, None]).float().reshape(-1, 1, *grid)
    changed = F.interpolate(changed, size=x.shape[-2:], mode="nearest")
    base_del, base_ins = torch.zeros_like(x), blurred(x)
    deleted = x * (1 - changed) + base_del * changed
    inserted = base_ins * (1 - changed) + x * changed
    stack = torch.cat([deleted, inserted])
    with torch.inference_mode():
        p = torch.cat([scorer(stack[s:s + batch_size])[:, target] for s in range(0, len(stack), batch_size)])
    p = p.float().numpy()
    return Curves(counts / n, p[:len(counts)], p[len(counts):])


def saliency_order(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat patch indices, most salient first; ties in random order (a flat map is no better than chance)."""
    flat = np.asarray(saliency, np.float64).ravel()
    return np.lexsort((rng.random(len(flat)), -flat))


def evaluate_tile(scorer: Scorer, x: Tensor, target: int, maps: dict[str, np.ndarray], *, steps: int = 16,
                  batch_size: int = 32, seed: int = 0) -> dict[str, dict[str, float]]:
    """{method or "random": {"deletion_auc", "insertion_auc"}} for one normalised tile and its maps
    (each rows × cols); "random" averages RANDOM_ORDERS random orders."""
    rng = np.random.default_rng(seed)
    grid = next(iter(maps.values())).shape
    out = {}
    for method, sal in maps.items():
        c = curves(scorer, x, target, saliency_order(sal, rng), grid, steps, batch_size)
        out[method] = {"deletion_auc": c.deletion_auc, "insertion_auc": c.insertion_auc}
    rand = [curves(scorer, x, target, rng.permutation(grid[0] * grid[1]), grid, steps, batch_size)
            for _ in range(RANDOM_ORDERS)]
    out["random"] = {"deletion_auc": float(np.mean([c.deletion_auc for c in rand])),
                     "insertion_auc": float(np.mean([c.insertion_auc for c in rand]))}
    return out
