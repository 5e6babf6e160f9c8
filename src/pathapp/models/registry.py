"""Named backbones: DINOv2 ViTs and the pathology foundation models built on them, as timm specs.

A `BackboneSpec` is plain JSON-able data so that a bundle can carry it and rebuild the exact
architecture later; `create_backbone` turns it into a random-init timm VisionTransformer (weights are
`weights.py`'s job) and `embed` turns images into one vector per image following the model's recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pathapp.errors import PathappError

if TYPE_CHECKING:
    import torch
    from torch import nn

Recipe = Literal["cls", "cls+mean"]
RECIPES: tuple[str, ...] = ("cls", "cls+mean")

# The defaults every command shares (re-exported by `models.loader`, which applies them).
DEFAULT_MODEL = "dinov2_vits14"
DEFAULT_MPP = 0.5  # µm/px tiles are analysed at unless a bundle or option says otherwise (≈ 20×)
DEFAULT_TILE_SIZE = 224  # px: the input size of the DINOv2 ViTs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm kwargs that take a class; the spec stores the class by name so it stays JSON.
_LAYER_KWARGS = {"mlp_layer", "act_layer", "norm_layer"}
# Overrides that change a spec field rather than (only) a timm kwarg.
_FIELD_KWARGS = {"img_size": "img_size", "embed_dim": "embed_dim", "patch_size": "patch_size"}


class UnknownBackboneError(PathappError):
    """A backbone name that is not in the registry."""


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone and feed it: timm architecture + preprocessing."""

    name: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    patch_size: int = 14
    embed_dim: int = 384
    num_register_tokens: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    recipe: Recipe = "cls"
    hub_repo: str | None = None  # Hugging Face repo holding the weights file
    img_size: int = DEFAULT_TILE_SIZE
    description: str = ""

    @property
    def embedding_dim(self) -> int:
        """Length of the vector `embed` returns (the recipe doubles it for cls+mean)."""
        return self.embed_dim * (2 if self.recipe == "cls+mean" else 1)

    def replace(self, **overrides: Any) -> BackboneSpec:
        """A copy with timm kwargs overridden (e.g. depth=2, embed_dim=64 for tests)."""
        fields = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {k: overrides.pop(k) for k in list(overrides) if k in fields and k not in _FIELD_KWARGS}
        kwargs = dict(self.timm_kwargs)
        for key, value in overrides.items():
            kwargs[key] = value
            if key in _FIELD_KWARGS:
                changes[_FIELD_KWARGS[key]] = value
            elif key == "reg_tokens":
                changes["num_register_tokens"] = value
        return dataclasses.replace(self, timm_kwargs=kwargs, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**d)


def _dinov2(size: str, arch: str, dim: int, reg: bool) -> BackboneSpec:
    label = "g" if size == "g" else size.upper()  # DINOv2's own spelling: ViT-S, -B, -L, -g
    tag = "reg4_dinov2" if reg else "dinov2"
    timm_name = f"vit_{arch}_patch14_{tag}"
    return BackboneSpec(
        name=f"dinov2_vit{size}14" + ("_reg4" if reg else ""),
        timm_name=timm_name,
        timm_kwargs={"img_size": 224, "dynamic_img_size": True},
        embed_dim=dim,
        num_register_tokens=4 if reg else 0,
        hub_repo=f"timm/{timm_name}.lvd142m",
        description=f"DINOv2 ViT-{label}/14" + (" with 4 registers" if reg else "") + " (Meta, LVD-142M)",
    )


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}

