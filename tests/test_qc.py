"""Per-tile QC: the blur estimate's physics, and precision / recall of every flag on real tiles
(histolab's labelled QC tiles, and real tissue tiles damaged by a known amount)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage as ndi

from conftest import data_file
from pathapp.slide import open_slide
from pathapp.tiles import detect_tissue, make_grid, read_tile
from pathapp.tiles import qc_cases
from pathapp.tiles.qc import OK, QCThresholds, measure_tile, measure_tiles, open_disk, qc_classes


def test_blur_estimate_recovers_a_known_edge_blur():
    """A straight edge blurred by σ gives r = sqrt((s2² + σ²) / (s1² + σ²)) exactly: the estimate is σ,
    whatever the edge's contrast, and it is in µm at the tile's µm/px."""
    edge = np.zeros((128, 128), np.float32)
    edge[:, 64:] = 1.0
    for sigma_px in (1.0, 2.0, 4.0):
        for contrast in (0.2, 0.8):
            grey = 0.9 - contrast * ndi.gaussian_filter(edge, sigma_px)
            tile = np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)
            got = measure_tile(tile, 0.5)["blur µm"]
            assert got == pytest.approx(sigma_px * 0.5, rel=0.15), (sigma_px, contrast, got)
    # a finer tile is measured at QC_MPP: the same physical blur gives the same µm
    fine = np.repeat((255 * (0.9 - 0.6 * ndi.gaussian_filter(np.tile(edge, (2, 2)), 4.0))).astype(np.uint8)[..., None], 3, 2)
    assert measure_tile(fine, 0.25)["blur µm"] == pytest.approx(1.0, rel=0.2)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), radius=st.integers(1, 14), smooth=st.floats(0.5, 6.0),
       level=st.floats(0.4, 0.6), shape=st.tuples(st.integers(1, 90), st.integers(1, 90)))
def test_open_disk_is_scipys_binary_opening_by_a_disk(seed, radius, smooth, level, shape):
    """The fast opening (distance transforms) keeps exactly the pixels scipy's opening by skimage's disk
    keeps, at the image border too, so fold and pen fractions do not change with the speed-up."""
    from skimage.morphology import disk

    mask = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), smooth) > level
    np.testing.assert_array_equal(open_disk(mask, radius), ndi.binary_opening(mask, structure=disk(radius)))


def test_compression_needs_a_whole_block_grid():
    tile = np.asarray(Image.open(data_file("tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif")).convert("RGB"))
    damaged = qc_cases.jpeg(tile, 10)
    assert measure_tile(damaged, 0.5)["compression"] > QCThresholds().compression
    assert np.isnan(measure_tile(damaged, 0.5, resample=224 / 325)["compression"])  # 8 px -> 5.5 px


def test_class_is_the_first_artefact_or_ok():
    m = {"background": [0.95, 0.2, 0.2], "pen red": [0.3, 0.0, 0.0], "pen green": [0, 0, 0], "pen blue": [0, 0, 0],
         "eosin": [0, 0, 0], "blur µm": [np.nan, 1.0, 0.0], "out of focus": [np.nan, 1.0, 0.0],
         "compression": [0, 0, 0]}
    assert list(qc_classes({k: np.array(v, float) for k, v in m.items()})) == ["background", "blur", OK]


def test_fold_is_judged_against_the_slide():
    """`fold` is a tile's eosin over the slide's median, flagged from 1.4× with at least the absolute
    floor; measures without `fold` (one batch of a stream, not yet a whole slide) flag no fold."""
    from pathapp.tiles.qc import artefact_flags, with_fold

    t = QCThresholds()
    zeros = np.zeros(5)
    m = {"background": zeros, "pen red": zeros, "pen green": zeros, "pen blue": zeros, "blur µm": zeros,
         "out of focus": zeros, "compression": zeros, "eosin": np.array([0.04, 0.04, 0.04, 0.06, 0.03])}
    slide = with_fold(m)
    assert slide["fold"] == pytest.approx([1.0, 1.0, 1.0, 1.5, 0.75])
    assert list(artefact_flags(slide, t)["fold"]) == [False, False, False, True, False]
    assert not artefact_flags(m, t)["fold"].any()
    pale = with_fold({**m, "eosin": m["eosin"] / 2})  # the same slide, half as stained: 1.5× but under the floor
    assert pale["fold"][3] == pytest.approx(1.5) and not artefact_flags(pale, t)["fold"].any()
    # judged against another set of tiles (a case's clean slide in bench_qc), and no eosin to compare with
    assert with_fold({"eosin": np.array([0.09])}, reference=m["eosin"])["fold"] == pytest.approx([2.25])
    assert np.isnan(with_fold({"eosin": np.zeros(3)})["fold"]).all()


def _slide_tiles(rel: str, n: int) -> list[tuple[str, np.ndarray]]:
    slide = open_slide(data_file(rel))
    grid = make_grid(slide, 0.5, 224, tissue=detect_tissue(slide), min_tissue=0.5)
    pick = np.random.default_rng(0).permutation(len(grid))[:n]
    return [(f"{rel}#{i}", read_tile(slide, grid, int(i))) for i in sorted(pick)]


@pytest.fixture(scope="module")
def scored():
    folder = data_file("tiles/histolab-qc-tiles/no-tissue.png").parent
    tiles = (_slide_tiles("wsi/aperio/CMU-1-Small-Region.svs", 3) + _slide_tiles("wsi/ome-tiff/OS-1-detail.ome.tif", 3)
             + _slide_tiles("wsi/aperio/luna-1065626.svs", 3))
    nct = sorted(data_file("tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif").parents[1].glob("*/*.tif"))
    tiles += [(f"nct#{p.parent.name}", np.asarray(Image.open(p).convert("RGB"))) for p in nct
              if p.parent.name not in {"BACK", "MUC"}]
    uncompressed = {n for n, _ in tiles if "OS-1" in n or "luna" in n}
    cases = qc_cases.histolab_cases(folder) + qc_cases.synthetic_cases(tiles, 0.5, jpeg_sources=uncompressed)
    return qc_cases.evaluate(cases)


# floors well under what bench_qc.py measures (README): a broken detector falls through them
FLOORS = {"background": (0.5, 0.75), "pen": (0.7, 1.0), "fold": (0.7, 0.5), "blur": (0.95, 0.85),
          "out of focus": (0.9, 0.85), "compression": (0.9, 0.85)}


@pytest.mark.parametrize("flag", list(FLOORS))
def test_flag_precision_and_recall(scored, flag):
    scores, _ = scored
    precision, recall = FLOORS[flag]
    s = scores[flag]
    assert s.tp + s.fn > 0 and s.precision >= precision and s.recall >= recall, (flag, s)


def test_clean_and_pale_tissue_raise_no_flag(scored):
    _, rows = scored
    judged = [r for r in rows if r["group"] in {"clean", "pale ×0.6"}]
    assert len(judged) >= 30
    assert [r for r in judged if r["fired"]] == []
    tissue = [r for r in rows if r["group"] == "histolab" and not r["expected"]]
    assert len(tissue) >= 15 and [r["name"] for r in tissue if set(r["fired"]) & {"background", "pen"}] == []


def test_densities_from_tables_are_rgb2hed_and_the_formula_on_real_tiles():
    """`measure_tile` reads optical densities from 256-entry tables (no logarithm per pixel): on real
    tiles (the NCT-CRC-HE tiles, histolab's QC tiles with pen, glass and IHC) the eosin density is
    skimage's rgb2hed within float rounding, and `background` is the glass of the OD formula exactly."""
    from skimage.color import rgb2hed

    from pathapp.tiles.qc import GLASS_CHROMA, eosin_density, optical_densities
    from pathapp.tiles.tissue import hsv, pen_colours, to_rgb

    nct = sorted(data_file("tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif").parents[1].glob("*/*.tif"))
    histolab = sorted(data_file("tiles/histolab-qc-tiles/no-tissue.png").parent.glob("*.png"))
    tiles = [to_rgb(np.asarray(Image.open(p)))[:224, :224] for p in nct + histolab]  # 224 px, as infer reads
    assert len(tiles) >= 40
    for rgb in tiles:
        expected = np.clip(rgb2hed(rgb)[..., 1], 0, None).astype(np.float32)
        np.testing.assert_allclose(eosin_density(rgb), expected, rtol=0, atol=1e-6)
        od = optical_densities(rgb)
        ink = np.logical_or.reduce(list(pen_colours(*hsv(rgb)).values()))
        glass = (od.max(axis=2) - od.min(axis=2) < GLASS_CHROMA) & ~ink
        assert measure_tile(rgb, 0.5)["background"] == float(glass.mean())


def test_measure_tiles_columns():
    tile = np.asarray(Image.open(data_file("tiles/nct-crc-he-100k-nonorm-samples/NORM/NORM-AAAWMSFI.tif")).convert("RGB"))
    cols = measure_tiles([tile, qc_cases.blur(tile, 2.0, 0.5)], 0.5)
    assert all(v.shape == (2,) for v in cols.values())
    assert cols["blur µm"][1] > QCThresholds().blur_um > cols["blur µm"][0]
