"""Read the objects in a QuPath data file (`data/<entryID>/data.qpdata`, QuPath 0.2–0.7) without Java.

A data file is a Java object stream (`PathIO.writeImageData`): a "Data file version N" string, the
image server as JSON (QuPath 0.3+; 0.2 wrote "Image path: ..."), the Locale, image type, stains,
workflow, the `PathObjectHierarchy`, a property map and "EOF". javaobj-py3 parses the stream; what
it cannot know is QuPath's own part, written here against qupath-core's sources (tags v0.2.0 to
v0.7.0, identical in what follows):

- `PathObject.writeExternal`: name, colour (Integer), then either the UUID, a field count and that
  many fields (data version 4) or a MetadataMap holding "Object ID" (3 and earlier), then the
  MeasurementList, the number of children and the children. `PathROIObject` adds locked (Boolean),
  PathClass, ROI and the class probability (double); `PathCellObject` the nucleus ROI;
  `TMACoreObject` isMissing (boolean).
- ROIs are written through serialisation proxies: rectangle/ellipse/line as x, y, x2, y2; polygon,
  polyline and points as float arrays; the legacy AreaROI as one float array per ring; GeometryROI
  as WKB. QuPath turns an ellipse into a 100-point polygon (JTS GeometricShapeFactory) on a 0.01 px
  grid; so does this reader.

Objects come back as `QuPathObject`s in QuPath's order (parents before children) with `parent` and
`children` set. TMA cores are left out (their contents are kept, nested under the core's parent).
Writing a data file stays with QuPath (or paquo): nothing here writes one.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from javaobj.constants import ClassDescFlags, StreamConstants, TerminalCode, TypeCode
from javaobj.v2.api import ObjectTransformer
from javaobj.v2.beans import BlockData, JavaArray, JavaEnum, JavaInstance, JavaString
from javaobj.v2.core import JavaStreamParser
from javaobj.v2.transformers import DefaultObjectTransformer
from shapely.geometry.base import BaseGeometry

from pathapp.errors import PathappError
from pathapp.qupath.geojson import QuPathObject, argb_to_rgb, rois_from_objects
from pathapp.qupath.project import ProjectEntry, QuPathProject, builder_metadata, is_pathapp_object, metadata_mpp

DATA_FILE = "data.qpdata"
# QuPath releases whose data-file code this reader follows (checked source by source, see above).
SUPPORTED_QUPATH = ((0, 2), (0, 7))
_DATA_VERSIONS = (2, 3, 4)
_PKG = "qupath.lib."
_OBJECT_TYPES = {
    _PKG + "objects.PathAnnotationObject": "annotation",
    _PKG + "objects.PathDetectionObject": "detection",
    _PKG + "objects.PathTileObject": "tile",
    _PKG + "objects.PathCellObject": "cell",
    _PKG + "objects.TMACoreObject": "tma_core",
    _PKG + "objects.PathRootObject": "root",
}
_ELLIPSE_POINTS = 100  # JTS GeometricShapeFactory's default, which QuPath uses for ellipses
_GRID = 100.0  # QuPath's GeometryFactory precision model: coordinates on a 0.01 px grid


class QpdataError(PathappError):
    """A data file that is missing, truncated, corrupt, or from a QuPath version not handled."""


@dataclass
class QpData:
    """What a data.qpdata holds. `width`, `height`, `mpp` come from the server JSON QuPath stores
    (0.3+); files written by QuPath 0.2 hold only an image path, so they are None there."""

    path: Path
    data_version: int
    qupath_version: str | None
    image_type: str | None
    server: dict = field(default_factory=dict)
    image_path: str | None = None
    width: int | None = None
    height: int | None = None
    mpp: float | None = None
    objects: list[QuPathObject] = field(default_factory=list)

    @property
    def roots(self) -> list[QuPathObject]:
        """The objects directly under the hierarchy's root."""
        return [o for o in self.objects if o.parent is None]


