"""Stain normalisation in pretraining, through `pathapp pretrain` as a user runs it: each slide fitted
once on its tissue, every sampled tile mapped onto the reference before the augmentations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from pathapp.errors import PathappError
from pathapp.models.bundle import load_bundle
from pathapp.slide import open_slide
from pathapp.ssl.config import SSLConfig
from pathapp.ssl.data import SlideTileSource, TileFolderSource, open_sources
from pathapp.tiles.stain import fit_pixels, stain_target, stained_pixels
from ssl_tiny import TINY_SSL

torch.set_num_threads(1)
CMU = "wsi/aperio/CMU-1-Small-Region.svs"
IHC = "wsi/ome-tiff/OS-2-vsi.ome.tif"
REF = "tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif"


def _stain_angle(tiles: list[np.ndarray], target) -> float:
    """Largest angle (degrees) between the Macenko stain vectors of `tiles` and the target's."""
    fit = fit_pixels(np.concatenate([stained_pixels(t) for t in tiles]), "macenko", "sampled tiles")
    cos = np.sum(np.asarray(fit.stains) * np.asarray(target.stains), axis=0)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))).max())


def test_pretrain_normalises_every_slide_by_one_fit(tmp_path):
    cfg = SSLConfig(**{k: v for k, v in TINY_SSL.items() if k != "backbone"})
    cfg.save(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["pretrain", "--slides", str(data_file(CMU)), "--config", str(tmp_path / "tiny.yaml"),
                                   "--steps", "1", "--out", str(out), "--quiet", "--stain-norm", "macenko",
                                   "--stain-ref", str(data_file(REF))], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    record = json.loads((out / "stain.json").read_text())["stain"]
    (slide_path, fit), = record["slides"].items()
    assert slide_path.endswith("CMU-1-Small-Region.svs") and np.asarray(fit["od_matrix"]).shape == (3, 3)
    assert record["target"]["source"].endswith("TUM-AACHEHDV.tif")
    assert SSLConfig.load(out / "config.yaml").stain_norm == "macenko"
    assert load_bundle(out / "teacher.pathapp").provenance["stain_norm"]["method"] == "macenko"
    # the run's stain.json is itself a reference: a later run normalises onto the same target
    assert stain_target("macenko", out / "stain.json").stains == record["target"]["stains"]

    # the sampled tiles carry the reference's stains: their own fit moves to the target's vectors
    target = stain_target("macenko", data_file(REF))
    plain = open_sources(data_file(CMU), mpps=[0.5], tile_size=64, min_tissue=0.6)
    normed = open_sources(data_file(CMU), mpps=[0.5], tile_size=64, min_tissue=0.6)
    normed.normalise_onto(target)
    a = [plain.sample(np.random.default_rng([0, i])) for i in range(24)]
    b = [normed.sample(np.random.default_rng([0, i])) for i in range(24)]
    assert all(x.shape == y.shape == (64, 64, 3) and y.dtype == np.uint8 for x, y in zip(a, b))
    assert _stain_angle(b, target) < 0.5 * _stain_angle(a, target)


def test_an_ihc_slide_is_skipped_against_an_h_and_e_reference(capsys):
    target = stain_target("reinhard", data_file(REF))
    with open_slide(data_file(CMU)) as he, open_slide(data_file(IHC)) as ihc:
        src = SlideTileSource([he, ihc], [0.5], 64)
        record = src.normalise_onto(target)
        assert [str(e.slide.path) for e in src.entries] == [str(he.path)] and len(record["slides"]) == 1
        assert "OS-2-vsi" in capsys.readouterr().err
        with pytest.raises(PathappError, match="no slide can be normalised"):
            SlideTileSource([ihc], [0.5], 64).normalise_onto(target)


def test_tile_folders_fit_each_image_on_its_own(tmp_path):
    folder = data_file("labeled/ebhi-seg/EBHI-SEG/Normal/image")
    target = stain_target("reinhard", data_file(REF))
    plain, normed = TileFolderSource(folder, 128), TileFolderSource(folder, 128)
    normed.normalise_onto(target)
    rng = [np.random.default_rng([0, i]) for i in range(2)]
    x, y = plain.sample(rng[0]), normed.sample(rng[1])
    assert x.shape == y.shape == (128, 128, 3) and not np.array_equal(x, y) and len(normed._stains) == 1
    lab_mean = np.asarray(target.lab_mean)
    from pathapp.tiles.stain import fit_image

    assert np.abs(np.asarray(fit_image(y, "reinhard", "y").lab_mean) - lab_mean).sum() < \
        np.abs(np.asarray(fit_image(x, "reinhard", "x").lab_mean) - lab_mean).sum()
