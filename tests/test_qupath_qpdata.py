"""The data.qpdata reader against QuPath itself: files QuPath 0.2.3–0.7.0 wrote (tests/data/qpdata, made
by tests/qpdata_fixtures/make_fixtures.sh with QuPath's own qupath-core) compared with what QuPath
reads back from them, and the two real projects in ../shared/data compared with their GeoJSON export
and summary.json."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely

from conftest import data_file
from qupath_rules import assert_qupath_conformant
from pathapp.qupath.geojson import QuPathObject, read_objects
from pathapp.qupath.project import read_project
from pathapp.qupath.qpdata import QpdataError, data_file as entry_data_file, read_entry_objects, read_qpdata

FIXTURES = Path(__file__).parent / "data" / "qpdata"
VERSIONS = ["v0.2.3", "v0.3.2", "v0.4.4", "v0.5.1", "v0.6.0", "v0.7.0"]
BTC = "qupath/btc-lab-he-project"
COSCIA = "qupath/coscia-demo-project"


def _expected(version: str) -> tuple[list[QuPathObject], list[int], list[str]]:
    """QuPath's reading of a fixture: objects (TMA cores left out, as the reader does), the index of
    each one's parent among them (-1 at the root), and the ROI class QuPath built."""
    features = json.loads((FIXTURES / version / "expected.json").read_text(encoding="utf-8"))
    kept: dict[int, int] = {}
    parents, rois, out = [], [], []
    for i, f in enumerate(features):
        props = f["properties"]  # 0.2 names the class in "id", 0.3 says "object_type", 0.4+ "objectType"
        is_core = "TMACoreObject" == f.get("id") or "tma_core" == props.get("object_type") or "tmaCore" == props.get("objectType")
        parent = f["parent"]
        while parent >= 0 and parent not in kept:  # a core's children belong to the core's parent
            parent = features[parent]["parent"]
        if is_core:
            continue
        kept[i] = len(out)
        parents.append(kept[parent] if parent >= 0 else -1)
        rois.append(f["roiType"])
        out.extend(read_objects(f))
    return out, parents, rois


def _same_geometry(a, b, tol: float = 0.02) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.is_empty or b.is_empty:
        return a.is_empty and b.is_empty
    # vertices within tol of each other, so the areas differ by at most tol along the boundary
    return a.geom_type == b.geom_type and a.hausdorff_distance(b) <= tol and abs(a.area - b.area) <= tol * a.length + 1e-9


def _same_measurements(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], rel_tol=1e-6) for k in a
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_reads_what_qupath_reads(version: str) -> None:
    """Every object type and ROI type QuPath writes (rectangle, ellipse, polygon, polyline, line,
    points, a multipolygon with a hole, the legacy AreaROI, cells with nuclei, tiles, TMA cores), with
    the three measurement list kinds, classes (derived too), colours, names, locks and nesting."""
    data = read_qpdata(FIXTURES / version / "data.qpdata")
    expected, parents, rois = _expected(version)
    assert {"PolygonROI", "PolylineROI", "LineROI", "PointsROI", "RectangleROI", "EllipseROI", "GeometryROI",
            "AreaROI"} <= set(rois)
    assert len(data.objects) == len(expected) == 12
    for got, want, parent, roi in zip(data.objects, expected, parents, rois):
        where = f"{version} {roi} {want.object_type} {want.class_name}"
        assert got.object_type == want.object_type, where
        assert got.class_name == want.class_name, where
        if version != "v0.2.3" or want.name is not None or want.class_name is not None:
            assert got.color == want.color, where  # QuPath 0.2's export writes an own colour only with a name
        assert got.name == want.name, where
        assert got.locked == want.locked, where
        assert _same_measurements(got.measurements, want.measurements), (where, got.measurements, want.measurements)
        assert _same_geometry(got.geometry, want.geometry), (where, got.geometry.wkt[:200], want.geometry.wkt[:200])
        assert _same_geometry(got.nucleus_geometry, want.nucleus_geometry), where
        if want.id is not None:  # QuPath 0.4+ gives every object a UUID
            assert got.id == want.id, where
        assert (data.objects.index(got.parent) if got.parent is not None else -1) == parent, where
        assert all(child.parent is got for child in got.children)
    assert [o.name for o in data.roots if o.name] == ["big rectangle", "two parts, one hole", "three points"]
    assert data.image_type == "BRIGHTFIELD_H_E"
    if version == "v0.2.3":  # data version 2: an image path instead of the server's JSON
        assert data.data_version == 2 and data.server == {} and data.image_path
    else:
        assert data.qupath_version == version[1:] and data.data_version == 3


