"""The results writers on SlideResults laid out like real inference output: QuPath conformance of
the written files (checked on the files, independently of the writer), regions valid after
rounding with holes kept, heatmap alignment, the CLAM/TRIDENT h5 layout, run.json and `.done`."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from pathapp.results import SlideResult, is_done, write_results
from pathapp.results.geojson import class_regions
from pathapp.results.heatmap import heatmap_scale, tile_cells
from pathapp.results.pictures import image_box
from qupath_rules import assert_qupath_conformant

SLIDE_W, SLIDE_H, SLIDE_MPP = 2220, 2967, 0.499  # CMU-1-Small-Region.svs
CLASSES = ["Tumor", "Stroma", "Background"]
COLORS = [(200, 0, 0), (150, 200, 150), (255, 255, 255)]


def grid_result(n_side: int = 9, headless: bool = False, footprint: float = 224 * 0.5 / SLIDE_MPP) -> SlideResult:
    """A full grid of tiles whose classes form rings: Tumor in the centre, a Stroma ring around it
    and Background outside, so Stroma's region must keep a hole. Footprint is fractional, as in
    real runs (0.5 µm/px tiles on a 0.499 µm/px slide), so neighbouring squares do not share
    exact edges after the integer rounding of corners."""
    ij = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2)
    coords = np.round(ij * footprint).astype(np.int64)
    r = np.abs(ij - (n_side - 1) / 2).max(axis=1)
    labels = np.where(r < 2, 0, np.where(r < 4, 1, 2))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(ij), 3))
    logits[np.arange(len(ij)), labels] += 8  # noise never flips the ring pattern
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    attention = rng.random(len(ij))
    attention[3] = np.nan  # a NaN measurement must be left out, never written
    return SlideResult(
        slide_path="/data/CMU-1-Small-Region.svs",
        slide_name="CMU-1-Small-Region",
        coords=coords,
        footprint=footprint,
        tile_size=224,
        mpp=0.5,
        slide_mpp=SLIDE_MPP,
        slide_size=(SLIDE_W, SLIDE_H),
        class_names=[] if headless else CLASSES,
        class_colors=[] if headless else COLORS,
        probs=None if headless else probs.astype(np.float32),
        embeddings=rng.normal(size=(len(ij), 16)).astype(np.float32),
        extra={"attention": attention},
        thumbnail=np.full((512, round(512 * SLIDE_W / SLIDE_H), 3), 230, np.uint8),
        model_name="tiny-vit",
        params={"batch_size": 4},
        timings={"model": 1.0},
    )


def test_tiles_geojson_conformant_with_class_colour_and_measurements(tmp_path):
    res = grid_result()
    write_results(res, tmp_path)
    feats = assert_qupath_conformant(tmp_path / "tiles.geojson")
    assert len(feats) == len(res)
    labels = res.probs.argmax(1)
    # Features keep the tile order; check class, colour, geometry and measurements per tile.
    for i, f in enumerate(feats):
        p = f["properties"]
        assert p["objectType"] == "tile"
        assert p["classification"] == {"name": CLASSES[labels[i]], "color": list(COLORS[labels[i]])}
        m = p["measurements"]
        for k, c in enumerate(CLASSES):
            assert m[f"prob: {c}"] == pytest.approx(res.probs[i, k], abs=1e-6)
        assert m["max prob"] == pytest.approx(res.probs[i].max(), abs=1e-6)
        assert m["entropy"] == pytest.approx(-(res.probs[i] * np.log(res.probs[i])).sum(), rel=1e-5)
        assert ("attention" in m) == (i != 3)
        x0, y0, x1, y1 = shape(f["geometry"]).bounds
        assert (x0, y0) == tuple(res.coords[i]) and x1 - x0 == pytest.approx(res.footprint, abs=0.01)


def test_detection_objects_and_headless_bundle(tmp_path):
    write_results(grid_result(), tmp_path / "det", object_type="detection")
    feats = assert_qupath_conformant(tmp_path / "det" / "tiles.geojson")
    assert {f["properties"]["objectType"] for f in feats} == {"detection"}

    res = grid_result(headless=True)
    files = {p.name for p in write_results(res, tmp_path / "headless")}
    feats = assert_qupath_conformant(tmp_path / "headless" / "tiles.geojson")
    assert len(feats) == len(res)
    assert all("classification" not in f["properties"] for f in feats)
    assert all(not any(k.startswith("prob") for k in f["properties"].get("measurements", {})) for f in feats)
    assert "pca.png" in files and {n for n in files if n.startswith("heatmap-")} == {"heatmap-attention.png"}
    assert json.loads((tmp_path / "headless" / "annotations.geojson").read_text())["features"] == []
    pca, scale = slide_area(tmp_path / "headless" / "pca.png")
    centres = ((res.coords + res.footprint / 2) / scale).astype(int)
    rgb = pca[centres[:, 1], centres[:, 0]].astype(float)
    assert rgb.std(axis=0).min() > 10  # tiles differ in colour


def test_annotations_valid_after_rounding_with_holes_and_areas(tmp_path):
    res = grid_result()
    write_results(res, tmp_path)
    feats = assert_qupath_conformant(tmp_path / "annotations.geojson")
    by_class = {f["properties"]["classification"]["name"]: f for f in feats}
    assert set(by_class) == set(CLASSES)
    labels = res.probs.argmax(1)
    for k, c in enumerate(CLASSES):
        f = by_class[c]
        g = shape(f["geometry"])
        assert f["properties"]["objectType"] == "annotation"
        # Seams between fractional squares are closed: one connected region per class here.
        assert g.geom_type == "Polygon", f"{c}: {g.geom_type}"
        n = int((labels == k).sum())
        assert g.area == pytest.approx(n * res.footprint**2, rel=0.02)
        m = f["properties"]["measurements"]
        assert m["Area µm^2"] == pytest.approx(g.area * SLIDE_MPP**2, rel=1e-3)
        assert m["Mean prob"] == pytest.approx(res.probs[labels == k, k].mean(), abs=1e-6)
    assert len(shape(by_class["Stroma"]["geometry"]).interiors) == 1  # the ring keeps its hole
    assert len(shape(by_class["Background"]["geometry"]).interiors) == 1


def test_touching_squares_stay_valid_after_rounding():
    """Squares overlapping by a few thousandths of a pixel (integer corners, footprint 100.004), not
    smoothed: the union must still survive QuPath's 0.01 snap."""
    res = grid_result(n_side=6, footprint=100.004)
    for g in class_regions(res, smooth=0.0).values():
        assert g.is_valid and shapely.set_precision(g, 0.01, mode="pointwise").is_valid


