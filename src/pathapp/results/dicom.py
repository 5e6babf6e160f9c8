"""Results as DICOM objects a PACS stores and a slide viewer (e.g. Slim) shows over the source slide:

- `annotations.ann.dcm`: Microscopy Bulk Simple Annotations, one annotation group per class holding
  that class's tiles as polygons (their union is the class region), with every class probability of
  each tile as a measurement;
- `probabilities.seg.dcm`: a fractional Segmentation, one segment per class probability map, on the
  pixel grid of one of the source pyramid's levels and tiled like it.

Both reference the source series (same Patient, Study and Frame of Reference). Their UIDs derive from
the source series, the model and the numbers, so storing the same results again replaces rather than
duplicates them. highdicom is imported here only."""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pathapp.atomic import atomic_path
from pathapp.errors import PathappError
from pathapp.results.geojson import PROB_PREFIX
from pathapp.results.result import SlideResult
from pathapp.tiles.grid import tile_boxes

if TYPE_CHECKING:
    from pydicom import Dataset

ANN_FILE = "annotations.ann.dcm"
SEG_FILE = "probabilities.seg.dcm"
MIN_TILE_PX = 4  # the SEG grid is the coarsest source level on which a tile still spans this many pixels
CODE_SCHEME = "99PATHAPP"  # private coding scheme for class names and measurements (PS3.16 8.2)
MANUFACTURER = "pathapp"
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName")


class DicomResultError(PathappError):
    """DICOM results cannot be made or stored for this slide."""


def _code(kind: str, text: str):  # noqa: ANN202 - highdicom CodedConcept
    from highdicom.sr import CodedConcept

    return CodedConcept(f"{kind}{hashlib.sha1(text.encode()).hexdigest()[:10]}", CODE_SCHEME, text[:64])


def _uid(*parts: object) -> str:
    """A UID that is the same whenever `parts` are (pydicom's root + a hash of them)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _color(rgb: tuple[int, int, int]):  # noqa: ANN202 - highdicom CIELabColor
    from highdicom.color import CIELabColor

    return CIELabColor.from_rgb(*(int(c) for c in rgb))


def _source(header: Dataset) -> Dataset:
    """The source header with what highdicom copies from it present even where a converter left it
    out: Patient and Study Type 2 attributes (empty), and the total pixel matrix origin (the slide
    origin, which is where readers such as wsidicom place a level that states none)."""
    import copy

    from pydicom import Dataset

    ds = copy.copy(header)
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "TotalPixelMatrixOriginSequence" not in ds:
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 0.0
        origin.YOffsetInSlideCoordinateSystem = 0.0
        ds.TotalPixelMatrixOriginSequence = [origin]
    return ds


def _common(result: SlideResult, kind: str) -> dict:
    """Series, instance and equipment attributes shared by both objects."""
    source = result.dicom_headers[0]
    digest = hashlib.sha1(np.ascontiguousarray(result.coords).tobytes())
    if result.probs is not None:
        digest.update(np.ascontiguousarray(result.probs, np.float32).tobytes())
    key = (source.SeriesInstanceUID, result.model_fingerprint, result.mpp, result.tile_size, kind)
    version = metadata.version("pathapp")
    return {
        "series_instance_uid": _uid(*key),
        "series_number": 900 if kind == "ann" else 901,
        "sop_instance_uid": _uid(*key, digest.hexdigest()),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": (result.model_name or "pathapp")[:64],
        "software_versions": version,
        "device_serial_number": (result.model_fingerprint or "none")[:64],
    }


def _algorithm(result: SlideResult):  # noqa: ANN202 - highdicom AlgorithmIdentificationSequence
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    return AlgorithmIdentificationSequence(name=(result.model_name or "pathapp")[:64],
                                           family=codes.cid7162.ArtificialIntelligence,
                                           version=metadata.version("pathapp"))


def annotations_dataset(result: SlideResult) -> Dataset:
    """The ANN object: per class (argmax), its tiles as closed POLYGONs in level-0 (column, row)
    pixel coordinates, with one measurement per class probability. A headless bundle gives one
    'tile' group without measurements."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    bounds = tile_boxes(result).astype(np.float32)
    squares = np.stack([bounds[:, [0, 1]], bounds[:, [2, 1]], bounds[:, [2, 3]], bounds[:, [0, 3]]], axis=1)
    labels = np.argmax(result.probs, axis=1) if result.probs is not None else np.zeros(len(result), int)
    names = result.class_names or ["tile"]
    common = _common(result, "ann")
    groups = []
    for k, name in enumerate(names):
        members = np.flatnonzero(labels == k)
        if len(members) == 0:
            continue
        measurements = None
        if result.probs is not None:
            measurements = [
                hd.ann.Measurements(name=_code("P", PROB_PREFIX + c), values=result.probs[members, j].astype(np.float32),
                                    unit=codes.UCUM.NoUnits)
                for j, c in enumerate(result.class_names)
            ]
        groups.append(hd.ann.AnnotationGroup(
            number=len(groups) + 1, uid=_uid(common["sop_instance_uid"], name), label=name[:64],
            annotated_property_category=codes.SCT.Tissue, annotated_property_type=_code("C", name),
            graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=list(squares[members]),
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(result), measurements=measurements,
            description=f"{name}: tiles of {result.tile_size} px at {result.mpp:g} um/px"[:64],
            display_color=_color(result.class_colors[k]) if result.class_colors else None,
        ))
    if not groups:
        raise DicomResultError(f"{result.slide_path}: no tiles to annotate")
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[_source(result.dicom_headers[0])], annotation_coordinate_type="2D", annotation_groups=groups,
        content_description=f"pathapp {result.model_name}"[:64], content_label="PATHAPP", **common,
    )
    for group in ann.AnnotationGroupSequence:  # highdicom leaves an empty 3D-only attribute in 2D groups
        if "CommonZCoordinateValue" in group and not group.CommonZCoordinateValue:
            del group.CommonZCoordinateValue
    return ann


