"""OpenSlide backend: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Ventana BIF, generic tiled TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathapp.slide.base import Level, Slide


def rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA (transparent outside the scanned area) onto white."""
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        import openslide

        super().__init__(path, slide_mpp)
        self._osr = openslide.OpenSlide(str(path))
        props = self._osr.properties
        self.levels = [
            Level(int(w), int(h), float(ds))
            for (w, h), ds in zip(self._osr.level_dimensions, self._osr.level_downsamples)
        ]
        mpp = props.get("openslide.mpp-x")
        try:
            self.file_mpp = float(mpp) if mpp not in (None, "") and float(mpp) > 0 else None
        except ValueError:
            self.file_mpp = None
        self.vendor = props.get("openslide.vendor")

    @property
    def associated_images(self) -> list[str]:
        return sorted(self._osr.associated_images.keys())

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        # OpenSlide takes level-0 coordinates and pads outside the image itself (transparent → white)
        region = self._osr.read_region((int(x), int(y)), int(level), (int(w), int(h)))
        return rgba_on_white(np.asarray(region))

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self.levels[level].downsample
        return self.read(round(x * ds), round(y * ds), w, h, level)

    def close(self) -> None:
        self._osr.close()
