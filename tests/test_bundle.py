"""Bundles round-trip; heads rebuild from (kind, config, tensors); the model normalises inside."""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pathapp.models.bundle import Bundle, BundleError, load_bundle, save_bundle
from pathapp.models.header import read_metadata
from pathapp.models.loader import load_model
from pathapp.models.heads import HeadError, build_head, head_state
from pathapp.models.registry import embed
from vit_factory import calibration_images, tiny_bundle, tiny_head, tiny_spec, tiny_vit


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("head", ["linear", "mlp", "prototype", "knn"])
def test_round_trip_with_tile_head(tmp_path: Path, head: str) -> None:
    spec = tiny_spec("dinov2_vits14_reg4")
    backbone = tiny_vit(spec, seed=7)
    h = tiny_head(head, spec.embedding_dim, 3, hidden=[32]) if head == "mlp" else \
        tiny_head(head, spec.embedding_dim, 3)
    bundle = Bundle.from_model(backbone, spec, head=h, class_names=["Tumor", "Stroma", "Other"],
                               mpp=1.0, tile_size=56, provenance={"weights": "random"})
    path = save_bundle(bundle, tmp_path / "m.pathapp")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pathapp"]  # no temp file left behind

    loaded = load_bundle(path)
    assert loaded.spec == spec and loaded.class_names == ["Tumor", "Stroma", "Other"]
    assert loaded.class_colors == bundle.class_colors and len(set(loaded.class_colors)) == 3
    assert (loaded.mpp, loaded.tile_size, loaded.recipe) == (1.0, 56, "cls")
    assert loaded.provenance["weights"] == "random" and "created" in loaded.provenance

    x = calibration_images(6, 56, seed=3)
    with torch.no_grad():
        e1, p1 = bundle.build()(x)
        e2, p2 = loaded.build()(x)
        direct = embed(backbone, (x - torch.tensor(spec.mean).view(1, 3, 1, 1))
                       / torch.tensor(spec.std).view(1, 3, 1, 1), spec)
    torch.testing.assert_close(e2, e1)
    torch.testing.assert_close(e2, direct, rtol=1e-5, atol=1e-5)  # normalisation happens inside
    torch.testing.assert_close(p2, p1)
    assert p2.shape == (6, 3) and torch.allclose(p2.sum(1), torch.ones(6))
    assert (e2[0] - e2[1]).abs().max() > 1e-2


def test_headless_bundle_gives_embeddings_only(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path, num_classes=0)
    bundle = load_bundle(path)
    assert not bundle.has_head and bundle.num_classes == 0
    model = bundle.build()
    with torch.no_grad():
        e, p = model(torch.rand(2, 3, 56, 56))
    assert e.shape == (2, 64) and p is None


def test_uint8_input_equals_float_input(tmp_path: Path) -> None:
    model = load_bundle(tiny_bundle(tmp_path)).build()
    u8 = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        a, pa = model(u8)
        b, pb = model(u8.float() / 255)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(pa, pb)


def test_abmil_bundle_is_a_slide_head(tmp_path: Path) -> None:
    spec = tiny_spec()
    bundle = Bundle.from_model(tiny_vit(spec), spec, head=tiny_head("abmil", 64, 2, hidden_dim=16, attn_dim=8),
                               class_names=["benign", "malignant"])
    model = load_bundle(save_bundle(bundle, tmp_path / "mil.pathapp")).build()
    with torch.no_grad():
        e, p = model(calibration_images(5, 56))
        probs, attention = model.slide_head(e)
    assert p is None and model.tile_head is None
    assert probs.shape == (2,) and attention.shape == (5,)
    assert torch.isclose(attention.sum(), torch.tensor(1.0)) and attention.std() > 0


def test_meta_is_json_in_safetensors_header(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path, 2)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        keys = list(f.keys())
    assert header["format"] == "pathapp.bundle" and header["format_version"] == "1"
    meta = json.loads(header["pathapp"])
    assert meta["classes"] == [{"name": "Tumor", "color": meta["classes"][0]["color"]},
                               {"name": "Stroma", "color": meta["classes"][1]["color"]}]
    assert meta["preprocessing"]["mpp"] == 0.5 and meta["preprocessing"]["tile_size"] == 56
    assert meta["head"]["kind"] == "linear" and read_metadata(path) == meta
    assert all(k.startswith(("backbone.", "head.")) for k in keys) and "head.fc.weight" in keys


