"""DICOM-WSI backend (wsidicom): a series folder, a single file, or one file of a multi-file series."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pathapp.slide.base import Level, Slide

if TYPE_CHECKING:
    from pydicom import Dataset
    from wsidicom import WsiDicom

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
PIXEL_DATA_TAG = 0x7FE00010


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def series_files(path: Path) -> list[Path]:
    """The files of the series `path` belongs to: for a folder, its DICOM files; for a file, the files
    in its folder that share its SeriesInstanceUID (a folder may hold several series)."""
    import pydicom

    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and is_dicom_file(p))
    uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
        "SeriesInstanceUID"
    )
    same = []
    for p in sorted(path.parent.iterdir()):
        if p == path or not (p.is_file() and is_dicom_file(p)):
            continue
        other = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        if uid is not None and other.get("SeriesInstanceUID") == uid:
            same.append(p)
    return sorted([path, *same])


def _jfif_mislabelled_as_rgb(encoded_tile: bytes, photometric: str, transfer_syntax: str) -> bool:
    """True for JPEG frames that are YCbCr (a JFIF header, no RGB signal) while the DICOM header
    says RGB. wsidicom trusts the header and returns Y, Cb, Cr as R, G, B; we convert instead."""
    from PIL import Image

    if photometric != "RGB" or transfer_syntax != JPEG_BASELINE:
        return False
    img = Image.open(io.BytesIO(encoded_tile))
    signals_rgb = img.info.get("adobe_transform") == 0 or tuple(
        layer[0] for layer in getattr(img, "layer", [])
    ) == (0x52, 0x47, 0x42)
    return "jfif" in img.info and not signals_rgb


class WsiDicomSlide(Slide):
    """What every wsidicom-backed slide shares, wherever its frames come from (files or DICOMweb)."""

    backend = "wsidicom"

    def _adopt(self, wsi: WsiDicom, photometric: str, transfer_syntax: str) -> None:
        """Take the pyramid, µm/px, vendor and colour handling from an opened `wsi`."""
        from wsidicom.errors import WsiDicomNoResolutionError

        self._wsi = wsi
        base = wsi.levels[0]
        self.levels = [Level(lv.size.width, lv.size.height, base.size.width / lv.size.width) for lv in wsi.levels]
        self._level_ids = [lv.level for lv in wsi.levels]
        try:
            mpp = wsi.mpp.width * 1.0
            self.file_mpp = mpp if mpp > 0 else None
        except (WsiDicomNoResolutionError, AttributeError, TypeError):
            self.file_mpp = None
        self.vendor = str(base.datasets[0].as_dataset().get("Manufacturer", "")) or None
        tile = wsi.read_encoded_tile(self._level_ids[0], (0, 0))
        self._ycbcr_fix = _jfif_mislabelled_as_rgb(tile, photometric, transfer_syntax)

    def dicom_headers(self) -> list[Dataset]:
        """Header of each pyramid level's first instance (level 0 first), without pixel data: what a
        DICOM result object needs to reference this series."""
        from pydicom import Dataset

        headers = []
        for lv in self._wsi.levels:
            ds = lv.datasets[0].as_dataset()
            headers.append(Dataset({e.tag: e for e in ds if e.tag < PIXEL_DATA_TAG}))
        return headers

    @property
    def associated_images(self) -> list[str]:
        names = []
        if self._wsi.labels:
            names.append("label")
        if self._wsi.overviews:
            names.append("overview")
        return names

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        from PIL import Image

        region = self._wsi.read_region((x, y), self._level_ids[level], (w, h))
        if self._ycbcr_fix:
            region = Image.frombytes("YCbCr", region.size, region.convert("RGB").tobytes())
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self._wsi.close()


class DicomSlide(WsiDicomSlide):
    """DICOM-WSI files on disk."""

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        import pydicom
        from wsidicom import WsiDicom

        super().__init__(path, slide_mpp)
        files = series_files(self.path)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        self._adopt(WsiDicom.open(files), str(header.get("PhotometricInterpretation", "")),
                    str(header.file_meta.TransferSyntaxUID))
