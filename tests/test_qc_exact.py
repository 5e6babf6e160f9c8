"""The fast per-tile QC (integer channels, table lookups, no float modulo) gives what the plain formulas
give: the same masks bit for bit and the same measures within float32 rounding, on every 8-bit colour
and on real tiles (JPEG and JPEG 2000 slides, histolab's pen and glass tiles, NCT-CRC-HE)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from conftest import data_file
from pathapp.slide import open_slide
from pathapp.tiles.qc import GLASS_CHROMA, measure_tile, qc_classes
from pathapp.tiles.tissue import grey_levels, hsv, pen_colours, tissue_pixels, to_rgb


def plain_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The textbook float32 formula (pathapp's hsv before it was made fast)."""
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    mx, mn = f.max(axis=2), f.min(axis=2)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1.0), 0.0).astype(np.float32)
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return (hue * 60.0).astype(np.float32), sat, mx / 255.0


def plain_measures(rgb: np.ndarray, mpp: float) -> dict[str, float]:
    """`measure_tile`'s masks and measures by the plain formulas: axis-2 reductions, logarithms and
    rgb2hed instead of tables, the JPEG grid score through the transpose; focus by its own function."""
    from pathapp.tiles.qc import FOLD_WINDOW_UM, JPEG_BLOCK, COMPRESSION_FLOOR, focus_measures, ink_fraction

    inks = pen_colours(*plain_hsv(rgb))
    od = -np.log10((rgb.astype(np.float32) + 1.0) / 256.0)
    glass = (od.max(axis=2) - od.min(axis=2) < GLASS_CHROMA) & ~np.logical_or.reduce(list(inks.values()))
    grey = rgb.astype(np.float32).mean(axis=2)
    blur, oof = focus_measures(grey / 255.0, mpp, 0.25)
    eosin = np.clip(rgb2hed(rgb)[..., 1], 0, None).astype(np.float32)
    scores = []
    for a in (grey, grey.T):
        d = np.abs(np.diff(a, axis=1)).mean(axis=0)
        phase = d[: len(d) // JPEG_BLOCK * JPEG_BLOCK].reshape(-1, JPEG_BLOCK).mean(axis=0)
        scores.append((phase.max() - np.median(phase)) / max(float(phase.mean()), COMPRESSION_FLOOR))
    return {"background": float(glass.mean()), **{f"pen {c}": ink_fraction(m, mpp) for c, m in inks.items()},
            "eosin": float(np.percentile(ndi.uniform_filter(eosin, int(round(FOLD_WINDOW_UM / mpp))), 90)),
            "blur µm": blur, "out of focus": oof, "compression": float(np.mean(scores))}


def test_hsv_and_grey_are_the_formula_on_every_colour():
    """All 2^24 colours: hue, saturation and value bit for bit (so every ink and tissue mask on any
    tile is too), and the grey level the channel mean's."""
    for red in range(0, 256, 32):
        cube = np.stack(np.meshgrid(np.arange(red, red + 32), np.arange(256), np.arange(256), indexing="ij"), -1)
        cube = cube.astype(np.uint8).reshape(-1, 4096, 3)
        for name, fast, plain in zip(("hue", "saturation", "value"), hsv(cube), plain_hsv(cube)):
            assert fast.dtype == np.float32 and np.array_equal(fast.view(np.uint32), plain.view(np.uint32)), name
        assert np.array_equal(grey_levels(cube), cube.astype(np.float32).mean(axis=2))


def _real_tiles() -> list[tuple[str, np.ndarray]]:
    """224 px tiles read as infer reads them: CMU-1 (JPEG) across the slide (tissue and glass), a
    JPEG 2000 SVS, and histolab's labelled QC tiles (pen, glass, IHC) and NCT-CRC-HE."""
    tiles = []
    for rel, step in (("wsi/aperio/CMU-1-Small-Region.svs", 700), ("wsi/aperio/tcga-cr-7395-01a-01-ts1.svs", 1100)):
        slide = open_slide(data_file(rel))
        w, h = slide.size
        tiles += [(f"{rel}@{x},{y}", to_rgb(slide.read(x, y, 224, 224)))
                  for y in range(0, h - 224, step) for x in range(0, w - 224, step)]
    folder = data_file("tiles/histolab-qc-tiles/no-tissue.png").parent
    nct = data_file("tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif").parents[1]
    for p in sorted(folder.glob("*.png")) + sorted(nct.glob("*/*.tif")):
        rgb = to_rgb(np.asarray(Image.open(p)))
        if min(rgb.shape[:2]) >= 224:
            tiles.append((p.name, np.ascontiguousarray(rgb[:224, :224])))
    return tiles


def test_measures_are_the_plain_formulas_on_real_tiles():
    tiles = _real_tiles()
    assert len(tiles) >= 60
    inked = 0
    for name, rgb in tiles:
        got, want = measure_tile(rgb, 0.5), plain_measures(rgb, 0.5)
        for k in ("background", "pen red", "pen green", "pen blue", "blur µm", "out of focus"):  # exact masks
            assert got[k] == want[k] or (np.isnan(got[k]) and np.isnan(want[k])), (name, k, got[k], want[k])
        for k in ("eosin", "compression"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (name, k, got[k], want[k])
        inked += max(got["pen red"], got["pen green"], got["pen blue"]) > 0
    assert inked >= 3  # the comparison covered ink masks, not only empty ones


def test_tissue_mask_is_the_formula_on_low_resolution_views():
    """Tissue detection (planning every slide) thresholds the same HSV: the same mask on real views."""
    for rel in ("wsi/aperio/CMU-1-Small-Region.svs", "wsi/ome-tiff/OS-2-ndpi.ome.tif"):
        rgb, _ = open_slide(data_file(rel)).read_low_res(16.0)
        hue, sat, value = plain_hsv(rgb)
        plain = (sat > 0.07) & ~np.logical_or.reduce(list(pen_colours(hue, sat, value).values()))
        assert plain.any() and np.array_equal(tissue_pixels(rgb, 0.07), plain), rel


@pytest.mark.parametrize("tile, expected", [("no-tissue-red-pen.png", "pen"), ("no-tissue-green-pen.png", "pen"),
                                            ("almost-white-1.png", "background"), ("no-tissue.png", "background")])
def test_pen_and_glass_tiles_keep_their_class(tile, expected):
    rgb = to_rgb(np.asarray(Image.open(data_file(f"tiles/histolab-qc-tiles/{tile}"))))
    measures = {k: np.array([v]) for k, v in measure_tile(rgb, 0.5).items()}
    assert list(qc_classes(measures)) == [expected]
