"""tifffile backend: OME-TIFF, QPTIFF, plain and tiled TIFF (and SVS, for cross-checking OpenSlide)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pathapp.slide.base import BRIGHTFIELD, FLUORESCENCE, Level, Slide

# µm per unit of the OME PhysicalSizeXUnit values we meet in practice.
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
# µm per TIFF ResolutionUnit; inch is accepted only for scanner-like resolutions (see _tiff_tag_mpp).
_TIFF_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}


def _ome_mpp(xml: str) -> float | None:
    root = ET.fromstring(xml)
    for el in root.iter():
        if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
            unit = el.get("PhysicalSizeXUnit", "µm")
            return float(el.get("PhysicalSizeX")) * _OME_UNIT_UM.get(unit, 1.0)
    return None


def _tiff_tag_mpp(page) -> float | None:
    """µm/px from XResolution/ResolutionUnit. Desktop defaults (72/96/300 dpi in inches) are not a
    microscope calibration, so inch-based values count only when finer than 5 µm/px."""
    res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if res is None or unit is None or int(unit.value) not in _TIFF_UNIT_UM:
        return None
    num, den = res.value
    if not num or not den:
        return None
    mpp = _TIFF_UNIT_UM[int(unit.value)] * den / num
    if int(unit.value) == 2 and mpp > 5.0:
        return None
    return mpp


class TiffSlide(Slide):
    backend = "tifffile"

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        import tifffile
        import zarr

        super().__init__(path, slide_mpp)
        self._tf = tifffile.TiffFile(str(path))
        self._series = self._tf.series[0]
        store = self._series.aszarr()
        root = zarr.open(store, mode="r")
        self._arrays = [root[str(i)] for i in range(len(self._series.levels))] if isinstance(
            root, zarr.Group
        ) else [root]
        self._axes = [lv.axes for lv in self._series.levels]
        w0 = self._dims(0)[0]
        self.levels = [Level(*self._dims(i), w0 / self._dims(i)[0]) for i in range(len(self._arrays))]
        self.file_mpp = self._read_mpp()
        self.vendor = self._read_vendor()
        axes, shape = self._axes[0], self._arrays[0].shape
        self.channels = int(np.prod([n for a, n in zip(axes, shape) if a in "SC"]))
        self.modality = self._read_modality()

    def _dims(self, i: int) -> tuple[int, int]:
        axes, shape = self._axes[i], self._arrays[i].shape
        return int(shape[axes.index("X")]), int(shape[axes.index("Y")])

    def _read_mpp(self) -> float | None:
        tf, page = self._tf, self._tf.pages[0]
        if tf.is_ome and tf.ome_metadata:
            mpp = _ome_mpp(tf.ome_metadata)
            if mpp:
                return mpp
        if tf.is_svs:
            m = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
            return float(m.group(1)) if m else None
        return _tiff_tag_mpp(page)

    def _read_modality(self) -> str:
        """Fluorescence when the file says so (a QPTIFF's scan Mode, OME's IlluminationType or
        ContrastMethod) or stores a stack of channel planes rather than one colour image (not 3
        channels, or planes without an RGB photometric): stained brightfield is RGB (or YCbCr)."""
        tf, page = self._tf, self._tf.pages[0]
        if tf.is_qpi:
            mode = re.search(r"<Mode>([^<]*)</Mode>", page.description or "")
            if mode:
                return FLUORESCENCE if "fluor" in mode.group(1).lower() else BRIGHTFIELD
        if tf.is_ome and tf.ome_metadata:
            said = set(re.findall(r'(?:IlluminationType|ContrastMethod)="([^"]+)"', tf.ome_metadata))
            if any("fluor" in v.lower() for v in said):
                return FLUORESCENCE
            if said & {"Transmitted", "Brightfield"}:
                return BRIGHTFIELD
        import tifffile

        colour = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
        return BRIGHTFIELD if self.channels in (3, 4) and colour else FLUORESCENCE

    def _read_vendor(self) -> str:
        tf = self._tf
        for flag, name in (("is_svs", "aperio"), ("is_qpi", "perkinelmer-qpi"), ("is_ome", "ome"), ("is_ndpi", "hamamatsu")):
            if getattr(tf, flag, False):
                return name
        return "tiff"

    @property
    def associated_images(self) -> list[str]:
        return [s.name.lower() for s in self._tf.series[1:] if s.name]

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        axes = self._axes[level]
        index = tuple(
            slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None) if a in "SC" else 0
            for a in axes
        )
        block = np.asarray(self._arrays[level][index])
        kept = [a for a in axes if a in "YXSC"]
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]
        return to_rgb8(block.transpose(order) if block.ndim == len(order) else block)

    def close(self) -> None:
        self._tf.close()


def to_rgb8(block: np.ndarray) -> np.ndarray:
    """(H, W[, C]) of any dtype → (H, W, 3) uint8: grey is replicated, channels beyond 3 dropped,
    16-bit and float data scaled by their range (fluorescence is shown, not measured, here)."""
    if block.ndim == 2:
        block = block[..., None]
    if block.dtype != np.uint8:
        b = block.astype(np.float32)
        hi = float(b.max()) or 1.0
        block = (b / hi * 255).clip(0, 255).astype(np.uint8)
    c = block.shape[-1]
    if c == 1:
        return np.repeat(block, 3, axis=-1)
    if c == 2:
        return np.concatenate([block, np.zeros_like(block[..., :1])], axis=-1)
    return np.ascontiguousarray(block[..., :3])
