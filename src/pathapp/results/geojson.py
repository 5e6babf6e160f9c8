"""QuPath GeoJSON from a SlideResult: one object per tile (tiles.geojson) and one region per class
(annotations.geojson). The QuPath dialect itself (uuid, colours, rounding, validity) is
`pathapp.qupath.geojson.write_objects`; this module only decides what the objects are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import shapely

from pathapp.qupath.geojson import QuPathObject, write_objects
from pathapp.qupath.geojson import tile_objects as qp_tile_objects
from pathapp.results.result import SlideResult
from pathapp.tiles.grid import tile_boxes

# QuPath measurement name of a class probability; the Groovy launcher maps this name.
PROB_PREFIX = "prob: "


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats of each row (0 log 0 = 0)."""
    p = np.clip(probs.astype(np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=1)


def tile_measurements(result: SlideResult) -> dict[str, np.ndarray]:
    """Per-tile measurement columns: per-class probabilities, max prob and entropy (classified
    bundles only), then every extra per-tile array (e.g. attention)."""
    cols: dict[str, np.ndarray] = {}
    if result.probs is not None:
        probs = np.asarray(result.probs, dtype=np.float64)
        cols.update({PROB_PREFIX + c: probs[:, k] for k, c in enumerate(result.class_names)})
        cols["max prob"] = probs.max(axis=1)
        cols["entropy"] = entropy(probs)
    for key, values in result.extra.items():
        cols[key] = np.asarray(values, dtype=np.float64).reshape(len(result))
    return cols


QC_CLASS = "QC: "  # QuPath derived class of a tile's QC verdict: "QC: ok", "QC: blur", …


def tile_objects(result: SlideResult, object_type: str = "tile") -> list[QuPathObject]:
    """One QuPath tile (or detection) per tile: class = argmax with its colour, measurements.
    Non-finite values are left out by the writer. When QC ran, every tile is named by its QC class,
    and when QC is all that ran (no model), classified by it too."""
    if object_type not in {"tile", "detection"}:
        raise ValueError(f"object_type must be 'tile' or 'detection', not {object_type!r}")
    names = None
    colors = dict(zip(result.class_names, map(tuple, result.class_colors)))
    qc_names = None
    if result.qc is not None:
        qc_names = [QC_CLASS + c for c in result.qc.classes[result.qc.kept]]
    if result.probs is not None:
        names = [result.class_names[k] for k in np.argmax(result.probs, axis=1)]
    elif qc_names is not None and result.embeddings is None:  # QC alone (`pathapp qc`): its class is the tile's
        names = qc_names
        colors = {QC_CLASS + k: tuple(c) for k, c in result.qc.colors.items()}
    objects = qp_tile_objects(
        tile_boxes(result),
        object_type=object_type,
        measurements=tile_measurements(result),
        class_names=names,
        colors=colors,
    )
    for obj, name in zip(objects, qc_names or []):
        obj.name = name
    return objects


def union_of_tiles(tiles: Any, members: np.ndarray, smooth: float | None = None) -> shapely.Geometry | None:
    """The union of the selected tile squares of `tiles` (anything with level-0 `coords` and a
    `footprint`: a SlideResult, a TileQC) in level-0 px (holes kept), or None when empty.

    Tile corners are integers but the footprint is fractional, so neighbouring squares can be
    a fraction of a pixel apart. Each square is grown by `smooth` px (default: 1 % of the
    footprint, at least 1 px) before the union and the union shrunk back by as much with mitred
    joins: seams close, corners stay square, real gaps wider than 2 × smooth stay open.
    """
    e = max(1.0, 0.01 * tiles.footprint) if smooth is None else smooth
    bounds = tile_boxes(tiles, grow=e)[members]
    if len(bounds) == 0:
        return None
    union = shapely.union_all(shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3]))
    if e > 0:
        union = union.buffer(-e, join_style="mitre")
    union = shapely.make_valid(shapely.set_precision(union, 0.01))
    polys = [g for g in shapely.get_parts(union) if isinstance(g, shapely.Polygon) and not g.is_empty]
    if not polys:
        return None
    return shapely.MultiPolygon(polys) if len(polys) > 1 else polys[0]


def label_regions(tiles: Any, labels: np.ndarray, names: list[str],
                  smooth: float | None = None) -> dict[str, shapely.Geometry]:
    """Per name, the union of the tiles labelled with its index (`union_of_tiles`)."""
    regions = {}
    for k, name in enumerate(names):
        geom = union_of_tiles(tiles, labels == k, smooth)
        if geom is not None:
            regions[name] = geom
    return regions


def class_regions(result: SlideResult, smooth: float | None = None) -> dict[str, shapely.Geometry]:
    """Per class, the union of the tiles it is the argmax of (`label_regions`)."""
    if result.probs is None or len(result) == 0:
        return {}
    return label_regions(result, np.argmax(result.probs, axis=1), list(result.class_names), smooth=smooth)


