"""Embedding cache: computed once per model and image, invalidated by new weights or new pixels;
inference's embeddings.h5 is reused only when it fits; bad input ends as a one-line error."""

from __future__ import annotations

import shutil
import sys

import h5py
import numpy as np
import pytest
import torch

from pathapp.models.bundle import load_bundle
from pathapp.slide import open_slide
from pathapp.tiles import make_grid
from pathapp.train.cache import CacheError, embed_slide_grid, reuse_inference_embeddings
from vit_factory import tiny_bundle


def embed_images(bundle, paths, cache, model=None, image_mpp: float = 1.0, **kw) -> np.ndarray:
    """Each image's pooled tile embeddings, as train and evaluate compute them (api.embed_labelled)."""
    out = []
    for p in paths:
        slide = open_slide(p, slide_mpp=image_mpp)
        out.append(embed_slide_grid(bundle, slide, make_grid(slide, bundle.mpp, bundle.tile_size), cache,
                                    model=model, **kw).mean(0))
    return np.stack(out)


def test_cache_reuses_and_invalidates(tmp_path, shared_data):
    torch.set_num_threads(1)
    src = sorted((shared_data / "labeled" / "ebhi-seg" / "EBHI-SEG" / "Normal" / "image").glob("*.png"))[:3]
    paths = [tmp_path / p.name for p in src]
    for s, d in zip(src, paths):
        shutil.copy(s, d)
    bundle = load_bundle(tiny_bundle(tmp_path, 0, mpp=2.0))  # 2 × 2 tiles per 224 px image at 1 µm/px
    cache = tmp_path / "cache"
    first = embed_images(bundle, paths, cache, progress=False)
    assert first.shape == (3, 64) and first.std(0).mean() > 1e-3  # tiles differ
    files = list(cache.glob("*.h5"))
    assert len(files) == 1
    with h5py.File(files[0]) as f:
        assert len(f.keys()) == 3 and f.attrs["model_fingerprint"] == bundle.fingerprint()
    # a cache hit must not need the model: pass one that would fail if called
    broken = bundle.build()
    broken.embed = None
    assert np.array_equal(embed_images(bundle, paths, cache, model=broken, progress=False), first)
    # new pixels in one file -> only that one is recomputed, and its vector changes
    shutil.copy(src[0], paths[1])
    again = embed_images(bundle, paths, cache, progress=False)
    assert np.allclose(again[1], first[0], atol=1e-5) and np.array_equal(again[2], first[2])
    # the same file at another µm/px is another tiling: computed anew, not returned from the cache
    with pytest.raises(TypeError):
        embed_images(bundle, paths[:1], cache, model=broken, image_mpp=1.5, progress=False)
    # other weights -> another fingerprint, another file
    other = load_bundle(tiny_bundle(tmp_path, 0, filename="other.pathapp", mpp=2.0, depth=1))
    assert other.fingerprint() != bundle.fingerprint()
    embed_images(other, paths, cache, progress=False)
    assert len(list(cache.glob("*.h5"))) == 2


def test_reuse_rejects_mismatched_embeddings(tmp_path):
    bundle = load_bundle(tiny_bundle(tmp_path, 0))
    h5 = tmp_path / "embeddings.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = np.ones((4, 64), np.float32)
        f["coords"] = np.array([[0, 0], [56, 0], [0, 56], [56, 56]])
        f.attrs["mpp"], f.attrs["tile_size"] = bundle.mpp, bundle.tile_size
    feats, coords = reuse_inference_embeddings(h5, bundle, np.array([[56, 56], [0, 0]]))
    assert feats.shape == (2, 64) and coords.tolist() == [[56, 56], [0, 0]]
    with pytest.raises(CacheError, match="not in this file"):
        reuse_inference_embeddings(h5, bundle, np.array([[1, 1]]))
    with h5py.File(h5, "a") as f:
        f.attrs["tile_size"] = 224
    with pytest.raises(CacheError, match="tile size 224"):
        reuse_inference_embeddings(h5, bundle)


def test_cli_bad_input_is_one_line_error(tmp_path, monkeypatch, capsys):
    from pathapp.cli import main

    (tmp_path / "one.csv").write_text("image,label\nx.png,a\n")
    monkeypatch.setattr(sys, "argv", ["pathapp", "train", "--data", str(tmp_path / "one.csv"), "--model",
                                      str(tiny_bundle(tmp_path, 0)), "--out", str(tmp_path / "m.pathapp")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "one.csv" in err and len(err.strip().splitlines()) == 1


def test_train_from_backbone_name_and_weights_file(tmp_path, shared_data):
    """`--backbone dinov2_vits14 --weights FILE` (a timm safetensors file) trains a bundle whose
    backbone carries exactly those weights."""
    import csv

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from pathapp.cli import cli
    from pathapp.models.registry import create_backbone, get_spec
    from vit_factory import set_layerscale_one

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = set_layerscale_one(create_backbone(get_spec("dinov2_vits14")))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "vits14.safetensors"))
    root = shared_data / "labeled" / "ebhi-seg"
    rows = [r for r in csv.DictReader(open(root / "labels.csv")) if r["label"] in ("Normal", "Polyp")]
    with open(tmp_path / "l.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "case_prefix"])
        for lab in ("Normal", "Polyp"):
            for r in [r for r in rows if r["label"] == lab][:3]:
                w.writerow([root / r["image"], lab, r["case_prefix"]])
    res = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "l.csv"), "--backbone", "dinov2_vits14",
                                   "--weights", str(tmp_path / "vits14.safetensors"), "--method", "prototype",
                                   "--tile-size", "112", "--mpp", "2.0", "--image-mpp", "1.0", "--cache", str(tmp_path / "c"),
                                   "--out", str(tmp_path / "m.pathapp")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "m.pathapp")
    assert b.spec.name == "dinov2_vits14" and b.tile_size == 112 and b.class_names == ["Normal", "Polyp"]
    assert all(torch.equal(v, b.backbone_state[k]) for k, v in net.state_dict().items())
