"""Tissue detection on real tiles and slides: the QC tiles' labels, H&E and IHC slides, low-res reads."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from PIL import Image

from conftest import data_file
from pathapp.slide import open_slide
from pathapp.tiles import DEFAULT_MIN_TISSUE, detect_tissue, tissue_fraction_rgb
from pathapp.slide.base import READ_BLOCK as _BLOCK
from pathapp.tiles.tissue import mask_to_geometry

QC = "tiles/histolab-qc-tiles"
QC_NAMES = [
    "almost-white-1", "almost-white-2", "almost-white-ihc",
    "high-nuclei-score-level0", "high-nuclei-score-level2", "high-nuclei-score-red-pen-level1",
    "low-nuclei-score-level0", "low-nuclei-score-level1",
    "medium-nuclei-score-green-pen-level1", "medium-nuclei-score-level0", "medium-nuclei-score-level1-2",
    "medium-nuclei-score-level1", "medium-nuclei-score-level2",
    "no-tissue-green-pen", "no-tissue-line", "no-tissue-red-pen", "no-tissue", "no-tissue2",
    "tissue-level0-4302-10273-4814-10785", "tissue-level0-7352-11762-7864-12274",
    "tissue-level2-1784-6289-5880-10386", "tissue-level2-3000-7666-7096-11763",
    "tissue-level2-4640-4649-8736-8746", "tissue-level2-4760-5241-8856-9338",
    "very-low-nuclei-score-level0", "very-low-nuclei-score-red-pen-level1",
]


def _qc_tile(name: str) -> np.ndarray:
    with Image.open(data_file(f"{QC}/{name}.png")) as im:
        return np.asarray(im)  # RGBA as stored: tissue_fraction_rgb composites it on white


def _is_tissue_label(name: str) -> bool:
    """The label in a histolab QC file name. Tissue tiles with pen marks stay tissue: the ink pixels
    are not counted, the tissue beside them is."""
    return name.startswith("tissue-") or "-nuclei-score-" in name


@pytest.mark.parametrize("name", QC_NAMES)
def test_qc_tiles_agree_with_their_labels(name: str) -> None:
    frac = tissue_fraction_rgb(_qc_tile(name))
    if _is_tissue_label(name):
        assert frac >= DEFAULT_MIN_TISSUE, f"{name}: tissue tile scored {frac:.3f}"
    else:
        assert frac < DEFAULT_MIN_TISSUE, f"{name}: non-tissue tile scored {frac:.3f}"


def test_all_qc_tiles_are_covered() -> None:
    """The list above is the whole folder: a new file there must get a label decision here."""
    folder = data_file(QC)
    assert sorted(p.stem for p in folder.glob("*.png") if not p.stem.startswith(("kidney-", "liver-"))) == sorted(
        QC_NAMES
    )


@pytest.mark.parametrize("name", ["no-tissue-red-pen", "no-tissue-green-pen"])
def test_ink_is_what_separates_pen_tiles(name: str) -> None:
    """Saturation alone calls pen marks tissue; the ink-colour and focus rules are what reject them."""
    from skimage.color import rgb2hsv

    rgb = _qc_tile(name)
    assert (rgb2hsv(rgb[..., :3])[..., 1] > 0.1).mean() > 0.5
    assert tissue_fraction_rgb(rgb) < DEFAULT_MIN_TISSUE


def test_transparent_pixels_are_background() -> None:
    rgba = _qc_tile("tissue-level0-4302-10273-4814-10785").copy()
    rgba[..., 3] = 0
    assert tissue_fraction_rgb(rgba) == 0.0


def test_mask_to_geometry_keeps_holes_and_scale() -> None:
    mask = np.zeros((40, 50), bool)
    mask[5:35, 5:45] = True  # 30 × 40 block
    mask[15:25, 15:25] = False  # 10 × 10 hole
    mask[37:39, 47:49] = True  # separate 2 × 2 island
    geom = mask_to_geometry(mask, scale=4.0, size=(200, 160))
    assert geom.geom_type == "MultiPolygon" and geom.is_valid
    big = max(geom.geoms, key=lambda g: g.area)
    assert len(big.interiors) == 1
    # marching squares at 0.5 cuts pixel corners: area within a pixel's perimeter share of the truth
    assert big.area == pytest.approx((30 * 40 - 100) * 16, rel=0.03)
    assert shapely.contains_xy(geom, 4 * 20 + 2, 4 * 10 + 2)  # inside the block, level-0 px
    assert not shapely.contains_xy(geom, 4 * 20 + 2, 4 * 20 + 2)  # inside the hole


def test_he_slide_tissue_outline() -> None:
    slide = open_slide(data_file("wsi/aperio/CMU-1-Small-Region.svs"))
    tm = detect_tissue(slide)
    assert tm.geometry.is_valid and not tm.geometry.is_empty
    w, h = slide.size
    assert shapely.box(0, 0, w, h).contains(tm.geometry)
    assert tm.geometry.area == pytest.approx(tm.mask.sum() * tm.scale**2, rel=0.05)
    # stained pixels are inside the mask, glass outside: compare mean saturation of the two
    rgb = tm.rgb.astype(np.float32)
    sat = (rgb.max(2) - rgb.min(2)) / np.maximum(rgb.max(2), 1)
    assert sat[tm.mask].mean() > 0.2 > 0.05 > sat[~tm.mask].mean()
    assert not shapely.contains_xy(tm.geometry, 20, 20)  # the glass in the top-left corner


def test_ihc_slide_dab_and_haematoxylin_are_tissue() -> None:
    """OS-2 is Ki67 IHC: brown DAB nuclei in pale blue haematoxylin; both must count as tissue."""
    slide = open_slide(data_file("wsi/ome-tiff/OS-2-ndpi.ome.tif"))
    tm = detect_tissue(slide, target_mpp=2.0)
    rgb = tm.rgb.astype(np.int32)
    r, b = rgb[..., 0], rgb[..., 2]
    dab = (r > b + 15) & (rgb.max(2) < 200)  # brown: red above blue, darker than background
    haem = (b > r + 15) & (rgb.max(2) < 235)  # blue counterstain
    assert dab.sum() > 20 and haem.sum() > 200
    assert tm.mask[dab].mean() > 0.9
    assert tm.mask[haem].mean() > 0.9
    assert 0.3 < tm.mask.mean() < 0.98  # the crop has glass too


def test_pyramid_slide_reads_only_a_low_level(monkeypatch: pytest.MonkeyPatch) -> None:
    slide = open_slide(data_file("wsi/aperio/luna-1065626.svs"))
    calls = _record_reads(slide, monkeypatch)
    tm = detect_tissue(slide)
    assert calls and all(level == 1 for *_, level in calls)
    assert tm.scale == pytest.approx(16.0, rel=1e-3)  # level 1 (4×) averaged 4 × 4: exact, ≈ 8 µm/px
    assert tm.mask.any()


def test_single_level_slide_is_read_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With only level 0, it is read in bounded blocks and averaged down as it goes."""
    slide = open_slide(data_file("wsi/aperio/CMU-1-Small-Region.svs"))
    calls = _record_reads(slide, monkeypatch)
    rgb, scale = slide.read_low_res(4.0)
    assert len(calls) > 1 and max(w * h for _, _, w, h, _ in calls) <= _BLOCK * _BLOCK
    assert sum(w * h for _, _, w, h, _ in calls) == slide.size[0] * slide.size[1]  # each pixel once
    assert scale == 4.0 and rgb.shape == (-(-slide.size[1] // 4), -(-slide.size[0] // 4), 3)
    # block means equal a direct average of the same pixels
    direct = slide.read(0, 0, 64, 64, 0).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(rgb[:16, :16].astype(float) - direct).max() <= 0.5 + 1e-9


def test_detection_does_not_need_mpp() -> None:
    slide = open_slide(data_file("wsi/aperio/tcga-cr-7395-01a-01-ts1.svs"))
    assert slide.mpp is None
    tm = detect_tissue(slide)
    assert tm.geometry.is_valid and 0.2 < tm.mask.mean() < 0.95


def _record_reads(slide, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int, int]]:
    """Record every region the real reader is asked for (the pixels still come from the file)."""
    calls: list[tuple[int, int, int, int, int]] = []
    original = slide.read

    def read(x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        calls.append((x, y, w, h, level))
        return original(x, y, w, h, level)

    monkeypatch.setattr(slide, "read", read)
    return calls
