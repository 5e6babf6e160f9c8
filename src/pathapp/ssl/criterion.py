"""The DINOv2 objective of one step: DINO loss on the CLS token, iBOT loss on masked patches and the
KoLeo (or KDE) regulariser, weighted, with the teacher-target centring they need."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from pathapp.ssl.centering import Centering
from pathapp.ssl.config import SSLConfig
from pathapp.ssl.dino_loss import dino_loss
from pathapp.ssl.ibot_loss import ibot_loss
from pathapp.ssl.koleo_loss import kde_loss, koleo_loss
from pathapp.ssl.meta_arch import Teacher



@dataclasses.dataclass
class Criterion:
    """The weighted DINOv2 objective; owns the teacher-target centres of the CLS and patch heads."""

    cfg: SSLConfig
    dino_center: Centering
    ibot_center: Centering

    @classmethod
    def build(cls, cfg: SSLConfig, device: torch.device) -> "Criterion":
        def centre() -> Centering:
            return Centering(cfg.n_prototypes, cfg.centering, cfg.center_momentum, cfg.sinkhorn_iterations).to(device)

        return cls(cfg, centre(), centre())

    def __call__(self, student: nn.Module, teacher: Teacher, batch: dict[str, torch.Tensor],
                 teacher_temp: float, autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        g, masks = batch["global"], batch["masks"]
        local = batch["local"] if batch["local"].numel() else None
        with autocast:
            t_out = teacher(g, masks)
            s_out = student(g, local, masks)
        t_cls = self.dino_center(t_out["global_logits"], teacher_temp)
        t_patch = self.ibot_center(t_out["masked_logits"], teacher_temp)
        l_dino = dino_loss(s_out["global_logits"], s_out.get("local_logits"), t_cls, 2, cfg.student_temp)
        l_ibot = ibot_loss(s_out["masked_logits"], t_patch, masks, cfg.student_temp)
        reg_fn = koleo_loss if cfg.regularizer == "koleo" else (lambda x: kde_loss(x, cfg.kde_kappa))
        l_reg = sum(reg_fn(c) for c in s_out["cls"].float().chunk(2))
        w_reg = cfg.koleo_weight if cfg.regularizer == "koleo" else cfg.kde_weight
        loss = cfg.dino_weight * l_dino + cfg.ibot_weight * l_ibot + w_reg * l_reg
        # near ln K while the teacher cannot yet tell images apart; falls as the prototypes specialise
        target_entropy = -(t_cls * torch.log(t_cls.clamp_min(1e-12))).sum(dim=-1).mean()
        parts = {"loss": loss, "dino": l_dino, "ibot": l_ibot, cfg.regularizer: l_reg,
                 "dino_target_entropy": target_entropy}
        return loss, {k: float(v.detach()) for k, v in parts.items()}
