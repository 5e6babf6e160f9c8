"""QC in the written results: `qc: …` measurements and QC classes on the tiles, one annotation per
artefact kind (merged tiles, excluded ones included), counts and areas in run.json, overlay-qc.png.
Tiles are real (CMU-1-Small-Region at 0.5 µm/px); some are blurred by a known amount."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from conftest import data_file
from pathapp.results import SlideResult, write_results
from pathapp.results.pictures import image_box
from pathapp.results.result import TileQC
from pathapp.slide import open_slide
from pathapp.tiles import detect_tissue, make_grid, read_tile
from pathapp.tiles import qc_cases
from pathapp.tiles.qc import ARTEFACTS, OK, PREFIX, QCThresholds, measure_tiles, qc_classes
from qupath_rules import assert_qupath_conformant

BLURRED = range(0, 6)  # tiles blurred by σ 2 µm: a block of neighbours, merged into one region


@pytest.fixture(scope="module")
def measured():
    slide = open_slide(data_file("wsi/aperio/CMU-1-Small-Region.svs"))
    grid = make_grid(slide, 0.5, 224, tissue=detect_tissue(slide))
    n = min(24, len(grid))
    tiles = [read_tile(slide, grid, i) for i in range(n)]
    tiles = [qc_cases.blur(t, 2.0, 0.5) if i in BLURRED else t for i, t in enumerate(tiles)]
    measures = measure_tiles(tiles, 0.5)
    thumb = slide.thumbnail(512)
    return slide, grid, n, measures, qc_classes(measures), thumb


def _result(measured, *, exclude: bool, classified: bool) -> SlideResult:
    slide, grid, n, measures, classes, thumb = measured
    kept = classes == OK if exclude else np.ones(n, bool)
    k = int(kept.sum())
    probs = np.tile([[0.8, 0.2]], (k, 1)).astype(np.float32) if classified else None
    return SlideResult(
        slide_path=str(slide.path), slide_name=slide.name, coords=grid.coords[:n][kept], footprint=grid.footprint,
        tile_size=224, mpp=0.5, slide_mpp=grid.slide_mpp, slide_size=slide.size,
        class_names=["Tumor", "Stroma"] if classified else [], class_colors=[(200, 0, 0), (0, 150, 0)] if classified else [],
        probs=probs, extra={PREFIX + m: v[kept] for m, v in measures.items()}, thumbnail=thumb,
        qc=TileQC(coords=grid.coords[:n], footprint=grid.footprint, classes=classes, kept=kept, colors=dict(ARTEFACTS),
                  thresholds=QCThresholds().to_dict(), excluded=exclude),
    )


def test_qc_only_results(tmp_path, measured):
    *_, classes, thumb = measured
    assert set(classes[list(BLURRED)]) == {"blur"}, classes
    files = {p.name for p in write_results(_result(measured, exclude=False, classified=False), tmp_path)}
    assert {"tiles.geojson", "annotations.geojson", "overlay-qc.png", "run.json"} <= files
    tiles = assert_qupath_conformant(tmp_path / "tiles.geojson")
    assert [f["properties"]["classification"]["name"] for f in tiles] == ["QC: " + c for c in classes]
    assert [f["properties"]["name"] for f in tiles] == ["QC: " + c for c in classes]
    meas = tiles[0]["properties"]["measurements"]
    assert {"qc: blur µm", "qc: background", "qc: pen red", "qc: compression"} <= set(meas)
    blur = [f["properties"]["measurements"]["qc: blur µm"] for f in tiles[:6]]
    assert min(blur) > QCThresholds().blur_um

    annotations = assert_qupath_conformant(tmp_path / "annotations.geojson")
    qc_ann = {f["properties"]["classification"]["name"]: f for f in annotations}
    blur_ann = qc_ann["QC: blur"]
    geom = shape(blur_ann["geometry"])
    assert blur_ann["properties"]["measurements"]["Tiles"] == np.count_nonzero(classes == "blur")
    assert blur_ann["properties"]["measurements"]["Area µm^2"] == pytest.approx(geom.area * 0.499**2, rel=1e-6)

    run = json.loads((tmp_path / "run.json").read_text())
    assert run["qc"]["tiles"]["blur"] == np.count_nonzero(classes == "blur")
    assert run["qc"]["area µm^2"]["blur"] == pytest.approx(geom.area * 0.499**2, rel=1e-3)
    assert run["counts"]["qc: blur"] == run["qc"]["tiles"]["blur"] and run["qc"]["tiles excluded"] == 0

    x, y, w, h = image_box(tmp_path / "overlay-qc.png")  # the slide inside the picture (legend and title beside it)
    overlay = np.asarray(Image.open(tmp_path / "overlay-qc.png").convert("RGB"))[y:y + h, x:x + w]
    assert overlay.shape == thumb.shape and np.abs(overlay.astype(int) - thumb).max() > 30


def test_excluded_tiles_leave_the_results_but_stay_counted(tmp_path, measured):
    *_, classes, _ = measured
    result = _result(measured, exclude=True, classified=True)
    write_results(result, tmp_path)
    tiles = assert_qupath_conformant(tmp_path / "tiles.geojson")
    assert len(tiles) == np.count_nonzero(classes == OK) < len(classes)
    assert {f["properties"]["classification"]["name"] for f in tiles} == {"Tumor"}  # the model's class
    assert {f["properties"]["name"] for f in tiles} == {"QC: ok"}
    names = {f["properties"]["classification"]["name"] for f in assert_qupath_conformant(tmp_path / "annotations.geojson")}
    assert {"Tumor", "QC: blur"} <= names
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["qc"]["excluded"] is True
    assert run["qc"]["tiles excluded"] == np.count_nonzero(classes != OK) == len(classes) - run["counts"]["tiles"]