def test_btc_lab_entry_106_qupath051() -> None:
    """16 hand-drawn annotations (GeometryROI, written as WKB), as summary.json counts them, inside the
    image; size and µm/px from the data file agree with the project."""
    path = data_file(f"{BTC}/data/106/data.qpdata")
    summary = json.loads(data_file(f"{BTC}/data/106/summary.json").read_text(encoding="utf-8"))
    data = read_qpdata(path)
    assert data.qupath_version == "0.5.1" and data.image_type == summary["imageType"]
    entry = read_project(data_file(f"{BTC}/project.qpproj")).entries[0]
    assert (data.width, data.height) == (entry.width, entry.height) == (107520, 105984)
    assert data.mpp == pytest.approx(entry.mpp) and data.mpp == pytest.approx(0.2297, abs=1e-4)
    counts = summary["hierarchy"]
    assert len(data.objects) + 1 == counts["nObjects"] == 17  # summary.json counts the root too
    assert Counter(o.object_type for o in data.objects) == {"annotation": counts["objectTypeCounts"]["Annotations"]}
    assert Counter(o.class_name for o in data.objects) == counts["annotationClassificationCounts"]
    assert (data.width, data.height) == (summary["server"]["width"], summary["server"]["height"])
    image = shapely.box(0, 0, data.width, data.height)
    for o in data.objects:
        assert o.geometry.geom_type in ("Polygon", "MultiPolygon") and o.geometry.is_valid
        assert o.geometry.area > 1e4 and image.contains(o.geometry)
        assert o.color is not None and o.id is not None


_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathTileObject": "tile",
          "PathCellObject": "cell"}


@pytest.mark.parametrize(("rel", "summary"), [(f"{BTC}/data/106/data.qpdata", "btc-lab-106.json"),
                                             (f"{COSCIA}/data/1/data.qpdata", "coscia-1.json")])
def test_real_files_read_as_qupath_reads_them(rel: str, summary: str) -> None:
    """The real projects' data files against QuPath's own reading of them (the version that wrote
    each, run by make_fixtures.sh): type, class and colour, name, lock, nesting, and the geometry's
    area, length, bounds and (for WKB geometries) vertex count."""
    data = read_qpdata(data_file(rel))
    expected = json.loads((FIXTURES / "real" / summary).read_text(encoding="utf-8"))
    assert len(data.objects) == len(expected)
    for got, want in zip(data.objects, expected):
        assert got.object_type == _TYPES[want["type"]]
        assert (got.class_name, got.name, got.locked) == (want["class"], want["name"], want["locked"])
        if want["class"] is not None:
            assert list(got.color) == want["classColor"]
        parent = data.objects.index(got.parent) if got.parent is not None else -1
        assert parent == want["parent"]
        if want["roiType"] == "GeometryROI":  # WKB: the very coordinates QuPath holds
            assert shapely.get_num_coordinates(got.geometry) == want["numPoints"]
            assert got.geometry.area == pytest.approx(want["area"], rel=1e-9)
            assert got.geometry.length == pytest.approx(want["length"], rel=1e-9)
        else:  # QuPath snaps other areas to its 0.01 px grid when it makes their geometry
            assert abs(got.geometry.area - want["area"]) <= 0.01 * want["length"]
            assert got.geometry.length == pytest.approx(want["length"], rel=1e-3)
        assert np.allclose(got.geometry.bounds, want["bounds"], atol=0.01)
        assert (got.nucleus_geometry is not None) == want["nucleus"]
        assert len(got.measurements) == want["measurements"]


