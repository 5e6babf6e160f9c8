"""iBOT masked-patch loss: at the patches hidden from the student, the student must predict the
teacher's prototype distribution of the unmasked patch. Each image weighs the same whatever its
number of masked patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ibot_loss(student_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """student_logits, teacher_targets: (M, K) at the M masked patches, in the order of
    `masks.nonzero()`; masks: (B, N) bool over all images. Returns
    −(1/B) Σ_images (1/m_b) Σ_masked patches Σ_k t_k log softmax(s/τ)_k."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_patch = (teacher_targets * lsm).sum(dim=-1)
    per_image_count = masks.sum(dim=-1).clamp(min=1).float()
    weights = (1.0 / per_image_count).unsqueeze(-1).expand_as(masks)[masks]
    return -(per_patch * weights).sum() / masks.shape[0]
