"""Read and write objects inside a QuPath project through paquo (QuPath's own Java code via JPype).

paquo is an optional extra and needs a QuPath installation; importing `paquo.projects` starts a JVM
(one per process), so it is imported here, lazily, and every failure to find QuPath becomes one
PathappError that says what to install. Objects pathapp writes are named "pathapp" or
"pathapp: <class>" (project.TAG) so that a rerun replaces them and leaves the user's objects alone.
Reading a project's objects needs no Java: pathapp.qupath.qpdata reads its data files."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from pathapp.errors import PathappError
from pathapp.qupath.geojson import (
    QuPathObject,
    class_color,
    clean_measurements,
    conform_geometries,
    read_objects,
)
from pathapp.qupath.project import PROJECT_FILE, TAG, is_pathapp_object
INSTALL_HINT = (
    "install the bridge with pip install 'pathapp[qupath]', then QuPath with "
    "`python -m paquo get_qupath --install-path DIR 0.6.0` and set PAQUO_QUPATH_DIR=DIR/QuPath-0.6.0 "
    "(or use the GeoJSON files and the Groovy import script instead)"
)


class QuPathNotAvailableError(PathappError):
    """paquo or a QuPath installation is missing."""


def load_paquo() -> tuple[ModuleType, ModuleType]:
    """(paquo.projects, paquo.classes), or one clear error when paquo or QuPath is missing."""
    try:
        import paquo.classes
        import paquo.projects
    except ImportError as e:
        raise QuPathNotAvailableError(f"paquo is not installed ({e}); {INSTALL_HINT}") from e
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        where = os.environ.get("PAQUO_QUPATH_DIR") or "no PAQUO_QUPATH_DIR set"
        raise QuPathNotAvailableError(f"no usable QuPath installation ({where}: {e}); {INSTALL_HINT}") from e
    return paquo.projects, paquo.classes


@contextmanager
def open_entry(project_path: str | os.PathLike, entry_id: int | str, mode: str = "r") -> Iterator[tuple[Any, Any]]:
    """(paquo project, image entry) for an entry id; the project is saved on exit unless mode is "r"."""
    projects, _ = load_paquo()
    path = Path(project_path)
    if path.is_dir():
        path = path / PROJECT_FILE
    if not path.is_file():
        raise PathappError(f"{path}: no QuPath project here; give the project.qpproj file or its folder")
    with projects.QuPathProject(path, mode=mode) as qp:
        entry = next((e for e in qp.images if str(e.entry_id) == str(entry_id)), None)
        if entry is None:
            ids = ", ".join(str(e.entry_id) for e in qp.images) or "none"
            raise PathappError(f"{path}: no image entry {entry_id} (entries: {ids}); check the entry id")
        yield qp, entry


def read_entry_objects(project_path: str | os.PathLike, entry_id: int | str, *, include_pathapp: bool = False) -> list[QuPathObject]:
    """The annotations and detections of an entry as QuPathObjects (pathapp's own left out by default)."""
    with open_entry(project_path, entry_id) as (_, entry):
        h = entry.hierarchy
        objs = [_to_object(o, "annotation") for o in h.annotations]
        for o in h.detections:  # paquo wraps every detection alike; ask QuPath which kind it is
            kind = "tile" if o.java_object.isTile() else "cell" if o.java_object.isCell() else "detection"
            objs.append(_to_object(o, kind))
    return [o for o in objs if include_pathapp or not is_pathapp_object(o.name)]


def write_entry_objects(project_path: str | os.PathLike, entry_id: int | str, objects: Sequence[QuPathObject]) -> int:
    """Replace pathapp's earlier objects in an entry with `objects`; returns how many were added.

    The user's objects stay; new classes join the project's class list; measurements become Python
    floats (paquo rejects numpy scalars) and NaN/Inf are left out, as in the GeoJSON writer."""
    _, classes = load_paquo()
    geoms = conform_geometries([o.geometry for o in objects])
    nuclei = conform_geometries([o.nucleus_geometry for o in objects])
    with open_entry(project_path, entry_id, mode="r+") as (qp, entry):
        known = {pc.id: pc for pc in qp.path_classes}
        for o in objects:
            if o.class_name and o.class_name not in known:
                known[o.class_name] = _path_class(classes, o.class_name, o.color)
        qp.path_classes = list(known.values())
        h = entry.hierarchy
        adders = {"annotation": h.add_annotation, "detection": h.add_detection, "tile": h.add_tile,
                  "cell": h.add_detection}  # a cell without a nucleus is imported as a detection
        added = 0
        with h.no_autoflush():
            for proxy in (h.annotations, h.detections):
                old = [o for o in proxy if is_pathapp_object(o.name)]
                if old:
                    proxy -= old
            for obj, geom, nucleus in zip(objects, geoms, nuclei):
                if geom is None:
                    continue
                kwargs = {"path_class": known.get(obj.class_name) if obj.class_name else None,
                          "measurements": clean_measurements(obj.measurements)}
                if obj.object_type == "cell" and nucleus is not None:
                    new = h.add_cell(geom, nucleus_roi=nucleus, **kwargs)
                else:
                    new = adders.get(obj.object_type, h.add_annotation)(geom, **kwargs)
                label = obj.name or obj.class_name
                new.name = f"{TAG}: {label}" if label else TAG
                new.locked = obj.locked or obj.object_type == "tile"
                added += 1
    return added


def _path_class(classes: ModuleType, full_name: str, color: tuple[int, int, int] | None) -> Any:
    """A paquo class for "Tumor" or a derived "Tumor: Positive" (paquo wants the parent chain)."""
    parent = None
    for part in full_name.split(": ")[:-1]:
        parent = classes.QuPathPathClass(part, parent=parent)
    return classes.QuPathPathClass(full_name.split(": ")[-1], color=color or class_color(full_name), parent=parent)


def write_geojson_to_project(
    project_path: str | os.PathLike, entry_id: int | str, files: Sequence[str | os.PathLike]
) -> str:
    """`pathapp infer project.qpproj --write-project`: add the GeoJSON among `files` to the entry.

    Without paquo or QuPath the GeoJSON files stay where they are and the returned message says how
    to import them; other errors (no such entry, unreadable file) raise. Returns a line for the user."""
    geojson_files = [Path(f) for f in files if str(f).endswith(".geojson")]
    try:
        load_paquo()
    except QuPathNotAvailableError as e:
        return f"{e}\n{import_instructions(geojson_files)}"
    objects = [o for p in geojson_files for o in read_objects(p)]
    n = write_entry_objects(project_path, entry_id, objects)
    return f"added {n} objects to {project_path} entry {entry_id} (earlier pathapp objects replaced)"


def import_instructions(files: Sequence[str | os.PathLike]) -> str:
    """What to tell a user whose results were written as GeoJSON because QuPath is not installed."""
    listed = "\n".join(f"  {f}" for f in files)
    return (
        f"wrote QuPath GeoJSON:\n{listed}\n"
        "To see them in QuPath: open the project, then Automate › Project scripts (or Script editor) › "
        "groovy/pathapp_import.groovy › Run for project; or drag the files onto the open image. "
        f"To write them into the project directly: {INSTALL_HINT}."
    )


def _to_object(o: Any, kind: str) -> QuPathObject:
    pc = o.path_class
    color = tuple(pc.color.to_rgb()) if pc is not None and pc.color is not None else None
    nucleus = None
    if kind == "cell" and o.java_object.getNucleusROI() is not None:
        from paquo.pathobjects import QuPathPathCellObject

        nucleus = QuPathPathCellObject(o.java_object).nucleus_roi
    return QuPathObject(
        geometry=o.roi,
        object_type=kind,
        class_name=pc.id if pc is not None else None,
        color=color,  # type: ignore[arg-type]
        measurements={str(k): float(v) for k, v in o.measurements.items()},
        name=o.name,
        nucleus_geometry=nucleus,
        locked=bool(o.locked),
    )
