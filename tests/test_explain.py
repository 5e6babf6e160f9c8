"""`pathapp explain`: the saliency methods against explicit computations, the faithfulness curves'
end points, and the command on a real slide (files QuPath reads, ROI of selected tiles, ABMIL, errors)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapely.geometry import shape

from conftest import data_file, run_main
from qupath_rules import assert_qupath_conformant
from vit_factory import calibration_images, tiny_bundle

from pathapp.explain.faithfulness import curves
from pathapp.explain.saliency import Scorer, attention_maps, explain_tiles, vitcx_masks
from pathapp.models.bundle import load_bundle

SVS = "wsi/aperio/CMU-1-Small-Region.svs"
PATHAPP = Path(sys.executable).with_name("pathapp")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"linear": tiny_bundle(d, 3, mpp=1.0, filename="lin.pathapp"),
            "reg4": tiny_bundle(d, 3, name="dinov2_vits14_reg4", head="mlp", mpp=1.0, filename="reg.pathapp"),
            "abmil": tiny_bundle(d, 2, head="abmil", mpp=1.0, filename="mil.pathapp"),
            "headless": tiny_bundle(d, 0, mpp=1.0, filename="headless.pathapp")}


def _manual_attention(block, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) of a timm block, written out from its weights: (B, heads, T, T)."""
    a = block.attn
    h = block.norm1(x)
    qkv = a.qkv(h).reshape(x.shape[0], x.shape[1], 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
    return ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)


def test_attention_maps_match_explicit_computation_with_registers(models):
    model = load_bundle(models["reg4"]).build()
    bb = model.backbone
    assert bb.num_prefix_tokens == 5  # CLS + 4 registers
    x = model.normalize(calibration_images(3, 56))
    maps = attention_maps(model, x)
    assert all(blk.attn.fused_attn for blk in bb.blocks)  # switched back after the capture
    with torch.no_grad():
        t = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        layers = []
        for blk in bb.blocks:
            layers.append(_manual_attention(blk, t).mean(1))
            t = blk(t)
    cls = layers[-1][:, 0, 5:]
    np.testing.assert_allclose(maps["attention"].reshape(3, -1), cls / cls.sum(1, keepdim=True), atol=1e-5)
    r = torch.eye(layers[0].shape[-1]).expand_as(layers[0])
    for a in layers:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        r = (a / a.sum(-1, keepdim=True)) @ r
    roll = r[:, 0, 5:]
    np.testing.assert_allclose(maps["rollout"].reshape(3, -1), roll / roll.sum(1, keepdim=True), atol=1e-5)
    assert maps["attention"].shape == (3, 4, 4)  # 56 px / patch 14: the patch-token grid, registers left out
    assert not torch.allclose(maps["attention"][0], maps["attention"][1])  # inputs differ, maps differ


def test_vitcx_masks_cluster_identical_channels():
    """Channels that are the same map up to scale fall into one mask; masks are 0..1 at the input size."""
    bases = torch.zeros(3, 4, 4)  # three distinct maps on a 4 × 4 patch grid: left, middle, right columns
    bases[0, :, 0], bases[1, :, 1:3], bases[2, :, 3] = 1, 1, 1
    channels = torch.cat([bases[i:i + 1] * s for i in range(3) for s in (1.0, 2.0, 5.0)])  # (9, 4, 4)
    masks = vitcx_masks(channels.permute(1, 2, 0), (56, 56))
    assert masks.shape == (3, 56, 56)
    assert masks.min() >= 0 and masks.max() <= 1 and torch.allclose(masks.amax(dim=(1, 2)), torch.ones(3))


def test_scorers_reproduce_the_bundle_and_vitcx_maps_differ_between_tiles(models):
    model = load_bundle(models["linear"]).build()
    tiles = (calibration_images(3, 56) * 255).to(torch.uint8)
    with torch.no_grad():
        _, probs = model(tiles)
        np.testing.assert_allclose(Scorer(model)(model.normalize(tiles)), probs, atol=1e-5)
    maps = explain_tiles(model, tiles, [0, 1, 2], ["vitcx", "rollout"])
    assert maps["vitcx"].shape == (3, 4, 4) and np.isfinite(maps["vitcx"]).all()
    assert maps["vitcx"][0].std() > 0 and not np.allclose(maps["vitcx"][0], maps["vitcx"][1])
    again = explain_tiles(model, tiles, [0, 1, 2], ["vitcx"])  # seeded noise: reproducible
    np.testing.assert_array_equal(again["vitcx"], maps["vitcx"])

    mil = load_bundle(models["abmil"]).build()
    bag = mil.embed(tiles).detach()
    with torch.no_grad():
        slide_probs, _ = mil.slide_head(bag)
        same = mil.slide_head.replace_one(bag, 1, bag[1:2])  # replacing a tile by itself changes nothing
        moved = mil.slide_head.replace_one(bag, 1, bag[0:1])
    np.testing.assert_allclose(same[0], slide_probs, atol=1e-5)
    assert not torch.allclose(moved[0], slide_probs)


