"""The "must" rules of ../shared/docs/INTEROP.md for QuPath GeoJSON, as one reusable check.

Any test that writes GeoJSON for QuPath (tiles, inference, the QuPath bridge) calls
`assert_qupath_conformant(path)`. It re-derives every rule from the file itself, independently of
the writer in pathapp.qupath.geojson, so a writer bug cannot hide behind its own helpers."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import geojson
import numpy as np
import shapely
from shapely.geometry import shape

OBJECT_TYPES = {"annotation", "detection", "tile", "cell"}
F32_MAX = float(np.finfo(np.float32).max)


def assert_qupath_conformant(path: str | Path) -> list[dict]:
    """Fail with a precise message unless `path` is GeoJSON QuPath 0.4–0.7 imports unchanged.

    Returns the features so callers can make their own assertions on them."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text, parse_constant=_reject_constant)
    assert data.get("type") == "FeatureCollection", f"{path}: top level must be a FeatureCollection"
    parsed = geojson.loads(text)
    assert parsed.is_valid, f"{path}: not valid GeoJSON: {parsed.errors()}"
    seen: set[str] = set()
    for i, feat in enumerate(data["features"]):
        where = f"{path}: feature {i}"
        assert feat.get("type") == "Feature", f"{where}: type must be Feature"
        fid = feat.get("id")
        assert isinstance(fid, str), f"{where}: id must be a UUID string"
        assert _uuid_version(fid) == 4, f"{where}: id {fid} is not a uuid4 (QuPath replaces it)"
        assert fid not in seen, f"{where}: id {fid} repeats (QuPath would duplicate or prompt)"
        seen.add(fid)
        props = feat.get("properties")
        assert isinstance(props, dict), f"{where}: properties missing"
        kind = props.get("objectType")
        assert kind in OBJECT_TYPES, f"{where}: objectType {kind!r} not in {sorted(OBJECT_TYPES)}"
        _check_geometry(feat.get("geometry"), where)
        if "nucleusGeometry" in feat:
            assert kind == "cell", f"{where}: nucleusGeometry on a {kind}"
            _check_geometry(feat["nucleusGeometry"], where + " nucleus")
        assert "nucleusGeometry" not in props, f"{where}: nucleusGeometry belongs beside geometry"
        if "classification" in props:
            _check_classification(props["classification"], where)
        if "color" in props:
            _check_rgb(props["color"], where + " color")
        if kind == "tile":
            assert props.get("isLocked") is True, f"{where}: tiles must be locked"
        if kind != "annotation":
            assert "metadata" not in props, f"{where}: QuPath 0.5+ drops metadata on {kind}s"
        if "measurements" in props:
            _check_measurements(props["measurements"], where)
    return data["features"]


def _uuid_version(value: str) -> int | None:
    try:
        return uuid.UUID(value).version
    except ValueError:
        return None


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"bare {name} in JSON: QuPath < 0.5 cannot parse it")


def _check_classification(value: Any, where: str) -> None:
    assert isinstance(value, dict), f"{where}: classification must be an object"
    assert isinstance(value.get("name"), str) and value["name"], f"{where}: classification without a name"
    assert "color" in value, f"{where}: classification without color makes QuPath throw"
    _check_rgb(value["color"], where + " classification color")


def _check_rgb(value: Any, where: str) -> None:
    assert isinstance(value, list) and len(value) == 3, f"{where}: must be [r, g, b]"
    for c in value:
        assert isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255, f"{where}: {value}"


def _check_measurements(value: Any, where: str) -> None:
    assert isinstance(value, dict), f"{where}: measurements must be a map name -> number"
    for name, v in value.items():
        assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{where}: {name}={v!r} not a number"
        assert math.isfinite(v), f"{where}: {name} is not finite"
        assert abs(v) <= F32_MAX, f"{where}: {name}={v} overflows QuPath's float32"


def _check_geometry(geom: Any, where: str) -> None:
    assert isinstance(geom, dict) and "type" in geom, f"{where}: geometry missing"
    coords = _all_coordinates(geom)
    assert coords, f"{where}: empty geometry"
    for c in coords:
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in c), f"{where}: bad coordinate {c}"
        assert all(abs(v * 100 - round(v * 100)) < 1e-6 for v in c), f"{where}: {c} has more than 2 decimals"
    for ring in _rings(geom):
        assert len(ring) >= 4 and ring[0] == ring[-1], f"{where}: ring not closed"
    g = shape(geom)
    if g.geom_type in ("Polygon", "MultiPolygon", "GeometryCollection"):
        assert g.is_valid, f"{where}: invalid polygon: {shapely.is_valid_reason(g)}"
        snapped = shapely.set_precision(g, 0.01, mode="pointwise")  # what QuPath 0.6 does on import
        assert snapped.is_valid, f"{where}: invalid after QuPath's 0.01 snap: {shapely.is_valid_reason(snapped)}"
        assert not g.is_empty and g.area > 0, f"{where}: polygon without area"


def _all_coordinates(geom: dict) -> list[list[float]]:
    if geom["type"] == "GeometryCollection":
        return [c for g in geom["geometries"] for c in _all_coordinates(g)]
    out: list[list[float]] = []

    def walk(x: Any) -> None:
        if x and isinstance(x[0], (int, float)):
            out.append(x)
        else:
            for y in x:
                walk(y)

    walk(geom["coordinates"])
    return out


def _rings(geom: dict) -> list[list]:
    if geom["type"] == "Polygon":
        return list(geom["coordinates"])
    if geom["type"] == "MultiPolygon":
        return [r for p in geom["coordinates"] for r in p]
    if geom["type"] == "GeometryCollection":
        return [r for g in geom["geometries"] for r in _rings(g)]
    return []
