"""The registry builds each named backbone as its source describes it, and `embed` follows the recipe."""

from __future__ import annotations

import pytest
import torch

from pathapp.errors import PathappError
from pathapp.models.registry import BackboneSpec, create_backbone, embed, get_spec, list_backbones
from vit_factory import tiny_vit

EXPECTED = {  # name: (timm architecture, width, registers, recipe, patch)
    "dinov2_vits14": ("vit_small_patch14_dinov2", 384, 0, "cls", 14),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 768, 0, "cls", 14),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", 1024, 0, "cls", 14),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", 1536, 0, "cls", 14),
    "dinov2_vits14_reg4": ("vit_small_patch14_reg4_dinov2", 384, 4, "cls", 14),
    "dinov2_vitb14_reg4": ("vit_base_patch14_reg4_dinov2", 768, 4, "cls", 14),
    "dinov2_vitl14_reg4": ("vit_large_patch14_reg4_dinov2", 1024, 4, "cls", 14),
    "dinov2_vitg14_reg4": ("vit_giant_patch14_reg4_dinov2", 1536, 4, "cls", 14),
    "uni": ("vit_large_patch16_224", 1024, 0, "cls", 16),
    "uni2_h": ("vit_giant_patch14_224", 1536, 8, "cls", 14),
    "virchow2": ("vit_huge_patch14_224", 1280, 4, "cls+mean", 14),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", 1536, 4, "cls", 14),
    "midnight": ("vit_giant_patch14_dinov2", 1536, 0, "cls+mean", 14),
}


def test_registry_lists_every_model() -> None:
    assert set(list_backbones()) == set(EXPECTED)
    assert get_spec("H-optimus-0").name == "h_optimus_0"
    with pytest.raises(PathappError, match="unknown backbone 'vit_tiny'.*dinov2_vits14"):
        get_spec("vit_tiny")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_spec_builds_its_architecture(name: str) -> None:
    """One block at full width: the real token layout, width, MLP and LayerScale of each model."""
    arch, width, regs, recipe, patch = EXPECTED[name]
    spec = get_spec(name)
    assert (spec.timm_name, spec.embed_dim, spec.num_register_tokens, spec.recipe, spec.patch_size) == \
        (arch, width, regs, recipe, patch)
    assert spec.img_size == 224 and spec.timm_kwargs["dynamic_img_size"] is True
    size = patch * 2
    model = create_backbone(spec, depth=1, img_size=size)
    assert model.num_classes == 0 and model.embed_dim == width and model.num_prefix_tokens == 1 + regs
    assert model.blocks[0].ls1.gamma.shape == (width,)  # LayerScale present as in the checkpoints
    with torch.no_grad():
        out = embed(model, torch.rand(1, 3, size, size), spec)
    assert out.shape == (1, spec.embedding_dim)
    if "swiglu" in spec.description.lower() or "giant" in arch:
        assert type(model.blocks[0].mlp).__name__ == "GluMlp"


def test_pathology_preprocessing() -> None:
    assert get_spec("h_optimus_0").mean == (0.707223, 0.578729, 0.703617)
    assert get_spec("h_optimus_0").std == (0.211883, 0.230117, 0.177517)
    assert get_spec("midnight").mean == (0.5, 0.5, 0.5)
    assert get_spec("virchow2").mean == (0.485, 0.456, 0.406)
    assert get_spec("virchow2").embedding_dim == 2560 and get_spec("midnight").embedding_dim == 3072


def test_embed_recipes_use_prefix_tokens() -> None:
    model = tiny_vit("dinov2_vits14_reg4")
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls = embed(model, x, "cls")
        both = embed(model, x, "cls+mean")
    assert tokens.shape[1] == 1 + 4 + 16
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(both[:, 64:], tokens[:, 5:].mean(1))  # registers excluded
    assert (both[:, 64:] - tokens[:, 1:].mean(1)).abs().max() > 1e-4
    assert (cls[0] - cls[1]).abs().max() > 1e-2
    with pytest.raises(PathappError, match="recipe"):
        embed(model, x, "mean")


def test_other_input_sizes_work() -> None:
    model = tiny_vit("dinov2_vits14")  # built for 56 px
    with torch.no_grad():
        assert embed(model, torch.rand(1, 3, 84, 84), "cls").shape == (1, 64)


def test_spec_json_round_trip() -> None:
    spec = get_spec("virchow2").replace(depth=2)
    again = BackboneSpec.from_dict(spec.to_dict())
    assert again == spec and again.timm_kwargs["depth"] == 2 and again.timm_kwargs["mlp_layer"] == "SwiGLUPacked"
    assert get_spec("dinov2_vits14").replace(embed_dim=64, reg_tokens=2).num_register_tokens == 2