def test_deletion_and_insertion_curves_end_where_they_must(models):
    model = load_bundle(models["linear"]).build()
    scorer = Scorer(model)
    x = model.normalize(calibration_images(1, 56))
    c = curves(scorer, x, 1, np.arange(16), (4, 4), steps=8)
    from pathapp.explain.faithfulness import blurred

    with torch.no_grad():
        p = scorer(torch.cat([x, torch.zeros_like(x), blurred(x)]))[:, 1].numpy()
    assert c.fractions[0] == 0 and c.fractions[-1] == 1 and len(c.fractions) == 9
    np.testing.assert_allclose([c.deletion[0], c.deletion[-1], c.insertion[0], c.insertion[-1]],
                               [p[0], p[1], p[2], p[0]], atol=1e-5)
    assert 0 <= c.deletion_auc <= 1 and 0 <= c.insertion_auc <= 1


def _explain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PATHAPP), "explain", *args, "--workers", "0"], capture_output=True, text=True,
                          timeout=600)


def test_cli_explains_top_tiles_of_a_real_slide(models, tmp_path):
    slide = data_file(SVS)
    r = _explain(str(slide), "--model", str(models["linear"]), "--class", "Stroma", "--top", "3",
                 "--method", "vitcx", "--method", "attention", "--faithfulness", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "CMU-1-Small-Region"
    record = json.loads((out / "explain.json").read_text())
    assert record["patch_grid"] == [4, 4] and record["ranked_by"] == "prob: Stroma" and len(record["tiles"]) == 3
    probs = [t["prob: Stroma"] for t in record["tiles"]]
    assert probs == sorted(probs, reverse=True)
    assert set(record["faithfulness_mean"]) == {"vitcx", "attention", "random"}
    raw = np.load(out / "explain.npz")
    for method in ("vitcx", "attention"):
        feats = assert_qupath_conformant(out / f"saliency-{method}.geojson")
        assert len(feats) == 3 * 16 and {f["properties"]["objectType"] for f in feats} == {"detection"}
        sal = [f["properties"]["measurements"]["saliency"] for f in feats]
        np.testing.assert_allclose(sal, raw[f"saliency_{method}"].reshape(-1), rtol=1e-5, atol=1e-7)
        # each patch detection lies inside its tile, a 16th of its area
        tile0 = record["tiles"][0]
        poly = shape(feats[0]["geometry"])
        assert poly.bounds[:2] == pytest.approx((tile0["x"], tile0["y"]), abs=0.01)
        assert poly.area == pytest.approx((56 * 1.0 / 0.499 / 4) ** 2, rel=0.01)
        with Image.open(out / f"saliency-{method}.png") as im:  # slide map at thumbnail resolution
            assert max(map(int, im.text["pathapp:image_box"].split(",")[2:])) >= 1024
        with Image.open(out / f"explain-{method}.png") as im:
            mosaic = np.asarray(im.convert("RGB"))
        assert mosaic.shape[0] > 3 * 224 and len(np.unique(mosaic.reshape(-1, 3), axis=0)) > 1000


def test_cli_roi_of_selected_tiles_abmil_and_errors(models, tmp_path, monkeypatch, capsys):
    """Through the console entry point in process (the console script itself runs in the test above)."""
    slide = str(data_file(SVS))
    code, text = run_main(monkeypatch, capsys, "infer", slide, "--model", str(models["linear"]), "--out",
                          str(tmp_path / "inf"), "--workers", "0")
    assert code == 0, text
    tiles = json.loads((tmp_path / "inf" / "CMU-1-Small-Region" / "tiles.geojson").read_text())["features"]
    chosen = [tiles[5], tiles[17]]  # what a user selects in QuPath and exports
    roi = tmp_path / "selected.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": chosen}))

    def explain(*args: str) -> tuple[int, str]:
        return run_main(monkeypatch, capsys, "explain", *args, "--workers", "0")

    code, text = explain(slide, "--model", str(models["reg4"]), "--roi", str(roi), "--method", "rollout", "--out",
                         str(tmp_path / "ex"))
    assert code == 0, text
    record = json.loads((tmp_path / "ex" / "CMU-1-Small-Region" / "explain.json").read_text())
    got = sorted((t["x"], t["y"]) for t in record["tiles"])
    want = sorted(tuple(math.floor(v) for v in shape(f["geometry"]).bounds[:2]) for f in chosen)  # read from the pixel below
    assert got == want

    code, text = explain(slide, "--model", str(models["abmil"]), "--top", "2", "--method", "vitcx", "--out",
                         str(tmp_path / "mil"))
    assert code == 0, text
    record = json.loads((tmp_path / "mil" / "CMU-1-Small-Region" / "explain.json").read_text())
    assert record["ranked_by"] == "attention" and len(record["tiles"]) == 2
    assert record["tiles"][0]["attention"] >= record["tiles"][1]["attention"]

    for args, words in (([slide, "--model", str(models["linear"]), "--class", "Nope"], ["Nope", "Tumor"]),
                        ([slide, "--model", str(models["headless"])], ["head"])):
        code, text = explain(*args, "--out", str(tmp_path / "bad"))
        assert code == 2 and "Traceback" not in text, text
        err = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and all(w in err[0] for w in words), text