def seg_level(result: SlideResult) -> int:
    """Index of the source level the probability maps are drawn on: the coarsest one on which a tile
    still spans MIN_TILE_PX pixels, so the map's size follows the tile count, not the slide's area."""
    columns = [int(h.TotalPixelMatrixColumns) for h in result.dicom_headers]
    fits = [i for i, c in enumerate(columns) if result.footprint * c / columns[0] >= MIN_TILE_PX]
    return min(fits, key=lambda i: columns[i], default=0)


def probability_maps(result: SlideResult, level: int) -> np.ndarray:
    """(rows, columns, classes) float32 on `level`'s total pixel matrix: each tile's probabilities
    over its footprint, 0 where no tile was analysed."""
    header = result.dicom_headers[level]
    rows, cols = int(header.TotalPixelMatrixRows), int(header.TotalPixelMatrixColumns)
    scale = cols / int(result.dicom_headers[0].TotalPixelMatrixColumns)
    maps = np.zeros((rows, cols, len(result.class_names)), np.float32)
    box = np.rint(tile_boxes(result) * scale).astype(np.int64)
    for (x0, y0, x1, y1), p in zip(box, result.probs):
        maps[max(y0, 0) : min(y1, rows), max(x0, 0) : min(x1, cols)] = p
    return maps


