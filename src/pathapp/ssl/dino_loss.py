"""DINO loss on the CLS token: cross-entropy between teacher targets and the student's tempered
softmax, summed over every (student view, teacher view) pair of different views."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_cross_entropy(student_logits: torch.Tensor, teacher_targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over samples of −Σ_k t_k · log softmax(s / τ_s)_k for (B, K) tensors."""
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_targets * lsm).sum(dim=-1).mean()


def dino_loss(student_global: torch.Tensor, student_local: torch.Tensor | None, teacher_targets: torch.Tensor,
              n_global: int, student_temp: float) -> torch.Tensor:
    """DINOv2's CLS loss. `student_global` (n_global·B, K) and `teacher_targets` (n_global·B, K) are
    view-major; each student global view is paired with the *other* teacher views, each local view
    with every teacher view, and the total is divided by the number of pairs."""
    s_glob = student_global.chunk(n_global)
    t = teacher_targets.chunk(n_global)
    s_loc = student_local.chunk(student_local.shape[0] // s_glob[0].shape[0]) if student_local is not None and len(student_local) else ()
    total = student_global.new_zeros(())
    n_terms = 0
    for i, s in enumerate(s_glob):
        for j, tj in enumerate(t):
            if i != j:
                total = total + dino_cross_entropy(s, tj, student_temp)
                n_terms += 1
    for s in s_loc:
        for tj in t:
            total = total + dino_cross_entropy(s, tj, student_temp)
            n_terms += 1
    return total / max(n_terms, 1)
