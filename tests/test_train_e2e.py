"""The full loop on real data with a tiny ViT: train -> bundle -> infer -> evaluate.

EBHI-Seg (real colorectal biopsy images, grouped by case), a GeoJSON over CMU-1-Small-Region.svs,
and UCSB breast TMA images as slides for attention-MIL. Kept small: a few cases per class, a
56 px two-block ViT, LoRA for a handful of steps."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pathapp.cli import cli
from pathapp.models.bundle import load_bundle, pool_tiles
from pathapp.slide import open_slide
from pathapp.tiles import make_grid, read_tile
from vit_factory import tiny_bundle

torch.set_num_threads(1)


def _run(*args: str) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _ebhi_subset(root: Path, out: Path, cases: slice, per_case: int = 2) -> Path:
    """A labels.csv over a case slice of each class (absolute image paths; shared data stays read-only)."""
    rows = list(csv.DictReader(open(root / "labels.csv")))
    by_class: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_class.setdefault(r["label"], {}).setdefault(r["case_prefix"], []).append(r)
    keep = []
    for label, case_rows in sorted(by_class.items()):
        for case in sorted(case_rows)[cases]:
            keep += case_rows[case][:per_case]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "case_prefix"])
        w.writeheader()
        for r in keep:
            w.writerow({"image": str(root / r["image"]), "label": r["label"], "case_prefix": r["case_prefix"]})
    return out


@pytest.fixture(scope="module")
def ebhi(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("ebhi")
    root = shared_data / "labeled" / "ebhi-seg"
    return {
        "tmp": tmp,
        "train": _ebhi_subset(root, tmp / "train.csv", slice(0, 4)),
        "test": _ebhi_subset(root, tmp / "test.csv", slice(4, 6)),
        "base": tiny_bundle(tmp, 0, mpp=2.0, filename="base.pathapp"),  # 2 × 2 tiles per image at 1 µm/px
        "cache": tmp / "cache",
    }


def _probs_on_images(bundle_path: Path, csv_path: Path) -> tuple[np.ndarray, list[str]]:
    """Run the bundle by hand: each image (1 µm/px) tiled at the bundle's scale, its tiles embedded,
    pooled, and the head applied to the pooled embedding."""
    b = load_bundle(bundle_path)
    model = b.build()
    rows = list(csv.DictReader(open(csv_path)))
    pooled = []
    for r in rows:
        slide = open_slide(r["image"], slide_mpp=1.0)
        grid = make_grid(slide, b.mpp, b.tile_size)
        x = torch.from_numpy(np.stack([read_tile(slide, grid, i) for i in range(len(grid))])).permute(0, 3, 1, 2)
        with torch.no_grad():
            pooled.append(pool_tiles(model.embed(x).numpy()))
    with torch.no_grad():
        p = model.head(torch.from_numpy(np.stack(pooled)))
    return p.numpy(), [r["label"] for r in rows]


def test_ebhi_train_infer_evaluate(ebhi):
    t = ebhi["tmp"]
    _run("train", "--data", ebhi["train"], "--model", ebhi["base"], "--method", "linear", "--group-by", "case_prefix",
         "--image-mpp", "1.0", "--out", t / "linear.pathapp", "--cache", ebhi["cache"])
    b = load_bundle(t / "linear.pathapp")
    assert b.head_kind == "linear" and len(b.class_names) == 6 and b.provenance["training"]["inner_cv"]
    probs, labels = _probs_on_images(t / "linear.pathapp", ebhi["train"])
    assert probs.shape == (len(labels), 6) and np.allclose(probs.sum(1), 1, atol=1e-5)
    train_acc = np.mean([b.class_names[i] == lab for i, lab in zip(probs.argmax(1), labels)])
    assert train_acc > 1 / 6 + 0.1  # it learned something from the real images

    # held-out cases, scored with the bundle's own head: the report matches the direct forward pass
    _run("evaluate", "--data", ebhi["test"], "--model", t / "linear.pathapp", "--out", t / "heldout",
         "--image-mpp", "1.0", "--cache", ebhi["cache"], "--bootstrap", "50")
    rep = json.loads((t / "heldout" / "report.json").read_text())
    test_probs, test_labels = _probs_on_images(t / "linear.pathapp", ebhi["test"])
    acc = np.mean([b.class_names[i] == lab for i, lab in zip(test_probs.argmax(1), test_labels)])
    assert rep["metrics"]["accuracy"] == pytest.approx(acc)
    assert rep["n_groups"] == len({r["case_prefix"] for r in csv.DictReader(open(ebhi["test"]))})
    lo, hi = rep["metrics"]["ci95"]["balanced_accuracy"]
    assert lo <= rep["metrics"]["balanced_accuracy"] <= hi
    assert (t / "heldout" / "confusion.png").exists() and (t / "heldout" / "roc.png").exists()

    # case-grouped cross-validation and the few-shot curve
    _run("evaluate", "--data", ebhi["train"], "--model", ebhi["base"], "--folds", "3", "--method", "prototype",
         "--fewshot", "--group-by", "case_prefix", "--image-mpp", "1.0", "--out", t / "cv", "--cache", ebhi["cache"], "--bootstrap", "50")
    cv = json.loads((t / "cv" / "report.json").read_text())
    assert cv["n_folds"] == 3 and [c["shots"] for c in cv["fewshot"]] == [1, 5, 10, 25, 100, "all"]
    assert len(cv["metrics"]["sensitivity"]) == 6 and (t / "cv" / "fewshot.png").exists()
    _run("evaluate", "--data", ebhi["train"], "--model", ebhi["base"], "--holdout", "0.3", "--method", "knn",
         "--image-mpp", "1.0", "--out", t / "ho", "--cache", ebhi["cache"], "--bootstrap", "20")
    ho = json.loads((t / "ho" / "report.json").read_text())
    assert ho["method"] == "knn" and 0 < ho["n_samples"] < ho["metrics"]["n_train"] + ho["n_samples"]


def test_ebhi_lora_smoke(ebhi):
    t = ebhi["tmp"]
    _run("train", "--data", ebhi["train"], "--model", ebhi["base"], "--method", "lora", "--lora-rank", "2",
         "--epochs", "2", "--max-steps", "4", "--batch-size", "8", "--image-mpp", "1.0", "--checkpoint-dir", t / "ckpt",
         "--out", t / "lora.pathapp", "--device", "cpu")
    base, tuned = load_bundle(ebhi["base"]), load_bundle(t / "lora.pathapp")
    assert set(tuned.backbone_state) == set(base.backbone_state)  # merged: a plain ViT again
    changed = [k for k in base.backbone_state if not torch.equal(base.backbone_state[k], tuned.backbone_state[k])]
    assert changed and all(k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")) for k in changed)
    assert tuned.provenance["training"]["method"] == "lora" and tuned.provenance["training"]["steps"] == 4
    assert (t / "ckpt" / "last.pt").exists()
    probs, _ = _probs_on_images(t / "lora.pathapp", ebhi["test"])
    assert probs.shape[1] == 6 and np.isfinite(probs).all()


def _two_region_geojson(path: Path) -> Path:
    """Two classes drawn by hand-picked regions over CMU-1-Small-Region (level-0 px): the upper
    part of the section 'Upper', the lower part 'Lower', with a gap between them."""
    def feat(name, x0, y0, x1, y1):
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1],
                [x0, y1], [x0, y0]]]}, "properties": {"objectType": "annotation",
                "classification": {"name": name, "color": [200, 0, 0]}}}
    fc = {"type": "FeatureCollection", "features": [feat("Upper", 0, 0, 2220, 1300), feat("Lower", 0, 1700, 2220, 2967)]}
    path.write_text(json.dumps(fc))
    return path


def test_cmu_annotations_train_then_infer(tmp_path, shared_data):
    svs = shared_data / "wsi" / "aperio" / "CMU-1-Small-Region.svs"
    geo = _two_region_geojson(tmp_path / "regions.geojson")
    base = tiny_bundle(tmp_path, 0, mpp=2.0, filename="base.pathapp")
    _run("train", "--data", geo, "--slides", svs, "--model", base, "--method", "knn", "--out", tmp_path / "m.pathapp",
         "--cache", tmp_path / "cache")
    b = load_bundle(tmp_path / "m.pathapp")
    assert b.class_names == ["Lower", "Upper"] and b.head_kind == "knn" and b.mpp == 2.0
    # embeddings.h5 from a headless inference run is reused instead of recomputing: same bank
    _run("infer", svs, "--model", base, "--out", tmp_path / "emb", "--workers", "0", "--precision", "fp32")
    _run("train", "--data", geo, "--slides", svs, "--model", base, "--method", "knn", "--out", tmp_path / "m2.pathapp",
         "--cache", tmp_path / "nocache", "--embeddings", tmp_path / "emb")
    assert not (tmp_path / "nocache").exists()
    bank, bank2 = b.head_tensors["embeddings"], load_bundle(tmp_path / "m2.pathapp").head_tensors["embeddings"]
    assert bank.shape == bank2.shape and torch.allclose(bank, bank2, atol=1e-4)
    # the default precision (bf16 on bf16 hardware) writes embeddings training reuses too, close to fp32
    _run("infer", svs, "--model", base, "--out", tmp_path / "emb-auto", "--workers", "0")
    _run("train", "--data", geo, "--slides", svs, "--model", base, "--method", "knn", "--out", tmp_path / "m3.pathapp",
         "--cache", tmp_path / "nocache", "--embeddings", tmp_path / "emb-auto")
    bank3 = load_bundle(tmp_path / "m3.pathapp").head_tensors["embeddings"]
    assert bank3.shape == bank.shape and torch.nn.functional.cosine_similarity(bank, bank3).min() >= 0.999
    _run("infer", svs, "--model", tmp_path / "m.pathapp", "--out", tmp_path / "out", "--workers", "0")
    tiles = json.loads((tmp_path / "out" / svs.stem / "tiles.geojson").read_text())["features"]
    got = {}
    for f in tiles:
        ys = [p[1] for p in f["geometry"]["coordinates"][0]]
        got[(min(ys) + max(ys)) / 2] = f["properties"]["classification"]["name"]
    upper = [c for y, c in got.items() if y < 1250]
    lower = [c for y, c in got.items() if y > 1750]
    assert upper and lower
    # the kNN bank holds these very tiles, so inference on the slide reproduces most training labels
    assert np.mean([c == "Upper" for c in upper]) > 0.7 and np.mean([c == "Lower" for c in lower]) > 0.7


def test_project_annotations_train_without_qupath(tmp_path, shared_data):
    """A QuPath project's own annotations (its data.qpdata, read without Java) label the tiles exactly as
    the same regions exported as GeoJSON do; an entry never saved in QuPath is one warning line."""
    from qupath_projects import annotated_project

    qpproj = annotated_project(tmp_path / "proj", entries=2, saved=1)
    base = tiny_bundle(tmp_path, 0, mpp=2.0, filename="base.pathapp")
    out = _run("train", "--data", qpproj, "--model", base, "--method", "knn", "--out", tmp_path / "p.pathapp",
               "--cache", tmp_path / "cache")
    assert "entry 2 (slide 2.svs) has no data file" in out and out.count("warning: ") == 1
    geo = _two_region_geojson(tmp_path / "regions.geojson")
    _run("train", "--data", geo, "--slides", shared_data / "wsi" / "aperio" / "CMU-1-Small-Region.svs", "--model",
         base, "--method", "knn", "--out", tmp_path / "g.pathapp", "--cache", tmp_path / "cache")
    from_project, from_geojson = load_bundle(tmp_path / "p.pathapp"), load_bundle(tmp_path / "g.pathapp")
    assert from_project.class_names == from_geojson.class_names == ["Lower", "Upper"]
    for key in ("embeddings", "labels"):
        assert torch.equal(from_project.head_tensors[key], from_geojson.head_tensors[key])


def test_ucsb_abmil_slides(tmp_path, shared_data):
    root = shared_data / "labeled" / "ucsb-breast-cancer"
    rows = list(csv.DictReader(open(root / "labels.csv")))
    with open(tmp_path / "slides.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "patient"])
        for r in rows:
            w.writerow([root / r["image"], r["label"], r["tma_batch"]])
    base = tiny_bundle(tmp_path, 0, mpp=2.0, filename="base.pathapp")
    _run("train", "--data", tmp_path / "slides.csv", "--model", base, "--method", "abmil", "--epochs", "3",
         "--slide-mpp", "0.5", "--out", tmp_path / "mil.pathapp", "--cache", tmp_path / "cache")
    b = load_bundle(tmp_path / "mil.pathapp")
    assert b.head_kind == "abmil" and b.class_names == ["benign", "malignant"]
    _run("evaluate", "--data", tmp_path / "slides.csv", "--model", tmp_path / "mil.pathapp", "--slide-mpp", "0.5",
         "--out", tmp_path / "rep", "--cache", tmp_path / "cache", "--bootstrap", "20")
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["n_samples"] == 18 and rep["n_groups"] == 9
    _run("evaluate", "--data", tmp_path / "slides.csv", "--model", base, "--folds", "3", "--method", "abmil",
         "--slide-mpp", "0.5", "--out", tmp_path / "cv", "--cache", tmp_path / "cache", "--bootstrap", "20")
    cv = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert cv["n_folds"] == 3 and "patient" in cv["mode"]
    # inference exports the attention per tile
    one = root / rows[0]["image"]
    _run("infer", one, "--model", tmp_path / "mil.pathapp", "--slide-mpp", "0.5", "--out", tmp_path / "out",
         "--workers", "0")
    feats = json.loads((tmp_path / "out" / one.stem / "tiles.geojson").read_text())["features"]
    att = [f["properties"]["measurements"]["attention"] for f in feats]
    assert len(att) > 1 and sum(att) == pytest.approx(1, abs=1e-3)


def test_project_without_images_is_a_clear_error(tmp_path, shared_data):
    """A real QuPath project whose image is not on this machine: one error naming the project."""
    import shutil

    from pathapp.train.labels import LabelError

    proj = tmp_path / "p"
    shutil.copytree(shared_data / "qupath" / "btc-lab-he-project", proj)
    base = tiny_bundle(tmp_path, 0)
    res = CliRunner().invoke(cli, ["train", "--data", str(proj / "project.qpproj"), "--model", str(base),
                                   "--out", str(tmp_path / "m.pathapp")])
    assert isinstance(res.exception, LabelError) and "project.qpproj" in str(res.exception)
    assert "relink" in str(res.exception)


@pytest.mark.paquo
@pytest.mark.skipif(not os.environ.get("PAQUO_QUPATH_DIR"), reason="needs QuPath (PAQUO_QUPATH_DIR)")
def test_qupath_project_annotations_train(tmp_path, shared_data):
    """Classified annotations drawn in a QuPath project (through QuPath itself) train a head."""
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely.geometry import box

    svs = shared_data / "wsi" / "aperio" / "CMU-1-Small-Region.svs"
    with QuPathProject(tmp_path / "proj", mode="x") as qp:
        entry = qp.add_image(svs, image_type=QuPathImageType.BRIGHTFIELD_H_E)
        entry.hierarchy.add_annotation(box(0, 0, 2220, 1300), path_class=QuPathPathClass("Upper"))
        entry.hierarchy.add_annotation(box(0, 1700, 2220, 2967), path_class=QuPathPathClass("Lower"))
    base = tiny_bundle(tmp_path, 0, mpp=2.0, filename="base.pathapp")
    _run("train", "--data", tmp_path / "proj" / "project.qpproj", "--model", base, "--method", "prototype",
         "--out", tmp_path / "m.pathapp", "--cache", tmp_path / "cache")
    assert load_bundle(tmp_path / "m.pathapp").class_names == ["Lower", "Upper"]