def read_qpdata(path: str | os.PathLike, object_types: Collection[str] | None = None) -> QpData:
    """Parse one data file; `object_types` (e.g. {"annotation"}) keeps only those objects, which
    saves building the geometry and measurements of every cell when only annotations are needed.
    Raises QpdataError with one line naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise QpdataError(f"{path}: no QuPath data file here; open the image in QuPath and save it (File › Save)")
    raw = path.read_bytes()
    stream = _Stream(io.BytesIO(raw), path)
    header = stream.next_content(required=True)
    if not isinstance(header, BlockData) or not header.data[2:].startswith(b"Data file version"):
        raise QpdataError(f"{path}: not a QuPath data file (no 'Data file version' header)")
    data_version = _data_version(header.data[2:].decode("utf-8", "replace"), path)
    server_text = stream.next_content(required=True)
    if not isinstance(server_text, JavaString):
        raise QpdataError(f"{path}: corrupt QuPath data file (no image server record)")
    data = _server_record(server_text.value, data_version, path)
    _check_version(data, path)
    contents = list(stream.rest())
    if not contents or not isinstance(contents[-1], JavaString) or contents[-1].value != "EOF":
        raise QpdataError(
            f"{path}: truncated QuPath data file (it stops before its end marker); "
            "restore it from QuPath's backup (data.qpdata.backup) or save the image again in QuPath"
        )
    hierarchy = next((c for c in contents if _class_name(c) == _PKG + "objects.hierarchy.PathObjectHierarchy"), None)
    if hierarchy is None:
        raise QpdataError(f"{path}: corrupt QuPath data file (no object hierarchy)")
    data.image_type = next((str(c.value) for c in contents if isinstance(c, JavaEnum)), None)
    root = _field(hierarchy, "rootObject")
    try:
        data.objects = list(_Decoder(path, data.qupath_version, object_types).objects(root))
    except (_Malformed, EOFError, struct.error, KeyError, IndexError, TypeError, ValueError,
            shapely.errors.ShapelyError) as e:
        raise QpdataError(f"{path}: corrupt QuPath data file ({_one_line(e)}); save the image again in QuPath") from e
    return data


def data_file(project: QuPathProject, entry: ProjectEntry) -> Path:
    """Where QuPath keeps an entry's objects: <project>/data/<entryID>/data.qpdata."""
    return project.dir / "data" / str(entry.entry_id) / DATA_FILE


def read_entry_objects(
    project: QuPathProject, entry: ProjectEntry, object_types: Collection[str] | None = None, *,
    include_pathapp: bool = False,
) -> list[QuPathObject]:
    """The objects QuPath saved for a project entry (of `object_types`, see read_qpdata), without
    those an earlier `pathapp infer --write-project` added (named "pathapp: ...") unless asked. An
    entry whose image was never saved in QuPath has no data file: that raises QpdataError (one
    line), as does a bad file."""
    path = data_file(project, entry)
    if not path.is_file():
        raise QpdataError(
            f"{project.path}: entry {entry.entry_id} ({entry.name}) has no data file ({path}): QuPath "
            "never saved objects for this image; open it in QuPath, annotate it and save"
        )
    objects = read_qpdata(path, object_types).objects
    return objects if include_pathapp else [o for o in objects if not is_pathapp_object(o.name)]


def read_entry_rois(project: QuPathProject, entry: ProjectEntry, classes: Collection[str] | None = None) -> BaseGeometry:
    """The union of an entry's area annotations (of `classes`; "Unclassified" for those without a
    class): the region to analyse. One-line QpdataError/GeoJSONError when there is none."""
    objects = read_entry_objects(project, entry, {"annotation"})
    return rois_from_objects(objects, classes, f"{project.path}: entry {entry.entry_id} ({entry.name})")


# ------------------------------------------------------------------------------------- the stream


