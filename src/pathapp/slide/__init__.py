"""Where pixels come from: `open_slide(path)` picks a backend by the file's content."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import logging
import warnings

from pathapp.atomic import OUTPUT_MARKER
from pathapp.errors import SlideOpenError, one_line
from pathapp.slide.base import Level, Slide, slide_name

__all__ = ["BACKENDS", "IMAGE_SUFFIXES", "Level", "Slide", "detect_backend", "expand_slide_inputs", "find_slides",
           "is_slide_file", "is_url", "open_slide", "slide_name"]

# Library chatter (tifffile's damaged-file log lines, pydicom's over-long UID warnings) would bury the
# one-line message the user needs; failures still surface as SlideOpenError.
logging.getLogger("tifffile").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="pydicom")

BACKENDS = ("openslide", "wsidicom", "tifffile", "pil")  # file readers; "dicomweb" is chosen by the address

# Plain image files (labelled tiles, tile folders, PNG/JPEG "slides"): one list for every reader of them.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
# Extensions considered when scanning a folder for slides; a file's backend is still chosen by content.
SLIDE_EXTENSIONS = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".qptiff", ".dcm", ".dicom", ".png", ".jpg", ".jpeg",
}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _head(path: Path, n: int = 132) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def detect_backend(path: Path) -> str:
    """Choose a backend from the file's bytes, not its name."""
    from pathapp.slide.dicom_backend import is_dicom_file

    if path.is_dir():
        if any(p.is_file() and is_dicom_file(p) for p in path.iterdir()):
            return "wsidicom"
        raise SlideOpenError(
            f"{path}: a folder that holds no DICOM files; give a slide file, or a DICOM-WSI series folder"
        )
    head = _head(path)
    if head[128:132] == b"DICM":
        return "wsidicom"
    if head[:4] in _TIFF_MAGIC:
        import tifffile

        with tifffile.TiffFile(str(path)) as tf:
            if tf.is_ome or tf.is_qpi:
                return "tifffile"
    import openslide

    if openslide.OpenSlide.detect_format(str(path)):
        return "openslide"
    if head[:4] in _TIFF_MAGIC:
        return "tifffile"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff":
        return "pil"
    raise SlideOpenError(
        f"{path}: not a slide format pathapp reads (DICOM-WSI, SVS/NDPI/MRXS/SCN/BIF and other "
        f"OpenSlide formats, OME-TIFF/QPTIFF/TIFF, PNG/JPEG)"
    )


def _backend_class(name: str) -> type[Slide]:
    if name == "openslide":
        from pathapp.slide.openslide_backend import OpenSlideSlide as cls
    elif name == "wsidicom":
        from pathapp.slide.dicom_backend import DicomSlide as cls
    elif name == "tifffile":
        from pathapp.slide.tiff_backend import TiffSlide as cls
    elif name == "pil":
        from pathapp.slide.pil_backend import PilSlide as cls
    elif name == "dicomweb":
        from pathapp.slide.dicomweb_backend import DicomWebSlide as cls
    else:
        raise SlideOpenError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return cls


def open_slide(path: str | Path, backend: str | None = None, slide_mpp: float | None = None) -> Slide:
    """Open a slide. `backend` forces one of BACKENDS; `slide_mpp` overrides the file's own µm/px
    (`--slide-mpp`; the resolution tiles are analysed at is always called `mpp`).

    `path` may also be a DICOMweb address, `dicomweb+http(s)://host/<root>/studies/<UID>/series/<UID>`.
    Every failure becomes a SlideOpenError whose one-line message names the file."""
    if is_url(path):
        return _open_url(str(path), backend, slide_mpp)
    p = Path(path)
    if not p.exists():
        raise SlideOpenError(f"{p}: no such file or folder")
    if p.is_file() and p.stat().st_size == 0:
        raise SlideOpenError(f"{p}: an empty file (0 bytes): its copy or download did not finish; copy it again")
    if slide_mpp is not None and not slide_mpp > 0:
        raise SlideOpenError(f"{p}: --slide-mpp must be a positive number of µm per pixel, got {slide_mpp}")
    name = backend or detect_backend(p)
    cls = _backend_class(name)
    try:
        slide = cls(p, slide_mpp)
        if not slide.levels or slide.size[0] <= 0 or slide.size[1] <= 0:
            raise ValueError("no image levels found")
    except SlideOpenError:
        raise
    except Exception as e:  # noqa: BLE001 - each library raises its own types; the user needs one line
        reason = one_line(e)
        raise SlideOpenError(
            f"{p}: cannot be read by the {name} backend ({reason[:200]}); check that the file is "
            f"complete and a slide, or force another reader with --backend"
        ) from e
    return slide


