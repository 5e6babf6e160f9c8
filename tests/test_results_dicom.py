"""DICOM results (ANN + fractional SEG) from inference over DICOMweb: valid by dciodvfy, referenced to
the source series, equal to the GeoJSON results when read back with highdicom, stored back by STOW-RS."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from conftest import data_file
from vit_factory import tiny_bundle
from pathapp.infer import infer_slide
from pathapp.models.bundle import load_bundle
from pathapp.results import write_results
from pathapp.results.dicom import ANN_FILE, SEG_FILE, DicomResultError, seg_level, store_dicomweb, write_dicom
from pathapp.slide import open_slide

# dicom3tools' ANN module rule `Verify CommonZCoordinateValue if AnnotationCoordinateType is not 3D`
# fires for every 2D object, present or not; the test checks the attribute's absence itself.
DCIODVFY_2D_RULE = "Only valid for AnnotationCoordinateType of 3D - attribute <CommonZCoordinateValue>"


@pytest.fixture(scope="module")
def written(orthanc, tmp_path_factory):
    """Inference on the dicomized SVS read from Orthanc, its GeoJSON results and its DICOM results."""
    out = tmp_path_factory.mktemp("dicom-results")
    bundle = load_bundle(tiny_bundle(out, num_classes=3))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in orthanc.env.items():
            mp.setenv(key, value)
        with open_slide(orthanc.url("svs")) as slide:
            result = infer_slide(slide, bundle, mpp=2.0, workers=0, progress=False)
        write_results(result, out)
        files = write_dicom(result, out)
    return result, out, files


def test_files_pass_dciodvfy(written) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian: apt-get install dicom3tools)")
    result, out, files = written
    assert [f.name for f in files] == [ANN_FILE, SEG_FILE]
    for f in files:
        report = subprocess.run(["dciodvfy", str(f)], capture_output=True, timeout=120).stderr.decode("latin-1")
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        if f.name == ANN_FILE:
            assert all("CommonZCoordinateValue" not in g for g in pydicom.dcmread(f).AnnotationGroupSequence)
            errors = [e for e in errors if DCIODVFY_2D_RULE not in e]
        assert errors == [], f"{f.name}:\n" + "\n".join(errors)


def test_objects_reference_the_source_series(written, orthanc) -> None:
    result, _, files = written
    source = result.dicom_headers[0]
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName"):
            assert ds[keyword].value == source[keyword].value, keyword
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        referenced = ds.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == source.SeriesInstanceUID == orthanc.series["svs"][1]
    ann, seg = (pydicom.dcmread(f) for f in files)
    # 2D annotations live in the pixel matrix of the level-0 image they reference (whose frame of
    # reference they share); the SEG states the frame of reference itself.
    assert ann.AnnotationCoordinateType == "2D" and "FrameOfReferenceUID" not in ann
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    level = result.dicom_headers[seg_level(result)]
    assert (seg.TotalPixelMatrixColumns, seg.TotalPixelMatrixRows, seg.Columns, seg.Rows) == (
        level.TotalPixelMatrixColumns, level.TotalPixelMatrixRows, level.Columns, level.Rows)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == level.SOPInstanceUID


def _bounds(xs, ys) -> tuple[int, int, float, float]:
    """A tile square's key: its integer top-left corner (tiles start on whole pixels) and its
    fractional bottom-right corner."""
    return int(round(min(xs))), int(round(min(ys))), float(max(xs)), float(max(ys))


def _geojson_tiles(out) -> dict[tuple[int, int], tuple[tuple[float, float], str, dict[str, float]]]:
    tiles = {}
    for feature in json.loads((out / "tiles.geojson").read_text())["features"]:
        x0, y0, x1, y1 = _bounds(*zip(*feature["geometry"]["coordinates"][0]))
        props = feature["properties"]
        tiles[(x0, y0)] = ((x1, y1), props["classification"]["name"], props["measurements"])
    return tiles


def test_annotations_read_back_equal_the_geojson(written) -> None:
    import highdicom as hd

    result, out, files = written
    expected = _geojson_tiles(out)
    ann = hd.ann.annread(files[0])
    seen = {}
    for group in ann.get_annotation_groups():
        polygons = group.get_graphic_data(coordinate_type="2D")
        names, values, _ = group.get_measurements()
        meanings = [n.meaning for n in names]
        for poly, row in zip(polygons, values):
            x0, y0, x1, y1 = _bounds(poly[:, 0], poly[:, 1])
            seen[(x0, y0)] = ((x1, y1), group.label, dict(zip(meanings, row)))
    assert seen.keys() == expected.keys() and len(seen) == len(result) > 10
    for key, (corner, label, probs) in seen.items():
        want_corner, name, measurements = expected[key]
        assert np.allclose(corner, want_corner, atol=0.01) and label == name
        assert set(probs) == {f"prob: {c}" for c in result.class_names}
        for m, v in probs.items():
            assert abs(v - measurements[m]) <= 1e-3, (key, m)


def test_probability_maps_read_back_equal_the_tile_probabilities(written) -> None:
    import highdicom as hd

    result, out, files = written
    seg = hd.seg.segread(files[1])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [f"prob: {c}" for c in result.class_names]
    maps = seg.get_total_pixel_matrix(combine_segments=False, rescale_fractional=True)  # (rows, cols, classes)
    scale = seg.TotalPixelMatrixColumns / result.slide_size[0]
    expected = {(x0, y0, *corner): m for (x0, y0), (corner, _, m) in _geojson_tiles(out).items()}
    for (x0, y0, x1, y1), measurements in expected.items():
        r, c = int((y0 + y1) / 2 * scale), int((x0 + x1) / 2 * scale)
        if r >= maps.shape[0] or c >= maps.shape[1]:  # an edge tile whose centre is beyond the slide
            continue
        want = np.array([measurements[f"prob: {n}"] for n in result.class_names])
        np.testing.assert_allclose(maps[r, c], want, atol=0.5 / 255 + 1e-6)  # 8-bit fractional values
    covered = np.zeros(maps.shape[:2], bool)
    for x0, y0, x1, y1 in expected:
        covered[int(round(y0 * scale)):int(round(y1 * scale)), int(round(x0 * scale)):int(round(x1 * scale))] = True
    assert np.all(maps[~covered] == 0) and covered.mean() < 0.9


def test_store_back_with_stow_rs_is_idempotent(written, orthanc) -> None:
    import requests

    _, _, files = written
    study = orthanc.series["svs"][0]
    session = orthanc.session()

    def instances() -> list[str]:
        r = session.get(f"{orthanc.dicomweb}/studies/{study}/instances", timeout=30)
        return sorted(i["00080018"]["Value"][0] for i in r.json())

    before = instances()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in orthanc.env.items():
            mp.setenv(key, value)
        store_dicomweb(files, orthanc.url("svs"))  # a slide address means its server
        after = instances()
        store_dicomweb(files, f"dicomweb+{orthanc.dicomweb}")
    sops = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    # (the same results stored earlier in the session, e.g. by `pathapp infer`, have the same UIDs)
    assert after == sorted(set(before) | sops) and instances() == after
    modalities = {i["00080060"]["Value"][0] for i in session.get(f"{orthanc.dicomweb}/studies/{study}/series",
                                                                  timeout=30).json()}
    assert modalities == {"SM", "ANN", "SEG"}
    assert requests.get(f"{orthanc.dicomweb}/studies/{study}/series", timeout=30).status_code == 401


def test_store_failure_is_one_line_without_credentials(written, orthanc, monkeypatch) -> None:
    _, _, files = written
    monkeypatch.setenv("PATHAPP_DICOMWEB_USER", "pathapp")
    monkeypatch.setenv("PATHAPP_DICOMWEB_PASSWORD", "wrong-password-77")
    with pytest.raises(DicomResultError) as e:
        store_dicomweb(files, orthanc.dicomweb)
    assert "refused the credentials (HTTP 401)" in str(e.value) and "wrong-password-77" not in str(e.value)
    assert "\n" not in str(e.value)


def test_a_slide_that_is_not_dicom_gets_one_line(tmp_path) -> None:
    bundle = load_bundle(tiny_bundle(tmp_path, num_classes=2))
    with open_slide(data_file("wsi/aperio/CMU-1-Small-Region.svs")) as slide:
        result = infer_slide(slide, bundle, mpp=8.0, workers=0, progress=False)
    with pytest.raises(DicomResultError, match="must reference a DICOM-WSI source series"):
        write_dicom(result, tmp_path)
