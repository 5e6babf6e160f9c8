"""Tiny random-weight DINOv2-family ViTs and bundles for tests (any engineer's tests import this).

Random timm DINOv2 ViTs start with LayerScale gammas at 1e-5, which makes every input give nearly the
same embedding; these helpers set the gammas to 1 so outputs depend on the input, as real weights do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathapp.models.bundle import Bundle, save_bundle
from pathapp.models.heads import build_head
from pathapp.models.registry import BackboneSpec, create_backbone, get_spec

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 56}
CLASS_NAMES = ["Tumor", "Stroma", "Immune cells", "Necrosis", "Other"]


def tiny_spec(name: str = "dinov2_vits14", **overrides: Any) -> BackboneSpec:
    """The registry spec `name` shrunk to depth 2, width 64, 56 px (overrides win)."""
    spec = get_spec(name)
    kwargs = {**TINY, **overrides}
    if spec.timm_kwargs.get("mlp_layer") or "giant" in spec.timm_name:
        kwargs.setdefault("mlp_ratio", 4.0)  # SwiGLU needs an even hidden width
    if spec.patch_size == 16 and "img_size" not in overrides:
        kwargs["img_size"] = 64
    return spec.replace(**kwargs)


def set_layerscale_one(model: nn.Module) -> nn.Module:
    """LayerScale gammas to 1 so random blocks contribute (timm names the parameter `gamma`)."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gamma") and isinstance(m.gamma, torch.Tensor):
                m.gamma.fill_(1.0)
    return model


def tiny_vit(name: str | BackboneSpec = "dinov2_vits14", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random ViT (eval mode, LayerScale 1) built exactly as `create_backbone` builds it."""
    spec = name if isinstance(name, BackboneSpec) else tiny_spec(name, **overrides)
    torch.manual_seed(seed)
    return set_layerscale_one(create_backbone(spec))


def calibration_images(n: int = 32, size: int = 56, seed: int = 0) -> torch.Tensor:
    """Varied float 0..1 images (tinted, light and dark noise) standing in for real tiles."""
    g = torch.Generator().manual_seed(seed)
    tint = torch.rand(n, 3, 1, 1, generator=g)
    return (tint * 0.7 + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def tiny_head(kind: str, in_dim: int, num_classes: int, seed: int = 0,
              calibration: torch.Tensor | None = None, **config: Any) -> nn.Module:
    """A head of `kind` with random, non-degenerate tensors.

    With `calibration` embeddings (N, in_dim) the head standardises its input with their mean/std,
    so that different tiles get different classes rather than one class everywhere.
    """
    g = torch.Generator().manual_seed(seed)
    cfg: dict[str, Any] = {"in_dim": in_dim, "num_classes": num_classes, **config}
    if calibration is not None:
        cfg["standardize"] = True
    head = _random_head(kind, cfg, g, seed)
    if calibration is not None:
        head.input_mean.copy_(calibration.mean(0))
        head.input_std.copy_(calibration.std(0) + 1e-6)
    return head


def _random_head(kind: str, cfg: dict[str, Any], g: torch.Generator, seed: int) -> nn.Module:
    in_dim, num_classes = cfg["in_dim"], cfg["num_classes"]
    if kind == "knn":
        n = cfg.setdefault("num_train", 4 * num_classes)
        cfg.setdefault("k", 3)
        tensors = {"embeddings": torch.randn(n, in_dim, generator=g),
                   "labels": torch.arange(n) % num_classes}
        head = build_head(kind, cfg)
        head.embeddings.copy_(tensors["embeddings"])
        head.labels.copy_(tensors["labels"])
        return head
    if kind == "prototype":
        head = build_head(kind, cfg)
        head.prototypes.copy_(torch.randn(num_classes, in_dim, generator=g))
        return head
    torch.manual_seed(seed)
    head = build_head(kind, cfg)
    with torch.no_grad():  # default init gives near-uniform probabilities; spread them out
        for p in head.parameters():
            p.mul_(5.0)
    return head


def tiny_bundle(
    tmp_path: Path,
    num_classes: int = 2,
    *,
    name: str = "dinov2_vits14",
    head: str = "linear",
    mpp: float = 0.5,
    tile_size: int | None = None,
    filename: str = "tiny.pathapp",
    **overrides: Any,
) -> Path:
    """Write a tiny bundle into tmp_path and return its path; num_classes=0 gives a headless one.

    Tile size defaults to the tiny model's input size (56 px) to keep tests fast.
    """
    spec = tiny_spec(name, **overrides)
    model = tiny_vit(spec)
    h = None
    if num_classes:
        with torch.no_grad():
            pm = Bundle.from_model(model, spec).build()
            calib = pm.embed(calibration_images(size=spec.img_size))
        h = tiny_head(head, spec.embedding_dim, num_classes, calibration=calib)
    bundle = Bundle.from_model(model, spec, head=h, class_names=CLASS_NAMES[:num_classes] if num_classes <= 5
                               else [f"Class {i + 1}" for i in range(num_classes)],
                               mpp=mpp, tile_size=tile_size or spec.img_size,
                               provenance={"source_weights": "random (tests/vit_factory.py)"})
    return save_bundle(bundle, Path(tmp_path) / filename)
