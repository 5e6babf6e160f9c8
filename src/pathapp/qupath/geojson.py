"""QuPath's GeoJSON dialect: one reader for every shape QuPath writes or reads, one writer that
follows every "must" of ../shared/docs/INTEROP.md (QuPath 0.6 rejects invalid polygons, a class
without a colour, NaN measurements, and duplicates objects whose ids repeat)."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from pathapp.atomic import atomic_write_text
from pathapp.errors import PathappError

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")
# QuPath 0.2/0.3 wrote the Java class name as the feature id.
_LEGACY_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathTileObject": "tile",
    "PathCellObject": "cell",
}
GRID = 0.01  # QuPath 0.6 snaps every coordinate to this grid on import
UNCLASSIFIED = "Unclassified"  # how QuPath names objects without a class (summary.json, the class list)
_F32_MAX = float(np.finfo(np.float32).max)


class GeoJSONError(PathappError):
    """A GeoJSON file QuPath could not have written (or we cannot read)."""


@dataclass
class QuPathObject:
    """One QuPath object. `color` is the class colour, or the object's own colour when unclassified.

    `parent` and `children` give QuPath's nesting where the source has it (a data.qpdata); they are
    left out of comparisons and repr, which would otherwise walk the whole hierarchy."""

    geometry: BaseGeometry
    object_type: str = "annotation"
    class_name: str | None = None
    color: tuple[int, int, int] | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    id: str | None = None
    nucleus_geometry: BaseGeometry | None = None
    locked: bool = False
    parent: QuPathObject | None = field(default=None, repr=False, compare=False)
    children: list[QuPathObject] = field(default_factory=list, repr=False, compare=False)


# ---------------------------------------------------------------------------------------------- read


def read_objects(source: str | os.PathLike | Mapping | Sequence) -> list[QuPathObject]:
    """Objects from a QuPath GeoJSON file (.geojson/.json, .gz, .zip) or already-parsed JSON."""
    label = str(source) if isinstance(source, (str, os.PathLike)) else "<geojson>"
    data = _load(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    features = _features(data, label)
    return [_to_object(f, i, label) for i, f in enumerate(features)]


def read_rois(path: str | os.PathLike, classes: Iterable[str] | None = None) -> BaseGeometry:
    """Union of the annotation areas in a QuPath export, optionally only those of `classes`
    ("Unclassified" selects the annotations without a class, as QuPath names them).

    Points and lines are ignored (they have no area). Raises if nothing is left, so that a typo
    in a class name never silently means "the whole slide"."""
    return rois_from_objects(read_objects(path), classes, str(path))


def rois_from_objects(
    objects: Sequence[QuPathObject], classes: Iterable[str] | None = None, label: str = "<objects>"
) -> BaseGeometry:
    """The union of the annotation areas among `objects` (see read_rois); `label` names the source."""
    wanted = set(classes) if classes is not None else None
    areas = [
        _polygonal(shapely.make_valid(o.geometry))
        for o in objects
        if o.object_type == "annotation" and (wanted is None or (o.class_name or UNCLASSIFIED) in wanted)
    ]
    areas = [a for a in areas if not a.is_empty]
    if not areas:
        present = sorted({o.class_name or UNCLASSIFIED for o in objects if o.object_type == "annotation"})
        which = f" of class {', '.join(sorted(wanted))}" if wanted is not None else ""
        raise GeoJSONError(
            f"{label}: no annotation polygons{which} (annotation classes present: "
            f"{', '.join(present) or 'none'}); draw or export area annotations in QuPath, or fix --roi-class"
        )
    return shapely.union_all(areas)


def _load(path: Path) -> Any:
    if not path.is_file():
        raise GeoJSONError(f"{path}: file not found; give the path of a QuPath GeoJSON export")
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.lower().endswith((".geojson", ".json"))]
                merged: list = []
                for n in names:
                    merged.extend(_features(json.loads(z.read(n).decode("utf-8")), f"{path}:{n}"))
                return merged
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise GeoJSONError(f"{path}: not readable as GeoJSON ({e}); export it again from QuPath") from e


def _features(data: Any, label: str) -> list[dict]:
    """Feature dicts from a FeatureCollection, a Feature, a list of Features, or a bare Geometry."""
    if isinstance(data, list):
        out: list[dict] = []
        for item in data:
            out.extend(_features(item, label))
        return out
    if not isinstance(data, Mapping):
        raise GeoJSONError(f"{label}: expected a GeoJSON object or array, found {type(data).__name__}")
    kind = data.get("type")
    if kind == "FeatureCollection":
        return list(data.get("features") or [])
    if kind == "Feature":
        return [dict(data)]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
                "GeometryCollection"):
        return [{"type": "Feature", "geometry": dict(data), "properties": {}}]
    raise GeoJSONError(f"{label}: unknown GeoJSON type {kind!r}; expected a FeatureCollection or Feature")


def _to_object(feat: Mapping, index: int, label: str) -> QuPathObject:
    props = feat.get("properties") or {}
    geom_json = feat.get("geometry")
    if not geom_json:
        raise GeoJSONError(f"{label}: feature {index} has no geometry; QuPath cannot import it either")
    try:
        geometry = shape(geom_json)
        nucleus = shape(feat["nucleusGeometry"]) if feat.get("nucleusGeometry") else None
    except (ValueError, TypeError, KeyError, AttributeError, shapely.errors.GEOSException) as e:
        raise GeoJSONError(f"{label}: feature {index} has a malformed geometry ({e})") from e
    raw_id = feat.get("id")
    class_name, class_color = _classification(props.get("classification"))
    own_color = _rgb(props.get("color"))
    return QuPathObject(
        geometry=geometry,
        object_type=_object_type(props, raw_id),
        class_name=class_name,
        color=class_color if class_name is not None else own_color,
        measurements=_measurements(props.get("measurements")),
        name=props.get("name"),
        id=raw_id if _is_uuid(raw_id) else None,
        nucleus_geometry=nucleus,
        locked=bool(props.get("isLocked", False)),
    )


def _object_type(props: Mapping, raw_id: Any) -> str:
    for key in ("objectType", "object_type", "type"):
        value = props.get(key)
        if isinstance(value, str) and value.lower() in OBJECT_TYPES:
            return value.lower()
    if isinstance(raw_id, str) and raw_id in _LEGACY_IDS:
        return _LEGACY_IDS[raw_id]
    return "annotation"


def _classification(value: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    if isinstance(value, str):
        return (value or None), None
    if not isinstance(value, Mapping):
        return None, None
    name = value.get("name")
    if not name and value.get("names"):
        name = ": ".join(str(n) for n in value["names"])
    elif name and isinstance(value.get("parentClass"), Mapping):  # 0.2 wrote a derived class as a chain
        parent, _ = _classification(value["parentClass"])
        name = f"{parent}: {name}" if parent else name
    color = _rgb(value.get("color", value.get("colorRGB")))
    return (str(name) if name else None), color


def _rgb(value: Any) -> tuple[int, int, int] | None:
    """An [r, g, b] list or a packed (A)RGB int (QuPath stores signed 32-bit ARGB) as (r, g, b)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return argb_to_rgb(value)
    if isinstance(value, Sequence) and len(value) >= 3:
        return tuple(int(c) for c in value[:3])  # type: ignore[return-value]
    return None