def test_fingerprint_is_recorded_in_the_header_and_read_back(tmp_path: Path) -> None:
    """A loaded bundle takes its fingerprint from the header while it holds the tensors and
    preprocessing it was read with, and hashes again as soon as either changes."""
    path = tiny_bundle(tmp_path, 2)
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    loaded = load_bundle(path)
    hashed = dataclasses.replace(loaded, backbone_state=dict(loaded.backbone_state))  # other tensors: hashed
    assert header["fingerprint"] == hashed.fingerprint()
    # Recorded, not recomputed: a header that says otherwise is believed, also through load_model,
    # whose dataclasses.replace keeps the tensors
    save_file(tensors, str(path), metadata={**header, "fingerprint": "recorded"})
    loaded = load_bundle(path)
    assert loaded.fingerprint() == load_model(path).fingerprint() == "recorded"
    assert dataclasses.replace(loaded, backbone_state=dict(loaded.backbone_state)).fingerprint() == hashed.fingerprint()
    loaded.tile_size = 28  # other preprocessing: another fingerprint
    assert loaded.fingerprint() not in ("recorded", hashed.fingerprint())
    loaded.tile_size = 56
    assert loaded.fingerprint() == "recorded"
    other = {k: v.clone() for k, v in loaded.backbone_state.items()}
    other["norm.weight"] += 1
    gone = weakref.ref(loaded.backbone_state)
    loaded.backbone_state = other  # other weights: hashed, and the file's tensors are not kept alive
    gc.collect()
    assert gone() is None and loaded.fingerprint() not in ("recorded", hashed.fingerprint())
    # A bundle written before fingerprints were recorded is hashed
    save_file(tensors, str(path), metadata={k: v for k, v in header.items() if k != "fingerprint"})
    assert load_bundle(path).fingerprint() == hashed.fingerprint()


def test_not_a_bundle(tmp_path: Path) -> None:
    text = tmp_path / "model.pathapp"
    text.write_text("hello")
    with pytest.raises(BundleError, match=r"model\.pathapp: not a pathapp bundle.*pathapp model create"):
        load_bundle(text)
    plain = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(BundleError, match=r"weights\.safetensors: a safetensors file but not a pathapp bundle"):
        load_bundle(plain)
    with pytest.raises(BundleError, match="no such model file"):
        load_bundle(tmp_path / "absent.pathapp")


def test_class_count_must_match_head() -> None:
    spec = tiny_spec()
    with pytest.raises(BundleError, match="3 classes but 2 names"):
        Bundle.from_model(tiny_vit(spec), spec, head=tiny_head("linear", 64, 3), class_names=["a", "b"])


def test_head_state_round_trip_and_validation() -> None:
    for kind in ("linear", "mlp", "prototype", "knn", "abmil"):
        head = tiny_head(kind, 16, 3)
        again = build_head(*head_state(head))
        x = torch.randn(4, 16)
        with torch.no_grad():
            a, b = head(x), again(x)
        torch.testing.assert_close(a[0] if kind == "abmil" else a, b[0] if kind == "abmil" else b)
    with pytest.raises(HeadError, match="unknown head kind"):
        build_head("svm", {"in_dim": 4, "num_classes": 2})
    with pytest.raises(HeadError, match="lacks 'in_dim'"):
        build_head("linear", {"num_classes": 2})
    with pytest.raises(HeadError, match=r"shape \['fc.weight \(2, 5\) != \(2, 4\)'"):
        build_head("linear", {"in_dim": 4, "num_classes": 2}, {"weight": torch.zeros(2, 5), "bias": torch.zeros(2)})


