"""Turning teacher logits into targets: softmax after subtracting an EMA centre (DINO), or the
Sinkhorn-Knopp equipartition (SwAV/DINOv2). Both sum over all processes under torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3,
                   n_samples: torch.Tensor | int | None = None) -> torch.Tensor:
    """(B, K) logits → (B, K) targets whose rows sum to 1 and whose prototype marginals tend to B/K.
    `n_samples` is the total number of rows over all processes (default B × world size)."""
    q = torch.exp(teacher_logits.float() / temp).t()  # (K, B)
    k = q.shape[0]
    b = n_samples if n_samples is not None else q.shape[1] * _world_size()
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


class Centering(nn.Module):
    """Teacher targets by EMA centering or Sinkhorn-Knopp; the centre is a buffer (saved, resumed)."""

    def __init__(self, dim: int, mode: str = "ema", momentum: float = 0.9, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        self.mode = mode
        self.momentum = momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets (N, K) for teacher logits (N, K); in "ema" mode the centre is updated after use."""
        if self.mode == "sinkhorn":
            n = torch.tensor(teacher_logits.shape[0], device=teacher_logits.device, dtype=torch.float32)
            return sinkhorn_knopp(teacher_logits, temp, self.sinkhorn_iterations, _all_reduce(n))
        logits = teacher_logits.float()
        targets = torch.softmax((logits - self.center) / temp, dim=-1)
        self.update(logits)
        return targets

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """centre ← m·centre + (1 − m)·mean of this step's logits over all processes."""
        total = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        if count.item() > 0:  # a step may have no masked patch at all
            self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)
