"""Per-tile quality control: measures computed on the very tiles a pipeline reads (no second pass
over the slide), and the artefact each tile shows, if any.

Every measure is physical and scale-aware, so one set of thresholds serves every slide:
- `qc: background`: fraction of the tile that is unstained: colourless in optical density (glass,
  grey dust, the shadow of a coverslip edge), whatever its brightness.
- `qc: pen red|green|blue`: fraction of the tile in regions of each marker-ink colour
  (`tissue.pen_colours`) at least PEN_WIDTH_UM across: a marker stroke is hundreds of µm wide,
  while the odd pixel of dense eosin or haematoxylin that takes an ink's hue is not.
- `qc: eosin`: how much eosin the tile's densest tissue holds: the 90th percentile over the tile of
  the eosin optical density (colour deconvolution, skimage's `rgb2hed`) averaged over FOLD_WINDOW_UM
  windows. `qc: fold` is that relative to the slide's own tissue: `qc: eosin` over its median across
  the slide's tiles. A fold lays two sections on top of each other and Beer-Lambert adds their
  densities, so a folded region holds about twice the stain of the same tissue elsewhere on the slide
  (per slide, so a pale or a strongly stained slide is judged against itself); the absolute floor
  keeps a doubled film of pale tissue (fat, mucus) from counting. Eosin rather than haematoxylin:
  nuclei make haematoxylin vary twofold within any tissue, eosin (cytoplasm, stroma) much less.
- `qc: blur µm`: the Gaussian blur, in µm, that explains the tile's edges. The energy of the
  gradient at two scales s1 < s2 is in the ratio r = sqrt((s2² + b²) / (s1² + b²)) for an edge
  blurred by b, so b follows from r alone: contrast, stain strength and paleness cancel out.
  Texture finer than an edge makes tissue look sharper than the edge model, so the estimate is
  lower than the blur applied (README table).
  Tiles finer than QC_MPP are measured at QC_MPP; NaN where the tile has no structure to judge.
- `qc: out of focus`: fraction of the tile's structured 16 µm windows whose own blur estimate is
  past the threshold: a partly blurred tile (air bubble, uneven section, a focus point gone astray).
- `qc: compression`: JPEG blockiness: the excess of pixel differences on one column (row) of every
  8 over the others, phase-free (tiles start anywhere on the compressor's grid); NaN where the
  tile was resampled so that 8 source pixels are no whole number of tile pixels.

A tile's QC class is the first artefact in ARTEFACTS whose threshold it passes, else `ok`. Every flag
but `fold` is decided tile by tile; `fold` needs the slide's other tiles (`with_fold`)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pathapp.tiles.tissue import grey_levels, hsv, pen_colours, to_rgb

QC_MPP = 0.5  # µm/px at which focus and fold are measured (finer tiles are averaged down to it)
FOCUS_SCALES_PX = (1.0, 2.0)  # gradient scales s1, s2 at the measuring resolution
WINDOW_UM = 16.0  # side of the windows of the out-of-focus map
JPEG_BLOCK = 8  # px: the JPEG block side
COMPRESSION_FLOOR = 2.0  # grey levels: the least mean neighbour difference a blockiness is relative to
PREFIX = "qc: "
OK = "ok"


@dataclass(frozen=True)
class QCThresholds:
    """When a measure makes an artefact. Defaults were chosen on real tiles and synthetic damage of
    known strength (`benchmarks/bench_qc.py`, README table)."""

    background: float = 0.9  # glass fraction (a tile with < 10 % tissue is not a tissue tile)
    pen: float = 0.012  # fraction of the tile in ink regions of any one colour
    fold: float = 1.4  # `qc: eosin` over the slide's median (benchmarks/bench_qc.py --fold-cv, fitted)
    fold_eosin: float = 0.048  # and at least this much eosin OD (skimage rgb2hed units; fitted with it)
    blur_um: float = 0.25  # µm of edge blur (an applied Gaussian of σ 1 µm measures ≈ 0.45 µm on tissue)
    out_of_focus: float = 0.35  # fraction of the structured windows past blur_um
    compression: float = 0.5  # blockiness (≈ JPEG quality ≤ 20 on uncompressed tiles)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Artefact kinds in the order a tile's single class is chosen (the first that applies), with the
# QuPath colour of their annotation. `blur` before `out of focus`: a tile blurred everywhere is both.
ARTEFACTS: dict[str, tuple[int, int, int]] = {
    "background": (200, 200, 200),
    "pen": (0, 160, 80),
    "fold": (120, 40, 20),
    "blur": (80, 140, 255),
    "out of focus": (160, 110, 255),
    "compression": (255, 160, 0),
}
MEASURES = ("background", "pen red", "pen green", "pen blue", "eosin", "blur µm", "out of focus", "compression")

GLASS_CHROMA = 0.03  # spread of a pixel's RGB optical densities below which it is colourless: not stained
FOLD_WINDOW_UM = 24.0  # eosin is averaged over windows this wide (a fold is wider; a few cells are not)
PEN_WIDTH_UM = 3.0  # an ink region is at least this wide
MIN_CONTRAST = 0.01  # grey standard deviation (of [0, 1]) below which there is no structure to judge


def optical_densities(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density -log10((I + 1) / 256) (Beer-Lambert: stain amount, glass ≈ 0)."""
    return -np.log10((rgb.astype(np.float32) + 1.0) / 256.0)


