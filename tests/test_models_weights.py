"""Every weights layout loads back into a fresh model and reproduces the source model's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pathapp.errors import PathappError
from pathapp.models.bundle import Bundle, save_bundle
from pathapp.models.registry import embed
from pathapp.models.loader import load_backbone
from pathapp.models.weights import WeightsError, read_state_dict
from vit_factory import (chunked_blocks, fresh_traced_start, official_dinov2_state, tiny_spec, tiny_vit,
                          transformers_dinov2_state)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(size: int = 56) -> torch.Tensor:
    return torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


LAYOUTS = {
    "timm_pth": lambda m: ("w.pth", m.state_dict()),
    "timm_safetensors": lambda m: ("w.safetensors", m.state_dict()),
    "timm_bin_wrapped_module": lambda m: ("pytorch_model.bin",
                                          {"model": {f"module.{k}": v for k, v in m.state_dict().items()},
                                           "epoch": 3}),
    "timm_state_dict_backbone": lambda m: ("w.pth", {"state_dict": {f"backbone.{k}": v for k, v in
                                                                     m.state_dict().items()}}),
    "dinov2_official": lambda m: ("dinov2_vits14_pretrain.pth", official_dinov2_state(m)),
    "dinov2_official_chunked_teacher": lambda m: (
        "teacher_checkpoint.pth",
        {"teacher": {**{f"backbone.{k}": v for k, v in chunked_blocks(official_dinov2_state(m), 2, 2).items()},
                     "dino_head.mlp.0.weight": torch.zeros(4, 4), "ibot_head.last_layer.weight_g": torch.ones(4, 1)}}),
    "dinov2_training_student_and_teacher": lambda m: (
        "model_final.pth",
        {"model": {**{f"teacher.backbone.{k}": v for k, v in official_dinov2_state(m).items()},
                   **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in official_dinov2_state(m).items()}},
         "iteration": 10}),
    "transformers_safetensors": lambda m: ("model.safetensors", transformers_dinov2_state(m)),
}


# transformers' Dinov2Model has no registers, so that layout is tested without them.
CASES = [(layout, name) for layout in LAYOUTS for name in ("dinov2_vits14", "dinov2_vits14_reg4")
         if not (layout.startswith("transformers") and "reg" in name)]


@pytest.mark.parametrize(("layout", "name"), CASES)
def test_layout_round_trip(tmp_path: Path, layout: str, name: str) -> None:
    source = tiny_vit(name, seed=1)
    filename, state = LAYOUTS[layout](source)
    path = _save(state, tmp_path / filename)
    model, spec = load_backbone(name, path, **_tiny_overrides())
    x = _inputs()
    with torch.no_grad():
        want, got = embed(source, x, spec), embed(model, x, spec)
        other = embed(tiny_vit(name, seed=2), x, spec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-2, "outputs must depend on the input"
    assert (other - want).abs().max() > 1e-2, "a differently seeded model must differ"


def _tiny_overrides(**kw) -> dict:
    return {k: v for k, v in {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 56, **kw}.items()}


@pytest.mark.parametrize("layout", ["dinov2_official", "transformers_safetensors"])
def test_swiglu_giant_layouts(tmp_path: Path, layout: str) -> None:
    """ViT-g (Midnight, DINOv2-g) checkpoints name the SwiGLU FFN w12/w3 or weights_in/out."""
    source = tiny_vit("midnight", seed=3)
    filename, _ = LAYOUTS[layout](source)
    state = official_dinov2_state(source, swiglu=True) if layout == "dinov2_official" else transformers_dinov2_state(source, swiglu=True)
    assert any(".w12." in k or "weights_in" in k for k in state)
    path = _save(state, tmp_path / filename)
    model, spec = load_backbone("midnight", path, **_tiny_overrides(mlp_ratio=4.0))
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(embed(model, x, spec), embed(source, x, spec), rtol=1e-5, atol=1e-5)
    assert spec.recipe == "cls+mean" and embed(model, x, spec).shape == (3, 128)


def test_bundle_as_weights(tmp_path: Path) -> None:
    spec = tiny_spec("dinov2_vits14_reg4")
    source = tiny_vit(spec, seed=4)
    path = save_bundle(Bundle.from_model(source, spec), tmp_path / "m.pathapp")
    model, loaded_spec = load_backbone(None, path)
    assert loaded_spec == spec
    with pytest.raises(PathappError, match="a dinov2_vits14_reg4 bundle, not uni"):
        load_backbone("uni", path)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(embed(model, x, spec), embed(source, x, spec))


def test_position_embeddings_resampled_to_model_grid(tmp_path: Path) -> None:
    """A checkpoint trained at another size (here 28 px: 2x2 grid) loads into a 56 px model (4x4)."""
    source = tiny_vit("dinov2_vits14", seed=5, img_size=28)
    path = _save(official_dinov2_state(source), tmp_path / "small_grid.pth")
    model, spec = load_backbone("dinov2_vits14", path, **_tiny_overrides())
    assert model.pos_embed.shape[1] == 1 + 16 and source.pos_embed.shape[1] == 1 + 4
    x = _inputs()
    with torch.no_grad():  # the source resamples on the fly (dynamic size) with the same interpolation
        torch.testing.assert_close(embed(model, x, spec), embed(source, x, spec), rtol=1e-4, atol=1e-4)


def test_wrong_architecture_names_keys(tmp_path: Path) -> None:
    path = _save(tiny_vit("dinov2_vits14_reg4").state_dict(), tmp_path / "reg.pth")
    with pytest.raises(WeightsError) as e:
        load_backbone("dinov2_vits14", path, **_tiny_overrides())
    msg = str(e.value)
    assert str(path) in msg and "unexpected keys: reg_token" in msg and "--backbone" in msg

    path = _save(tiny_vit("dinov2_vits14").state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(WeightsError, match=r"shape mismatch: .*cls_token \(1, 1, 64\) vs \(1, 1, 96\)"):
        load_backbone("dinov2_vits14", path, **_tiny_overrides(embed_dim=96))

    path = _save(tiny_vit("dinov2_vits14", depth=1).state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.1\."):
        load_backbone("dinov2_vits14", path, **_tiny_overrides())


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes\.pth: not a readable checkpoint"):
        load_backbone("dinov2_vits14", junk)
    with pytest.raises(WeightsError, match="no such weights file"):
        read_state_dict(tmp_path / "missing.pth")
    empty = _save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="holds no tensors"):
        load_backbone("dinov2_vits14", empty)


def test_offline_hub_without_cache_says_pass_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(PathappError) as e:
        load_backbone("dinov2_vits14")
    msg = str(e.value)
    assert "offline" in msg and "--weights FILE" in msg and "timm/vit_small_patch14_dinov2.lvd142m" in msg
    assert "\n" not in msg


def test_offline_hub_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in the HF cache layout (models--org--name/snapshots/<rev>/file) is used offline."""
    source = tiny_vit("uni", seed=6)
    repo = tmp_path / "hf" / "hub" / "models--MahmoodLab--uni"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    _save(source.state_dict(), repo / "snapshots" / rev / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model, spec = load_backbone("uni", None, **_tiny_overrides(img_size=64))
    x = _inputs(64)
    with torch.no_grad():
        torch.testing.assert_close(embed(model, x, spec), embed(source, x, spec))


def test_a_converted_checkpoint_needs_no_timm_next_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--weights FILE` converts the file with timm once; later loads take the fingerprint kept under the
    file's identity and convert only when the weights are read, so a run from its kept trace starts
    without timm. Another file (or the same file rewritten) is converted again."""
    from pathapp.infer import prepare_model
    from pathapp.models import loader, traced
    from pathapp.models.registry import create_backbone, get_spec

    monkeypatch.setattr(traced, "TRACED_CACHE", tmp_path / "pathapp" / "traced")
    torch.manual_seed(5)
    ckpt = _save(official_dinov2_state(create_backbone(get_spec("dinov2_vits14"))), tmp_path / "vits14.pth")
    first = loader.load_model("dinov2_vits14", weights=ckpt)
    prepare_model(first, "cpu", "fp32", traced=True).keep_trace()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(loader, "load_backbone", refuse)
        again = loader.load_model("dinov2_vits14", weights=ckpt)
        assert again.fingerprint() == first.fingerprint()  # from the record, not from the weights
        rt = prepare_model(again, "cpu", "fp32", traced=True)
        assert isinstance(rt.model.backbone, torch.jit.ScriptModule) and rt.bundle_fingerprint == first.fingerprint()
        with pytest.raises(AssertionError, match="converted again"):
            dict(again.backbone_state)
    assert all(torch.equal(v, first.backbone_state[k]) for k, v in again.backbone_state.items())  # read: converted
    assert fresh_traced_start(f"load_model('dinov2_vits14', weights={str(ckpt)!r})", tmp_path, "fp32") == \
        ["RecursiveScriptModule", "False", "False"]
    torch.manual_seed(6)
    _save(official_dinov2_state(create_backbone(get_spec("dinov2_vits14"))), ckpt)  # rewritten in place
    assert loader.load_model("dinov2_vits14", weights=ckpt).fingerprint() != first.fingerprint()