class _Packed:
    """A primitive array's values. javaobj copies whatever load_array returns into a Python list
    (JavaArray.__init__) and keeps the original as JavaArray.data: iterating as empty keeps that
    copy (one Python float per vertex) from being made."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class _NumpyArrays(ObjectTransformer):
    """Primitive arrays (polygon vertices, WKB, measurement values) as numpy arrays, read in one go."""

    _DTYPES = {
        TypeCode.TYPE_BYTE: ">i1", TypeCode.TYPE_CHAR: ">u2", TypeCode.TYPE_DOUBLE: ">f8",
        TypeCode.TYPE_FLOAT: ">f4", TypeCode.TYPE_INTEGER: ">i4", TypeCode.TYPE_LONG: ">i8",
        TypeCode.TYPE_SHORT: ">i2", TypeCode.TYPE_BOOLEAN: ">u1",
    }

    def load_array(self, reader: Any, type_code: Any, size: int) -> _Packed | None:
        dtype = self._DTYPES.get(type_code)
        if dtype is None:
            return None
        n = size * np.dtype(dtype).itemsize
        buf = reader.file_descriptor.read(n)
        if len(buf) != n:
            raise EOFError("the stream ends inside an array")
        return _Packed(np.frombuffer(buf, dtype=dtype))


class _Stream(JavaStreamParser):
    """javaobj's parser, read one top-level object at a time, with Externalizable data read once.

    javaobj reads the block data of an Externalizable object once per class in its hierarchy, while
    Java (ObjectInputStream.readExternalData) reads it once for the object: QuPath's path objects
    are Externalizable subclasses of Externalizable classes, so they need the Java behaviour."""

    def __init__(self, fd: io.BytesIO, path: Path) -> None:
        super().__init__(fd, [DefaultObjectTransformer(), _NumpyArrays()])
        self._fd = fd
        self._path = path
        head = fd.read(4)
        if len(head) != 4 or struct.unpack(">HH", head) != (StreamConstants.STREAM_MAGIC, StreamConstants.STREAM_VERSION):
            raise QpdataError(f"{path}: not a QuPath data file (not a Java object stream)")

    def next_content(self, required: bool = False) -> Any:
        """The next top-level object; at the end of the stream EOFError, or QpdataError if `required`."""
        code = self._fd.read(1)
        if not code:
            if required:
                raise QpdataError(f"{self._path}: truncated QuPath data file (it ends after {self._fd.tell()} bytes)")
            raise EOFError("end of stream")
        if code[0] == TerminalCode.TC_RESET:
            self._reset()
            return self.next_content(required)
        try:
            return self._read_content(code[0], True)
        except Exception as e:  # javaobj fails on corrupt input in many ways (even UnboundLocalError)
            raise QpdataError(
                f"{self._path}: truncated or corrupt QuPath data file ({_one_line(e)}); "
                "restore it from QuPath's backup (data.qpdata.backup) or save the image again in QuPath"
            ) from e

    def rest(self) -> Iterator[Any]:
        while True:
            try:
                yield self.next_content()
            except EOFError:
                return

    def _read_class_data(self, instance: JavaInstance) -> None:
        cd = instance.classdesc
        if cd.desc_flags & ClassDescFlags.SC_EXTERNALIZABLE:
            instance.annotations = {cd: self._read_class_annotations(cd)}
            instance.field_data = {}
            instance.load_from_instance()
            return
        super()._read_class_data(instance)


def _data_version(header: str, path: Path) -> int:
    text = header[len("Data file version"):].strip()
    try:
        version = int(text)
    except ValueError:
        version = -1
    if version not in _DATA_VERSIONS:
        raise QpdataError(
            f"{path}: QuPath data file version {text!r}, from a QuPath release before 0.2 or after "
            f"{_version_text(SUPPORTED_QUPATH[1])}, which pathapp does not read; open and save it in QuPath "
            f"{_version_text(SUPPORTED_QUPATH[0])}–{_version_text(SUPPORTED_QUPATH[1])}, or export its objects as GeoJSON"
        )
    return version


def _server_record(text: str, data_version: int, path: Path) -> QpData:
    """The second record: "Image path: ..." (QuPath 0.2) or the ServerBuilderWrapper JSON (0.3+)."""
    data = QpData(path=path, data_version=data_version, qupath_version=None, image_type=None)
    if text.startswith("Image path: "):
        data.image_path = text[len("Image path: "):].strip()
        data.qupath_version = "0.2"  # data version 2 without JSON: QuPath 0.1.2–0.2.x
        return data
    try:
        wrapper = json.loads(text)
    except json.JSONDecodeError as e:
        raise QpdataError(f"{path}: corrupt QuPath data file (its image server record is not JSON: {e})") from e
    if not isinstance(wrapper, dict):
        raise QpdataError(f"{path}: corrupt QuPath data file (its image server record is not a JSON object)")
    data.qupath_version = wrapper.get("qupathVersion")
    server = wrapper.get("server") if isinstance(wrapper.get("server"), dict) else {}
    data.server = server
    meta = builder_metadata(server)
    data.width, data.height, data.mpp = meta.get("width"), meta.get("height"), metadata_mpp(meta)
    base = server
    while isinstance(base.get("builder"), dict):
        base = base["builder"]
    data.image_path = base.get("uri")
    return data


def _check_version(data: QpData, path: Path) -> None:
    """Refuse a release this reader was not checked against: its objects might be read wrongly."""
    found = data.qupath_version
    if found is None:
        return  # QuPath wrote no version (a development build); the data version was checked
    parts = []
    for piece in str(found).replace("-", ".").split(".")[:2]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    if len(parts) == 2 and SUPPORTED_QUPATH[0] <= tuple(parts) <= SUPPORTED_QUPATH[1]:
        return
    low, high = (_version_text(v) for v in SUPPORTED_QUPATH)
    raise QpdataError(
        f"{path}: written by QuPath {found}, which pathapp does not read (it reads QuPath {low}–{high} "
        "data files); export the objects as GeoJSON from QuPath (File › Export objects as GeoJSON)"
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _version_text(version: tuple[int, int]) -> str:
    return ".".join(str(v) for v in version)


# ------------------------------------------------------------------------ QuPath's object model


class _Malformed(Exception):
    """The stream parsed, but QuPath's part of it is not what QuPath writes."""