def qc_regions(result: SlideResult) -> dict[str, shapely.Geometry]:
    """Per artefact kind, the union of its tiles, kept or excluded (`label_regions`)."""
    if result.qc is None or len(result.qc.classes) == 0:
        return {}
    kinds = list(result.qc.colors)
    labels = np.array([kinds.index(c) if c in kinds else -1 for c in result.qc.classes])
    return label_regions(result.qc, labels, kinds)


def qc_summary(result: SlideResult) -> dict:
    """For run.json: tiles and area (µm², of the merged tiles) per artefact kind, and the thresholds."""
    if result.qc is None:
        return {}
    qc = result.qc
    areas = {k: float(g.area * result.slide_mpp**2) for k, g in qc_regions(result).items()}
    return {
        "thresholds": qc.thresholds,
        "excluded": qc.excluded,
        "tiles measured": int(len(qc.classes)),
        "tiles excluded": int(np.count_nonzero(~qc.kept)),
        "tiles": {k: int(np.count_nonzero(qc.classes == k)) for k in qc.colors},
        "area µm^2": {k: round(areas.get(k, 0.0), 1) for k in qc.colors},
    }


# name of the annotation that carries a slide head's prediction over the analysed tissue
SLIDE_OBJECT_NAME = "slide"


def slide_object(result: SlideResult) -> QuPathObject | None:
    """A slide head's prediction as one annotation over every analysed tile: classified by the top
    class with `prob: <class>` measurements, or with the risk score ("risk") or predicted value
    (named as the target) as a measurement; plus its area and tile count."""
    if not result.slide_outputs or len(result) == 0:
        return None
    geom = union_of_tiles(result, np.ones(len(result), bool))
    if geom is None:
        return None
    outputs = result.slide_outputs
    meas = {"Area µm^2": float(geom.area * result.slide_mpp**2), "Tiles": float(len(result))}
    name = None
    if result.slide_task == "classification":
        meas.update({PROB_PREFIX + c: float(v) for c, v in outputs.items()})
        name = max(outputs, key=outputs.get)
    else:
        meas.update({c: float(v) for c, v in outputs.items()})
    return QuPathObject(geometry=geom, object_type="annotation", class_name=name, measurements=meas,
                        name=SLIDE_OBJECT_NAME)


def region_objects(result: SlideResult, regions: dict[str, shapely.Geometry] | None = None) -> list[QuPathObject]:
    """One annotation per class with its area (µm²) and the mean probability of its tiles, and the
    slide head's annotation (slide_object) when there is one; `regions`: class_regions(result), if
    computed already."""
    slide = slide_object(result)
    objects = [slide] if slide is not None else []
    if result.probs is None:
        return objects
    labels = np.argmax(result.probs, axis=1)
    for name, geom in (class_regions(result) if regions is None else regions).items():
        k = result.class_names.index(name)
        meas = {
            "Area µm^2": float(geom.area * result.slide_mpp**2),
            "Mean prob": float(np.mean(result.probs[labels == k, k])),
            "Tiles": float(np.count_nonzero(labels == k)),
        }
        objects.append(
            QuPathObject(
                geometry=geom,
                object_type="annotation",
                class_name=name,
                color=tuple(result.class_colors[k]),
                measurements=meas,
                name=name,
            )
        )
    return objects


def qc_objects(result: SlideResult) -> list[QuPathObject]:
    """One annotation per artefact kind found (`QC: <kind>`), with its area (µm²), its tile count
    and whether its tiles were excluded from the results."""
    if result.qc is None:
        return []
    qc = result.qc
    objects = []
    for kind, geom in qc_regions(result).items():
        meas = {"Area µm^2": float(geom.area * result.slide_mpp**2),
                "Tiles": float(np.count_nonzero(qc.classes == kind)),
                "Excluded": float(qc.excluded)}
        objects.append(QuPathObject(geometry=geom, object_type="annotation", class_name=QC_CLASS + kind,
                                    color=tuple(qc.colors[kind]), measurements=meas, name=QC_CLASS + kind))
    return objects


def write_tiles_geojson(result: SlideResult, path: Path, object_type: str = "tile") -> Path:
    """tiles.geojson: a FeatureCollection of one object per tile."""
    write_objects(path, tile_objects(result, object_type))
    return Path(path)


def write_annotations_geojson(result: SlideResult, path: Path,
                              regions: dict[str, shapely.Geometry] | None = None) -> Path:
    """annotations.geojson: a FeatureCollection of one annotation per predicted class (and the slide
    head's annotation), one per region a segmentation head found, and one per artefact kind QC found;
    `regions`: class_regions(result), if computed."""
    from pathapp.results.segmentation import segmentation_objects

    seg = segmentation_objects(result.segmentation, result.slide_size, result.slide_mpp)
    write_objects(path, region_objects(result, regions) + seg + qc_objects(result))
    return Path(path)
