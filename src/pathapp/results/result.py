"""SlideResult: everything inference knows about one slide; every writer takes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathapp.tiles.grid import TileGeometry


@dataclass
class TileQC:
    """The QC of every tile the grid held, kept in the results or excluded from them: writers draw
    and count artefacts from it. Measures of kept tiles travel in SlideResult.extra (`qc: …`)."""

    coords: np.ndarray  # (M, 2) level-0 top-left x, y of every measured tile
    footprint: float  # level-0 px per tile side (the SlideResult's)
    classes: np.ndarray  # (M,) str: "ok" or the artefact kind of each tile
    kept: np.ndarray  # (M,) bool: the tile is in the SlideResult (in its order)
    colors: dict[str, tuple[int, int, int]]  # artefact kind -> display colour
    thresholds: dict[str, float]
    excluded: bool = False  # flagged tiles were dropped from the model and the results (--qc exclude)


@dataclass
class SlideResult:
    """Per-tile results for one slide. Writers only format these numbers; none recomputes them."""

    slide_path: str
    slide_name: str
    coords: np.ndarray  # (N, 2) level-0 top-left x, y of each tile
    footprint: float  # level-0 px per tile side
    tile_size: int  # model input px
    mpp: float  # target µm/px the tiles were read at
    slide_mpp: float  # slide's level-0 µm/px
    slide_size: tuple[int, int]  # level-0 (width, height)
    class_names: list[str] = field(default_factory=list)
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)
    probs: np.ndarray | None = None  # (N, C) float32, rows sum to 1; None for a headless bundle
    embeddings: np.ndarray | None = None  # (N, D) float32
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more per-tile measurements (N,)
    # a slide head's prediction for the whole slide: class probabilities, {"risk": r} or {target: value}
    slide_outputs: dict[str, float] = field(default_factory=dict)
    slide_task: str | None = None  # "classification" | "survival" | "regression" when slide_outputs is set
    thumbnail: np.ndarray | None = None  # RGB uint8, for heatmap overlays
    model_name: str = ""
    model_fingerprint: str = ""  # Bundle.fingerprint(): lets training reuse these embeddings safely
    params: dict = field(default_factory=dict)  # run parameters for run.json
    # A DICOM-WSI source's level headers (Slide.dicom_headers: pydicom Datasets, level 0 first, no
    # pixels), which DICOM results reference; None for other formats.
    dicom_headers: list | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    qc: TileQC | None = None  # per-tile quality control, when it ran
    segmentation: Any = None  # results.segmentation.SegMap of a segmentation bundle
    geometry: TileGeometry | None = None  # the grid's: exact tile starts for the drawn footprints

    def __len__(self) -> int:
        return int(len(self.coords))