class _Block:
    """An Externalizable object's data as Java's readExternal sees it: objects in order, and the
    primitives (readInt, readDouble, readBoolean) from the block-data bytes between them."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items
        self._pos = 0
        self._bytes = b""

    def obj(self) -> Any:
        if self._bytes:
            raise _Malformed("unread primitive data before an object")
        if self._pos >= len(self._items) or isinstance(self._items[self._pos], BlockData):
            raise _Malformed("an object was expected")
        self._pos += 1
        return self._items[self._pos - 1]

    def _take(self, n: int) -> bytes:
        while len(self._bytes) < n and self._pos < len(self._items) and isinstance(self._items[self._pos], BlockData):
            self._bytes += self._items[self._pos].data
            self._pos += 1
        if len(self._bytes) < n:
            raise _Malformed("primitive data was expected")
        out, self._bytes = self._bytes[:n], self._bytes[n:]
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def double(self) -> float:
        return struct.unpack(">d", self._take(8))[0]

    def bool(self) -> bool:
        return self._take(1) != b"\x00"


class _Decoder:
    """Turns the parsed hierarchy into QuPathObjects, following qupath-core's readExternal."""

    def __init__(self, path: Path, version: str | None, object_types: Collection[str] | None = None) -> None:
        self.path = path
        self.version = version
        self.wanted = set(object_types) if object_types is not None else None
        self._classes: dict[int, tuple[str | None, tuple[int, int, int] | None]] = {}

    def objects(self, root: Any) -> Iterator[QuPathObject]:
        if _class_name(root) != _PKG + "objects.PathRootObject":
            raise _Malformed(f"the hierarchy's root is a {_class_name(root)}")
        yield from self._walk(root, None)

    def _walk(self, instance: Any, parent: QuPathObject | None) -> Iterator[QuPathObject]:
        """Depth first, parents before children, as QuPath stores them. Objects of types not wanted
        are read past without building their geometry and measurements."""
        kind = _OBJECT_TYPES.get(_class_name(instance))
        if kind is None:
            raise QpdataError(
                f"{self.path}: holds an object of class {_class_name(instance)} that pathapp does not know "
                f"({self._written_by()}); export the objects as GeoJSON from QuPath"
            )
        block = _Block(_annotations(instance))
        name = _string(block.obj())
        own_color = _int(block.obj())
        metadata, measurements, object_id = self._object_fields(block)
        children = [block.obj() for _ in range(block.int())]
        obj = None
        if kind != "root":
            locked, class_name, class_color, roi = self._roi_fields(block)
            nucleus = block.obj() if kind == "cell" else None
            if kind == "tma_core":
                block.bool()  # isMissing
            elif self.wanted is None or kind in self.wanted:
                obj = QuPathObject(
                    geometry=self._geometry(roi),
                    object_type=kind,
                    class_name=class_name,
                    color=class_color if class_name is not None else _rgb(own_color),
                    measurements=_measurements(measurements) if measurements is not None else {},
                    name=name,
                    id=object_id or metadata.get("Object ID"),
                    nucleus_geometry=self._geometry(nucleus),
                    locked=locked,
                    parent=parent,
                )
                if parent is not None:
                    parent.children.append(obj)
                yield obj
        for child in children:
            yield from self._walk(child, obj if obj is not None else parent)

    def _object_fields(self, block: _Block) -> tuple[dict[str, str], Any, str | None]:
        """PathObject.readExternal after name and colour: (metadata, measurement list, UUID)."""
        metadata: dict[str, str] = {}
        measurements = None
        object_id = None
        nxt = block.obj()
        if _class_name(nxt) == "java.util.UUID":  # data version 4
            object_id = _uuid(nxt)
            for _ in range(block.int()):
                item = block.obj()
                if _class_name(item) == _PKG + "objects.MetadataMap":
                    metadata = _metadata(item)
                elif item is not None:
                    measurements = item
            return metadata, measurements, object_id
        if _class_name(nxt) == _PKG + "objects.MetadataMap":
            metadata = _metadata(nxt)
            nxt = block.obj()
        return metadata, nxt, object_id

    def _roi_fields(self, block: _Block) -> tuple[bool, str | None, tuple[int, int, int] | None, Any]:
        """PathROIObject.readExternal: (locked, class name, class colour, ROI proxy); the class
        probability (a double) is read and dropped, as QuPath no longer shows it."""
        locked = False
        first = block.obj()
        if _class_name(first) == "java.lang.Boolean":
            locked = bool(first.value)
            first = block.obj()
        class_name, class_color = self._path_class(first) if first is not None else (None, None)
        roi = block.obj()
        block.double()
        return locked, class_name, class_color, roi

    def _path_class(self, instance: Any) -> tuple[str | None, tuple[int, int, int] | None]:
        """Full name ("Tumor: Positive" for a derived class) and colour of a serialised PathClass."""
        if _class_name(instance) != _PKG + "objects.classes.PathClass":
            raise _Malformed(f"a PathClass was expected, found {_class_name(instance)}")
        key = id(instance)
        if key not in self._classes:
            names = []
            node = instance
            while node is not None:
                names.append(_string(_field(node, "name")))
                node = _field(node, "parentClass")
            names = [n for n in reversed(names) if n]
            self._classes[key] = (": ".join(names) or None, _rgb(_int(_field(instance, "colorRGB"))))
        return self._classes[key]

    def _geometry(self, roi: Any) -> BaseGeometry | None:
        """A ROI's serialisation proxy as a shapely geometry in level-0 pixels."""
        if roi is None:
            return None
        name = _class_name(roi)
        builder = _ROI_BUILDERS.get(name)
        if builder is None:
            raise QpdataError(
                f"{self.path}: holds a ROI of class {name} that pathapp does not know ({self._written_by()}); "
                "export the objects as GeoJSON from QuPath"
            )
        return builder(roi)

    def _written_by(self) -> str:
        return f"written by QuPath {self.version}" if self.version else "QuPath version not recorded"


