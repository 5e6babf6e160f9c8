"""Read a QuPath project (`project.qpproj`, QuPath 0.2–0.7) without Java: its image entries, where
their images are now (relocated the way QuPath does it), their µm/px, and the project's classes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlparse

from pathapp.errors import PathappError
from pathapp.qupath.geojson import argb_to_rgb

PROJECT_FILE = "project.qpproj"
TAG = "pathapp"  # objects pathapp writes into a project are named "pathapp" or "pathapp: <class>"
DICOM_SUFFIXES = (".dcm", ".dicom")
# Top-level folders of a project that hold QuPath's (and pathapp's) own files, never images.
_SKIP_DIRS = {"data", "classifiers", "scripts", "pathapp", ".git"}
# Wrapping server builders that move pixels (QuPath's ImageServers registers them under these
# builderType names in 0.4.4-0.6.0: RotatedImageServer, AffineTransformImageServer,
# CroppedImageServer). QuPath shows and annotates the image in the moved space; pathapp reads the
# file as stored, so its results would land in the wrong place. The other wrappers (channels,
# color, pyramidize, swapRedBlue, color_deconvolved, normalized, typeConvert, sliced, z_projected)
# keep x and y.
MOVING_BUILDERS = {"rotated": "rotated", "affine": "affine-transformed", "cropped": "cropped"}


class ProjectError(PathappError):
    """The project file itself is missing or unreadable."""


@dataclass
class ProjectEntry:
    """One image of a project. `error` says why it cannot be analysed (then image_path is None)."""

    entry_id: int | str
    name: str
    uri: str | None
    image_path: Path | None
    mpp: float | None
    width: int | None
    height: int | None
    error: str | None = None
    provider: str | None = None
    args: list[str] = field(default_factory=list)
    channels: int | None = None  # as QuPath recorded them (3 for RGB)


@dataclass
class QuPathProject:
    """A parsed project; `uri` is where the .qpproj was when QuPath last saved it."""

    path: Path
    version: str | None
    entries: list[ProjectEntry]
    classes: dict[str, tuple[int, int, int]]
    uri: str | None = None

    @property
    def dir(self) -> Path:
        return self.path.parent


def is_project(path: str | os.PathLike) -> bool:
    """True for a project.qpproj file, or a folder that holds one."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".qpproj") or (p.is_dir() and (p / PROJECT_FILE).is_file())


def project_file(path: str | os.PathLike) -> Path:
    """The project.qpproj a user named by the file or by its folder; one line when there is none."""
    qpproj = Path(path)
    if qpproj.is_dir():
        qpproj = qpproj / PROJECT_FILE
    if not qpproj.is_file():
        raise ProjectError(f"{qpproj}: no QuPath project here; give the project.qpproj file or its folder")
    return qpproj


