"""Segmentation heads on a ViT's patch tokens: per-pixel class logits for a tile.

The backbone's patch tokens (optionally of its last `layers` blocks, concatenated as DINOv2's
linear segmentation probe does) form a (B, D·layers, h, w) feature map at one vector per patch;
a head maps it to class logits, which `segment` upsamples bilinearly to the input's pixels.

- "seg_linear": batch norm + 1×1 convolution (the DINOv2 linear probe), logits at patch resolution;
- "seg_decoder": a light progressive-upsampling decoder (3×3 conv blocks, ×2 upsampling twice), logits
  at four times the patch resolution, so outlines follow the tissue more closely than 14 px steps.

Config keys (besides `in_dim`, `num_classes`): `layers` (1 or 4), `hidden` (decoder width, 64),
`task` "segmentation". Class 0 is the background class: it is never written as an annotation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathapp.models.heads import Head


def patch_features(backbone: nn.Module, x: Tensor, layers: int = 1) -> Tensor:
    """(B, D·layers, h, w) normalised patch tokens of the last `layers` blocks of a timm ViT."""
    feats = backbone.get_intermediate_layers(x, n=layers, reshape=True, norm=True)
    return torch.cat(list(feats), dim=1)


class SegHead(Head):
    """A head from a patch feature map (B, in_dim, h, w) to class logits (B, C, h', w')."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.layers = int(config.get("layers", 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x).softmax(dim=1)


class SegLinearHead(SegHead):
    """BatchNorm + 1×1 conv on the patch features (DINOv2's linear segmentation probe)."""

    kind = "seg_linear"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.bn = nn.BatchNorm2d(self.in_dim)
        self.conv = nn.Conv2d(self.in_dim, self.num_classes, 1)

    def logits(self, x: Tensor) -> Tensor:
        return self.conv(self.bn(x))


def _block(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.GroupNorm(min(8, b), b), nn.GELU())


class SegDecoderHead(SegHead):
    """Progressive upsampling: project, then two (×2 bilinear, 3×3 conv) stages, then 1×1 to classes."""

    kind = "seg_decoder"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        h = int(config.get("hidden", 64))
        self.proj = _block(self.in_dim, h)
        self.up1 = _block(h, h // 2)
        self.up2 = _block(h // 2, h // 4)
        self.out = nn.Conv2d(h // 4, self.num_classes, 1)

    def logits(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = self.up1(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.up2(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(x)


SEG_HEADS: dict[str, type[SegHead]] = {c.kind: c for c in (SegLinearHead, SegDecoderHead)}
# `pathapp train --seg-head` names -> head kinds
SEG_HEAD_NAMES = {"linear": "seg_linear", "decoder": "seg_decoder"}


def new_seg_head(head: str, in_dim: int, num_classes: int, layers: int = 1, **config: Any) -> SegHead:
    """A random-init segmentation head ("linear" or "decoder") for `layers` blocks of width `in_dim`."""
    kind = SEG_HEAD_NAMES.get(head, head)
    return SEG_HEADS[kind]({"in_dim": in_dim * layers, "num_classes": num_classes, "layers": layers,
                            "task": "segmentation", **config})


def segment_logits(backbone: nn.Module, head: SegHead, x: Tensor) -> Tensor:
    """(B, C, H, W) logits at the input's pixels for normalised images x (B, 3, H, W)."""
    logits = head.logits(patch_features(backbone, x, head.layers))
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def seg_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0, eps: float = 1.0) -> Tensor:
    """Cross-entropy plus soft Dice (mean over the classes present in the batch or predicted).

    `logits` (B, C, H, W), `target` (B, H, W) int64 class indices; pixels < 0 are ignored."""
    valid = target >= 0
    ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")[valid].mean() if valid.any() \
        else logits.sum() * 0
    probs = logits.softmax(dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype) * valid.unsqueeze(1)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)
    return ce + dice_weight * (1 - dice.mean())