def _bounds(roi: Any) -> tuple[float, float, float, float]:
    x, y, x2, y2 = (float(_field(roi, k)) for k in ("x", "y", "x2", "y2"))
    return x, y, x2, y2


def _rectangle(roi: Any) -> BaseGeometry:
    x, y, x2, y2 = _bounds(roi)
    return shapely.box(x, y, x2, y2)


def _ellipse(roi: Any) -> BaseGeometry:
    """JTS GeometricShapeFactory.createEllipse with QuPath's 0.01 px precision model."""
    x, y, x2, y2 = _bounds(roi)
    rx, ry = (x2 - x) / 2, (y2 - y) / 2
    angles = np.arange(_ELLIPSE_POINTS) * (2 * math.pi / _ELLIPSE_POINTS)
    xs = _precise(rx * np.cos(angles) + x + rx)
    ys = _precise(ry * np.sin(angles) + y + ry)
    if rx == 0 or ry == 0:
        return shapely.Polygon()
    return shapely.Polygon(np.column_stack([xs, ys]))


def _precise(values: np.ndarray) -> np.ndarray:
    """JTS PrecisionModel.makePrecise for a 0.01 grid (Java Math.round: halves round up)."""
    return np.floor(values * _GRID + 0.5) / _GRID


def _line(roi: Any) -> BaseGeometry:
    x, y, x2, y2 = _bounds(roi)
    return shapely.LineString([(x, y), (x2, y2)])


