"""Student and teacher. The student (backbone with drop-path + DINO head [+ iBOT head] + mask token)
is trained; the teacher is an EMA copy that never receives gradients and always runs in eval mode."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pathapp.ssl.head import DINOHead


def backbone_tokens(backbone: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                    mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised tokens (B, prefix + N, D) of a timm ViT; patches where `masks` (B, N) is True are
    replaced by `mask_token` before the position embedding (iBOT). Works with register tokens; with
    the backbone's gradient checkpointing on (`set_grad_checkpointing`) block activations are
    recomputed in the backward pass instead of kept."""
    x = backbone.patch_embed(x)
    if masks is not None and mask_token is not None:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype).view(1, 1, -1), x).reshape(shape)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    if getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq  # timm's own: activations recomputed per block

        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    return backbone.norm(x)


class Student(nn.Module):
    """What DDP/FSDP wraps: forward returns every output the losses need in one call."""

    def __init__(self, backbone: nn.Module, cfg) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        self.num_prefix_tokens = backbone.num_prefix_tokens
        head_kw = dict(out_dim=cfg.n_prototypes, hidden_dim=cfg.head_hidden_dim,
                       bottleneck_dim=cfg.head_bottleneck_dim, n_layers=cfg.head_n_layers)
        self.dino_head = DINOHead(dim, **head_kw)
        self.ibot_head = DINOHead(dim, **head_kw) if cfg.ibot_separate_head else None
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """global_crops (2B, 3, G, G), local_crops (nB, 3, L, L) or None/empty, masks (2B, N) bool.
        Returns CLS logits of global and local views, logits at masked patches, and backbone CLS."""
        tok = backbone_tokens(self.backbone, global_crops, masks, self.mask_token)
        cls = tok[:, 0]
        patches = tok[:, self.num_prefix_tokens:]
        out = {"cls": cls, "global_logits": self.dino_head(cls)}
        out["masked_logits"] = self.patch_head()(patches[masks])
        if local_crops is not None and local_crops.numel():
            out["local_logits"] = self.dino_head(backbone_tokens(self.backbone, local_crops)[:, 0])
        return out


class Teacher(nn.Module):
    """EMA copy of a student: no gradients, eval mode whatever `.train()` is called with."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.dino_head = copy.deepcopy(student.dino_head)
        self.ibot_head = copy.deepcopy(student.ibot_head)
        self.num_prefix_tokens = student.num_prefix_tokens
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLS logits of the global views and patch logits at the positions masked for the student."""
        tok = backbone_tokens(self.backbone, global_crops)
        patches = tok[:, self.num_prefix_tokens:]
        return {"global_logits": self.dino_head(tok[:, 0]), "masked_logits": self.patch_head()(patches[masks])}

    @torch.no_grad()
    def ema_update(self, student: Student, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s for every parameter (the mask token has no teacher twin)."""
        for m in (self, student):  # FSDP2 leaves a root module unsharded after its forward
            if hasattr(m, "reshard"):
                m.reshard()
        s_params = dict(student.named_parameters())
        t, s = [], []
        for name, p in self.named_parameters():  # under FSDP both are sharded alike: update local shards
            t.append(p.to_local() if hasattr(p, "to_local") else p)
            q = s_params[name].detach()
            s.append(q.to_local() if hasattr(q, "to_local") else q)
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)