def test_linear_head_matches_sklearn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    for n_classes in (2, 3):
        x = rng.normal(size=(120, 8)).astype(np.float32)
        y = rng.integers(0, n_classes, 120)
        x[np.arange(120), y] += 2.0
        lr = LogisticRegression(max_iter=500).fit(x, y)
        head = build_head("linear", {"in_dim": 8, "num_classes": n_classes},
                          {"weight": torch.tensor(lr.coef_), "bias": torch.tensor(lr.intercept_)})
        with torch.no_grad():
            probs = head(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(probs, lr.predict_proba(x), atol=1e-5)


def test_prototype_and_knn_semantics() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    head = build_head("prototype", {"in_dim": 2, "num_classes": 2, "temperature": 0.5}, {"prototypes": protos * 3})
    p = head(torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]]))
    assert p[0, 0] > 0.8 and p[1, 1] > 0.8 and torch.allclose(p[2], torch.tensor([0.5, 0.5]))
    np.testing.assert_allclose(p[0, 0].item(), np.exp(2) / (np.exp(2) + np.exp(0)), rtol=1e-6)

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    knn = build_head("knn", {"in_dim": 2, "num_classes": 2, "k": 3, "num_train": 5},
                     {"embeddings": train, "labels": labels})
    queries = torch.tensor([[5.0, 0.2], [0.0, 3.0]])
    torch.testing.assert_close(knn(queries), torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]))

    weighted = build_head("knn", {"in_dim": 2, "num_classes": 2, "k": 3, "num_train": 5, "temperature": 0.1},
                          {"embeddings": train, "labels": labels})
    q = torch.nn.functional.normalize(queries[:1], dim=-1)
    sims = q @ torch.nn.functional.normalize(train, dim=-1).T  # neighbours: 0, 1 (class 0) and 4 (class 1)
    w = (sims[0, [0, 1, 4]] / 0.1).exp()
    torch.testing.assert_close(weighted(queries)[0], torch.stack([w[:2].sum(), w[2]]) / w.sum())


def test_abmil_attention_follows_gating() -> None:
    """Attention = softmax(w^T (tanh(V h) * sigmoid(U h))) over the bag, as in Ilse et al."""
    head = tiny_head("abmil", 8, 2, hidden_dim=6, attn_dim=4)
    bag = torch.randn(7, 8)
    with torch.no_grad():
        probs, att = head(bag)
        h = head.fc(bag)
        want = head.attn_w(torch.tanh(head.attn_v(h)) * torch.sigmoid(head.attn_u(h))).squeeze(-1).softmax(0)
        torch.testing.assert_close(att, want)
        torch.testing.assert_close(probs, head.classifier(want @ h).softmax(-1))


def test_int8_quantisation_keeps_embeddings(tmp_path: Path) -> None:
    from pathapp.models.quantize import quantize_int8

    model = load_bundle(tiny_bundle(tmp_path, 2)).build()
    qmodel = quantize_int8(model)
    assert type(qmodel.backbone.blocks[0].attn.qkv).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(model.backbone.blocks[0].attn.qkv, torch.nn.Linear)  # original untouched
    x = calibration_images(16, 56, seed=9)
    with torch.no_grad():
        e32, p32 = model(x)
        e8, p8 = qmodel(x)
    assert not torch.equal(e32, e8)  # it really ran int8
    cos = torch.nn.functional.cosine_similarity(e32, e8)
    assert cos.min() > 0.99, cos
    spread = 1 - torch.nn.functional.cosine_similarity(e32[:1], e32[1:]).max()
    assert spread > 10 * (1 - cos.min()), "quantisation error must be small next to tile-to-tile differences"
    assert (p32.argmax(1) == p8.argmax(1)).float().mean() >= 0.9


# ------------------------------------------------------------------------- pathapp model (CLI)