def _vertices(roi: Any) -> np.ndarray:
    xs, ys = _floats(_field(roi, "x")), _floats(_field(roi, "y"))
    if len(xs) != len(ys):
        raise _Malformed("a ROI has different numbers of x and y coordinates")
    return np.column_stack([xs, ys])


def _polygon(roi: Any) -> BaseGeometry:
    return _area(_vertices(roi))


def _polyline(roi: Any) -> BaseGeometry:
    xy = _vertices(roi)
    return shapely.LineString(xy) if len(xy) >= 2 else shapely.LineString()


def _points(roi: Any) -> BaseGeometry:
    xy = _vertices(roi)
    return shapely.Point(xy[0]) if len(xy) == 1 else shapely.MultiPoint(xy)


def _legacy_area(roi: Any) -> BaseGeometry:
    """AreaROI: one float array per ring, as java.awt.geom.Area's path gives them (outer boundaries
    and holes that never cross), so the even-odd combination of the rings is the area."""
    rings = [np.column_stack([_floats(rx), _floats(ry)]) for rx, ry in zip(_values(_field(roi, "x")), _values(_field(roi, "y")))]
    out: BaseGeometry = shapely.Polygon()
    for ring in rings:
        out = shapely.symmetric_difference(out, _area(ring))
    return out


def _area(xy: np.ndarray) -> BaseGeometry:
    """A closed area from vertices; self-intersections resolved (QuPath goes through java.awt Area)."""
    if len(xy) < 3:
        return shapely.Polygon()
    poly = shapely.Polygon(xy)
    if poly.is_valid:
        return poly
    fixed = shapely.make_valid(poly)
    parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _wkb(roi: Any) -> BaseGeometry:
    return shapely.from_wkb(np.asarray(_values(_field(roi, "wkb")), dtype=np.int8).tobytes())


_ROI_BUILDERS = {
    _PKG + "roi.RectangleROI$SerializationProxy": _rectangle,
    _PKG + "roi.EllipseROI$SerializationProxy": _ellipse,
    _PKG + "roi.LineROI$SerializationProxy": _line,
    _PKG + "roi.PolygonROI$SerializationProxy": _polygon,
    _PKG + "roi.PolylineROI$SerializationProxy": _polyline,
    _PKG + "roi.PointsROI$SerializationProxy": _points,
    _PKG + "roi.AreaROI$SerializationProxy": _legacy_area,
    _PKG + "roi.GeometryROI$WKBSerializationProxy": _wkb,
}


