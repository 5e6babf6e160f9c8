"""Inference precisions on real tiles: `auto` picks bf16 exactly where the CPU has native bf16 (or on
CUDA), bf16 and int8 embeddings stay close to fp32, and the GPU-path settings (channels-last batches,
pinned memory) are exercised on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_file
from vit_factory import fresh_traced_start, tiny_bundle

from pathapp.infer import infer_slide, pipeline, prepare_model
from pathapp.infer.pipeline import loader_options, ramped_batches, resolve_precision
from pathapp.models.bundle import load_bundle, save_bundle
from pathapp.slide import open_slide
from pathapp.tiles import detect_tissue, make_grid
from pathapp.tiles.dataset import read_tiles

SVS = "wsi/aperio/CMU-1-Small-Region.svs"
FLOORS = {"bf16": 0.999, "int8": 0.99}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Deeper and wider than the default tiny ViT (6 blocks, 192 wide, as many heads as ViT-S), so
    rounding errors accumulate as they do in a real model; LayerScale 1 and a head."""
    path = tiny_bundle(tmp_path_factory.mktemp("prec"), num_classes=2, depth=6, embed_dim=192, num_heads=3,
                       img_size=112)
    return load_bundle(path)


@pytest.fixture(scope="module")
def fp32(shared_data, bundle):
    with open_slide(data_file(SVS)) as slide:
        return infer_slide(slide, bundle, mpp=1.0, workers=0, progress=False, precision="fp32")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_embeddings_close_to_fp32_on_real_tiles(fp32, bundle, precision):
    with open_slide(data_file(SVS)) as slide:
        res = infer_slide(slide, bundle, mpp=1.0, workers=0, progress=False, precision=precision)
    assert res.params["precision"] == precision and len(res) == len(fp32) >= 20
    a, b = fp32.embeddings, res.embeddings
    assert not np.array_equal(a, b)  # it really ran at another precision
    cos = cosines(a, b)
    assert cos.min() >= FLOORS[precision]
    # ... and a typical pair of neighbouring tiles differs more than the precisions differ on any tile
    assert np.median(1 - cosines(a[:-1], a[1:])) > (1 - cos).max()
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-5)  # the head runs in fp32 on the embeddings


def test_traced_backbone_embeds_as_the_model_does_without_importing_timm(shared_data, bundle, tmp_path, monkeypatch):
    """`pathapp infer` builds its model from a cached trace of the backbone (no timm import: 2-3 s at each
    start): the first run traces and keeps it, later runs load it and embed real tiles as the timm model
    does, at fp32 and bf16; a damaged trace is traced again."""
    from pathapp.models import traced

    monkeypatch.setattr(traced, "TRACED_CACHE", tmp_path / "pathapp" / "traced")
    with open_slide(data_file(SVS)) as slide:
        grid = make_grid(slide, 1.0, bundle.tile_size, tissue=detect_tissue(slide))
        x = torch.from_numpy(np.stack(read_tiles(slide, grid, range(24)))).permute(0, 3, 1, 2)
    for precision in ("fp32", "bf16"):
        eager = prepare_model(bundle, "cpu", precision)
        first = prepare_model(bundle, "cpu", precision, traced=True)
        path = traced.traced_path(bundle, first.bundle_fingerprint, torch.device("cpu"), precision)
        assert not isinstance(first.model.backbone, torch.jit.ScriptModule) and first.trace_to == path
        assert not path.exists()  # kept once the run's slides are done (`keep_trace`), not while they run
        first.keep_trace()
        assert path.is_file()
        again = prepare_model(bundle, "cpu", precision, traced=True)
        assert isinstance(again.model.backbone, torch.jit.ScriptModule)
        with torch.inference_mode():
            (a, pa), (b, pb) = eager.model(x), again.model(x)
        assert (a - a[0]).abs().max() > 1e-2  # tiles differ
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    path.write_bytes(b"not a trace")
    damaged = prepare_model(bundle, "cpu", "bf16", traced=True)
    assert not isinstance(damaged.model.backbone, torch.jit.ScriptModule) and damaged.trace_to == path
    damaged.keep_trace()
    saved = tmp_path / "b.pathapp"
    save_bundle(bundle, saved)
    assert fresh_traced_start(f"load_bundle({str(saved)!r})", tmp_path) == ["RecursiveScriptModule", "False", "False"]