def argb_to_rgb(packed: int) -> tuple[int, int, int]:
    """QuPath's packed colour int (signed 32-bit ARGB) as (r, g, b)."""
    packed &= 0xFFFFFFFF
    return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255


def _measurements(value: Any) -> dict[str, float]:
    """0.4+ map name -> number, or the 0.2/0.3 list of {name, value}; "NaN"/"Infinity" strings too."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = ((m.get("name"), m.get("value")) for m in value if isinstance(m, Mapping))
    else:
        return {}
    out: dict[str, float] = {}
    for k, v in items:
        if k is None:
            continue
        try:
            out[str(k)] = float("nan") if v is None else float(v)
        except (TypeError, ValueError):
            continue
    return out


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- write


def write_objects(path: str | os.PathLike, objects: Sequence[QuPathObject]) -> Path:
    """Write `objects` as a QuPath FeatureCollection, atomically (temp name, then rename).

    Polygons are made valid, snapped to QuPath's 0.01 grid and re-checked after snapping; objects
    whose area vanishes are dropped. Every object gets a fresh uuid4. Returns the path written."""
    geoms = _geometries_json(conform_geometries([o.geometry for o in objects]))
    nuclei = _geometries_json(conform_geometries([o.nucleus_geometry for o in objects]))
    features = []
    for obj, geom, nucleus in zip(objects, geoms, nuclei):
        if geom is None:
            continue
        feature = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geom, "properties": _properties(obj)}
        if nucleus is not None and obj.object_type == "cell":
            feature["nucleusGeometry"] = nucleus
        features.append(feature)
    text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text)


def tile_objects(
    boxes: np.ndarray,
    *,
    object_type: str = "tile",
    measurements: Mapping[str, np.ndarray] | None = None,
    class_names: Sequence[str | None] | None = None,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
) -> list[QuPathObject]:
    """Square/rectangular tile objects from an (N, 4) array of x0, y0, x1, y1 (level-0 px).

    Built vectorised (shapely.box over the whole array, one tolist per measurement column) so that
    tens of thousands of tiles cost milliseconds; `write_objects` then needs no per-tile repair."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    polys = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    columns = {k: np.asarray(v, dtype=np.float64).reshape(-1).tolist() for k, v in (measurements or {}).items()}
    for k, col in columns.items():
        if len(col) != len(polys):
            raise ValueError(f"measurement {k!r} has {len(col)} values for {len(polys)} tiles")
    colors = colors or {}
    out = []
    for i, poly in enumerate(polys):
        cls = class_names[i] if class_names is not None else None
        out.append(
            QuPathObject(
                geometry=poly,
                object_type=object_type,
                class_name=cls,
                color=colors.get(cls) if cls else None,
                measurements={k: col[i] for k, col in columns.items()},
                locked=object_type == "tile",
            )
        )
    return out


