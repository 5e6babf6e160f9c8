"""The Slide interface every backend implements: level-0 coordinates, µm/px, a pyramid of levels."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathapp.errors import MissingMppError

MIN_MPP, MAX_MPP = 0.01, 100.0  # µm/px: finer than any microscope, coarser than any useful thumbnail
READ_BLOCK = 1024  # level pixels per side read at once: bounds peak memory whatever the slide size


def box_mean(block: np.ndarray, k: int) -> np.ndarray:
    """Each k × k box of a uint8 (H, W, 3) image (H, W multiples of k) averaged and rounded half up,
    summed in integers along one axis at a time (twice as fast as a float mean over both)."""
    h, w = block.shape[:2]
    if k == 1:
        return block
    rows = block.reshape(h // k, k, w, 3).sum(axis=1, dtype=np.uint32)
    sums = rows.reshape(h // k, w // k, k, 3).sum(axis=2)
    return ((sums + k * k // 2) // (k * k)).astype(np.uint8)


BRIGHTFIELD, FLUORESCENCE = "brightfield", "fluorescence"


def slide_name(path: str | Path) -> str:
    """A slide's name for output folders, known without opening it: the file stem (without
    .ome.tif[f]), the folder name of a DICOM series folder, or the series (else study) UID of a
    DICOMweb address."""
    if isinstance(path, str) and path.lower().startswith("dicomweb+"):
        from pathapp.slide.dicomweb_backend import parse_dicomweb_url

        return parse_dicomweb_url(path).name
    p = Path(path)
    for suffix in (".ome.tiff", ".ome.tif"):
        if p.name.lower().endswith(suffix):
            return p.name[: -len(suffix)]
    return p.name if p.is_dir() else p.stem


@dataclass(frozen=True)
class Level:
    """One pyramid level: its pixel size and its downsample relative to level 0."""

    width: int
    height: int
    downsample: float


class Slide(ABC):
    """A whole-slide image. Coordinates given to `read` are level-0 pixels for every backend.

    A backend's constructor fills `levels`, `file_mpp` and `vendor`, and implements `_read_level`."""

    backend: str = ""

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        self.path = Path(path)
        self._slide_mpp = slide_mpp
        self.levels: list[Level] = []  # level 0 first, downsamples increasing
        self.file_mpp: float | None = None  # µm/px stored in the file; None when the file does not say
        self.vendor: str | None = None
        self.channels = 3  # colour channels, or the planes of a fluorescence stack, as the file stores them
        self.modality = BRIGHTFIELD  # or FLUORESCENCE: dark background, light tissue, channels not RGB

    @property
    def background(self) -> int:
        """The value of empty glass in every channel: white in brightfield, black in fluorescence."""
        return 255 if self.modality == BRIGHTFIELD else 0

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    @property
    def mpp(self) -> float | None:
        """µm/px in effect: the user's --slide-mpp override wins over the file."""
        return self._slide_mpp if self._slide_mpp is not None else self.file_mpp

    @property
    def mpp_source(self) -> str | None:
        """Where `mpp` comes from: "override" (--slide-mpp, or a QuPath project's calibration), "file", or None."""
        return "override" if self._slide_mpp is not None else ("file" if self.file_mpp else None)

    @property
    def associated_images(self) -> list[str]:
        """Names of label/macro/thumbnail images stored beside the pyramid."""
        return []

    @property
    def name(self) -> str:
        """A stem for output folders (see `slide_name`)."""
        return slide_name(self.path)

    def calibrate(self, slide_mpp: float) -> None:
        """Use `slide_mpp` as the level-0 µm/px from now on (e.g. the calibration a QuPath project
        records for a file that has none); kept when the slide is pickled into a worker."""
        self._slide_mpp = slide_mpp

    def require_mpp(self) -> float:
        """µm/px, or a clear error naming the file and the --slide-mpp option. Never guess."""
        if self.mpp is None:
            raise MissingMppError(str(self.path))
        return self.mpp

    # --- pixels -----------------------------------------------------------------------------
    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of the region whose top-left is (x, y) in level-0 pixels,
        w × h pixels at `level`. Areas outside the image come back as `background` (white glass in
        brightfield, black in fluorescence)."""
        lv = self.levels[level]
        lx, ly = int(round(x / lv.downsample)), int(round(y / lv.downsample))
        out = np.full((h, w, 3), self.background, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lv.width), min(ly + h, lv.height)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read_level(x0, y0, x1 - x0, y1 - y0, level)
        return out

    def prefetch(self, regions: Sequence[tuple[int, int, int, int]], level: int = 0) -> None:
        """Get ready to `read` each (x, y, w, h) region (x, y level-0 px, w × h px at `level`) soon.
        A no-op for files; a DICOMweb slide fetches all their missing frames in one request."""

    @abstractmethod
    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`, x, y in that level's pixels, the region inside the image."""

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (never upsample)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_low_res(self, downsample: float) -> tuple[np.ndarray, float]:
        """The whole slide at about `downsample` level-0 px per pixel, as uint8 RGB, and its exact scale.

        Reads the level just finer than `downsample` in blocks of at most READ_BLOCK² level pixels and
        averages k × k level pixels per output pixel (k integer, so the scale is exact), so peak memory
        is one block plus the output, whatever the level-0 area."""
        return self.read_views([downsample])[0]

    def read_views(self, downsamples: Sequence[float]) -> list[tuple[np.ndarray, float]]:
        """`read_low_res` at each of several downsamples, decoding each level once: views read from the
        same level are averaged from the same blocks (a tissue mask and a thumbnail in one pass)."""
        plans = []
        for ds in downsamples:
            level = self.best_level_for_downsample(max(ds, 1.0))
            plans.append((level, max(1, int(round(ds / self.levels[level].downsample)))))
        views: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
        for level in dict.fromkeys(lv for lv, _ in plans):
            ks = sorted({k for lv, k in plans if lv == level})
            while ks:  # one pass per group of factors whose common block stays small
                group = [k for k in ks if math.lcm(*[g for g in ks if g <= k]) <= 2 * READ_BLOCK] or ks[:1]
                views.update({(level, k): v for k, v in zip(group, self._reduce_level(level, group))})
                ks = [k for k in ks if k not in group]
        return [views[plan] for plan in plans]

    def _reduce_level(self, level: int, ks: list[int]) -> list[tuple[np.ndarray, float]]:
        """The whole of `level` averaged over k × k pixels for each k of `ks`, from one blockwise read."""
        lv = self.levels[level]
        m = math.lcm(*ks)
        step = max(m, (READ_BLOCK // m) * m)
        outs = [np.empty((math.ceil(lv.height / k), math.ceil(lv.width / k), 3), np.uint8) for k in ks]
        for y in range(0, lv.height, step):
            for x in range(0, lv.width, step):
                w, h = min(step, lv.width - x), min(step, lv.height - y)
                block = self.read(round(x * lv.downsample), round(y * lv.downsample), w, h, level)
                pw, ph = math.ceil(w / m) * m, math.ceil(h / m) * m
                if (pw, ph) != (w, h):  # pad the last partial block with the background
                    padded = np.full((ph, pw, 3), self.background, np.uint8)
                    padded[:h, :w] = block
                    block = padded
                for k, out in zip(ks, outs):
                    bw, bh = math.ceil(w / k), math.ceil(h / k)
                    out[y // k : y // k + bh, x // k : x // k + bw] = box_mean(block[: bh * k, : bw * k], k)
        return [(out, lv.downsample * k) for k, out in zip(ks, outs)]

    def thumbnail_downsample(self, max_px: int = 1024) -> float:
        """The downsample `thumbnail` reads at: a whole-number reduction of the level that is no coarser
        than the thumbnail (never enlarge a coarser read, which blurs)."""
        scale = max(max(self.size) / max_px, 1.0)
        lv = self.levels[self.best_level_for_downsample(scale)]
        return lv.downsample * max(1, int(scale / lv.downsample + 1e-9))

    def thumbnail(self, max_px: int = 1024, view: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 image of the whole slide whose longer side is at most `max_px` (read blockwise),
        shrunk once (antialiased) from `view`, the slide read at `thumbnail_downsample`, if given."""
        from PIL import Image

        w0, h0 = self.size
        scale = max(max(w0, h0) / max_px, 1.0)
        region = self.read_low_res(self.thumbnail_downsample(max_px))[0] if view is None else view
        tw, th = max(1, min(round(w0 / scale), max_px)), max(1, min(round(h0 / scale), max_px))
        if (tw, th) == (region.shape[1], region.shape[0]):
            return region
        return np.asarray(Image.fromarray(region).resize((tw, th), Image.BILINEAR))

    def dicom_headers(self) -> list | None:
        """For a DICOM-WSI slide, each pyramid level's header (pydicom Datasets, level 0 first, no
        pixel data), which DICOM results must reference; None for every other format."""
        return None

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        """Pickle as (path, backend, slide µm/px override) so DataLoader workers reopen their own handle."""
        from pathapp.slide import open_slide

        return open_slide, (str(self.path), self.backend, self._slide_mpp)

    def info(self) -> dict:
        """JSON-ready description for `pathapp info`."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.size[0],
            "height": self.size[1],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "channels": self.channels,
            "modality": self.modality,
            "levels": [
                {"width": lv.width, "height": lv.height, "downsample": round(lv.downsample, 4)}
                for lv in self.levels
            ],
            "associated_images": self.associated_images,
        }