def read_project(path: str | os.PathLike) -> QuPathProject:
    """Parse a project; missing images become per-entry errors, not an exception."""
    qpproj = project_file(path)
    try:
        data = json.loads(qpproj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ProjectError(f"{qpproj}: not a readable QuPath project ({e}); open it in QuPath to repair it") from e
    if not isinstance(data, dict) or not isinstance(data.get("images", []), list):
        raise ProjectError(f"{qpproj}: not a QuPath project (no 'images' list)")
    qpproj = qpproj.resolve()
    old_uri = data.get("uri")
    finder = _FileFinder(qpproj.parent)
    entries = [_entry(e, i, qpproj, old_uri, finder) for i, e in enumerate(data.get("images", []))]
    return QuPathProject(qpproj, data.get("version"), entries, read_classes(qpproj.parent), old_uri)


def read_classes(project_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Class name -> (r, g, b) from classifiers/classes.json (packed ARGB ints); {} if absent."""
    path = project_dir / "classifiers" / "classes.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProjectError(f"{path}: unreadable class list ({e}); re-save the project in QuPath") from e
    out: dict[str, tuple[int, int, int]] = {}
    for c in data.get("pathClasses", []):
        if isinstance(c, dict) and c.get("name"):
            out[str(c["name"])] = argb_to_rgb(int(c.get("color", 0)))
    return out


def is_pathapp_object(name: str | None) -> bool:
    """True for the objects an earlier pathapp run wrote into a project (see TAG)."""
    return name is not None and (name == TAG or name.startswith(TAG + ":"))


def results_dir(project: QuPathProject, entry: ProjectEntry) -> Path:
    """Where pathapp's results for an entry go: <project dir>/pathapp/<entryID>/."""
    return project.dir / "pathapp" / str(entry.entry_id)


def _entry(raw: dict, index: int, qpproj: Path, old_uri: str | None, finder: _FileFinder) -> ProjectEntry:
    entry_id = raw.get("entryID", index + 1)
    name = raw.get("imageName") or f"entry {entry_id}"
    chain = _builder_chain(raw.get("serverBuilder") or {})
    base = chain[-1] if chain else {}
    meta = builder_metadata(raw.get("serverBuilder") or {})
    channels = meta.get("channels")
    entry = ProjectEntry(
        entry_id=entry_id,
        name=name,
        uri=base.get("uri"),
        image_path=None,
        mpp=metadata_mpp(meta),
        width=meta.get("width"),
        height=meta.get("height"),
        provider=base.get("providerClassName"),
        args=[str(a) for a in base.get("args", [])],
        channels=len(channels) if isinstance(channels, list) else channels if isinstance(channels, int) else None,
    )
    where = f"{qpproj}: entry {entry_id} ({name})"
    moved = moving_transforms(chain)
    if moved:
        entry.error = (f"{where}: QuPath shows this image {' and '.join(moved)}, but pathapp reads the file as "
                       "stored, so results would land in the wrong place; add the image to a project again "
                       "without rotation or crop to analyse it")
        return entry
    if not entry.uri:
        kinds = " > ".join(str(b.get("builderType")) for b in chain) or "none"
        entry.error = f"{where}: its image server ({kinds}) has no single image file; pathapp cannot open it"
        return entry
    stored = uri_to_path(entry.uri)
    if stored is None:
        entry.error = f"{where}: image {entry.uri} is not a local file; copy it locally and relink it in QuPath"
        return entry
    candidates = [stored]
    rebased = _rebase(stored, old_uri, qpproj.parent)
    if rebased is not None:
        candidates.append(rebased)
    found = next((Path(c) for c in candidates if Path(c).is_file()), None) or finder.find(stored.name)
    if found is None:
        tried = " or ".join(str(c) for c in candidates)
        entry.error = (
            f"{where}: image not found at {tried}, nor under {qpproj.parent}; move the image there "
            "or relink it in QuPath (File › Project › Check project URIs)"
        )
        return entry
    is_dicom = found.suffix.lower() in DICOM_SUFFIXES or "dicom" in (entry.provider or "").lower()
    image = found.parent if is_dicom else found
    if found != Path(stored):  # found elsewhere (by relative location or by name): is it the same image?
        entry.error = _mismatch(entry, image, where)
        if entry.error:
            return entry
    entry.image_path = image
    return entry


def _mismatch(entry: ProjectEntry, image: Path, where: str) -> str | None:
    """Why `image` (found away from the entry's stored path) is not the entry's image: its size or
    channel count differs from what the project recorded; None when they agree or cannot be compared
    (an unreadable file is reported when it is opened)."""
    if entry.width is None or entry.height is None:
        return None
    from pathapp.errors import SlideOpenError
    from pathapp.slide import open_slide

    try:
        with open_slide(image) as slide:
            size, channels = slide.size, slide.channels
    except SlideOpenError:
        return None
    recorded = (int(entry.width), int(entry.height))
    if size == recorded and (entry.channels is None or entry.channels == channels):
        return None

    def described(wh: tuple[int, int], c: int | None) -> str:
        return f"{wh[0]}×{wh[1]} px" + (f", {c} channels" if c is not None else "")

    known = entry.channels is not None
    return (f"{where}: the image found at {image} ({described(size, channels if known else None)}) is not the "
            f"one the project recorded ({described(recorded, entry.channels)}); relink the right image in "
            "QuPath (File › Project › Check project URIs) or move it beside the project")


def moving_transforms(chain: list[dict]) -> list[str]:
    """How the builders of `chain` move the image, e.g. ["rotated (ROTATE_90)"]; [] when none does."""
    out = []
    for b in chain:
        kind = b.get("builderType")
        if kind == "rotated" and b.get("rotation", "ROTATE_NONE") == "ROTATE_NONE":
            continue
        if kind in MOVING_BUILDERS:
            out.append(MOVING_BUILDERS[kind] + (f" ({b['rotation']})" if kind == "rotated" else ""))
    return out


def _builder_chain(builder: dict) -> list[dict]:
    """Outermost to innermost server builder; wrappers (rotated, cropped, ...) nest it under `builder`."""
    chain = []
    node: Any = builder
    while isinstance(node, dict) and node:
        chain.append(node)
        node = node.get("builder")
    return chain


def builder_metadata(builder: dict) -> dict:
    """The image metadata (width, height, pixelCalibration, ...) of a server builder: the first one
    stored along its chain of wrappers. QuPath writes the same JSON into project.qpproj and data.qpdata."""
    return next((b["metadata"] for b in _builder_chain(builder) if isinstance(b.get("metadata"), dict)), {})


def metadata_mpp(meta: dict) -> float | None:
    """µm/px from a server's metadata, or None when it has no calibration in µm."""
    cal = meta.get("pixelCalibration") or {}
    width = cal.get("pixelWidth") or {}
    value, unit = width.get("value"), str(width.get("unit", "µm"))
    if not isinstance(value, (int, float)) or value <= 0 or unit not in ("µm", "um", "μm", "micron", "microns"):
        return None
    return float(value)


def uri_to_path(uri: str) -> PurePath | None:
    """A file: URI as a path, Windows ones (file:/C:/...) as PureWindowsPath; None if not a file."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        return None
    path = unquote(parsed.path)
    if parsed.netloc and parsed.netloc != "localhost":  # UNC share: file://server/share/x
        return PureWindowsPath(f"//{parsed.netloc}{path}")
    if len(path) >= 3 and path[0] == "/" and path[2] == ":":
        return PureWindowsPath(path[1:])
    return PurePosixPath(path)


def _rebase(image: PurePath, old_project_uri: str | None, new_dir: Path) -> Path | None:
    """The image's path relative to the project's old folder, applied to its new folder (as QuPath)."""
    old = uri_to_path(old_project_uri) if old_project_uri else None
    if old is None or type(old) is not type(image):
        return None
    old_parts, img_parts = old.parent.parts, image.parts
    common = 0
    while common < min(len(old_parts), len(img_parts)) and _same(old_parts[common], img_parts[common], image):
        common += 1
    if common < 2:  # only the root or drive in common: nothing to re-base on
        return None
    relative = [".."] * (len(old_parts) - common) + list(img_parts[common:])
    return Path(os.path.normpath(new_dir.joinpath(*relative)))


def _same(a: str, b: str, kind: PurePath) -> bool:
    return a.lower() == b.lower() if isinstance(kind, PureWindowsPath) else a == b


class _FileFinder:
    """Finds an image by file name under the project folder (QuPath's last resort), indexing once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: dict[str, Path] | None = None

    def find(self, name: str) -> Path | None:
        if self._index is None:
            self._index = {}
            seen: set[str] = set()  # linked folders are followed, once each (no cycles)
            for folder, dirs, files in os.walk(self.root, followlinks=True):
                real = os.path.realpath(folder)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                top = Path(folder) == self.root
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in _SKIP_DIRS))
                for f in files:
                    self._index.setdefault(f, Path(folder) / f)
        return self._index.get(name)
