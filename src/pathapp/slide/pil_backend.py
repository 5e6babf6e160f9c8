"""PIL backend: PNG and JPEG images, one level, no µm/px unless the user gives one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathapp.slide.base import Level, Slide
from pathapp.slide.tiff_backend import to_rgb8


class PilSlide(Slide):
    backend = "pil"

    def __init__(self, path: str | Path, mpp_override: float | None = None) -> None:
        from PIL import Image

        super().__init__(path, mpp_override)
        with Image.open(path) as img:
            self._format = img.format
            if img.mode in ("RGBA", "LA", "P"):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            self._pixels = to_rgb8(np.asarray(img.convert("RGB") if img.mode not in ("I;16", "I", "F") else img))
        self._levels = [Level(self._pixels.shape[1], self._pixels.shape[0], 1.0)]

    @property
    def levels(self) -> list[Level]:
        return self._levels

    @property
    def file_mpp(self) -> float | None:
        return None

    @property
    def vendor(self) -> str | None:
        return (self._format or "").lower() or None

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self._pixels.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out