def test_coscia_entry_1_matches_its_geojson_export() -> None:
    """QuPath 0.6.0: the 131 objects of the project's entry against QuPath's GeoJSON export of them,
    object by object (same UUIDs): type, class, colour, name, measurements, geometry within 0.01 px."""
    data = read_qpdata(data_file(f"{COSCIA}/data/1/data.qpdata"))
    export = read_objects(data_file("qupath/geojson/coscia_Single_cells.geojson"))
    assert len(data.objects) == len(export) == 131
    by_id = {o.id: o for o in data.objects}
    for want in export:
        got = by_id[want.id]
        assert (got.object_type, got.class_name, got.color, got.name) == (
            want.object_type, want.class_name, want.color, want.name)
        assert _same_measurements(got.measurements, want.measurements)
        assert _same_geometry(got.geometry, want.geometry, tol=0.01)
    cells = [o for o in data.objects if o.object_type == "cell"]
    assert len(cells) == 121 and len(cells[0].measurements) > 100
    assert all(c.parent is not None and c.parent.object_type == "annotation" for c in cells)
    assert (data.width, data.height, data.image_type) == (1000, 1000, "FLUORESCENCE")


def test_project_entries(tmp_path: Path) -> None:
    """An entry's objects through the project; an entry QuPath never saved is one line naming it."""
    project = read_project(data_file(f"{COSCIA}/project.qpproj"))
    objects = read_entry_objects(project, project.entries[0])
    assert Counter(o.object_type for o in objects) == {"cell": 121, "annotation": 10}
    copy = tmp_path / "proj"
    shutil.copytree(project.dir, copy)
    shutil.rmtree(copy / "data" / "1")
    moved = read_project(copy / "project.qpproj")
    with pytest.raises(QpdataError) as e:
        read_entry_objects(moved, moved.entries[0])
    _one_line(e.value, entry_data_file(moved, moved.entries[0]))
    assert "entry 1 (TD_01_verysmall_mIF.ome.tif)" in str(e.value)


def _one_line(error: Exception, path: Path) -> None:
    text = str(error)
    assert "\n" not in text and str(path) in text and len(text) < 500, text


def _edited(tmp_path: Path, old: bytes, new: bytes, version: str = "v0.7.0") -> Path:
    """A copy of a fixture with one string replaced by another of the same length (so the stream stays valid)."""
    assert len(old) == len(new)
    raw = (FIXTURES / version / "data.qpdata").read_bytes()
    assert raw.count(old) >= 1
    out = tmp_path / "data.qpdata"
    out.write_bytes(raw.replace(old, new))
    return out


def test_unsupported_qupath_versions(tmp_path: Path) -> None:
    later = _edited(tmp_path, b'"qupathVersion":"0.7.0"', b'"qupathVersion":"0.9.1"')
    with pytest.raises(QpdataError, match=r"written by QuPath 0\.9\.1, which pathapp does not read") as e:
        read_qpdata(later)
    _one_line(e.value, later)
    future = _edited(tmp_path, b"Data file version 3", b"Data file version 7")
    with pytest.raises(QpdataError, match=r"data file version '7'") as e:
        read_qpdata(future)
    _one_line(e.value, future)


def test_unknown_roi_class(tmp_path: Path) -> None:
    odd = _edited(tmp_path, b"qupath.lib.roi.LineROI$SerializationProxy", b"qupath.lib.roi.LineXYZ$SerializationProxy")
    with pytest.raises(QpdataError, match=r"a ROI of class qupath\.lib\.roi\.LineXYZ\$SerializationProxy .* QuPath 0\.7\.0") as e:
        read_qpdata(odd)
    _one_line(e.value, odd)


@pytest.mark.parametrize("version", ["v0.2.3", "v0.6.0"])
def test_truncated_and_corrupt_files(tmp_path: Path, version: str) -> None:
    """Every truncation, and single-byte corruptions, give either the objects or one QpdataError line."""
    raw = (FIXTURES / version / "data.qpdata").read_bytes()
    path = tmp_path / "data.qpdata"
    for end in list(range(0, len(raw), 53)) + [len(raw) - 1]:
        path.write_bytes(raw[:end])
        with pytest.raises(QpdataError) as e:
            read_qpdata(path)
        _one_line(e.value, path)
    rng = random.Random(0)
    outcomes = Counter()
    for _ in range(150):
        data = bytearray(raw)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            read_qpdata(path)
            outcomes["read"] += 1
        except QpdataError as e:
            _one_line(e, path)
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["read"] > 0