def segmentation_dataset(result: SlideResult) -> Dataset:
    """The fractional SEG: one segment per class, on the grid and frame size of `seg_level`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    level = seg_level(result)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=f"{PROB_PREFIX}{name}"[:64], segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=_code("C", name), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(result),
            display_color=_color(result.class_colors[k]) if result.class_colors else None,
        )
        for k, name in enumerate(result.class_names)
    ]
    source = _source(result.dicom_headers[level])
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=probability_maps(result, level)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, segment_descriptions=segments,
        tile_pixel_array=True, tile_size=(int(source.Columns), int(source.Rows)), omit_empty_frames=True,
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        pixel_measures=_pixel_measures(source),
        content_description=f"pathapp {result.model_name} class probabilities"[:64], content_label="PATHAPP",
        **_common(result, "seg"),
    )
    seg.PatientOrientation = ""  # General Image, Type 2C: slide coordinates, not patient ones
    return seg


def _pixel_measures(source: Dataset):  # noqa: ANN202 - highdicom PixelMeasuresSequence
    """The source level's pixel spacing and slice thickness (the imaged depth when the source gives
    no thickness), which the SEG's Pixel Measures must state."""
    from highdicom import PixelMeasuresSequence

    measures = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = measures.get("SliceThickness")
    if thickness is None and source.get("ImagedVolumeDepth") is not None:
        thickness = float(source.ImagedVolumeDepth) * 1e-3  # µm -> mm
    return PixelMeasuresSequence(pixel_spacing=[float(v) for v in measures.PixelSpacing],
                                 slice_thickness=None if thickness is None else float(thickness))


def write_dicom(result: SlideResult, out_dir: str | Path) -> list[Path]:
    """Write annotations.ann.dcm and (for a bundle with classes) probabilities.seg.dcm into `out_dir`."""
    if not result.dicom_headers:
        raise DicomResultError(f"{result.slide_path}: DICOM results must reference a DICOM-WSI source series, "
                               f"and this slide is not one; drop --dicom-out/--dicomweb-store for it")
    out = Path(out_dir)
    datasets = {ANN_FILE: annotations_dataset(result)} if len(result) else {}
    if result.probs is not None and len(result):
        datasets[SEG_FILE] = segmentation_dataset(result)
    paths = []
    for name, ds in datasets.items():
        with atomic_path(out / name) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(out / name)
    return paths


def store_root(target: str) -> str:
    """The DICOMweb service root of a store target: `http(s)://host/<root>`, `dicomweb+http(s)://…`,
    or a slide address (…/studies/<UID>…, whose server is meant)."""
    root = re.sub(r"^dicomweb\+", "", target.strip(), flags=re.IGNORECASE)
    root = re.sub(r"/studies(/.*)?$", "", root).rstrip("/")
    if not re.match(r"^https?://[^/@\s]+", root):
        from pathapp.slide.dicomweb_backend import redact

        raise DicomResultError(f"{redact(target)}: not a DICOMweb server address; give its root, e.g. "
                               f"https://pacs.example.org/dicom-web")
    return root


def store_dicomweb(paths: list[Path], target: str) -> None:
    """Send the DICOM files to a DICOMweb server with STOW-RS (same credentials, timeouts and retries
    as reading); a failure is one DicomResultError line naming the server."""
    import pydicom

    from pathapp.slide.dicomweb_backend import explain, redact, web_client, web_session

    root = store_root(target)
    with web_session() as session:
        try:
            answer = web_client(root, session).store_instances([pydicom.dcmread(p) for p in paths])
        except Exception as e:  # noqa: BLE001 - requests and dicomweb-client raise their own types
            reason = explain(e)
            if reason is None:
                raise
            raise DicomResultError(f"{redact(root)}: storing the DICOM results failed: {reason}") from None
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        raise DicomResultError(f"{redact(root)}: the server refused {len(failed)} of the DICOM results "
                               f"(failure reason {', '.join(reasons)})")


SAME_SERVER = ""  # --dicomweb-store without an address: the server the slide was read from


def export_dicom(result: SlideResult, folder: str | Path, store: str | None = None) -> list[Path]:
    """Write the DICOM results into `folder` and, when `store` is given, send them with STOW-RS to that
    server (SAME_SERVER: the one the slide came from)."""
    from pathapp.slide.dicomweb_backend import is_dicomweb_url

    if store == SAME_SERVER and not is_dicomweb_url(result.slide_path):
        raise DicomResultError(f"{result.slide_path}: --dicomweb-store without an address stores to the server "
                               f"the slide came from, and this slide is a file; give the server's address")
    files = write_dicom(result, folder)
    if store is not None and files:
        store_dicomweb(files, store or result.slide_path)
    return files
