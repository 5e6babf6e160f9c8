"""`pathapp export`: the objects of QuPath projects (or single data.qpdata files) as QuPath GeoJSON,
read without Java and written by the one GeoJSON writer (QuPath's rules: valid areas on its 0.01 px
grid, a colour for every class, finite measurements, fresh ids)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pathapp.errors import PathappError
from pathapp.qupath.geojson import QuPathObject, write_objects
from pathapp.qupath.project import is_project, read_project
from pathapp.qupath.qpdata import DATA_FILE, read_entry_objects, read_qpdata

_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


@dataclass
class ExportSummary:
    """Files written, and the inputs (entries) that failed with their one-line reason."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def export_objects(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    object_types: Collection[str] | None = None,
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> ExportSummary:
    """Write each project entry's objects to OUT/<entry ID>_<image name>.geojson (a data.qpdata
    given directly: OUT/<its folder name>.geojson). A bad entry is one line; the others go on."""
    out = Path(out)
    summary = ExportSummary()
    for raw in inputs:
        path = Path(raw)
        if is_project(path):
            project = read_project(path)
            if not project.entries:
                summary.failed.append((str(path), f"{project.path}: the project has no images"))
                echo(f"failed: {project.path}: the project has no images")
            for entry in project.entries:
                target = out / f"{entry.entry_id}_{_safe(Path(entry.name).stem)}.geojson"
                _export_one(f"{project.path}: entry {entry.entry_id} ({entry.name})", target, summary, echo,
                            lambda e=entry: read_entry_objects(project, e, object_types, include_pathapp=True))
        elif path.name == DATA_FILE or path.suffix == ".qpdata":
            target = out / f"{_safe(path.parent.name if path.name == DATA_FILE else path.stem)}.geojson"
            _export_one(str(path), target, summary, echo, lambda p=path: read_qpdata(p, object_types).objects)
        else:
            reason = f"{path}: not a QuPath project (project.qpproj or its folder) nor a data.qpdata file"
            summary.failed.append((str(path), reason))
            echo(f"failed: {reason}")
    return summary


def _export_one(label: str, target: Path, summary: ExportSummary, echo: Callable[[str], None],
                read: Callable[[], list[QuPathObject]]) -> None:
    try:
        objects = read()
        write_objects(target, objects)
    except PathappError as e:
        summary.failed.append((label, str(e)))
        echo(f"failed: {e}")
        return
    summary.written.append(target)
    echo(f"{label}: {len(objects)} objects -> {target}")


def _safe(name: str) -> str:
    """A file name from an image name (no path separators or characters Windows refuses)."""
    return _UNSAFE.sub("_", name).strip(" .") or "image"