def is_url(path: str | Path) -> bool:
    """A web address rather than a file: only strings can be (a Path folds the '//')."""
    return isinstance(path, str) and re.match(r"^[a-z][a-z0-9+.-]*://", path.strip().lower()) is not None


def _open_url(url: str, backend: str | None, slide_mpp: float | None) -> Slide:
    from pathapp.slide.dicomweb_backend import DicomWebSlide, is_dicomweb_url, redact

    if not is_dicomweb_url(url):
        raise SlideOpenError(f"{redact(url)}: pathapp reads slides over the web from DICOMweb servers only; "
                             f"write the address as dicomweb+http(s)://host/<root>/studies/<UID>[/series/<UID>]")
    if backend not in (None, "dicomweb"):
        raise SlideOpenError(f"{redact(url)}: --backend {backend} reads files; drop it for a DICOMweb address")
    if slide_mpp is not None and not slide_mpp > 0:
        raise SlideOpenError(f"{redact(url)}: --slide-mpp must be a positive number of µm per pixel, got {slide_mpp}")
    try:
        return DicomWebSlide(url, slide_mpp)
    except SlideOpenError:
        raise
    except Exception as e:  # noqa: BLE001 - wsidicom rejects odd metadata with its own types
        reason = one_line(e)
        raise SlideOpenError(f"{redact(url)}: cannot be read as a whole-slide image over DICOMweb "
                             f"({redact(reason)[:200]})") from e


def expand_slide_inputs(inputs: Iterable[str | Path]) -> tuple[list[str | Path], list[str]]:
    """The slides that command-line inputs name, and a one-line error for each input that names none:
    a DICOMweb study gives each of its whole-slide series (one address each), a folder that is not a
    DICOM series the slides under it (`find_slides`); anything else is itself (opening it reports
    its own errors)."""
    slides: list[str | Path] = []
    errors: list[str] = []
    for item in inputs:
        if not is_url(item) and Path(item).is_dir() and not is_slide_file(Path(item)):
            found = find_slides(item)
            slides += found
            if not found:
                errors.append(f"{item}: no slides found in this folder; give slide files or a folder holding them")
            continue
        if is_url(item):
            from pathapp.slide.dicomweb_backend import is_dicomweb_url, wsi_series

            if is_dicomweb_url(str(item)):
                try:
                    slides += wsi_series(str(item))
                except SlideOpenError as e:
                    errors.append(str(e))
                continue
        slides.append(item)
    return slides, errors


def is_slide_file(path: Path) -> bool:
    """A file (or DICOM series folder) that looks like a slide by name; contents are checked on open."""
    from pathapp.slide.dicom_backend import is_dicom_file

    if path.is_dir():
        return any(p.is_file() and is_dicom_file(p) for p in path.iterdir())
    return path.suffix.lower() in SLIDE_EXTENSIONS


def find_slides(folder: str | Path) -> list[Path]:
    """Slides under `folder`, sorted. The files of one DICOM series count as one slide: the folder
    when it holds just that series, else the series' first file (open_slide gathers the rest).
    Folders pathapp wrote results into (marked with OUTPUT_MARKER) are skipped with all below them."""
    import pydicom

    from pathapp.slide.dicom_backend import is_dicom_file

    found: list[Path] = []
    for d, subdirs, names in os.walk(folder):
        if OUTPUT_MARKER in names:  # pathapp's own results (PNG heatmaps are not slides)
            subdirs.clear()
            continue
        here = Path(d)
        files = sorted(here / n for n in names)
        dicom = [f for f in files if f.suffix.lower() in {".dcm", ".dicom", ""} and is_dicom_file(f)]
        series: dict[str, list[Path]] = {}
        for f in dicom:
            uid = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            series.setdefault(str(uid.get("SeriesInstanceUID", f)), []).append(f)
        if len(series) == 1 and len(dicom) > 1:
            found.append(here)
        else:
            found.extend(group[0] for group in series.values())
        found.extend(f for f in files if f not in dicom and f.suffix.lower() in SLIDE_EXTENSIONS - {".dcm", ".dicom"})
    return sorted(found)


def describe_slide(path: str | Path, backend: str | None = None, slide_mpp: float | None = None) -> dict:
    """`Slide.info()` after proving the pixels decode: a small read at the coarsest level, so a
    truncated file is reported here rather than halfway through a run."""
    with open_slide(path, backend, slide_mpp) as slide:
        lv = len(slide.levels) - 1
        try:
            slide.read(0, 0, min(64, slide.levels[lv].width), min(64, slide.levels[lv].height), lv)
        except Exception as e:  # noqa: BLE001 - decoder errors vary by codec library
            raise SlideOpenError(f"{path}: the header opened but the pixels cannot be decoded ({e})") from e
        return slide.info()
