"""LoRA: low-rank adapters on a frozen ViT's linear layers, merged back into plain weights on export.

y = W x + b + (alpha / rank) * B A x, with W, b frozen, A (rank x in) random and B (out x rank) zero,
so an adapted model starts exactly equal to its base and only A, B (and the head) are trained.
Merging folds B A into W, so a fine-tuned model is again a plain timm ViT any loader reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + scale * B A (a new module; self is unchanged)."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        lin = lin.to(self.base.weight.device, self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def _matching_linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in targets:
                found.append((module, child_name, child))
    return found


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> list[str]:
    """Freeze every parameter of `model` and wrap its nn.Linear children named in `targets` with
    LoRA adapters (in place). Returns the wrapped module paths; raises if none matched."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = _matching_linears(model, targets)
    if not found:
        raise ValueError(f"no nn.Linear named any of {list(targets)} in the model")
    names = []
    for parent, child_name, child in found:
        setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            names.append(name)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` (in place) with its merged nn.Linear; returns the model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what an optimiser should update)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed as in model.state_dict() (small checkpoints)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(("lora_a", "lora_b"))}
