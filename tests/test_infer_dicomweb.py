"""`pathapp infer` on a hospital archive: a study and a worklist of addresses read from a real Orthanc,
results written as files and DICOM, stored back with STOW-RS, bad inputs one line each, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pydicom

from orthanc_server import PASSWORD
from vit_factory import tiny_bundle


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PATHAPP_DICOMWEB")} | env
    return subprocess.run([sys.executable, "-m", "pathapp", *args], capture_output=True, text=True, timeout=600,
                          env=full)


def test_infer_a_study_and_a_worklist_writes_and_stores_dicom(orthanc, tmp_path) -> None:
    bundle = tiny_bundle(tmp_path, num_classes=3)
    worklist = tmp_path / "worklist.txt"
    worklist.write_text(f"# slides to run\n{orthanc.url('svs')}\n\n{orthanc.url('nonconformant')}\n")
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    args = ["infer", orthanc.url("cmu1", series=False), str(worklist), "--model", str(bundle), "--mpp", "2.0",
            "--workers", "1", "--out", str(out), "--dicom-out", str(dicom_out), "--dicomweb-store"]
    r = run_cli(*args, env=orthanc.env)
    assert r.returncode == 1, r.stderr  # the nonconformant series failed, the two slides did not
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "no whole-slide pyramid in this series" in failed[0]
    assert "Traceback" not in r.stderr and PASSWORD not in r.stderr + r.stdout

    for name in ("cmu1", "svs"):
        study, series = orthanc.series[name]
        folder = out / series
        run = json.loads((folder / "run.json").read_text())
        assert run["slide_path"] == orthanc.url(name) and PASSWORD not in (folder / "run.json").read_text()
        tiles = json.loads((folder / "tiles.geojson").read_text())["features"]
        ann = pydicom.dcmread(dicom_out / series / "annotations.ann.dcm")
        seg = pydicom.dcmread(dicom_out / series / "probabilities.seg.dcm")
        assert ann.StudyInstanceUID == seg.StudyInstanceUID == study
        assert sum(g.NumberOfAnnotations for g in ann.AnnotationGroupSequence) == len(tiles) > 0
        stored = orthanc.session().get(f"{orthanc.dicomweb}/studies/{study}/series", timeout=30).json()
        by_modality = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in stored}
        assert by_modality["ANN"] == ann.SeriesInstanceUID and by_modality["SEG"] == seg.SeriesInstanceUID

    again = run_cli(*args, env=orthanc.env)  # a rerun skips the finished slides
    assert again.stderr.count("skip:") == 2, again.stderr
