"""Read and write objects inside a QuPath project through paquo (QuPath's own Java code via JPype).

paquo is an optional extra and needs a QuPath installation; importing `paquo.projects` starts a JVM
(one per process), so it is imported here, lazily, and every failure to find QuPath becomes one
PathappError that says what to install. Objects pathapp writes are named "pathapp" or
"pathapp: <class>" (project.TAG) so that a rerun replaces them and leaves the user's objects alone.
Reading a project's objects needs no Java: pathapp.qupath.qpdata reads its data files; the reader
here is kept to check that one where QuPath is installed.

Writing works around what paquo 0.9.0's own saving does (projects.py, images.py):
- `QuPathProject.__exit__` saves even after an exception, and `save()` visits every entry and reads
  each one's data: the project is opened without the context manager, and only the written entry
  is saved (`entry.save()`, then `save(images=False)` for the project file);
- `entry.save()` skips an entry whose image is not at its URI (a log warning only): the URI is
  first pointed at where pathapp found the image, or the write refused, and the save is checked;
- the entry's data files are copied first and put back if any step fails: all or nothing;
- `hierarchy.add_*` adds under the root: QuPath's `resolveHierarchy()` then nests the objects under
  the user's annotations, as the Groovy import does;
- paquo refuses ':' in a class name, which QuPath reads as derived classes (`PathClass.fromString`
  splits at ':' and strips each part): names are split the same way here."""

from __future__ import annotations

import os
import shutil
import tempfile
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
from pathapp.qupath.project import TAG, is_pathapp_object, project_file, uri_to_path

# What QuPath (DefaultProjectImageEntry.saveImageData) writes in an entry's folder.
ENTRY_DATA_FILES = ("data.qpdata", "summary.json", "server.json")
CLASSES_FILE = Path("classifiers") / "classes.json"
INSTALL_HINT = (
    "install the bridge with pip install 'pathapp[qupath]', then QuPath with "
    "`python -m paquo get_qupath --install-path DIR 0.6.0` and set PAQUO_QUPATH_DIR=DIR/QuPath-0.6.0 "
    "(or use the GeoJSON files and the Groovy import script instead)"
)


