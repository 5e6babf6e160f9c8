"""Stain normalisation on real tiles and slides: fits, the batched map against torchstain's own
per-image Macenko, and the bad inputs (no tissue, fluorescence, IHC against H&E, no convergence)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_file
from pathapp.slide import open_slide
from pathapp.tiles import detect_tissue, make_grid, read_tile
from pathapp.tiles import stain
from pathapp.tiles.stain import StainError, StainFit, StainNormalizer

HE_TILE = "tiles/nct-crc-he-100k-nonorm-samples/TUM/TUM-AACHEHDV.tif"
CMU = "wsi/aperio/CMU-1-Small-Region.svs"


def _tiles(rel: str, n: int = 4) -> torch.Tensor:
    slide = open_slide(data_file(rel))
    grid = make_grid(slide, 0.5, 224, tissue=detect_tissue(slide), min_tissue=0.5)
    idx = np.linspace(0, len(grid) - 1, n).round().astype(int)
    return torch.from_numpy(np.stack([read_tile(slide, grid, int(i)) for i in idx])).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def cmu_fit() -> StainFit:
    with open_slide(data_file(CMU)) as slide:
        return stain.fit_slide(slide, "macenko", tiles=8)


def test_references_of_each_kind():
    he = stain.load_reference(data_file(HE_TILE), "macenko")
    assert he.kind == "eosin" and he.pixels >= stain.MIN_PIXELS
    assert stain.load_reference(data_file("misc/skimage_ihc.png"), "macenko").kind == "DAB"
    assert stain.load_reference(data_file("wsi/ome-tiff/OS-2-vsi.ome.tif"), "macenko").kind == "DAB"
    h, e = np.asarray(he.stains).T  # unit optical-density vectors: haematoxylin absorbs red more than eosin does
    assert np.allclose([np.linalg.norm(h), np.linalg.norm(e)], 1, atol=1e-3) and h[0] > e[0] and e[1] > e[2]


def test_macenko_map_equals_torchstain_per_image():
    """With the same source and target stains, the one 3×3 matrix applied to a batch is torchstain's
    own Macenko normalisation of each image."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    x = _tiles(CMU, 2)
    target = stain.load_reference(data_file(HE_TILE), "macenko")
    for tile in x:
        ts = TorchMacenkoNormalizer()
        ts.fit(tile, Io=stain.IO, beta=stain.BETA)  # the tile's own stains, as normalize() computes them
        source = StainFit("macenko", ts.HERef.tolist(), ts.maxCRef.tolist(), [0, 0, 0], [1, 1, 1], "eosin", 0)
        ts.HERef, ts.maxCRef = torch.tensor(target.stains), torch.tensor(target.max_conc)
        expected, _, _ = ts.normalize(tile, Io=stain.IO, beta=stain.BETA, stains=False)  # (H, W, C) int
        got = StainNormalizer(source, target)(tile[None])[0].permute(1, 2, 0).int()
        assert (got - expected.clamp(0, 255)).abs().max() <= 1


@pytest.mark.parametrize("method", stain.METHODS)
def test_normalising_tiles_gives_them_the_reference_stains(method):
    """Fitted again after normalisation, the tiles have the reference's stains (Macenko, Vahadane)
    or its LAB statistics (Reinhard), far closer than before."""
    target = stain.load_reference(data_file(HE_TILE), method)
    x = _tiles(CMU, 4)

    mask = np.stack([stain.stained_mask(t) for t in x.permute(0, 2, 3, 1).numpy()])

    def fitted(batch: torch.Tensor) -> StainFit:  # on the same pixels before and after
        images = batch.permute(0, 2, 3, 1).numpy()
        return stain.fit_pixels(images[mask], method, "CMU tiles", images.reshape(-1, 3))

    def gap(fit: StainFit) -> float:
        if method == "reinhard":
            return float(np.abs(np.subtract(fit.lab_mean, target.lab_mean)).sum())
        cos = np.clip(np.sum(np.asarray(fit.stains) * np.asarray(target.stains), axis=0), -1, 1)
        return float(np.degrees(np.arccos(cos)).max())  # the worse of the two stains' angles

    source = fitted(x)
    stain.check_match(source, target)
    y = StainNormalizer(source, target)(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    before, after = gap(source), gap(fitted(y))
    assert after < 0.5 * before, (method, before, after)


def test_a_slide_mapped_onto_itself():
    """Macenko's map of a slide onto its own fit projects optical densities onto its two stains
    (each stain vector maps to itself); Reinhard's is the identity."""
    x = _tiles(CMU, 2)
    own = stain.fit_image(x.permute(0, 2, 3, 1).reshape(-1, 224, 3).numpy(), "macenko", "CMU tiles")
    m = StainNormalizer(own, own).matrix()
    assert np.allclose(m @ np.asarray(own.stains), own.stains, atol=1e-6) and np.allclose(m @ m, m, atol=1e-6)
    lab = StainFit.from_dict({**own.to_dict(), "method": "reinhard"})
    assert (StainNormalizer(lab, lab)(x).int() - x.int()).abs().float().mean() < 1.0


def test_record_and_saved_target_round_trip(tmp_path, cmu_fit):
    target = stain.load_reference(data_file(HE_TILE), "macenko")
    rec = StainNormalizer(cmu_fit, target).record()
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"stain": rec}))
    again = stain.load_reference(run, "macenko")
    assert again.stains == target.stains and again.max_conc == target.max_conc
    assert np.asarray(rec["od_matrix"]).shape == (3, 3)
    (tmp_path / "t.json").write_text(json.dumps(target.to_dict()))
    with pytest.raises(StainError, match="fitted with macenko; use --stain-norm macenko"):
        stain.load_reference(tmp_path / "t.json", "reinhard")


