"""Stain normalisation in the train/evaluate embedding path, through the CLI a user runs: real EBHI-Seg
images, a tiny ViT, an H&E tile as the reference, a slide-labelled set normalised by one fit per slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from pathapp.models.bundle import load_bundle
from pathapp.train.api import embed_labelled, load_labelled
from pathapp.tiles.stain import StainError, stain_target
from vit_factory import tiny_bundle

torch.set_num_threads(1)
REF = "tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif"


def _subset(out: Path, per_class: int = 4) -> Path:
    root = data_file("labeled/ebhi-seg/labels.csv").parent
    rows = list(csv.DictReader(open(root / "labels.csv")))
    keep, seen = [], {}
    for r in rows:
        if seen.get(r["label"], 0) < per_class:
            seen[r["label"]] = seen.get(r["label"], 0) + 1
            keep.append({"image": str(root / r["image"]), "label": r["label"], "case_prefix": r["case_prefix"]})
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "case_prefix"])
        w.writeheader()
        w.writerows(keep)
    return out


def test_evaluate_and_train_with_stain_normalisation(tmp_path):
    labels = _subset(tmp_path / "labels.csv")
    base = tiny_bundle(tmp_path, 0, mpp=2.0, filename="base.pathapp")  # 2 × 2 tiles per image at 1 µm/px
    cache = tmp_path / "cache"
    bundle = load_bundle(base)
    lt = load_labelled([labels], bundle, image_mpp=1.0)
    plain = embed_labelled(lt, bundle, cache, "cpu", progress=False)
    target = stain_target("macenko", data_file(REF), mpp=bundle.mpp, tile_size=bundle.tile_size)
    normed = embed_labelled(lt, bundle, cache, "cpu", progress=False, stain=target)
    assert plain.shape == normed.shape and not np.allclose(plain, normed, atol=1e-3)
    assert len(list(cache.glob("*.h5"))) == 2  # normalised embeddings are cached apart from the plain ones

    runner = CliRunner()
    res = runner.invoke(cli, ["evaluate", "--data", str(labels), "--model", str(base), "--folds", "2", "--method",
                              "prototype", "--image-mpp", "1.0", "--cache", str(cache), "--stain-norm", "macenko", "--stain-ref",
                              str(data_file(REF)), "--out", str(tmp_path / "cv"), "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert report["stain_norm"] == {"method": "macenko", "reference": str(data_file(REF))}
    res = runner.invoke(cli, ["train", "--data", str(labels), "--model", str(base), "--method", "linear",
                              "--image-mpp", "1.0", "--cache", str(cache), "--stain-norm", "reinhard", "--stain-ref", str(data_file(REF)),
                              "--out", str(tmp_path / "m.pathapp")])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "m.pathapp").provenance["training"]["stain_norm"]["method"] == "reinhard"


def test_stain_options_need_each_other_and_odd_images_stay_as_they_are(tmp_path):
    labels = _subset(tmp_path / "labels.csv", per_class=1)
    base = tiny_bundle(tmp_path, 0, filename="base.pathapp")
    runner = CliRunner()
    res = runner.invoke(cli, ["evaluate", "--data", str(labels), "--model", str(base), "--folds", "2",
                              "--stain-norm", "macenko", "--out", str(tmp_path / "cv")])
    assert isinstance(res.exception, StainError)  # `pathapp` prints a StainError as one line, exit code 2
    assert "needs both --stain-norm METHOD and --stain-ref REF" in str(res.exception)
    # an H&E image against an IHC reference is used as it is (one image's fit cannot stop a data set)
    from pathapp.tiles.stain import image_normalizer, load_reference
    from PIL import Image

    ihc = load_reference(data_file("misc/skimage_ihc.png"), "macenko")
    image = np.asarray(Image.open(lt_path(labels)).convert("RGB"))
    assert ihc.kind == "DAB" and image_normalizer(image, ihc, "img") is None


def lt_path(labels: Path) -> Path:
    return Path(next(csv.DictReader(open(labels)))["image"])