def class_color(name: str) -> tuple[int, int, int]:
    """A stable colour for a class that has none (QuPath throws on a classification without colour)."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return digest[0], digest[1], digest[2]


def _properties(obj: QuPathObject) -> dict[str, Any]:
    if obj.object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, not {obj.object_type!r}")
    props: dict[str, Any] = {"objectType": obj.object_type}
    if obj.name:
        props["name"] = str(obj.name)
    if obj.class_name:
        color = obj.color or class_color(obj.class_name)
        props["classification"] = {"name": str(obj.class_name), "color": _rgb_json(color)}
    elif obj.color is not None:
        props["color"] = _rgb_json(obj.color)
    if obj.locked or obj.object_type == "tile":
        props["isLocked"] = True
    measurements = clean_measurements(obj.measurements)
    if measurements:
        props["measurements"] = measurements
    return props


def _rgb_json(color: Sequence[Any]) -> list[int]:
    return [min(255, max(0, int(round(float(c))))) for c in color[:3]]


def clean_measurements(values: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only, as the shortest decimal that gives the same float32 QuPath stores."""
    out: dict[str, float] = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(f) or abs(f) > _F32_MAX:
            continue
        out[str(k)] = float(str(np.float32(f)))
    return out


def conform_geometries(geoms: Sequence[BaseGeometry | None]) -> list[BaseGeometry | None]:
    """Vectorised: areas made valid (polygonal parts kept), snapped to the 0.01 grid, and checked
    again after snapping; None where nothing is left. Valid squares cost no per-object work."""
    if not geoms:
        return []
    empty = shapely.Point()
    present = np.array([g is not None and not g.is_empty for g in geoms])
    arr = np.array([g if p else empty for g, p in zip(geoms, present)], dtype=object)
    area = present & np.isin(shapely.get_type_id(arr), (3, 6, 7))  # Polygon, MultiPolygon, Collection
    for i in np.flatnonzero(area & ((shapely.get_type_id(arr) == 7) | ~shapely.is_valid(arr))):
        arr[i] = _polygonal(shapely.make_valid(arr[i]))
    snapped = arr.copy()
    off = _off_grid(arr)
    snapped[off] = shapely.set_precision(arr[off], GRID)
    for i in np.flatnonzero(area & ~shapely.is_valid(snapped)):
        snapped[i] = shapely.set_precision(_polygonal(shapely.make_valid(snapped[i])), GRID)
    out: list[BaseGeometry | None] = []
    for g, p, a in zip(snapped, present, area):
        if a:
            g = _polygonal(g)
            ok = not g.is_empty and g.is_valid
        else:
            ok = p and not g.is_empty
        out.append(g if ok else None)
    return out


def _off_grid(arr: np.ndarray) -> np.ndarray:
    """Which geometries have a coordinate that is not already on QuPath's 0.01 grid."""
    coords, index = shapely.get_coordinates(arr, return_index=True)
    scaled = coords / GRID
    bad = np.any(np.abs(scaled - np.round(scaled)) > 1e-6, axis=1)
    return np.bincount(index[bad], minlength=len(arr)) > 0


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Only the areas of a geometry (make_valid may return lines and points beside polygons)."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    if geom.geom_type == "GeometryCollection":
        parts = [_polygonal(g) for g in geom.geoms]
        return shapely.union_all([p for p in parts if not p.is_empty])
    return shapely.Polygon()


def _geometries_json(geoms: Sequence[BaseGeometry | None]) -> list[dict | None]:
    """GeoJSON geometry mappings with coordinates rounded to QuPath's 2 decimals.

    Hole-free polygons (every tile) take a vectorised path: one get_coordinates for all of them."""
    out: list[dict | None] = [None] * len(geoms)
    simple = [i for i, g in enumerate(geoms) if g is not None and g.geom_type == "Polygon" and not g.interiors]
    if simple:
        rings = shapely.get_exterior_ring(np.array([geoms[i] for i in simple], dtype=object))
        counts = shapely.get_num_coordinates(rings)
        coords = np.round(shapely.get_coordinates(rings), 2).tolist()
        start = 0
        for i, n in zip(simple, counts.tolist()):
            out[i] = {"type": "Polygon", "coordinates": [coords[start : start + n]]}
            start += n
    for i, g in enumerate(geoms):
        if g is not None and out[i] is None:
            out[i] = _round_coords(mapping(g))
    return out


def _round_coords(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _round_coords(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and isinstance(obj[0], (int, float)):
            return [round(float(c), 2) for c in obj]
        return [_round_coords(c) for c in obj]
    return obj
