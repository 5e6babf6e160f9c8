"""Where the tissue is: a low-resolution mask of stained tissue and its outline as shapely polygons.

The slide is read at a working resolution of a few µm/px (never level 0 whole): blocks of the pyramid
level just finer than that are read one at a time and averaged down, so peak memory depends on the
mask size, not on the level-0 area. A pixel is tissue when it is stained (HSV saturation: works for
H&E, IHC with DAB + haematoxylin, and faint stains, while white glass and grey/black dirt are
unsaturated) and not the colour of a marker pen (red, green, blue ink). Fluorescence (the file says so,
or the background is dark) has no stain colour: there tissue is what Otsu's threshold finds bright in
the summed channels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from pathapp.errors import PathappError
from pathapp.slide import Slide
from pathapp.slide.base import BRIGHTFIELD, FLUORESCENCE

DEFAULT_MIN_TISSUE = 0.1  # tissue fraction a tile needs to count as tissue
TILE_SATURATION = 0.1  # per-tile pixel threshold (full-resolution pixels are noisier than a mask's)
MASK_SATURATION = 0.07  # working-resolution pixel threshold (block means: less noise, paler)
FOCUS_THRESHOLD = 0.002  # mean |LoG| of grey in [0, 1] below which a region is out of focus (ink, blur)
# Median brightest channel of the working-resolution image below which the background is dark, as
# in fluorescence (brightfield glass is ~240; the darkest H&E slide here is 180; a Vectra IF scan 10).
DARK_BACKGROUND = 60


@dataclass
class TissueMask:
    """A boolean tissue mask where one mask pixel covers `scale` × `scale` level-0 pixels, and its
    outline in level-0 pixels. `rgb` is the working-resolution image the mask was computed from."""

    mask: np.ndarray
    scale: float  # level-0 px per mask px
    geometry: BaseGeometry
    rgb: np.ndarray | None = None
    modality: str = BRIGHTFIELD  # FLUORESCENCE: found by Otsu on the summed channels (`modality_of`)


# ------------------------------------------------------------------------------------------ pixels


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB from RGB, RGBA (composited on white: transparent means no tissue) or grey."""
    a = np.asarray(image)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2).astype(np.uint8)
    if a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        return (a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return a[..., :3].astype(np.uint8)


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV hue (degrees), saturation and value (0-1) of RGB uint8 in float32 (skimage's rgb2hsv is
    float64: 2× the memory). The textbook formula's float32 values exactly (tested on every 8-bit
    colour), but from integer channels, with the hue's branch picked by 0/1 masks rather than nested
    np.where and float modulo: 7-16× faster (benchmarks/results/qc_speed*.txt), and every tile the
    pipeline reads goes through it."""
    # contiguous int16 copies: numpy's loops on them are many times faster than on the interleaved views
    r, g, b = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16), rgb[..., 2].astype(np.int16)
    mx = np.maximum(np.maximum(r, g), b)
    delta = (mx - np.minimum(np.minimum(r, g), b)).astype(np.float32)
    value = mx.astype(np.float32)
    sat = delta / np.maximum(value, 1.0)
    is_r = (mx == r).astype(np.int16)  # the largest channel: red before green before blue
    is_g = (mx == g) * (1 - is_r)
    is_b = 1 - is_r - is_g
    num = is_r * (g - b) + is_g * (b - r) + is_b * (r - g)
    sextant = 2 * is_g + 4 * is_b + 6 * (is_r & (num < 0))  # red's negative side wraps round (% 6)
    hue = num.astype(np.float32) / np.maximum(delta, 1e-6) + sextant.astype(np.float32)
    return hue * 60.0, sat, value / 255.0


def pen_colours(hue: np.ndarray, sat: np.ndarray, value: np.ndarray) -> dict[str, np.ndarray]:
    """Marker-ink colours that no H&E or DAB/haematoxylin stain has, one mask per ink: saturated
    scarlet red (eosin is pinker, hue < 348°, and paler), green/cyan, and strongly saturated blue
    that is not dark (haematoxylin is paler, and where it is dense, dark)."""
    return {
        "red": ((hue >= 348.0) | (hue < 12.0)) & (sat > 0.5),
        "green": (hue >= 90.0) & (hue < 190.0) & (sat > 0.15),
        "blue": (hue >= 190.0) & (hue < 250.0) & (sat > 0.55) & (value > 0.45),
    }


def pen_mask(hue: np.ndarray, sat: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Pixels of any marker-ink colour (`pen_colours`)."""
    return np.logical_or.reduce(list(pen_colours(hue, sat, value).values()))