# --------------------------------------------------------------------------- Java values in Python


def _class_name(value: Any) -> str | None:
    cd = getattr(value, "classdesc", None)
    return cd.name if cd is not None else None


def _annotations(instance: Any) -> list[Any]:
    """The block data and objects an Externalizable (or writeObject) class wrote, in order."""
    return [item for items in instance.annotations.values() for item in items]


def _field(instance: Any, name: str) -> Any:
    for fields in instance.field_data.values():
        for f, value in fields.items():
            if f.name == name:
                return value
    raise _Malformed(f"{_class_name(instance)} has no field {name!r}")


def _string(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, JavaString):
        return value.value
    raise _Malformed(f"a string was expected, found {_class_name(value) or type(value).__name__}")


def _int(value: Any) -> int | None:
    """A java.lang.Integer (QuPath's packed colours) or None (anything else QuPath ignores too)."""
    return int(value.value) if _class_name(value) == "java.lang.Integer" else None


def _rgb(packed: int | None) -> tuple[int, int, int] | None:
    return argb_to_rgb(packed) if packed is not None else None


def _floats(array: Any) -> np.ndarray:
    return np.asarray(_values(array), dtype=np.float64)


def _values(array: Any) -> Any:
    """A Java array's elements: a numpy array for primitives (see _Packed), else a list."""
    if isinstance(array, JavaArray):
        return array.data.values if isinstance(array.data, _Packed) else list(array)
    raise _Malformed(f"an array was expected, found {_class_name(array) or type(array).__name__}")


def _uuid(value: Any) -> str:
    high = _field(value, "mostSigBits") & 0xFFFFFFFFFFFFFFFF
    low = _field(value, "leastSigBits") & 0xFFFFFFFFFFFFFFFF
    return str(uuid.UUID(int=(high << 64) | low))


def _metadata(instance: Any) -> dict[str, str]:
    """MetadataMap.writeExternal: a version Integer, then the keys and the values as Object[]."""
    items = [i for i in _annotations(instance) if not isinstance(i, BlockData)]
    if len(items) != 3:
        raise _Malformed("a MetadataMap without keys and values")
    _, keys, values = items
    return {str(_string(k)): str(_string(v)) for k, v in zip(_values(keys), _values(values))}


def _measurements(instance: Any) -> dict[str, float]:
    """DefaultMeasurementList (a list of name/value objects) or NumericMeasurementList's
    FloatList/DoubleList (a list of names and one array of values)."""
    name = _class_name(instance) or ""
    if name == _PKG + "measurements.DefaultMeasurementList":
        return {str(_string(_field(m, "name"))): float(_field(m, "value")) for m in _java_list(_field(instance, "list"))}
    if name.startswith(_PKG + "measurements.NumericMeasurementList$"):
        names = [str(_string(n)) for n in _java_list(_field(instance, "names"))]
        values = _floats(_field(instance, "values"))
        if len(values) < len(names):
            raise _Malformed("a measurement list with fewer values than names")
        return dict(zip(names, values[: len(names)].tolist()))
    raise _Malformed(f"unknown measurement list {name}")


def _java_list(value: Any) -> list[Any]:
    """The elements of a serialised java.util.List, whichever implementation QuPath happened to use."""
    if value is None:
        return []
    if isinstance(value, JavaArray):
        return list(_values(value))
    if isinstance(value, list):  # ArrayList, LinkedList (javaobj's JavaList)
        return list(value)
    name = _class_name(value) or ""
    if name == "java.util.CollSer":  # List.of / List.copyOf: an int count, then the elements
        items = [i for i in _annotations(value) if not isinstance(i, BlockData)]
        return items
    if name.startswith("java.util.Collections$Unmodifiable") or name.startswith("java.util.Collections$Synchronized"):
        return _java_list(_field(value, "list") if name.endswith("List") else _field(value, "c"))
    if name == "java.util.Arrays$ArrayList":
        return _java_list(_field(value, "a"))
    raise _Malformed(f"unknown list class {name}")
