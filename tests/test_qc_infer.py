"""QC and stain normalisation through `pathapp infer` and `pathapp qc`, as a user runs them, on real
slides with a tiny random ViT."""

from __future__ import annotations

import json

import h5py
import numpy as np
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from qupath_rules import assert_qupath_conformant
from vit_factory import tiny_bundle

CMU = "wsi/aperio/CMU-1-Small-Region.svs"
REF = "tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif"


def _run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_qc_only_writes_the_qc_objects(tmp_path):
    _run("qc", data_file(CMU), "--out", tmp_path, "--workers", "0")
    d = tmp_path / "CMU-1-Small-Region"
    tiles = assert_qupath_conformant(d / "tiles.geojson")
    classes = {f["properties"]["classification"]["name"] for f in tiles}
    assert "QC: ok" in classes and classes <= {"QC: ok", "QC: background", "QC: pen", "QC: fold", "QC: blur",
                                               "QC: out of focus", "QC: compression"}
    assert "qc: blur µm" in tiles[0]["properties"]["measurements"]
    run = json.loads((d / "run.json").read_text())
    assert run["qc"]["tiles measured"] == len(tiles) and (d / "overlay-qc.png").exists()
    assert not (d / "embeddings.h5").exists()


def test_infer_excludes_flagged_tiles_and_normalises_stains(tmp_path):
    model = tiny_bundle(tmp_path, 0)
    _run("infer", data_file(CMU), "--model", model, "--out", tmp_path / "flag", "--workers", "0")
    flagged = json.loads((tmp_path / "flag" / "CMU-1-Small-Region" / "run.json").read_text())["qc"]
    res = CliRunner().invoke(cli, ["infer", str(data_file(CMU)), "--model", str(model), "--out", str(tmp_path / "ex"),
                                   "--workers", "0", "--qc", "exclude"], catch_exceptions=False)
    assert res.exit_code == 0
    run = json.loads((tmp_path / "ex" / "CMU-1-Small-Region" / "run.json").read_text())
    excluded = run["qc"]["tiles excluded"]
    assert excluded == sum(run["qc"]["tiles"].values()) > 0 and run["counts"]["tiles"] == flagged["tiles measured"] - excluded
    assert f"{excluded} of {flagged['tiles measured']} tiles excluded" in res.output
    _run("infer", data_file(CMU), "--model", model, "--out", tmp_path / "norm", "--workers", "0",
         "--stain-norm", "macenko", "--stain-ref", data_file(REF))
    run = json.loads((tmp_path / "norm" / "CMU-1-Small-Region" / "run.json").read_text())
    assert np.asarray(run["parameters"]["stain"]["od_matrix"]).shape == (3, 3)
    with h5py.File(tmp_path / "flag" / "CMU-1-Small-Region" / "embeddings.h5") as a, \
            h5py.File(tmp_path / "norm" / "CMU-1-Small-Region" / "embeddings.h5") as b:
        assert a["features"].shape == b["features"].shape and not np.allclose(a["features"][:], b["features"][:])
        assert a.attrs["model_fingerprint"] != b.attrs["model_fingerprint"]


def test_an_ihc_slide_against_an_h_and_e_reference_fails_alone(tmp_path):
    model = tiny_bundle(tmp_path, 0)
    res = CliRunner().invoke(cli, ["infer", str(data_file("wsi/ome-tiff/OS-2-vsi.ome.tif")), str(data_file(CMU)),
                                   "--model", str(model), "--out", str(tmp_path), "--workers", "0",
                                   "--stain-norm", "reinhard", "--stain-ref", str(data_file(REF))])
    assert res.exit_code == 1
    failed = [line for line in res.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "OS-2-vsi" in failed[0] and "IHC" in failed[0]
    assert (tmp_path / "CMU-1-Small-Region" / ".done").exists()


def test_a_vahadane_fit_that_does_not_converge_is_said(tmp_path, monkeypatch):
    """The reference's and the image's fallback to Macenko are each said on the console, once."""
    from pathapp.tiles import stain

    monkeypatch.setattr(stain, "VAHADANE_MAX_ITER", 1)  # one dictionary-learning pass cannot converge
    model = tiny_bundle(tmp_path, 0)
    out = _run("infer", data_file(REF), "--slide-mpp", "0.5", "--model", model, "--out", tmp_path / "v",
               "--workers", "0", "--min-tissue", "0", "--stain-norm", "vahadane", "--stain-ref", data_file(REF))
    said = [line for line in out.splitlines() if "vahadane did not converge; fitted with macenko instead" in line]
    assert len(said) == 2 and said[0].startswith("stain: reference ") and said[1].startswith("stain: TUM-AACHEHDV")
    run = json.loads((tmp_path / "v" / "TUM-AACHEHDV" / "run.json").read_text())
    assert run["parameters"]["stain"]["slide"]["notes"] == ["vahadane did not converge; fitted with macenko instead"]
