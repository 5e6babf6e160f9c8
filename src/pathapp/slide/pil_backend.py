"""PIL backend: PNG and JPEG images, one level, no µm/px unless the user gives one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathapp.slide.base import Level, Slide
from pathapp.slide.tiff_backend import to_rgb8


class PilSlide(Slide):
    backend = "pil"

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        from PIL import Image

        super().__init__(path, slide_mpp)
        with Image.open(path) as img:
            self._format = img.format
            if img.mode in ("RGBA", "LA", "P"):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            self._pixels = to_rgb8(np.asarray(img.convert("RGB") if img.mode not in ("I;16", "I", "F") else img))
        self.levels = [Level(self._pixels.shape[1], self._pixels.shape[0], 1.0)]
        self.vendor = (self._format or "").lower() or None

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self._pixels[y : y + h, x : x + w]
