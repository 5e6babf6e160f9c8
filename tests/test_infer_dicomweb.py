"""`pathapp infer` on a hospital archive: a study and a worklist of addresses read from a real Orthanc,
results written as files and DICOM, stored back with STOW-RS, bad inputs one line each, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pydicom

from conftest import run_main
from orthanc_server import PASSWORD
from vit_factory import tiny_bundle


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PATHAPP_DICOMWEB")} | env
    return subprocess.run([sys.executable, "-m", "pathapp", *args], capture_output=True, text=True, timeout=600,
                          env=full)


def test_infer_a_study_and_a_worklist_writes_and_stores_dicom(orthanc, tmp_path, monkeypatch, capsys) -> None:
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

    for name in [k for k in os.environ if k.startswith("PATHAPP_DICOMWEB")]:
        monkeypatch.delenv(name)
    for name, value in orthanc.env.items():
        monkeypatch.setenv(name, value)
    code, again = run_main(monkeypatch, capsys, *args)  # a rerun (in process) skips the finished slides
    assert again.count("skip:") == 2, again


class _FailingDataset:
    """A dataset whose reads fail as a DICOMweb slide's do when the server goes away mid-slide."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        from pathapp.errors import SlideOpenError

        raise SlideOpenError("dicomweb+http://127.0.0.1:1/dicom-web/studies/1.2/series/1.3: the server did not answer")


def test_an_error_in_a_dataloader_worker_is_reported_in_its_own_one_line() -> None:
    import pytest
    from torch.utils.data import DataLoader

    from pathapp.errors import SlideOpenError
    from pathapp.errors import one_line

    with pytest.raises(SlideOpenError) as e:
        next(iter(DataLoader(_FailingDataset(), batch_size=2, num_workers=1)))
    assert "Traceback" in str(e.value)  # what torch hands back
    assert one_line(e.value) == "dicomweb+http://127.0.0.1:1/dicom-web/studies/1.2/series/1.3: the server did not answer"


def test_store_to_the_same_server_needs_a_slide_read_from_one(tmp_path) -> None:
    import pytest

    from conftest import data_file
    from pathapp.infer import infer_slide
    from pathapp.models.bundle import load_bundle
    from pathapp.results.dicom import SAME_SERVER, DicomResultError, export_dicom
    from pathapp.slide import open_slide

    with open_slide(data_file("dicom/wsi2dcm-bone/jpeg.dicom")) as slide:
        result = infer_slide(slide, load_bundle(tiny_bundle(tmp_path, num_classes=2)), mpp=33.0, workers=0,
                             progress=False)
        headless = infer_slide(slide, load_bundle(tiny_bundle(tmp_path, num_classes=0, filename="h.pathapp")),
                               mpp=33.0, workers=0, progress=False)
    with pytest.raises(DicomResultError, match="stores to the server the slide came from"):
        export_dicom(result, tmp_path / "dicom", SAME_SERVER)
    assert [f.name for f in export_dicom(result, tmp_path / "dicom")] == ["annotations.ann.dcm", "probabilities.seg.dcm"]
    # a bundle without classes: the tiles as one group, no probabilities, no segmentation
    (ann,) = export_dicom(headless, tmp_path / "headless")
    groups = pydicom.dcmread(ann).AnnotationGroupSequence
    assert [(g.AnnotationGroupLabel, g.NumberOfAnnotations) for g in groups] == [("tile", len(headless))]
    assert "MeasurementsSequence" not in groups[0]