def slide_area(path) -> tuple[np.ndarray, float]:
    """The slide image inside a picture (placed 1:1, located by the PNG's own text chunks), and its
    scale in level-0 px per pixel."""
    x, y, w, h = image_box(path)
    with Image.open(path) as im:
        scale = float(im.text["pathapp:scale"])
        return np.asarray(im.convert("RGB"))[y:y + h, x:x + w], scale


def test_heatmaps_align_with_tiles_and_overlay_is_visible(tmp_path):
    from matplotlib import colormaps

    res = grid_result()
    write_results(res, tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["heatmap"]["scale"] == pytest.approx(heatmap_scale(res))
    rows, cols = tile_cells(res)
    centres = res.coords + res.footprint / 2
    with h5py.File(tmp_path / "embeddings.h5") as f:  # the raw maps, for programs
        assert f["heatmaps"].attrs["scale"] == pytest.approx(res.footprint)
        for k, c in enumerate(CLASSES):
            grid = f["heatmaps"][c][()]
            assert grid.shape == (run["heatmap"]["height"], run["heatmap"]["width"])
            assert grid.shape[1] == math.ceil(SLIDE_W / run["heatmap"]["scale"])
            np.testing.assert_allclose(grid[rows, cols], res.probs[:, k], atol=1e-6)
            assert np.isfinite(grid).sum() == len(res)
    for k, c in enumerate(CLASSES):  # the pictures: thumbnail resolution, viridis, colour bar beside
        pic, scale = slide_area(tmp_path / f"heatmap-{c}.png")
        assert pic.shape == res.thumbnail.shape and scale == pytest.approx(SLIDE_W / res.thumbnail.shape[1], rel=1e-4)
        px = pic[(centres[:, 1] / scale).astype(int), (centres[:, 0] / scale).astype(int)].astype(float)
        expected = 0.2 * (140 + 0.45 * 230) + 0.8 * colormaps["viridis"](res.probs[:, k])[:, :3] * 255
        np.testing.assert_allclose(px, expected, atol=3)
        assert (pic[-2, pic.shape[1] // 2] == round(140 + 0.45 * 230)).all()  # untiled strip: greyed slide
        with Image.open(tmp_path / f"heatmap-{c}.png") as im:
            panel = np.asarray(im.convert("RGB"))[:, pic.shape[1]:]
        assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 100  # the colour bar is drawn
    overlay, scale = slide_area(tmp_path / "overlay.png")
    assert overlay.shape == res.thumbnail.shape
    # The Tumor centre of the slide shows red; the untiled bottom strip stays the thumbnail grey.
    cy = int((res.coords[:, 1].max() + res.footprint) / 2 / scale)
    cx = int((res.coords[:, 0].max() + res.footprint) / 2 / scale)
    r, g, b = overlay[cy, cx].astype(int)
    assert r > g + 40 and r > b + 40
    assert (overlay[-2, overlay.shape[1] // 2:] == 230).all()  # (the scale bar sits bottom left)


@pytest.mark.parametrize("name", ["viridis", "inferno"])
def test_pictures_colour_as_matplotlib_does(name):
    """The pictures' colour maps (from `cmap`, so a run need not import matplotlib) give matplotlib's
    colours exactly, at the ends, between its 256 entries, and for a NaN (black)."""
    from matplotlib import colormaps

    from pathapp.results.pictures import ColourBar, colourise

    values = np.concatenate([np.linspace(-0.5, 1.5, 4001), [np.nan]])
    expected = np.round(colormaps[name](np.clip(values, 0, 1))[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(colourise(values * 4 + 2, ColourBar("x", 2.0, 6.0, name)), expected)


def test_blend_rounds_exactly_as_float32_arithmetic():
    """blend works in place for speed; its bytes stay those of base + (colour − base)·alpha in float32,
    rounded half to even and clipped, for a greyed (float32) or plain (uint8) base, alpha per pixel or one."""
    from pathapp.results.pictures import blend

    rng = np.random.default_rng(0)
    grey = (140 + 0.45 * rng.integers(0, 256, (64, 64, 1)).astype(np.float32)).repeat(3, axis=2)
    colour = rng.normal(128, 100, (64, 64, 3))  # float64, partly outside 0..255
    alpha = rng.choice([0.0, 0.45, 0.8, 1.0, rng.random()], (64, 64))
    for base, a in [(grey, alpha), (grey.astype(np.uint8), alpha), (grey.astype(np.uint8), 0.5)]:
        a32 = np.asarray(a, np.float32)
        exact = np.float32(base) + (np.float32(colour) - base) * (a32[..., None] if a32.ndim else a32)
        np.testing.assert_array_equal(blend(base, colour, a), np.round(np.clip(exact, 0, 255)).astype(np.uint8))


def test_embeddings_h5_layout(tmp_path):
    res = grid_result()
    write_results(res, tmp_path)
    with h5py.File(tmp_path / "embeddings.h5") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == res.embeddings.shape
        assert f["coords"].dtype.kind == "i" and f["coords"].shape == (len(res), 2)
        np.testing.assert_array_equal(f["features"][()], res.embeddings)
        np.testing.assert_array_equal(f["coords"][()], res.coords)
        assert f.attrs["mpp"] == 0.5 and f.attrs["slide_mpp"] == SLIDE_MPP and f.attrs["tile_size"] == 224
        assert f.attrs["model"] == "tiny-vit" and f.attrs["slide"] == "CMU-1-Small-Region"
        assert f.attrs["patch_size_level0"] == round(res.footprint)
        assert f["coords"].attrs["patch_level"] == 0


def test_run_json_done_marker_and_no_temp_files(tmp_path):
    res = grid_result()
    files = write_results(res, tmp_path)
    assert is_done(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in files] + [".done", ".pathapp"])
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["counts"]["tiles"] == len(res)
    assert sum(v for k, v in run["counts"].items() if k.startswith("class: ")) == len(res)
    assert run["versions"]["pathapp"] and run["versions"]["torch"]
    assert {"model", "write"} <= set(run["timings"])
    assert run["parameters"] == {"batch_size": 4}


def test_many_tiles_write_fast_enough(tmp_path):
    """10^4 tiles: vectorised boxes and unions keep the writers well within a few seconds."""
    import time

    res = grid_result(n_side=100, footprint=100.2)
    res.slide_size = (10100, 10100)
    t = time.perf_counter()
    write_results(res, tmp_path)
    assert time.perf_counter() - t < 60  # generous for a loaded 2-core machine; typical ~3 s
    assert len(json.loads((tmp_path / "tiles.geojson").read_text())["features"]) == 10_000


def test_slide_without_tiles_still_completes(tmp_path):
    """A tiny or blank slide gives zero tiles: valid empty files, a (0, D) h5, and `.done`."""
    res = grid_result()
    keep = np.zeros(len(res), bool)
    res.coords, res.probs, res.embeddings = res.coords[keep], res.probs[keep], res.embeddings[keep]
    res.extra = {k: v[keep] for k, v in res.extra.items()}
    write_results(res, tmp_path)
    assert is_done(tmp_path)
    assert assert_qupath_conformant(tmp_path / "tiles.geojson") == []
    with h5py.File(tmp_path / "embeddings.h5") as f:
        assert f["features"].shape == (0, 16) and f["coords"].shape == (0, 2)


@pytest.mark.parametrize("task,outputs", [("classification", {"benign": 0.3, "malignant": 0.7}),
                                          ("survival", {"risk": -0.42}), ("regression", {"tils": 12.5})])
def test_slide_head_prediction_is_one_annotation_over_the_tissue(tmp_path, task, outputs):
    """A slide head's prediction (ABMIL: classes, a Cox risk or a value) becomes one QuPath annotation
    named "slide" covering every analysed tile (rings with holes included), with the prediction as
    measurements; a headless result has none."""
    res = grid_result(headless=True)
    res.coords[40] = (0, 2700)  # a tile detached from the others (below the grid): the union has two parts
    res.slide_outputs, res.slide_task = outputs, task
    write_results(res, tmp_path)
    feats = assert_qupath_conformant(tmp_path / "annotations.geojson")
    assert [f["properties"]["name"] for f in feats] == ["slide"]
    p = feats[0]["properties"]
    geom = shape(feats[0]["geometry"])
    assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2
    assert geom.area == pytest.approx(len(res) * res.footprint**2, rel=1e-3)
    assert p["measurements"]["Tiles"] == len(res)
    assert p["measurements"]["Area µm^2"] == pytest.approx(geom.area * SLIDE_MPP**2, rel=1e-6)
    if task == "classification":
        assert p["classification"]["name"] == "malignant"
        assert p["measurements"]["prob: malignant"] == pytest.approx(0.7)
    else:
        assert "classification" not in p
        assert p["measurements"][next(iter(outputs))] == pytest.approx(next(iter(outputs.values())))


def test_principal_components_match_sklearn_pca():
    """pca.png's components without importing sklearn: the same scores as sklearn's PCA, signs included."""
    from sklearn.decomposition import PCA

    from pathapp.results.heatmap import principal_components

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12)
    ours = principal_components(x, 3)
    ref = PCA(n_components=3).fit_transform(x)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
