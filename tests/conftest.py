"""Shared fixtures: the real data in ../shared/data and small random-weight ViTs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def data_file(rel: str) -> Path:
    """Path of a shared data file; missing is a failure in CI and a skip elsewhere."""
    p = DATA / rel
    if not p.exists():
        if IN_CI:
            pytest.fail(f"shared data file missing in CI: {p}")
        pytest.skip(f"shared data file missing: {p}")
    return p


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`pathapp ARGS` through the console entry point (errors -> one line, exit 2), in process: the
    console script's behaviour without a second torch import."""
    from pathapp.cli import main

    monkeypatch.setattr(sys, "argv", ["pathapp", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out + out.err


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.exists():
        if IN_CI:
            pytest.fail(f"shared data folder missing in CI: {DATA}")
        pytest.skip(f"shared data folder missing: {DATA}")
    return DATA


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (small models are slower on more), then restore the count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc + DICOMweb plugin on loopback for the whole session, holding (by name):
    cmu1 (the 12-file wsi2dcm pyramid), svs (CMU-1-Small-Region.svs converted by OrthancWSIDicomizer),
    bone (uncompressed wsi2dcm), nonconformant (a WSI instance without ImageType: no levels) and
    ct (pydicom's CT_small.dcm: a study without slides). All uploaded through STOW-RS."""
    import shutil

    from orthanc_server import DICOMWEB_PLUGIN, dicomize_svs, start_orthanc

    missing = [name for name, ok in (("Orthanc", shutil.which("Orthanc")), ("the DICOMweb plugin", DICOMWEB_PLUGIN.exists()),
                                     ("OrthancWSIDicomizer", shutil.which("OrthancWSIDicomizer"))) if not ok]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install orthanc orthanc-dicomweb orthanc-wsi)")
    import pydicom.data

    work = tmp_path_factory.mktemp("orthanc")
    server = start_orthanc(work)
    try:
        server.store("cmu1", sorted(data_file("dicom/cmu-1-small-region-wsi2dcm").glob("*.dcm")))
        server.store("svs", dicomize_svs(data_file("wsi/aperio/CMU-1-Small-Region.svs"), work / "svs-dicom"))
        server.store("bone", [data_file("dicom/wsi2dcm-bone/raw.dicom")])
        server.store("nonconformant", [data_file("dicom/pathml-nonconformant/small_dicom.dcm")])
        server.store("ct", [Path(pydicom.data.get_testdata_file("CT_small.dcm"))])
        yield server
    finally:
        server.stop()