@functools.cache
def _density_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per 8-bit level: `optical_densities` (256,), and per channel its share of the eosin density
    (3, 256) as skimage's `rgb2hed` computes it: its own optical density, log(max(I / 255, 1e-6)) /
    log(1e-6) (`separate_stains`), times the eosin column of `hed_from_rgb`. Tiles are uint8, so a
    table lookup replaces the two logarithm passes per pixel (ours and rgb2hed's) of the hot path."""
    from skimage.color import hed_from_rgb, separate_stains

    levels = np.arange(256, dtype=np.uint8)
    skimage_od = separate_stains(np.repeat(levels[None, :, None], 3, axis=2), np.eye(3))[0, :, 0]
    return optical_densities(levels), np.ascontiguousarray((skimage_od[:, None] * hed_from_rgb[:, 1]).T)


def od_spread(rgb: np.ndarray) -> np.ndarray:
    """Per pixel of a uint8 RGB tile, the spread of `optical_densities` across its channels (max − min;
    the darkest channel has the most): near 0 where the pixel is colourless (glass, grey dust)."""
    od = _density_tables()[0]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # elementwise across channels: numpy's axis-2 min/max is 40× slower
    return np.take(od, np.minimum(np.minimum(r, g), b)) - np.take(od, np.maximum(np.maximum(r, g), b))


def eosin_density(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel eosin optical density of a uint8 RGB tile, float32: skimage's `rgb2hed(rgb)[..., 1]`
    (negatives clipped to 0, as rgb2hed does) within float64 rounding."""
    share = _density_tables()[1]
    eosin = np.take(share[0], rgb[..., 0])  # summed in place: each float64 temporary costs page faults
    part = np.take(share[1], rgb[..., 1])
    eosin += part
    eosin += np.take(share[2], rgb[..., 2], out=part)
    return np.maximum(eosin, 0, out=eosin).astype(np.float32)


def _to_qc_resolution(img: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
    """Average a (H, W) float image down to QC_MPP when it is finer; returns it and its µm/px."""
    if mpp >= QC_MPP * 0.95:
        return img, mpp
    from skimage.transform import rescale

    return rescale(img, mpp / QC_MPP, anti_aliasing=True, preserve_range=True).astype(np.float32), QC_MPP


def _blur_um(e1: float, e2: float, px_um: float) -> float:
    """Blur in µm from the gradient energies e1, e2 at scales s1, s2: r = e1 / e2 (module
    docstring); 0 when sharper than any blurred edge (texture finer than an edge gives r > s2 / s1)."""
    s1, s2 = FOCUS_SCALES_PX
    r2 = (e1 / max(e2, 1e-12)) ** 2
    b2 = (s2**2 - r2 * s1**2) / max(r2 - 1.0, 1e-6)
    return float(np.sqrt(max(b2, 0.0)) * px_um)


def focus_measures(grey: np.ndarray, mpp: float, blur_um: float) -> tuple[float, float]:
    """(`blur µm`, `out of focus`) of a grey image in [0, 1] at `mpp` µm/px (module docstring).
    Regions with too little contrast to judge (glass, faint mucus) count for neither."""
    from scipy import ndimage as ndi

    img, px = _to_qc_resolution(grey, mpp)
    s1, s2 = FOCUS_SCALES_PX
    e1, e2 = ndi.gaussian_gradient_magnitude(img, s1), ndi.gaussian_gradient_magnitude(img, s2)
    e1 *= e1  # squared in place: one 224² temporary fewer each
    e2 *= e2
    tile_blur = _blur_um(float(e1.mean()), float(e2.mean()), px) if img.std() > MIN_CONTRAST else float("nan")
    w = max(4, int(round(WINDOW_UM / px)))
    rows, cols = img.shape[0] // w, img.shape[1] // w
    if rows == 0 or cols == 0:
        return tile_blur, float("nan")

    def windows(a: np.ndarray) -> np.ndarray:
        return a[: rows * w, : cols * w].reshape(rows, w, cols, w).swapaxes(1, 2).reshape(rows * cols, w * w)

    judged = windows(img).std(axis=1) > MIN_CONTRAST
    if not judged.any():
        return tile_blur, float("nan")
    w1, w2 = windows(e1)[judged].mean(axis=1), windows(e2)[judged].mean(axis=1)
    return tile_blur, float(np.mean([_blur_um(a, b, px) >= blur_um for a, b in zip(w1, w2)]))


def eosin_level(rgb: np.ndarray, mpp: float) -> float:
    """`qc: eosin` of an RGB tile at `mpp` µm/px (module docstring)."""
    from scipy import ndimage as ndi

    eosin, px = _to_qc_resolution(eosin_density(rgb), mpp)
    side = max(1, int(round(FOLD_WINDOW_UM / px)))
    return float(np.percentile(ndi.uniform_filter(eosin, side, mode="reflect"), 90, overwrite_input=True))


def with_fold(measures: dict[str, np.ndarray], reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The measures of one slide's tiles with `fold`: each tile's `eosin` over the median `eosin` of
    `reference` (default: these tiles); NaN where there is no eosin to compare with."""
    eosin = np.asarray(measures["eosin"], np.float64)
    scale = eosin if reference is None else np.asarray(reference, np.float64)
    ref = float(np.nanmedian(scale)) if np.isfinite(scale).any() else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        fold = eosin / ref if ref > 0 else np.full_like(eosin, np.nan)
    return {**measures, "fold": fold}


def open_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening of `mask` by the disk x² + y² ≤ radius² (skimage's `disk`), outside the image
    counted as background: the same pixels as scipy's `binary_opening` with that structure, from two
    Euclidean distance transforms, whose cost does not grow with the radius."""
    from scipy import ndimage as ndi

    inner = 2 * int(radius / np.sqrt(2)) + 1  # the largest square inside the disk: if not even it fits, nothing is kept
    if not ndi.minimum_filter(mask, size=inner, mode="constant", cval=0).any():
        return np.zeros_like(mask)
    # a pixel survives erosion when its nearest background pixel (the border's ring included) is
    # farther than the radius; squared distances are integers, so the 1e-6 margins are exact
    core = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] > radius + 1e-6
    if not core.any():
        return core
    return ndi.distance_transform_edt(~core) <= radius + 1e-6


def ink_fraction(mask: np.ndarray, mpp: float) -> float:
    """Fraction of the tile in regions of `mask` at least PEN_WIDTH_UM wide (a binary opening)."""
    if not mask.any():
        return 0.0
    return float(open_disk(mask, max(1, int(round(PEN_WIDTH_UM / 2 / mpp)))).mean())


def compression_score(grey: np.ndarray, resample: float = 1.0) -> float:
    """JPEG blockiness of a grey tile (module docstring); `resample` = tile px per source px."""
    period = JPEG_BLOCK * resample
    p = int(round(period))
    if p < 4 or abs(period - p) > 0.02 * p:
        return float("nan")
    scores = []
    for axis in (1, 0):  # per column, then per row, the mean difference to the next (no transposed copy)
        d = np.diff(grey.astype(np.float32, copy=False), axis=axis)
        d = np.abs(d, out=d).mean(axis=1 - axis)
        n = len(d) // p * p
        if n < 2 * p:
            return float("nan")
        phase = d[:n].reshape(-1, p).mean(axis=0)
        # differences on glass are sensor noise (< 1 grey level): no blocks to see there
        scores.append((phase.max() - np.median(phase)) / max(float(phase.mean()), COMPRESSION_FLOOR))
    return float(np.mean(scores))


def measure_tile(tile: np.ndarray, mpp: float, *, resample: float = 1.0,
                 thresholds: QCThresholds = QCThresholds()) -> dict[str, float]:
    """Every QC measure of one tile (RGB, RGBA or grey uint8) read at `mpp` µm/px; `resample` is
    tile px per source px (tile_size / read_size) for the compression score."""
    rgb = to_rgb(tile)
    if rgb.size == 0:
        return dict.fromkeys(MEASURES, float("nan"))
    inks = pen_colours(*hsv(rgb))
    glass = (od_spread(rgb) < GLASS_CHROMA) & ~np.logical_or.reduce(list(inks.values()))
    grey = grey_levels(rgb)
    blur, oof = focus_measures(grey / 255.0, mpp, thresholds.blur_um)
    out = {
        "background": float(glass.mean()),
        **{f"pen {c}": ink_fraction(m, mpp) for c, m in inks.items()},
        "eosin": eosin_level(rgb, mpp),
        "blur µm": blur,
        "out of focus": oof,
        "compression": compression_score(grey, resample),
    }
    return out


def measure_tiles(tiles, mpp: float, *, resample: float = 1.0,
                  thresholds: QCThresholds = QCThresholds()) -> dict[str, np.ndarray]:
    """Measures of many tiles as columns (name -> (N,) float64), in MEASURES order."""
    measure = TileMeasurer(mpp, resample, thresholds)
    return columns(np.array([measure(t) for t in tiles], np.float32))


@dataclass(frozen=True)
class TileMeasurer:
    """`measure_tile` as a picklable callable for DataLoader workers: tile -> float32 vector of
    MEASURES, so QC is computed where the tile is decoded, beside the model's input."""

    mpp: float
    resample: float = 1.0
    thresholds: QCThresholds = QCThresholds()

    @classmethod
    def for_geometry(cls, geometry: Any, thresholds: QCThresholds = QCThresholds()) -> TileMeasurer:
        """For tiles read by a `grid.TileGeometry` (its µm/px, and its resize for the JPEG grid)."""
        return cls(geometry.mpp, geometry.tile_size / geometry.read_size, thresholds)

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        m = measure_tile(tile, self.mpp, resample=self.resample, thresholds=self.thresholds)
        return np.array([m[k] for k in MEASURES], np.float32)


def columns(vectors: np.ndarray) -> dict[str, np.ndarray]:
    """(N, len(MEASURES)) TileMeasurer rows as measure columns (name -> (N,) float64)."""
    v = np.asarray(vectors, np.float64).reshape(-1, len(MEASURES))
    return {k: v[:, j] for j, k in enumerate(MEASURES)}


def artefact_flags(measures: dict[str, np.ndarray], thresholds: QCThresholds = QCThresholds()) -> dict[str, np.ndarray]:
    """Per artefact kind, which tiles show it (NaN measures never flag). `fold` is judged only when
    the measures carry it (`with_fold`, over a whole slide); else no tile is flagged `fold`."""
    m = {k: np.asarray(v, np.float64) for k, v in measures.items()}
    fold = m.get("fold", np.full(len(m["eosin"]), np.nan))
    with np.errstate(invalid="ignore"):
        pen = np.max([m[f"pen {c}"] for c in ("red", "green", "blue")], axis=0)
        return {
            "background": m["background"] >= thresholds.background,
            "pen": pen >= thresholds.pen,
            "fold": (fold >= thresholds.fold) & (m["eosin"] >= thresholds.fold_eosin),
            "blur": m["blur µm"] >= thresholds.blur_um,
            "out of focus": m["out of focus"] >= thresholds.out_of_focus,
            "compression": m["compression"] >= thresholds.compression,
        }


def qc_classes(measures: dict[str, np.ndarray], thresholds: QCThresholds = QCThresholds()) -> np.ndarray:
    """Each tile's QC class: the first artefact of ARTEFACTS it shows, else `ok` (object array)."""
    flags = artefact_flags(measures, thresholds)
    n = len(next(iter(flags.values()))) if flags else 0
    out = np.full(n, OK, dtype=object)
    for kind in reversed(list(ARTEFACTS)):
        out[flags[kind]] = kind
    return out
