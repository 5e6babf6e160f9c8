"""The Slide interface every backend implements: level-0 coordinates, µm/px, a pyramid of levels."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathapp.errors import MissingMppError


@dataclass(frozen=True)
class Level:
    """One pyramid level: its pixel size and its downsample relative to level 0."""

    width: int
    height: int
    downsample: float


class Slide(ABC):
    """A whole-slide image. Coordinates given to `read` are level-0 pixels for every backend."""

    backend: str = ""

    def __init__(self, path: str | Path, mpp_override: float | None = None) -> None:
        self.path = Path(path)
        self._mpp_override = mpp_override

    # --- metadata every backend provides -------------------------------------------------
    @property
    @abstractmethod
    def levels(self) -> list[Level]:
        """Pyramid levels, level 0 first, downsamples increasing."""

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    @property
    @abstractmethod
    def file_mpp(self) -> float | None:
        """µm/px stored in the file, or None when the file does not say."""

    @property
    def mpp(self) -> float | None:
        """µm/px in effect: the user's --slide-mpp override wins over the file."""
        return self._mpp_override if self._mpp_override is not None else self.file_mpp

    @property
    def vendor(self) -> str | None:
        return None

    @property
    def associated_images(self) -> list[str]:
        """Names of label/macro/thumbnail images stored beside the pyramid."""
        return []

    @property
    def name(self) -> str:
        """A stem for output folders: file stem, or folder name for a DICOM series folder."""
        n = self.path.name
        for suffix in (".ome.tiff", ".ome.tif"):
            if n.lower().endswith(suffix):
                return n[: -len(suffix)]
        return self.path.stem if self.path.is_file() else n

    def require_mpp(self) -> float:
        """µm/px, or a clear error naming the file and the --slide-mpp option. Never guess."""
        if self.mpp is None:
            raise MissingMppError(str(self.path))
        return self.mpp

    # --- pixels -----------------------------------------------------------------------------
    @abstractmethod
    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of the region whose top-left is (x, y) in level-0 pixels,
        w × h pixels at `level`. Areas outside the image come back white."""

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (never upsample)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """RGB uint8 image of the whole slide whose longer side is at most `max_px`."""
        from PIL import Image

        w0, h0 = self.size
        scale = max(w0, h0) / max_px
        level = self.best_level_for_downsample(max(scale, 1.0))
        lv = self.levels[level]
        region = self.read(0, 0, lv.width, lv.height, level)
        tw = max(1, round(w0 / max(scale, 1.0)))
        th = max(1, round(h0 / max(scale, 1.0)))
        if (tw, th) == (lv.width, lv.height):
            return region
        return np.asarray(Image.fromarray(region).resize((tw, th), Image.BILINEAR))

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        """Pickle as (path, backend, µm/px override) so DataLoader workers reopen their own handle."""
        from pathapp.slide import open_slide

        return open_slide, (str(self.path), self.backend, self._mpp_override)

    def info(self) -> dict:
        """JSON-ready description for `pathapp info`."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.size[0],
            "height": self.size[1],
            "mpp": self.mpp,
            "mpp_source": "override" if self._mpp_override is not None else ("file" if self.file_mpp else None),
            "levels": [
                {"width": lv.width, "height": lv.height, "downsample": round(lv.downsample, 4)}
                for lv in self.levels
            ],
            "associated_images": self.associated_images,
        }
