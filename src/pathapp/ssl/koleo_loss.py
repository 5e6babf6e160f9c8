"""Spreading regularisers on the student CLS embeddings of one view: KoLeo (DINOv2; the
Kozachenko-Leonenko entropy estimator from nearest-neighbour distances) and the KDE alternative of
Midnight (entropy from a von Mises-Fisher kernel density estimate), which is smoother when two
embeddings collide."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """−mean_i log ‖x̂_i − x̂_nn(i)‖ on L2-normalised rows x̂ (nearest neighbour by cosine)."""
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist + eps).mean()


def kde_loss(x: torch.Tensor, kappa: float = 5.0) -> torch.Tensor:
    """mean_i log( 1/(n−1) Σ_{j≠i} exp(κ(x̂_i·x̂_j − 1)) ): the log density of each embedding under a
    vMF kernel estimate from the others (−entropy up to a constant); minimising it spreads the batch."""
    x = F.normalize(x.float(), p=2, dim=-1)
    n = x.shape[0]
    logits = kappa * (x @ x.t() - 1.0)
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - math.log(n - 1)).mean()
