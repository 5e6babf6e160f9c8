"""Tiny random-weight DINOv2-family ViTs and bundles for tests (any engineer's tests import this).

Random timm DINOv2 ViTs start with LayerScale gammas at 1e-5, which makes every input give nearly the
same embedding; these helpers set the gammas to 1 so outputs depend on the input, as real weights do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
    spec = name.replace(**overrides) if isinstance(name, BackboneSpec) else tiny_spec(name, **overrides)
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
        head = build_head(kind, cfg)
        head.embeddings.copy_(torch.randn(n, in_dim, generator=g))
        head.labels.copy_(torch.arange(n) % num_classes)
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
                               provenance={"weights": "random (tests/vit_factory.py)"})
    return save_bundle(bundle, Path(tmp_path) / filename)


# Checkpoint layouts other tools write, for loading tests (names as in facebookresearch/dinov2's
# vision_transformer.py and transformers' modeling_dinov2.py).


def official_dinov2_state(model: torch.nn.Module, swiglu: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights as facebookresearch/dinov2 names them (vision_transformer.py):
    pos_embed covers CLS, register_tokens are separate, SwiGLU FFN is mlp.w12 / mlp.w3."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, dim)}
    if "reg_token" in sd:  # timm folds the CLS position into cls_token; undo with any split
        cls_pos = torch.randn(1, 1, dim) * 0.02
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for k, v in sd.items():
        if swiglu:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    return out


def chunked_blocks(state: dict[str, torch.Tensor], depth: int, chunks: int) -> dict[str, torch.Tensor]:
    """DINOv2 block_chunks naming: blocks.<chunk>.<global block index>."""
    size = depth // chunks
    return {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // size}.{m[1]}.", k): v
            for k, v in state.items()}


def transformers_dinov2_state(model: torch.nn.Module, swiglu: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights as transformers' Dinov2Model names them (q, k, v separate)."""
    official = official_dinov2_state(model, swiglu)
    out = {}
    for k, v in official.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if not m:
            name = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
                    "pos_embed": "embeddings.position_embeddings"}.get(k, k)
            name = name.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")
            out[name.replace("norm.", "layernorm.") if name.startswith("norm.") else name] = v
            continue
        i, rest = m[1], m[2]
        if rest.startswith("attn.qkv."):
            for part, t in zip(("query", "key", "value"), v.chunk(3)):
                out[f"encoder.layer.{i}.attention.attention.{part}.{rest.split('.')[-1]}"] = t
            continue
        rest = (rest.replace("attn.proj.", "attention.output.dense.").replace("ls1.gamma", "layer_scale1.lambda1")
                .replace("ls2.gamma", "layer_scale2.lambda1").replace("mlp.w12.", "mlp.weights_in.")
                .replace("mlp.w3.", "mlp.weights_out."))
        out[f"encoder.layer.{i}.{rest}"] = v
    return out


def fresh_traced_start(load: str, cache: Path, precision: str = "bf16") -> list[str]:
    """What a fresh process with XDG_CACHE_HOME=`cache` reports after `prepare_model(<load>, traced=True)`
    (`load`: Python giving a Bundle, with load_bundle and load_model imported): the backbone's type
    name, and whether timm and torchvision were imported ("True"/"False")."""
    code = ("import sys\nfrom pathapp.infer import prepare_model\nfrom pathapp.models.bundle import load_bundle\n"
            f"from pathapp.models.loader import load_model\nrt = prepare_model({load}, 'cpu', {precision!r}, traced=True)\n"
            "print(type(rt.model.backbone).__name__, 'timm' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()
