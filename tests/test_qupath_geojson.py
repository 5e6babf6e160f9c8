"""QuPath GeoJSON: the reader on real QuPath exports, the writer on adversarial input."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, Polygon, box

from conftest import data_file
from pathapp.errors import PathappError
from pathapp.qupath.geojson import QuPathObject, read_objects, read_rois, tile_objects, write_objects
from qupath_rules import assert_qupath_conformant

GEOJSON = "qupath/geojson/"


def _summary(objs: list[QuPathObject]) -> Counter:
    return Counter((o.object_type, o.geometry.geom_type, o.class_name) for o in objs)


def test_coscia_single_cells_qupath06_export() -> None:
    objs = read_objects(data_file(GEOJSON + "coscia_Single_cells.geojson"))
    assert _summary(objs) == {
        ("cell", "Polygon", "single_cells_demo"): 121,
        ("annotation", "Polygon", "circles"): 4,
        ("annotation", "Polygon", "two_circles"): 2,
        ("annotation", "Polygon", "class_1"): 1,
        ("annotation", "Point", None): 3,
    }
    cells = [o for o in objs if o.object_type == "cell"]
    assert all(o.color == (255, 0, 255) for o in cells)
    assert all(len(o.measurements) == 126 for o in cells)
    assert all(math.isfinite(v) for o in cells for v in o.measurements.values())
    raw = json.loads(data_file(GEOJSON + "coscia_Single_cells.geojson").read_text())["features"]
    first_cell = next(f for f in raw if f["properties"]["objectType"] == "cell")
    assert cells[0].measurements == first_cell["properties"]["measurements"]
    assert cells[0].id == first_cell["id"]
    points = sorted(o.name for o in objs if o.geometry.geom_type == "Point")
    assert points == ["calib1", "calib2", "calib3"]
    class_1 = next(o for o in objs if o.class_name == "class_1")
    assert class_1.color == (3, 128, 17) and class_1.locked
    assert class_1.geometry.bounds == (296.0, 0.0, 982.0, 416.0)


def test_coscia_annotations_export() -> None:
    objs = read_objects(data_file(GEOJSON + "coscia_TD_01_verysmall_mIF.geojson"))
    assert _summary(objs) == {
        ("annotation", "Polygon", "class_1"): 3,
        ("annotation", "Polygon", "class_2"): 3,
        ("annotation", "Point", None): 3,
    }
    assert all(not o.measurements for o in objs)


def test_dlup_qupath05_unclassified_with_object_colour() -> None:
    objs = read_objects(data_file(GEOJSON + "dlup_qupath05.geojson"))
    assert [(o.object_type, o.class_name, o.name, o.color) for o in objs] == [
        ("annotation", None, "UT", (255, 0, 0)),
        ("annotation", None, "I", (255, 0, 0)),
        ("annotation", None, "I", (255, 0, 0)),
    ]
    assert all(5000 < c < 10000 for o in objs for c in o.geometry.bounds)


def test_luna_legacy_list_export() -> None:
    """QuPath ≤0.2: bare list, Java class name as id, colorRGB, measurement list, nucleusGeometry."""
    (cell,) = read_objects(data_file(GEOJSON + "luna_test_object_classification.geojson"))
    assert cell.object_type == "cell" and cell.id is None
    assert cell.class_name == "Other" and cell.color == (0, 128, 128)  # colorRGB -16744320
    assert cell.nucleus_geometry is not None and cell.nucleus_geometry.within(cell.geometry.buffer(1))
    assert cell.measurements["Detection probability"] == pytest.approx(0.5110340118408203)
    assert len(cell.measurements) == 54


def test_reader_accepts_every_shape_qupath_reads(tmp_path) -> None:
    poly = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}
    feature = {"type": "Feature", "geometry": poly,
               "properties": {"object_type": "detection", "classification": "Tumor: Positive",
                              "measurements": {"a": "NaN", "b": 1}}}
    assert read_objects(poly)[0].object_type == "annotation"  # bare geometry
    (det,) = read_objects(feature)
    assert (det.object_type, det.class_name, det.measurements["b"]) == ("detection", "Tumor: Positive", 1.0)
    assert math.isnan(det.measurements["a"])
    derived = dict(feature, properties={"classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}})
    assert read_objects([derived])[0].class_name == "Tumor: Positive"
    gz = tmp_path / "x.geojson.gz"
    with gzip.open(gz, "wt") as f:
        json.dump({"type": "FeatureCollection", "features": [feature, feature]}, f)
    assert len(read_objects(gz)) == 2
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(PathappError, match="bad.geojson"):
        read_objects(bad)
    with pytest.raises(PathappError, match="missing.geojson"):
        read_objects(tmp_path / "missing.geojson")


@pytest.mark.parametrize("name", [
    "coscia_Single_cells.geojson", "coscia_TD_01_verysmall_mIF.geojson",
    "dlup_qupath05.geojson", "luna_test_object_classification.geojson",
])
def test_real_exports_round_trip(tmp_path, name: str) -> None:
    original = read_objects(data_file(GEOJSON + name))
    out = write_objects(tmp_path / "out.geojson", original)
    assert_qupath_conformant(out)
    again = read_objects(out)
    assert len(again) == len(original)
    for a, b in zip(original, again):
        assert (a.object_type, a.class_name, a.color, a.name, a.locked) == (
            b.object_type, b.class_name, b.color, b.name, b.locked)
        assert b.measurements.keys() == a.measurements.keys()
        for k, v in a.measurements.items():
            assert np.float32(b.measurements[k]) == np.float32(v)
        assert b.geometry.geom_type == a.geometry.geom_type
        assert b.geometry.equals_exact(a.geometry, 0.005) or b.geometry.symmetric_difference(a.geometry).area < 1e-3
        assert (a.nucleus_geometry is None) == (b.nucleus_geometry is None)
        assert b.id != a.id  # fresh uuid4 each write


def test_writer_repairs_adversarial_input(tmp_path) -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # self-intersecting
    pinched_union = Polygon([(0, 0), (2, 0), (2, 2), (4, 2), (4, 4), (2, 4), (2, 2), (0, 2)])  # self-touching ring
    # two squares 0.004 px apart: valid now, overlapping edges (invalid MultiPolygon) after the 0.01 snap
    touching = shapely.MultiPolygon([box(0, 0, 10, 10), box(10.004, 0, 20, 10)])
    sliver_hole = Polygon(box(0, 0, 10, 10).exterior.coords, [[(1, 0.003), (5, 0.003), (5, 2), (1, 2)]])
    vanishing = box(0, 0, 0.003, 0.003)
    objs = [
        QuPathObject(bowtie, "annotation", "Tumor", None, {"prob: Tumor": float("nan"), "prob: Stroma": 0.25}),
        QuPathObject(pinched_union, "annotation", "", None, {"area": float("inf"), "big": 1e39, "ok": np.float32(0.1)}),
        QuPathObject(touching, "detection", None, None, {"n": np.int64(3)}),
        QuPathObject(sliver_hole, "tile", "Stroma", (0, 200, 0), {"p": 0.123456789}),
        QuPathObject(vanishing, "tile", "Stroma", (0, 200, 0)),
        QuPathObject(Point(1.23456, 7.891011), "annotation", name="pt"),
    ]
    for o in objs[:4]:
        assert shapely.set_precision(o.geometry, 0.01, mode="pointwise").is_valid is False or not o.geometry.is_valid
    out = write_objects(tmp_path / "adv.geojson", objs)
    feats = assert_qupath_conformant(out)
    assert len(feats) == 5  # the 0.003 px square has no area on QuPath's grid: dropped
    props = [f["properties"] for f in feats]
    assert props[0]["measurements"] == {"prob: Stroma": 0.25}
    assert props[0]["classification"]["name"] == "Tumor" and len(props[0]["classification"]["color"]) == 3
    assert "classification" not in props[1] and props[1]["measurements"] == {"ok": 0.1}
    assert props[2]["measurements"] == {"n": 3.0}
    assert props[3]["measurements"]["p"] == float(np.float32(0.123456789)) or \
        np.float32(props[3]["measurements"]["p"]) == np.float32(0.123456789)
    assert feats[4]["geometry"] == {"type": "Point", "coordinates": [1.23, 7.89]}
    back = read_objects(out)
    assert back[0].geometry.area == pytest.approx(50, abs=0.01)  # both triangles of the bowtie kept
    assert back[1].geometry.area == pytest.approx(8, abs=0.01)
    assert back[2].geometry.area == pytest.approx(200, abs=0.1)


def test_conformance_check_rejects_what_qupath_rejects(tmp_path) -> None:
    """The checker must fail on each rule the writer exists for."""
    good = {"type": "Feature", "id": "0b6c6a46-37a4-4b5b-9b9e-6a3b7e2ea0f1",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]},
            "properties": {"objectType": "tile", "isLocked": True, "classification": {"name": "A", "color": [1, 2, 3]},
                           "measurements": {"p": 0.5}}}
    path = tmp_path / "c.geojson"

    def check(feature: dict) -> None:
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
        assert_qupath_conformant(path)

    check(good)
    breaks = [
        {"properties": dict(good["properties"], classification={"name": "A"})},
        {"properties": dict(good["properties"], measurements={"p": float("nan")})},
        {"id": "PathTileObject"},
        {"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]}},
        {"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4.001, 0], [4, 4], [0, 4], [0, 0]]]}},
        {"properties": dict(good["properties"], isLocked=False)},
        {"properties": dict(good["properties"], metadata={"p": "1"})},
    ]
    for change in breaks:
        with pytest.raises(AssertionError):
            check(dict(good, **change))


def test_tile_objects_many_squares(tmp_path) -> None:
    n = 20000
    xy = np.stack(np.divmod(np.arange(n), 200), 1)[:, ::-1] * 224.0
    boxes = np.concatenate([xy, xy + 224.0], 1)
    probs = np.random.default_rng(0).random((n, 2)).astype(np.float32)
    probs[5, 0] = np.nan
    objs = tile_objects(boxes, measurements={"prob: A": probs[:, 0], "prob: B": probs[:, 1]},
                        class_names=["A" if p[0] > p[1] else "B" for p in probs], colors={"A": (255, 0, 0)})
    out = write_objects(tmp_path / "tiles.geojson", objs)
    feats = assert_qupath_conformant(out)
    assert len(feats) == n
    assert "prob: A" not in feats[5]["properties"]["measurements"]
    (ring,) = feats[7]["geometry"]["coordinates"]
    assert len(ring) == 5 and sorted(map(tuple, ring[:4])) == [(1568, 0), (1568, 224), (1792, 0), (1792, 224)]
    back = read_objects(out)
    assert [o.class_name for o in back] == [o.class_name for o in objs]
    assert back[9].measurements["prob: B"] == pytest.approx(float(probs[9, 1]), rel=1e-6)
    assert back[0].locked and back[0].object_type == "tile"


def test_read_rois_filters_by_class(tmp_path) -> None:
    path = data_file(GEOJSON + "coscia_TD_01_verysmall_mIF.geojson")
    objs = read_objects(path)
    everything = read_rois(path)
    only_1 = read_rois(path, classes=["class_1"])
    expected = shapely.union_all([o.geometry for o in objs if o.class_name == "class_1"])
    assert only_1.symmetric_difference(expected).area < 1e-6
    assert everything.area > only_1.area
    with pytest.raises(PathappError, match="class_1, class_2"):
        read_rois(path, classes=["Tumour"])


def test_read_rois_unclassified_by_qupaths_name() -> None:
    """QuPath calls annotations without a class "Unclassified"; --roi-class Unclassified selects them."""
    path = data_file(GEOJSON + "dlup_qupath05.geojson")
    assert all(o.class_name is None for o in read_objects(path))
    assert read_rois(path, classes=["Unclassified"]).equals(read_rois(path))
    with pytest.raises(PathappError, match=r"classes present: Unclassified\)"):
        read_rois(path, classes=["Tumor"])