def _pathapp(*args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io
    import sys

    from pathapp.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["pathapp", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def test_cli_create_from_bundle_and_head_file_then_info(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pathapp.cli import cli
    from pathapp.models.heads import save_head_file

    teacher = tiny_bundle(tmp_path, num_classes=0, filename="teacher.pathapp")  # e.g. from pretraining
    head = tiny_head("prototype", 64, 2, temperature=0.2)
    head_file = save_head_file(tmp_path / "head.safetensors", *head_state(head))
    out = tmp_path / "out" / "tumor.pathapp"
    result = CliRunner().invoke(cli, ["model", "create", "--weights", str(teacher), "--head", str(head_file),
                                      "--classes", "Tumor, Stroma", "--colors", "255,0,0;0,255,0",
                                      "--mpp", "1.0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "head prototype" in result.output

    info = CliRunner().invoke(cli, ["model", "info", str(out)])
    meta = json.loads(info.output)
    assert meta["classes"] == [{"name": "Tumor", "color": [255, 0, 0]}, {"name": "Stroma", "color": [0, 255, 0]}]
    assert meta["preprocessing"]["mpp"] == 1.0 and meta["preprocessing"]["tile_size"] == 56
    assert meta["provenance"]["weights"] == str(teacher) and meta["head"]["config"]["temperature"] == 0.2

    x = calibration_images(4, 56)
    with torch.no_grad():
        e_teacher, _ = load_bundle(teacher).build()(x)
        e, p = load_bundle(out).build()(x)
    torch.testing.assert_close(e, e_teacher)
    torch.testing.assert_close(p, head(e))


def test_cli_create_from_official_dinov2_checkpoint(tmp_path: Path) -> None:
    """The real path: a full-size ViT-S/14 in facebookresearch's .pth layout + a JSON head."""
    from vit_factory import official_dinov2_state, set_layerscale_one

    from pathapp.models.registry import create_backbone

    torch.manual_seed(0)
    source = set_layerscale_one(create_backbone("dinov2_vits14"))
    torch.save(official_dinov2_state(source), tmp_path / "dinov2_vits14_pretrain.pth")
    w = torch.randn(3, 384)
    (tmp_path / "head.json").write_text(json.dumps(
        {"kind": "linear", "config": {"in_dim": 384, "num_classes": 3}, "tensors": {"weight": w.tolist(),
         "bias": [0.0, 0.1, 0.2]}, "class_names": ["Tumor", "Stroma", "Fat"]}))
    out = tmp_path / "m.pathapp"
    code, _, err = _pathapp("model", "create", "--backbone", "dinov2_vits14", "--weights",
                            str(tmp_path / "dinov2_vits14_pretrain.pth"), "--head", str(tmp_path / "head.json"),
                            "--out", str(out))
    assert code == 0, err
    bundle = load_bundle(out)
    assert bundle.class_names == ["Tumor", "Stroma", "Fat"] and bundle.tile_size == 224 and bundle.mpp == 0.5
    x = calibration_images(2, 224)
    with torch.no_grad():
        e, p = bundle.build()(x)
        want = embed(source, (x - torch.tensor(bundle.mean).view(1, 3, 1, 1)) / torch.tensor(bundle.std).view(1, 3, 1, 1))
    torch.testing.assert_close(e, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p, (e @ w.T + torch.tensor([0.0, 0.1, 0.2])).softmax(1), rtol=1e-4, atol=1e-5)


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.pathapp"
    junk.write_text("x")
    code, _, err = _pathapp("model", "info", str(junk))
    assert code == 2 and err.startswith("error: ") and "junk.pathapp" in err and err.count("\n") == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    code, _, err = _pathapp("model", "create", "--backbone", "dinov2_vits14", "--out", str(tmp_path / "x.pathapp"))
    assert code == 2 and "--weights FILE" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pathapp").exists()

    teacher = tiny_bundle(tmp_path, num_classes=0, filename="t.pathapp")
    (tmp_path / "h.json").write_text(json.dumps({"kind": "linear", "config": {"in_dim": 32, "num_classes": 2},
                                                 "tensors": {}}))
    code, _, err = _pathapp("model", "create", "--weights", str(teacher), "--head", str(tmp_path / "h.json"),
                            "--out", str(tmp_path / "y.pathapp"))
    assert code == 2 and "takes 32-d embeddings" in err and "64-d" in err, err


def test_cli_list() -> None:
    code, out, _ = _pathapp("model", "list")
    assert code == 0 and out.splitlines()[0].startswith("dinov2_vits14")
    assert any(line.startswith("virchow2") and "2560-d" in line for line in out.splitlines())