def test_bf16_runs_the_backbone_in_bf16(bundle):
    rt = prepare_model(bundle, "cpu", "bf16")
    assert {p.dtype for p in rt.model.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in rt.model.head.parameters()} == {torch.float32}
    assert rt.fingerprint.endswith(":bf16")


@pytest.mark.parametrize(("flags", "device", "expected"), [
    ({"avx2", "avx512f"}, "cpu", "fp32"),  # bf16 would be emulated: slower than fp32
    ({"avx2", "avx512_bf16"}, "cpu", "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "cpu", "bf16"),
    (set(), "cuda", "bf16"),
])
def test_auto_precision_follows_the_hardware(monkeypatch, flags, device, expected):
    monkeypatch.setattr(pipeline, "cpu_flags", lambda: flags)
    assert resolve_precision("auto", torch.device(device)) == expected
    assert resolve_precision("fp32", torch.device(device)) == "fp32"


def test_auto_on_this_machine(bundle):
    """The default on the CPU running the tests, checked against /proc/cpuinfo read independently."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    native = " avx512_bf16" in text or " amx_bf16" in text
    rt = prepare_model(bundle, "cpu")
    assert rt.precision == ("bf16" if native else "fp32")


def test_channels_last_batches_give_the_same_embeddings(shared_data, bundle):
    """The GPU path's layout, on the CPU: channels-last weights and batches change nothing."""
    plain = prepare_model(bundle, "cpu", "fp32", channels_last=False)
    cl = prepare_model(bundle, "cpu", "fp32", channels_last=True)
    assert cl.model.backbone.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8)
    assert cl.place(x).is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a, _ = plain.model(plain.place(x))
        b, _ = cl.model(cl.place(x))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_loader_pins_memory_only_for_a_gpu():
    assert loader_options(True, 2) == {"pin_memory": True, "prefetch_factor": 4}
    assert loader_options(False, 0) == {"pin_memory": False, "prefetch_factor": None}


def test_batches_ramp_up_to_the_batch_size_in_order():
    """The model starts after 8 tiles, not a whole batch; the rest in even batches (no small one last);
    every tile once, in order."""
    batches = ramped_batches(100, 32)
    assert [len(b) for b in batches] == [8, 16, 26, 25, 25]
    assert sum(batches, []) == list(range(100))
    assert [len(b) for b in ramped_batches(72, 32, first=32)] == [24, 24, 24]
    assert [len(b) for b in ramped_batches(90, 32, first=72, start=72)] == [18]
    assert [len(b) for b in ramped_batches(5, 4)] == [3, 2] and ramped_batches(0, 32) == []
    assert [len(b) for b in ramped_batches(64, 32, first=32)] == [32, 32]


def test_folding_layer_scale_keeps_the_function():
    """γ multiplied into attn.proj and mlp.fc2 gives the same fp32 embeddings (γ drawn at random, so a
    wrong axis or a missed bias would show), and leaves no LayerScale behind."""
    from timm.layers import LayerScale
    from vit_factory import calibration_images, tiny_vit

    from pathapp.models.quantize import fold_layer_scale

    model = tiny_vit(depth=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.uniform_(0.2, 2.0)
    x = calibration_images(4, 56)
    with torch.inference_mode():
        before = model.forward_features(x)
        assert fold_layer_scale(model) == 6
        after = model.forward_features(x)
    assert not any(isinstance(m, LayerScale) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