def tissue_pixels(rgb: np.ndarray, saturation: float) -> np.ndarray:
    """Stained, non-ink pixels of an RGB uint8 image."""
    hue, sat, value = hsv(rgb)
    return (sat > saturation) & ~pen_mask(hue, sat, value)


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """Grey level (0-255, float32) of RGB uint8: the channel mean, from their exact integer sum (the
    values of `rgb.astype(np.float32).mean(axis=2)` without its slow 3-wide reduction)."""
    total = np.add(rgb[..., 0], rgb[..., 1], dtype=np.int16)
    total += rgb[..., 2]
    grey = total.astype(np.float32)
    grey /= 3.0
    return grey


def in_focus(rgb: np.ndarray, threshold: float = FOCUS_THRESHOLD, window: int = 15) -> np.ndarray:
    """Pixels with local detail: blurred ink smears and out-of-focus areas have almost none."""
    from scipy import ndimage as ndi

    detail = np.abs(ndi.gaussian_laplace(grey_levels(rgb) / 255.0, 1.0))
    return ndi.uniform_filter(detail, window) > threshold


def tissue_fraction_rgb(rgb: np.ndarray, *, saturation: float = TILE_SATURATION, focus: bool = True) -> float:
    """Fraction of a tile's pixels that are in-focus stained tissue (not glass, ink or blur).

    RGBA tiles are composited on white. A tile is usually kept when this is ≥ DEFAULT_MIN_TISSUE."""
    img = to_rgb(rgb)
    if img.size == 0:
        return 0.0
    keep = tissue_pixels(img, saturation)
    if focus:
        keep &= in_focus(img)
    return float(keep.mean())


# ------------------------------------------------------------------------------------ low-res read


TISSUE_MPP = 8.0  # µm/px at which tissue is found: glands and fat are many pixels, a slide a few MB
TISSUE_MAX_PX = 2048  # the mask's longer side at most (slides without µm/px)


def working_downsample(slide: Slide, target_mpp: float, max_px: int) -> float:
    """Level-0 px per mask px: the target µm/px when the slide's is known, and never a mask whose
    longer side exceeds max_px (so a slide without µm/px still works)."""
    ds = max(slide.size) / max_px
    if slide.mpp:
        ds = max(ds, target_mpp / slide.mpp)
    return max(ds, 1.0)


# ---------------------------------------------------------------------------------------- outline


def mask_to_geometry(mask: np.ndarray, scale: float, size: tuple[int, int] | None = None) -> BaseGeometry:
    """Polygons (with holes) tracing a boolean mask, in level-0 px (`scale` level-0 px per mask px).

    Each 8-connected component is traced with marching squares; its longest ring is the outline
    and the others are its holes. Clipped to the slide when `size` (level-0 w, h) is given."""
    from skimage.measure import find_contours, label, regionprops

    polys: list[Polygon] = []
    for region in regionprops(label(mask, connectivity=2)):
        r0, c0, r1, c1 = region.bbox
        comp = np.pad(region.image, 1)
        rings = [c for c in find_contours(comp.astype(np.uint8), 0.5, fully_connected="high") if len(c) >= 4]
        if not rings:
            continue
        # (row, col) in the padded crop -> level-0 x, y; a mask pixel's centre is at (i + 0.5) * scale
        xy = [np.column_stack(((c[:, 1] - 1 + c0 + 0.5) * scale, (c[:, 0] - 1 + r0 + 0.5) * scale)) for c in rings]
        areas = [abs(shapely.area(Polygon(r))) for r in xy]
        outer = int(np.argmax(areas))
        poly = Polygon(xy[outer], [r for i, r in enumerate(xy) if i != outer]).simplify(scale * 0.25)
        polys.extend(_polygons(poly if poly.is_valid else shapely.make_valid(poly)))
    geom: BaseGeometry = MultiPolygon(polys)  # 8-connected components never touch...
    if not geom.is_valid:  # ...unless simplifying moved two outlines together
        geom = shapely.union_all(polys)
    if size is not None and not geom.is_empty:
        geom = geom.intersection(shapely.box(0, 0, size[0], size[1]))
    parts = _polygons(geom)
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons in any geometry (make_valid and intersection can return collections)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    return [p for g in getattr(geom, "geoms", []) for p in _polygons(g)]


