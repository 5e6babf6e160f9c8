"""Train, evaluate and infer see a labelled image the same way (issue #18).

Real EBHI-Seg images (224 px; --image-mpp 1.0) with a tiny ViT whose bundle works at 2 µm/px and
56 px: every image is cut into 2 × 2 tiles of 112 image px, exactly as `pathapp infer` cuts it, and
stands for the mean of its tiles' embeddings in train, evaluate and infer alike."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pathapp.cli import cli
from pathapp.models.bundle import load_bundle
from vit_factory import tiny_bundle

torch.set_num_threads(1)


def _run(*args, code: int = 0) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def _subset(root: Path, out: Path, cases: slice, mpp: bool = False) -> Path:
    """labels.csv over a slice of each class's cases (one image each; absolute paths, shared data read-only)."""
    by_class: dict[str, dict[str, list[dict]]] = {}
    for r in csv.DictReader(open(root / "labels.csv")):
        by_class.setdefault(r["label"], {}).setdefault(r["case_prefix"], []).append(r)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "case_prefix"] + (["mpp"] if mpp else []))
        for label, cases_ in sorted(by_class.items()):
            for case in sorted(cases_)[cases]:
                for r in cases_[case][:1]:
                    w.writerow([root / r["image"], label, case] + (["1.0"] if mpp else []))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("embed")
    root = shared_data / "labeled" / "ebhi-seg"
    base = tiny_bundle(tmp, 0, mpp=2.0, filename="base.pathapp")
    train = _subset(root, tmp / "train.csv", slice(0, 2))
    test = _subset(root, tmp / "test.csv", slice(2, 3), mpp=True)  # scale from the mpp column this time
    count = {k: sum(1 for _ in csv.DictReader(open(v))) for k, v in (("train", train), ("test", test))}
    groups = {k: len({r["case_prefix"] for r in csv.DictReader(open(v))}) for k, v in (("train", train), ("test", test))}
    _run("train", "--data", train, "--image-mpp", "1.0", "--model", base, "--method", "linear", "--out",
         tmp / "lin.pathapp", "--cache", tmp / "cache")
    return {"tmp": tmp, "base": base, "train": train, "test": test, "model": tmp / "lin.pathapp", "n": count,
            "groups": groups}


def test_infer_on_an_image_gives_evaluate_probabilities(setup):
    t = setup["tmp"]
    b = load_bundle(setup["model"])
    training = b.provenance["training"]
    assert training["unit"] == "image" and training["grouping"] == "case_prefix" and training["image_mpp"] == [1.0]
    assert training["tiles_per_image"] == 4  # 224 px at 1 µm/px in 56 px tiles at 2 µm/px
    _run("evaluate", "--data", setup["test"], "--model", setup["model"], "--out", t / "rep", "--cache",
         t / "cache", "--bootstrap", "20")
    rep = json.loads((t / "rep" / "report.json").read_text())
    assert rep["group_by"] == "case_prefix" and "not trained on" in rep["mode"]
    rows = list(csv.DictReader(open(t / "rep" / "predictions.csv")))
    assert len(rows) == rep["n_samples"] == setup["n"]["test"]
    for row in rows[:2]:
        image = Path(row["item"])
        out = t / f"infer-{image.stem}"
        # fp32 as evaluate computes (--precision auto may pick bf16 on CPUs with AVX-512-BF16/AMX)
        _run("infer", image, "--model", setup["model"], "--slide-mpp", "1.0", "--out", out, "--workers", "0",
             "--precision", "fp32")
        run = json.loads((out / image.stem / "run.json").read_text())
        got = run["parameters"]["slide_prediction"]
        want = {k.removeprefix("prob: "): float(v) for k, v in row.items() if k.startswith("prob: ")}
        assert list(got) == b.class_names and np.allclose([got[k] for k in want], list(want.values()), atol=1e-5)
        tiles = json.loads((out / image.stem / "tiles.geojson").read_text())["features"]
        assert len(tiles) == 4  # the same tiles as train and evaluate used
    # the same image at another scale is tiled differently and predicted differently
    image = Path(rows[0]["item"])
    _run("infer", image, "--model", setup["model"], "--slide-mpp", "0.5", "--out", t / "half", "--workers", "0",
         "--precision", "fp32")
    half = json.loads((t / "half" / image.stem / "run.json").read_text())["parameters"]["slide_prediction"]
    assert not np.allclose(list(half.values()), [float(rows[0][f"prob: {c}"]) for c in b.class_names], atol=1e-4)