class QuPathNotAvailableError(PathappError):
    """paquo or a QuPath installation is missing; `reason` says which, the message adds how to fix it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}; {INSTALL_HINT}")


def load_paquo() -> tuple[ModuleType, ModuleType]:
    """(paquo.projects, paquo.classes), or one clear error when paquo or QuPath is missing."""
    try:
        import paquo.classes
        import paquo.projects
    except ImportError as e:
        raise QuPathNotAvailableError(f"paquo is not installed ({e})") from e
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        where = os.environ.get("PAQUO_QUPATH_DIR") or "no PAQUO_QUPATH_DIR set"
        raise QuPathNotAvailableError(f"no usable QuPath installation ({where}: {e})") from e
    return paquo.projects, paquo.classes


def _find_entry(qp: Any, entry_id: int | str, path: Path) -> Any:
    entry = next((e for e in qp.images if str(e.entry_id) == str(entry_id)), None)
    if entry is None:
        ids = ", ".join(str(e.entry_id) for e in qp.images) or "none"
        raise PathappError(f"{path}: no image entry {entry_id} (entries: {ids}); check the entry id")
    return entry


@contextmanager
def open_entry(project_path: str | os.PathLike, entry_id: int | str) -> Iterator[tuple[Any, Any]]:
    """(paquo project, image entry) for an entry id, read-only."""
    projects, _ = load_paquo()
    path = project_file(project_path)
    with projects.QuPathProject(path, mode="r") as qp:
        yield qp, _find_entry(qp, entry_id, path)


def read_entry_objects(project_path: str | os.PathLike, entry_id: int | str, *, include_pathapp: bool = False) -> list[QuPathObject]:
    """The annotations and detections of an entry as QuPathObjects (pathapp's own left out by default)."""
    with open_entry(project_path, entry_id) as (_, entry):
        h = entry.hierarchy
        objs = [_to_object(o, "annotation") for o in h.annotations]
        for o in h.detections:  # paquo wraps every detection alike; ask QuPath which kind it is
            kind = "tile" if o.java_object.isTile() else "cell" if o.java_object.isCell() else "detection"
            objs.append(_to_object(o, kind))
    return [o for o in objs if include_pathapp or not is_pathapp_object(o.name)]


def write_entry_objects(project_path: str | os.PathLike, entry_id: int | str, objects: Sequence[QuPathObject],
                        image_path: Path | None = None) -> int:
    """Replace pathapp's earlier objects in an entry with `objects`; returns how many were written.

    The user's objects stay and the new ones are nested under them; new classes join the project's
    class list; measurements become Python floats (paquo rejects numpy scalars) and NaN/Inf are left
    out, as in the GeoJSON writer. `image_path` is where pathapp found the entry's image (see
    `entry_uri_update`). Nothing is written unless everything is (see the module docstring)."""
    projects, classes = load_paquo()
    for o in objects:
        if o.class_name:
            class_parts(o.class_name)  # refuse a bad name before anything is touched
    geoms = conform_geometries([o.geometry for o in objects])
    nuclei = conform_geometries([o.nucleus_geometry for o in objects])
    path = project_file(project_path)
    qp = projects.QuPathProject(path, mode="r+")  # not `with`: its exit saves every entry, even after an error
    entry = _find_entry(qp, entry_id, path)
    where = f"{path}: entry {entry_id} ({entry.image_name})"
    new_uri = entry_uri_update(entry.uri, image_path, where)
    if new_uri is not None:
        qp.update_image_paths(uri2uri={entry.uri: new_uri})
    known = {pc.id: pc for pc in qp.path_classes}
    for o in objects:
        if o.class_name and qupath_class_id(o.class_name) not in known:
            known[qupath_class_id(o.class_name)] = _path_class(classes, o.class_name, o.color)
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
            kwargs = {"path_class": known.get(qupath_class_id(obj.class_name)) if obj.class_name else None,
                      "measurements": clean_measurements(obj.measurements)}
            if obj.object_type == "cell" and nucleus is not None:
                new = h.add_cell(geom, nucleus_roi=nucleus, **kwargs)
            else:
                new = adders.get(obj.object_type, h.add_annotation)(geom, **kwargs)
            label = obj.name or obj.class_name
            new.name = f"{TAG}: {label}" if label else TAG
            new.locked = obj.locked or obj.object_type == "tile"
            added += 1
    h.java_object.resolveHierarchy()  # PathObjectHierarchy.resolveHierarchy(), QuPath 0.4.4-0.6.0
    h.flush(invalidate_proxy_cache=True)
    data_file = Path(entry.entry_path) / ENTRY_DATA_FILES[0]
    before, must_write = _stat(data_file), entry.is_changed()
    kept = [Path(entry.entry_path) / n for n in ENTRY_DATA_FILES] + [path, path.parent / CLASSES_FILE]
    with restore_on_failure(kept):
        entry.save()
        if must_write and _stat(data_file) == before:
            raise PathappError(f"{where}: QuPath did not save the entry (its image {entry.uri} cannot be read); "
                               "nothing was written")
        qp.save(images=False)  # the project file and class list (DefaultProject.syncChanges)
    return added


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def entry_uri_update(stored_uri: str, found: Path | None, where: str) -> str | None:
    """The URI an entry's image must get before writing: None when the stored one names an existing
    file; else the `file:` URI of where pathapp found the image (`read_project` follows QuPath's
    own search). paquo's `entry.save()` skips an entry whose image is not at its URI, so without
    this the objects would silently not be written; an image found nowhere is refused."""
    stored = uri_to_path(stored_uri)
    if stored is not None and Path(stored).is_file():
        return None
    hint = "relink it in QuPath (File › Project › Check project URIs), then write again"
    if found is None:
        raise PathappError(f"{where}: its image is not at {stored_uri} and was not found elsewhere; {hint}")
    target = Path(found) / stored.name if Path(found).is_dir() and stored is not None else Path(found)
    if not target.is_file():  # a DICOM series folder without the entry's file
        raise PathappError(f"{where}: its image is not at {stored_uri} nor at {target}; {hint}")
    return target.resolve().as_uri()


@contextmanager
def restore_on_failure(files: Sequence[Path]) -> Iterator[None]:
    """Copies of `files` that are put back (and those that were absent removed) if the block
    raises: QuPath writes an entry's files one after the other and the project files after them,
    so a failure at any step would otherwise leave a mix of old and new."""
    with tempfile.TemporaryDirectory(prefix=".pathapp-keep-") as keep:
        copies = {f: Path(keep) / str(i) for i, f in enumerate(files)}
        for f, copy in copies.items():
            if f.is_file():
                shutil.copy2(f, copy)
        try:
            yield
        except BaseException:
            for f, copy in copies.items():
                if copy.is_file():
                    tmp = f.with_name(f".{f.name}.restore")
                    shutil.copy2(copy, tmp)
                    os.replace(tmp, f)
                else:
                    f.unlink(missing_ok=True)
            raise


def class_parts(full_name: str) -> list[str]:
    """A class name as QuPath reads it: derived classes split at ':', each part stripped
    (`PathClass.fromString`, QuPath 0.4.4-0.6.0). paquo itself refuses ':' in a name."""
    parts = [p.strip() for p in full_name.split(":")]
    if not all(parts):
        raise PathappError(f"class name {full_name!r} has an empty part between ':'; rename the class")
    return parts


def qupath_class_id(full_name: str) -> str:
    """The id QuPath gives the class ("Tumor:Grade 3" -> "Tumor: Grade 3", PathClass.toString)."""
    return ": ".join(class_parts(full_name))


def _path_class(classes: ModuleType, full_name: str, color: tuple[int, int, int] | None) -> Any:
    """A paquo class for "Tumor" or a derived "Tumor: Positive" (paquo wants the parent chain)."""
    *parents, name = class_parts(full_name)
    parent = None
    for part in parents:
        parent = classes.QuPathPathClass(part, parent=parent)
    return classes.QuPathPathClass(name, color=color or class_color(full_name), parent=parent)


def write_geojson_to_project(
    project_path: str | os.PathLike, entry_id: int | str, files: Sequence[str | os.PathLike],
    image_path: Path | None = None,
) -> str:
    """`pathapp infer project.qpproj --write-project`: add the GeoJSON among `files` to the entry
    whose image pathapp read at `image_path`. Returns a line for the user.

    Without paquo or QuPath this raises QuPathNotAvailableError and the GeoJSON files stay where
    they are: the caller says once per run how to import them (`geojson_files`, `import_instructions`);
    other errors (no such entry, unreadable file, image not found) raise too."""
    load_paquo()
    objects = [o for p in geojson_files(files) for o in read_objects(p)]
    n = write_entry_objects(project_path, entry_id, objects, image_path)
    return f"added {n} objects to {project_path} entry {entry_id} (earlier pathapp objects replaced)"


def geojson_files(files: Sequence[str | os.PathLike]) -> list[Path]:
    """The QuPath GeoJSON among a slide's result files (what a project import takes)."""
    return [Path(f) for f in files if str(f).endswith(".geojson")]


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