_SPECS: list[BackboneSpec] = [
    *(_dinov2(s, a, d, r) for r in (False, True) for s, a, d in
      (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536))),
    BackboneSpec(
        name="uni",
        timm_name="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        patch_size=16, embed_dim=1024, hub_repo="MahmoodLab/uni",
        description="UNI (Mahmood Lab), ViT-L/16, gated on Hugging Face",
    ),
    BackboneSpec(
        name="uni2_h",
        timm_name="vit_giant_patch14_224",
        timm_kwargs={"img_size": 224, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                     "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                     "dynamic_img_size": True, **_SWIGLU},
        embed_dim=1536, num_register_tokens=8, hub_repo="MahmoodLab/UNI2-h",
        description="UNI2-h (Mahmood Lab), ViT-H/14 SwiGLU, 8 registers, gated on Hugging Face",
    ),
    BackboneSpec(
        # Virchow2 config.json: vit_huge_patch14_224, mlp_ratio 5.3375, reg_tokens 4, ImageNet mean/std;
        # its model card embeds as concat(CLS, mean of patch tokens after the 4 registers).
        name="virchow2",
        timm_name="vit_huge_patch14_224",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                     "dynamic_img_size": True, **_SWIGLU},
        embed_dim=1280, num_register_tokens=4, recipe="cls+mean", hub_repo="paige-ai/Virchow2",
        description="Virchow2 (Paige), ViT-H/14 SwiGLU, 4 registers, CLS+mean (2560-d), gated",
    ),
    BackboneSpec(
        name="h_optimus_0",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        embed_dim=1536, num_register_tokens=4,
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        hub_repo="bioptimus/H-optimus-0",
        description="H-optimus-0 (Bioptimus), ViT-g/14, 4 registers",
    ),
    BackboneSpec(
        # kaiko-ai/midnight is a transformers Dinov2Model (ViT-g/14 SwiGLU, no registers); its card
        # normalises with mean=std=0.5 and embeds as concat(CLS, mean of patch tokens).
        name="midnight",
        timm_name="vit_giant_patch14_dinov2",
        timm_kwargs={"img_size": 224, "dynamic_img_size": True},
        embed_dim=1536, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), recipe="cls+mean",
        hub_repo="kaiko-ai/midnight",
        description="Midnight-12k (kaiko.ai), ViT-g/14 SwiGLU, CLS+mean (3072-d)",
    ),
]

REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


def list_backbones() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registered spec for `name` (case and '-' insensitive)."""
    key = name.strip().lower().replace("-", "_")
    if key not in REGISTRY:
        raise UnknownBackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def resolve_spec(spec_or_name: BackboneSpec | str) -> BackboneSpec:
    return spec_or_name if isinstance(spec_or_name, BackboneSpec) else get_spec(spec_or_name)


def _timm_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    import timm.layers
    from torch import nn

    kwargs = dict(spec.timm_kwargs)
    for key in _LAYER_KWARGS & kwargs.keys():
        value = kwargs[key]
        if isinstance(value, str) and key == "mlp_layer":
            kwargs[key] = getattr(timm.layers, value)
        elif isinstance(value, str) and key == "norm_layer" and hasattr(nn, value):
            kwargs[key] = getattr(nn, value)
    kwargs["num_classes"] = 0
    return kwargs


def create_backbone(spec_or_name: BackboneSpec | str, **overrides: Any) -> nn.Module:
    """A random-init timm ViT for the spec (no download); overrides go to timm (depth=2, ...)."""
    import timm

    spec = resolve_spec(spec_or_name).replace(**overrides) if overrides else resolve_spec(spec_or_name)
    model = timm.create_model(spec.timm_name, pretrained=False, **_timm_kwargs(spec))
    return model.eval()


def embed(model: nn.Module, x: torch.Tensor, recipe: BackboneSpec | str = "cls") -> torch.Tensor:
    """(B, D) image embeddings: the CLS token, or CLS concatenated with the mean patch token.

    Register tokens sit between CLS and the patches in timm; `num_prefix_tokens` skips them.
    """
    import torch

    recipe = recipe.recipe if isinstance(recipe, BackboneSpec) else recipe
    tokens = model.forward_features(x)
    cls = tokens[:, 0]
    if recipe == "cls":
        return cls
    if recipe == "cls+mean":
        return torch.cat([cls, tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)
    raise PathappError(f"unknown embedding recipe {recipe!r}; use one of {RECIPES}")