def test_image_without_a_scale_is_refused(setup):
    from pathapp.train.labels import LabelError

    res = CliRunner().invoke(cli, ["train", "--data", str(setup["train"]), "--model", str(setup["base"]), "--method",
                                   "linear", "--out", str(setup["tmp"] / "x.pathapp")])
    message = str(res.exception)  # pathapp.cli.main prints it as the one line (tests/test_robust.py)
    assert isinstance(res.exception, LabelError) and "\n" not in message
    assert "--image-mpp" in message
    assert ".png: the image has no µm/px" in message and not (setup["tmp"] / "x.pathapp").exists()


def test_evaluate_says_training_data_and_floors(setup):
    t = setup["tmp"]
    res = CliRunner().invoke(cli, ["evaluate", "--data", str(setup["train"]), "--image-mpp", "1.0", "--model",
                                   str(setup["model"]), "--out", str(t / "own"), "--cache", str(t / "cache"),
                                   "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    n = setup["n"]["train"]
    assert f"trained on {n} of these {n} items" in " ".join(res.output.split())
    rep = json.loads((t / "own" / "report.json").read_text())
    assert "own training data" in rep["mode"] and rep["training_data"]["items_seen"] == n
    for name in ("colour histogram", "random init"):  # floors fitted on the bundle's training data, paired
        d = rep["floors"][name]["model_minus_floor"]
        assert d["ci95"]["balanced_accuracy"][0] <= d["balanced_accuracy"] <= d["ci95"]["balanced_accuracy"][1]


def test_cv_floors_and_holdout_file(setup):
    t = setup["tmp"]
    _run("evaluate", "--data", setup["train"], "--image-mpp", "1.0", "--model", setup["base"], "--folds", "2",
         "--method", "prototype", "--out", t / "cv", "--cache", t / "cache", "--bootstrap", "20")
    cv = json.loads((t / "cv" / "report.json").read_text())
    assert cv["mode"] == "2-fold cross-validation grouped by case_prefix"
    for floor in cv["floors"].values():
        assert len(floor["per_fold"]) == 2 and len(floor["model_minus_floor"]["per_fold"]) == 2
        assert floor["model_minus_floor"]["balanced_accuracy"] == pytest.approx(
            cv["metrics"]["balanced_accuracy"] - floor["metrics"]["balanced_accuracy"])
    res = CliRunner().invoke(cli, ["evaluate", "--data", str(setup["test"]), "--holdout", str(setup["test"]), "--model",
                                   str(setup["base"]), "--method", "prototype", "--out", str(t / "same"), "--cache",
                                   str(t / "cache"), "--bootstrap", "20"])
    g = setup["groups"]["test"]
    assert res.exit_code == 0 and f"{g} of its {g} case_prefix groups are also in --data" in " ".join(res.output.split())
    _run("evaluate", "--data", setup["train"], "--image-mpp", "1.0", "--holdout", setup["test"], "--model",
         setup["base"], "--method", "prototype", "--out", t / "ho", "--cache", t / "cache", "--bootstrap", "20")
    ho = json.loads((t / "ho" / "report.json").read_text())
    assert ho["shared_groups"]["count"] == 0 and ho["n_samples"] == setup["n"]["test"]
    assert ho["metrics"]["n_train"] == setup["n"]["train"]
