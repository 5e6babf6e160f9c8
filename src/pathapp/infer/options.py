"""Everything `pathapp infer` can be told, as one typed value: the CLI fills it, the planner reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pathapp.infer.lease import DEFAULT_TTL_S
from pathapp.models.loader import DEFAULT_MODEL

OBJECT_TYPES = ("tile", "detection")
QC_MODES = ("flag", "exclude", "off")  # measure and mark artefacts; also drop flagged tiles; neither


@dataclass
class InferOptions:
    """How to run a model over slides. None means "the bundle's" (mpp, tile size) or "chosen for this
    machine" (workers); `slide_mpp` is the slides' own resolution, `mpp` the one tiles are analysed at."""

    model: str | Path = DEFAULT_MODEL  # a .pathapp bundle or a registry backbone name
    weights: str | Path | None = None  # weights file for a backbone name (None: the hub)
    out: str | Path | None = None  # OUT/<slide name>/; None: beside each slide (or in the QuPath project)
    mpp: float | None = None
    tile_size: int | None = None
    roi: str | Path | None = None  # QuPath GeoJSON of annotations: only tiles whose centre is inside
    roi_class: Sequence[str] = ()  # only annotations of these classes: of --roi, or each project image's own
    slide_mpp: float | None = None
    min_tissue: float | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"  # bf16 where the hardware has it (CUDA, AVX-512-BF16/AMX CPUs), else fp32
    object_type: str = "tile"  # QuPath object type of the per-tile objects
    overwrite: bool = False
    dicom_out: str | Path | None = None  # also write DICOM results (ANN + SEG) into DIR/<slide name>/
    dicomweb_store: str | None = None  # STOW-RS them there; "" = the server the slide came from
    write_project: bool = False  # also add the objects to a .qpproj input (paquo + QuPath)
    progress: bool = True
    lease_seconds: float = DEFAULT_TTL_S  # a slide whose process stops heartbeating this long is taken over
    qc: str = "flag"  # QC_MODES
    qc_only: bool = False  # `pathapp qc`: measure and write QC, run no model
    stain_norm: str | None = None  # "macenko" | "reinhard" | "vahadane": normalise onto stain_ref
    stain_ref: str | Path | None = None  # a tile, a slide, or a saved target (.json, run.json)