def test_bad_references_and_slides_say_what_to_do(cmu_fit):
    with pytest.raises(StainError, match="no tissue to fit a stain on"):
        stain.load_reference(data_file("tiles/histolab-qc-tiles/almost-white-1.png"), "macenko")
    with pytest.raises(StainError, match="fluorescence"):
        stain.load_reference(data_file("wsi/qptiff/small_vectra.qptiff"), "reinhard")
    with open_slide(data_file("wsi/ome-tiff/OS-2-ndpi.ome.tif")) as slide:
        ihc = stain.fit_slide(slide, "macenko", tiles=8)
    with pytest.raises(StainError, match=r"OS-2-ndpi.*IHC.*reference .*TUM.* is H&E") as e:
        stain.check_match(ihc, stain.load_reference(data_file(HE_TILE), "macenko"))
    assert "\n" not in str(e.value)
    stain.check_match(ihc, stain.load_reference(data_file("wsi/ome-tiff/OS-2-vsi.ome.tif"), "macenko"))
    with pytest.raises(StainError, match="no such stain reference"):
        stain.load_reference(data_file(HE_TILE).with_name("missing.tif"), "macenko")


def test_vahadane_that_does_not_converge_falls_back_to_macenko(monkeypatch):
    tile = np.asarray(Image.open(data_file(HE_TILE)).convert("RGB"))
    monkeypatch.setattr(stain, "VAHADANE_MAX_ITER", 1)  # one dictionary-learning pass cannot converge
    fit = stain.fit_image(tile, "vahadane", "tile")
    assert fit.method == "vahadane" and fit.notes == ["vahadane did not converge; fitted with macenko instead"]
    assert np.allclose(fit.stains, stain.fit_image(tile, "macenko", "tile").stains)


def test_vahadane_that_disagrees_with_macenko_on_the_second_stain_falls_back():
    """An EBHI-Seg H&E crop with little eosin: the sparse dictionary's second stain leans to blue (DAB),
    which stopped a whole `evaluate --stain-norm vahadane` against an H&E reference; Macenko finds eosin."""
    rgb = np.asarray(Image.open(data_file("labeled/ebhi-seg/EBHI-SEG/High-grade IN/image/GTXC2015403-1-400-003.png"))
                     .convert("RGB"))
    fit = stain.fit_image(rgb, "vahadane", "crop")
    assert fit.kind == "eosin" and fit.notes == ["vahadane found DAB where macenko finds eosin; fitted with macenko instead"]
    stain.check_match(fit, stain.load_reference(data_file(HE_TILE), "macenko"))  # an H&E target: no error


def test_a_slide_whose_fit_fails_is_left_unnormalised_and_says_so(monkeypatch):
    target = stain.load_reference(data_file(HE_TILE), "reinhard")
    with open_slide(data_file(CMU)) as slide:
        grid = make_grid(slide, 0.5, 224)
        norm, rec = stain.slide_normalizer(slide, grid, target)
        assert norm is not None and rec["slide"]["kind"] == "eosin" and "fallback" not in rec
        with open_slide(data_file("wsi/ome-tiff/OS-2-vsi.ome.tif")) as ihc, pytest.raises(StainError, match="IHC"):
            stain.slide_normalizer(ihc, make_grid(ihc, 0.5, 224), target)
        monkeypatch.setattr(stain, "MIN_PIXELS", 10**9)  # no slide has that much tissue in 64 tiles
        norm, rec = stain.slide_normalizer(slide, grid, target)
    assert norm is None and rec["fallback"].startswith("not normalised: ") and "stained pixels" in rec["fallback"]