# ---------------------------------------------------------------------------------------- detect


def detect_tissue(
    slide: Slide,
    *,
    target_mpp: float = TISSUE_MPP,
    max_px: int = TISSUE_MAX_PX,
    saturation: float = MASK_SATURATION,
    min_object_um2: float = 10_000.0,
    min_hole_um2: float = 10_000.0,
    min_object_px: float = 40_000.0,
    min_hole_px: float = 40_000.0,
    view: tuple[np.ndarray, float] | None = None,
) -> TissueMask:
    """Tissue mask of a slide, computed at about `target_mpp` µm/px (at most `max_px` on a side).

    Stained non-ink pixels are closed by one pixel, then objects smaller than `min_object_um2` are
    dropped and holes smaller than `min_hole_um2` filled. Without µm/px (tissue detection never
    needs it) the minimum areas are `min_object_px` / `min_hole_px` in level-0 px². `view`: the slide
    already read at `working_downsample(slide, target_mpp, max_px)` (`Slide.read_views`), if it was."""
    from scipy import ndimage as ndi
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb, scale = view or slide.read_low_res(working_downsample(slide, target_mpp, max_px))
    modality = modality_of(slide, rgb)
    mask = tissue_pixels(rgb, saturation) if modality == BRIGHTFIELD else fluorescent_pixels(rgb)
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), border_value=0) | mask
    if slide.mpp:
        px_area = (scale * slide.mpp) ** 2  # µm² per mask px
        min_obj, min_hole = min_object_um2 / px_area, min_hole_um2 / px_area
    else:
        min_obj, min_hole = min_object_px / scale**2, min_hole_px / scale**2
    if min_obj >= 1:
        mask = remove_small_objects(mask, max_size=math.ceil(min_obj) - 1, connectivity=2)
    if min_hole >= 1:
        mask = remove_small_holes(mask, max_size=math.ceil(min_hole) - 1)
    return TissueMask(mask=mask, scale=scale, geometry=mask_to_geometry(mask, scale, slide.size), rgb=rgb,
                      modality=modality)


def modality_of(slide: Slide, rgb: np.ndarray) -> str:
    """FLUORESCENCE when the file says so (`Slide.modality`) or its working-resolution view `rgb`
    has a dark background; else BRIGHTFIELD."""
    if slide.modality != BRIGHTFIELD or rgb.size == 0:
        return slide.modality
    return FLUORESCENCE if float(np.median(rgb.max(axis=2))) < DARK_BACKGROUND else BRIGHTFIELD


def fluorescent_pixels(rgb: np.ndarray) -> np.ndarray:
    """Tissue of a fluorescence image: above Otsu's threshold of the summed channels (none when the
    image is flat)."""
    from skimage.filters import threshold_otsu

    total = rgb.astype(np.float32).sum(axis=2)
    if rgb.size == 0 or float(total.max()) == float(total.min()):
        return np.zeros(total.shape, bool)
    return total > threshold_otsu(total)


def require_brightfield(slide: Slide, tissue: TissueMask) -> None:
    """Refuse a fluorescence image where a model or stain-based QC would see it as H&E: one line."""
    if tissue.modality == BRIGHTFIELD:
        return
    why = "the file says so" if slide.modality == FLUORESCENCE else "its background is dark"
    raise PathappError(f"{slide.path}: a fluorescence image ({slide.channels} channels; {why}), but pathapp's "
                       f"models and QC read brightfield RGB (H&E, IHC); analyse brightfield slides, or tile "
                       f"this one with `pathapp tile` (tissue found by Otsu on the summed channels)")