def test_nesting_does_not_change_equality_or_repr() -> None:
    data = read_qpdata(FIXTURES / "v0.6.0" / "data.qpdata")
    parent = next(o for o in data.objects if o.children)
    assert "children" not in repr(parent) and len(repr(parent)) < 2000
    alone = QuPathObject(geometry=parent.geometry, object_type=parent.object_type, class_name=parent.class_name,
                         color=parent.color, measurements=parent.measurements, name=parent.name, id=parent.id,
                         locked=parent.locked)
    assert alone == parent


def test_only_some_object_types() -> None:
    """Keeping annotations only: the detections under them are read past, the nesting closes up."""
    every = read_qpdata(FIXTURES / "v0.6.0" / "data.qpdata")
    some = read_qpdata(FIXTURES / "v0.6.0" / "data.qpdata", {"annotation"})
    assert [o.id for o in some.objects] == [o.id for o in every.objects if o.object_type == "annotation"]
    inner = next(o for o in some.objects if o.class_name == "Tumor: Positive")
    assert inner.parent is not None and inner.parent.name == "big rectangle"
    assert [c.object_type for c in inner.parent.children] == ["annotation"]


def _pathapp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pathapp", *args], capture_output=True, text=True, timeout=300)


def test_export_command_writes_what_qupath_exported(tmp_path: Path) -> None:
    """`pathapp export` on the real projects: conformant QuPath GeoJSON, object for object what QuPath's
    own export of the coscia entry holds, and btc-lab's 16 annotations with their classes."""
    out = tmp_path / "out"
    run = _pathapp("export", str(data_file(f"{COSCIA}/project.qpproj")), str(data_file(BTC)), "--out", str(out))
    assert run.returncode == 0, run.stderr
    coscia = out / "1_TD_01_verysmall_mIF.ome.geojson"
    btc = out / "106_AS21057515 - 2024-05-07 19.34.42.geojson"
    assert "131 objects" in run.stdout and "16 objects" in run.stdout and str(coscia) in run.stdout
    assert len(assert_qupath_conformant(coscia)) == 131 and len(assert_qupath_conformant(btc)) == 16
    ours = read_objects(coscia)
    source = read_qpdata(data_file(f"{COSCIA}/data/1/data.qpdata")).objects
    qupath = {o.id: o for o in read_objects(data_file("qupath/geojson/coscia_Single_cells.geojson"))}
    for mine, original in zip(ours, source, strict=True):
        want = qupath[original.id]  # the writer gives fresh ids; the order is the data file's
        assert (mine.object_type, mine.class_name, mine.color, mine.name) == (
            want.object_type, want.class_name, want.color, want.name)
        assert _same_geometry(mine.geometry, want.geometry, tol=0.01)
        assert _same_measurements(mine.measurements, {k: float(np.float32(v)) for k, v in want.measurements.items()})
    assert Counter(o.class_name for o in read_objects(btc)) == {
        "well differentiated tumor": 7, "undifferentiated tumor": 4, "normal tissue": 3, "possibly undifferentiated": 2}


def test_export_goes_on_after_a_bad_entry(tmp_path: Path) -> None:
    """Two entries, one without a data file and one truncated, and a good project: one line for each
    bad entry, the good one written, exit code 1; --type keeps only annotations."""
    proj = tmp_path / "proj"
    shutil.copytree(data_file(COSCIA), proj)
    (proj / "data" / "1" / "data.qpdata").write_bytes((proj / "data" / "1" / "data.qpdata").read_bytes()[:5000])
    qpproj = json.loads((proj / "project.qpproj").read_text(encoding="utf-8"))
    qpproj["images"].append({**qpproj["images"][0], "entryID": 2, "imageName": "never saved.tif"})
    (proj / "project.qpproj").write_text(json.dumps(qpproj), encoding="utf-8")
    out = tmp_path / "out"
    run = _pathapp("export", str(proj), str(data_file(BTC)), "--type", "annotation", "--out", str(out))
    assert run.returncode == 1
    failed = [line for line in run.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and "truncated" in failed[0] and "entry 2 (never saved.tif) has no data file" in failed[1]
    assert "Traceback" not in run.stderr
    assert [p.name for p in out.iterdir()] == ["106_AS21057515 - 2024-05-07 19.34.42.geojson"]
