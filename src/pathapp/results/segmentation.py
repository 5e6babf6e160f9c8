"""A segmentation head's slide map -> QuPath annotations and an overlay picture.

`SegMap` holds the blended result at the map's resolution: the class of every map pixel (0 =
background or not analysed) and that class's probability. Per class, connected regions become
polygons with their holes (tiles.tissue.mask_to_geometry, the one mask tracer), simplified at a
tolerance in µm, clipped to the ROIs the map was made in (a hair inside: see ROI_INSET_PX) and kept
from a minimum area, each an annotation with its area and mean probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from pathapp.qupath.geojson import QuPathObject

SIMPLIFY_UM = 1.0  # outline tolerance (µm): well under a 3.5 µm map pixel at 0.5 µm/px
MIN_AREA_UM2 = 100.0  # smaller regions are dropped (about 8 map pixels at 0.5 µm/px)
# Regions are clipped this far (level-0 px) inside the ROIs: QuPath files an annotation under another
# only if the other's outline covers it exactly (JTS covers, PathObjectTileCache.covers), and GeoJSON
# coordinates are written to 0.01 px and held by QuPath's PolygonROI as floats (~0.01 px at 10⁵ px).
ROI_INSET_PX = 0.05


@dataclass
class SegMap:
    """Blended segmentation of one slide (or ROI) at `scale` level-0 px per map pixel."""

    labels: np.ndarray  # (H, W) uint8 class per map pixel; 0 = background / not analysed
    prob: np.ndarray  # (H, W) uint8: the pixel's class probability × 255
    scale: float
    class_names: list[str]
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)
    roi: BaseGeometry | None = None  # level-0 area the map was made in (the --roi annotations); None = all


def class_polygons(seg: SegMap, slide_size: tuple[int, int], slide_mpp: float, simplify_um: float = SIMPLIFY_UM,
                   min_area_um2: float = MIN_AREA_UM2) -> dict[int, list[shapely.Polygon]]:
    """Per foreground class index, its regions as valid level-0 polygons (holes kept), inside `seg.roi`."""
    from pathapp.tiles.tissue import mask_to_geometry

    out: dict[int, list[shapely.Polygon]] = {}
    tol, min_area = simplify_um / slide_mpp, min_area_um2 / slide_mpp**2
    inside = None if seg.roi is None else seg.roi.buffer(-ROI_INSET_PX)
    for k in range(1, len(seg.class_names)):
        mask = seg.labels == k
        if not mask.any():
            continue
        geom = mask_to_geometry(mask, seg.scale, slide_size).simplify(tol, preserve_topology=True)
        geom = shapely.make_valid(geom)
        if inside is not None:
            geom = geom.intersection(inside)
        parts = shapely.get_parts(shapely.get_parts(geom))  # a collection may hold multipolygons
        polys = [p for p in parts if isinstance(p, shapely.Polygon) and p.area >= min_area]
        if polys:
            out[k] = polys
    return out


def mean_prob(seg: SegMap, poly: shapely.Polygon) -> float:
    """Mean class probability of the map pixels whose centres lie inside `poly`."""
    x0, y0, x1, y1 = (np.asarray(poly.bounds) / seg.scale).tolist()
    c0, r0 = max(0, int(x0)), max(0, int(y0))
    c1, r1 = min(seg.prob.shape[1], int(np.ceil(x1)) + 1), min(seg.prob.shape[0], int(np.ceil(y1)) + 1)
    cols, rows = np.meshgrid(np.arange(c0, c1), np.arange(r0, r1))
    inside = shapely.contains_xy(poly, (cols + 0.5) * seg.scale, (rows + 0.5) * seg.scale)
    values = seg.prob[r0:r1, c0:c1][inside]
    return float(values.mean() / 255) if values.size else float("nan")


def segmentation_objects(seg: SegMap | None, slide_size: tuple[int, int], slide_mpp: float,
                         simplify_um: float = SIMPLIFY_UM, min_area_um2: float = MIN_AREA_UM2) -> list[QuPathObject]:
    """One QuPath annotation per region: class, colour, `Area µm^2` and `Mean prob`."""
    if seg is None:
        return []
    objects = []
    for k, polys in class_polygons(seg, slide_size, slide_mpp, simplify_um, min_area_um2).items():
        name, color = seg.class_names[k], tuple(seg.class_colors[k]) if seg.class_colors else None
        for poly in polys:
            objects.append(QuPathObject(geometry=poly, object_type="annotation", class_name=name, color=color,
                                        measurements={"Area µm^2": float(poly.area * slide_mpp**2),
                                                      "Mean prob": mean_prob(seg, poly)}))
    return objects


def seg_on_thumbnail(seg: SegMap, slide_size: tuple[int, int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, prob) looked up at every pixel of a (h, w) picture of the whole slide, by the map
    pixel under each picture pixel's level-0 centre."""
    th, tw = shape
    w0, h0 = slide_size
    cols = np.minimum(((np.arange(tw) + 0.5) * (w0 / tw) // seg.scale).astype(np.int64), seg.labels.shape[1] - 1)
    rows = np.minimum(((np.arange(th) + 0.5) * (h0 / th) // seg.scale).astype(np.int64), seg.labels.shape[0] - 1)
    return seg.labels[np.ix_(rows, cols)], seg.prob[np.ix_(rows, cols)]


def write_segmentation_overlay(result, out_dir: Path) -> Path | None:
    """overlay-segmentation.png: the thumbnail with each class's colour where the head put it
    (opacity = its probability), a legend and a scale bar."""
    from pathapp.results.heatmap import OVERLAY_ALPHA, _figure
    from pathapp.results.pictures import blend

    seg = result.segmentation
    if seg is None or result.thumbnail is None:
        return None
    thumb = np.asarray(result.thumbnail, np.float32)[..., :3]
    labels, prob = seg_on_thumbnail(seg, result.slide_size, thumb.shape[:2])
    colours = np.asarray(seg.class_colors, np.float64).reshape(-1, 3)[labels]
    alpha = np.where(labels > 0, OVERLAY_ALPHA * prob / 255.0, 0.0)
    legend = [(n, tuple(c)) for n, c in zip(seg.class_names[1:], seg.class_colors[1:])]
    return _figure(result, blend(thumb, colours, alpha), Path(out_dir) / "overlay-segmentation.png",
                   "segmentation (opacity = probability)", legend=legend)


def write_label_image(result, out_dir: Path) -> Path | None:
    """labels.ome.tif: the class map (uint8, 0 = background, k = class k) as a tiled OME-TIFF pyramid
    (each level half the last, nearest-neighbour) with its physical pixel size, for tools that read
    label images (napari, QuPath's pixel classifier import, TIAToolbox)."""
    import tifffile

    from pathapp.atomic import atomic_path

    seg = result.segmentation
    if seg is None:
        return None
    um = float(seg.scale * result.slide_mpp)
    levels = [seg.labels]
    while min(levels[-1].shape) > 512:
        levels.append(levels[-1][::2, ::2])
    path = Path(out_dir) / "labels.ome.tif"
    meta = {"axes": "YX", "PhysicalSizeX": um, "PhysicalSizeY": um, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm", "Description": "pathapp segmentation: "
            + ", ".join(f"{k}={n}" for k, n in enumerate(seg.class_names))}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, ome=True, bigtiff=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), compression="zlib", metadata=meta,
                  resolution=(1e4 / um, 1e4 / um), resolutionunit="CENTIMETER")
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(256, 256), compression="zlib")
    return path
