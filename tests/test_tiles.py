"""Tile grids at a target µm/px on real slides, the tile dataset, and the `pathapp tile` command."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import shapely
from PIL import Image

from conftest import data_file
from pathapp.errors import MissingMppError
from pathapp.qupath.geojson import QuPathObject, read_objects, read_rois, write_objects
from pathapp.slide import open_slide
from pathapp.tiles import TileDataset, detect_tissue, make_grid, read_tile, tile_boxes, tile_polygons

CMU = "wsi/aperio/CMU-1-Small-Region.svs"
NO_MPP = "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="module")
def cmu():
    slide = open_slide(data_file(CMU))
    return slide, detect_tissue(slide)


def test_footprints_are_exact_and_inside_the_slide(cmu) -> None:
    slide, tissue = cmu
    grid = make_grid(slide, 0.5, 224, tissue=tissue)
    assert slide.mpp == pytest.approx(0.499)
    assert grid.footprint == pytest.approx(224 * 0.5 / 0.499)
    assert (grid.level, grid.read_size, grid.tile_size) == (0, 224, 224)
    boxes = tile_boxes(grid)
    w, h = slide.size
    assert len(boxes) > 20
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] < w).all() and (boxes[:, 1] < h).all()
    inside = (boxes[:, 2] <= w) & (boxes[:, 3] <= h)  # the others are edge tiles, padded beyond the slide
    padding = grid.geometry.padding(grid.coords, grid.slide_size)
    assert (padding[inside] == 0).all() and (padding[~inside] > 0).all() and (~inside).any()
    assert np.allclose(boxes[:, 2] - boxes[:, 0], 224 * 0.5 / 0.499)
    assert all(p.bounds[2] - p.bounds[0] == pytest.approx(224 * 0.5 / 0.499) for p in tile_polygons(grid))
    assert (grid.tissue_fraction >= 0.1).all()


def test_tiles_cover_the_tissue(cmu) -> None:
    """Tissue left outside the kept tiles: only tiles under 10 % tissue (edge tiles reach past the
    slide, so no edge strip is out of reach)."""
    slide, tissue = cmu
    grid = make_grid(slide, 0.5, 224, tissue=tissue)
    union = shapely.union_all(tile_polygons(grid))
    boxes = tile_boxes(grid)
    reachable = shapely.box(0, 0, boxes[:, 2].max(), boxes[:, 3].max())
    area = tissue.geometry.area
    assert tissue.geometry.difference(union).area / area < 0.06
    assert tissue.geometry.intersection(reachable).difference(union).area / area < 0.02
    every = shapely.union_all(tile_polygons(make_grid(slide, 0.5, 224, tissue=tissue, min_tissue=0.0)))
    assert tissue.geometry.intersection(reachable).difference(every).area / area < 0.005  # sub-pixel seams


def test_doubling_mpp_halves_tiles_per_axis(cmu) -> None:
    slide, tissue = cmu
    fine = make_grid(slide, 0.5, 224, tissue=tissue, min_tissue=0.0)
    coarse = make_grid(slide, 1.0, 224, tissue=tissue, min_tissue=0.0)
    assert coarse.footprint == pytest.approx(2 * fine.footprint)
    for axis in (0, 1):
        n_fine, n_coarse = len(np.unique(fine.coords[:, axis])), len(np.unique(coarse.coords[:, axis]))
        assert n_coarse == n_fine // 2  # 10 → 5 across, 14 → 7 down (edge tiles reach past the slide)
    # the grids nest: each 1.0 µm/px tile is exactly four 0.5 µm/px tiles, and so is its tissue
    fx, fy = np.unique(fine.coords[:, 0]), np.unique(fine.coords[:, 1])
    cx, cy = np.unique(coarse.coords[:, 0]), np.unique(coarse.coords[:, 1])
    assert np.array_equal(cx, fx[: 2 * len(cx) : 2]) and np.array_equal(cy, fy[: 2 * len(cy) : 2])
    index = {tuple(c): f for c, f in zip(fine.coords.tolist(), fine.tissue_fraction)}
    whole = coarse.geometry.padding(coarse.coords, coarse.slide_size) == 0  # edge tiles count their part on the slide
    for (x, y), frac in zip(coarse.coords[whole].tolist(), coarse.tissue_fraction[whole]):
        i, j = np.searchsorted(fx, x), np.searchsorted(fy, y)
        children = [index[(int(fx[i + dx]), int(fy[j + dy]))] for dy in (0, 1) for dx in (0, 1)]
        assert frac == pytest.approx(np.mean(children), abs=0.01)
    kept_fine = make_grid(slide, 0.5, 224, tissue=tissue)
    kept_coarse = make_grid(slide, 1.0, 224, tissue=tissue)
    assert len(kept_fine) / 4 - 6 <= len(kept_coarse) <= len(kept_fine) / 4 + 6


def test_overlap_shortens_the_stride(cmu) -> None:
    slide, tissue = cmu
    grid = make_grid(slide, 0.5, 224, overlap=112, tissue=tissue, min_tissue=0.0)
    xs = np.unique(grid.coords[:, 0])
    assert np.allclose(np.diff(xs), 112 * 0.5 / 0.499, atol=1)


def test_roi_restricts_tiles(cmu, tmp_path) -> None:
    slide, tissue = cmu
    x0, y0, x1, y1 = tissue.geometry.bounds
    roi_poly = shapely.box(x0, y0, x1, (y0 + y1) / 2)  # upper half of the tissue
    path = write_objects(
        tmp_path / "rois.geojson",
        [QuPathObject(roi_poly, class_name="Tumor", color=(200, 0, 0)),
         QuPathObject(shapely.box(0, 0, 50, 50), class_name="Other", color=(0, 0, 200))],
    )
    rois = read_rois(path, ["Tumor"])
    full = make_grid(slide, 0.5, 224, tissue=tissue)
    inside = make_grid(slide, 0.5, 224, tissue=tissue, rois=rois)
    assert 0 < len(inside) < len(full)
    centres = inside.coords + inside.footprint / 2
    assert shapely.contains_xy(roi_poly, centres[:, 0], centres[:, 1]).all()
    assert set(map(tuple, inside.coords.tolist())) <= set(map(tuple, full.coords.tolist()))
    # every tissue tile whose centre is in the ROI is kept
    full_centres = full.coords + full.footprint / 2
    assert len(inside) == shapely.contains_xy(roi_poly, full_centres[:, 0], full_centres[:, 1]).sum()


def test_missing_mpp_is_an_error_not_a_guess() -> None:
    path = data_file(NO_MPP)
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        make_grid(open_slide(path), 0.5, 224)
    grid = make_grid(open_slide(path, slide_mpp=0.5), 0.5, 224)
    assert grid.footprint == 224 and len(grid) > 10


def test_a_coarse_slide_is_upsampled_with_one_warning_and_refused_far_beyond(cmu, capsys) -> None:
    """The scale rule lives in the one tile geometry, so every tiling caller keeps it: within 1.5×
    quiet; a slide 1.5-4× coarser than the target warns once per pair of scales, naming the slide,
    both scales and the factor; beyond 4× (a real 16.8 µm/px DICOM at 0.5 µm/px) it is refused in one
    line unless the slide's µm/px was stated, which goes ahead with the warning."""
    from pathapp.errors import PathappError
    from pathapp.tiles import tile_geometry

    slide, tissue = cmu
    tile_geometry(slide, 0.4, 224)  # 0.499 µm/px at 0.4: 1.25×
    assert capsys.readouterr().err == ""
    coarse = open_slide(data_file(CMU), slide_mpp=1.13)  # 2.26×: warned once, whatever the caller
    make_grid(coarse, 0.5, 224, tissue=tissue)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {coarse.path}: ")
    assert "1.13 µm/px" in err and "0.5 µm/px" in err and "upsampled 2.3×" in err
    tile_geometry(coarse, 0.5, 224)
    assert capsys.readouterr().err == ""
    bone = data_file("dicom/wsi2dcm-bone/jpeg.dicom")
    with open_slide(bone) as s, pytest.raises(PathappError) as e:
        tile_geometry(s, 0.5, 224)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{bone}: the slide is 16.783 µm/px")
    assert "upsampled 33.6×" in message and "about 15,552 tiles" in message and "--slide-mpp 16.783" in message
    with open_slide(bone, slide_mpp=16.783) as s:
        assert tile_geometry(s, 0.5, 224).read_size == 7
    assert "upsampled 33.6×" in capsys.readouterr().err


def test_pyramid_level_is_used_at_low_resolution() -> None:
    """luna: 0.5026 µm/px with a 4× level. At 2.0 µm/px tiles come from level 1 (2.01 µm/px, within
    the 2 % tolerance) and match a level-0 read shrunk to the same size."""
    slide = open_slide(data_file("wsi/aperio/luna-1065626.svs"))
    grid = make_grid(slide, 2.0, 224)
    assert grid.level == 1 and grid.read_size == round(224 * 2.0 / 0.5026 / slide.levels[1].downsample)
    assert make_grid(slide, 0.5, 224, tissue=detect_tissue(slide)).level == 0
    assert len(grid) >= 1
    tile = read_tile(slide, grid, 0)
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    x, y = grid.coords[0]
    side = round(grid.footprint)
    ref = np.asarray(Image.fromarray(slide.read(int(x), int(y), side, side, 0)).resize((224, 224), Image.BILINEAR))
    assert np.abs(tile.astype(float) - ref).mean() < 8  # same place, same scale (J2K levels differ slightly)
    assert np.abs(tile.astype(float) - np.roll(ref, 40, axis=1)).mean() > np.abs(tile.astype(float) - ref).mean()


def test_dicom_folder_tiles_like_the_svs(cmu) -> None:
    svs, _ = cmu
    dicom = open_slide(data_file("dicom/cmu-1-small-region-wsi2dcm"))
    a, b = make_grid(dicom, 0.5, 224), make_grid(svs, 0.5, 224)
    assert a.footprint == b.footprint
    sa, sb = set(map(tuple, a.coords.tolist())), set(map(tuple, b.coords.tolist()))
    assert len(sa & sb) / len(sa | sb) > 0.9
    ds = TileDataset(dicom, b)
    x, _ = ds[0]
    svs_tile = read_tile(svs, b, 0)
    assert np.abs(x.permute(1, 2, 0).numpy().astype(float) - svs_tile).mean() < 10


def test_dataset_items_and_workers(cmu) -> None:
    import torch
    from torch.utils.data import DataLoader

    slide, tissue = cmu
    grid = make_grid(slide, 1.0, 112, tissue=tissue)  # read 224 px, resized to 112
    assert grid.read_size == round(112 * 1.0 / 0.499) == 224 and grid.tile_size == 112
    ds = TileDataset(slide, grid)
    assert len(ds) == len(grid)
    x, i = ds[3]
    assert i == 3 and x.dtype == torch.uint8 and x.shape == (3, 112, 112)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), read_tile(slide, grid, 3))
    assert not np.array_equal(ds[0][0].numpy(), ds[1][0].numpy())
    seen = TileDataset(slide, grid, transform=lambda im: (type(im).__name__, im.size))[0][0]
    assert seen == ("Image", (112, 112))
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    assert torch.equal(clone[2][0], ds[2][0])
    batches = list(DataLoader(ds, batch_size=8, num_workers=1))
    assert torch.equal(torch.cat([b for b, _ in batches]), torch.stack([ds[k][0] for k in range(len(ds))]))
    with pytest.raises(IndexError):
        ds[len(ds)]


def _pathapp(*args: str) -> subprocess.CompletedProcess:
    """The installed command in a fresh process: what a user sees, tracebacks included."""
    return subprocess.run([sys.executable, "-m", "pathapp", *args], capture_output=True, text=True, timeout=120)


def _tile(*args: str):
    """`pathapp tile` in this process (faster; for runs that should succeed)."""
    from click.testing import CliRunner

    from pathapp.cli.tile import tile

    return CliRunner().invoke(tile, list(args), catch_exceptions=False)


def test_cli_writes_tiles_that_reread_to_the_same_geometry(cmu, tmp_path) -> None:
    slide, tissue = cmu
    r = _tile(str(data_file(CMU)), "--mpp", "0.5", "--tile-size", "224", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "CMU-1-Small-Region" in lines[0]
    out = tmp_path / "CMU-1-Small-Region"
    objects = read_objects(out / "tiles.geojson")
    grid = make_grid(slide, 0.5, 224, tissue=tissue)
    assert f"{len(grid)} tiles" in lines[0]
    assert len(objects) == len(grid) and {o.object_type for o in objects} == {"tile"}
    for obj, poly in zip(objects, tile_polygons(grid)):
        assert np.allclose(obj.geometry.bounds, poly.bounds, atol=0.006)  # written with 2 decimals
        assert obj.measurements["tissue fraction"] >= 0.1
    raw = json.loads((out / "tiles.geojson").read_text())
    assert len({f["id"] for f in raw["features"]}) == len(objects)
    tissue_objs = read_objects(out / "tissue.geojson")
    assert tissue_objs[0].class_name == "Tissue"
    assert tissue_objs[0].geometry.area == pytest.approx(tissue.geometry.area, rel=0.01)
    with Image.open(out / "thumbnail.png") as im:
        scale = float(im.text["pathapp:scale"])
        pic = np.asarray(im.convert("RGB"))
    # the picture spans the slide, read at its own size (1200 px on the long side), not enlarged from the
    # tissue mask's working image: it is as sharp as the slide shrunk once (mean |Laplacian| alike)
    assert max(pic.shape[:2]) == 1200 and pic.shape[1] * scale == pytest.approx(slide.size[0])
    ref = np.asarray(Image.fromarray(slide.read(0, 0, *slide.size)).resize(pic.shape[1::-1], Image.BILINEAR))
    lap = [np.abs(np.diff(np.asarray(a, float).mean(2), 2, axis=0)).mean() for a in (pic[300:], ref[300:])]
    assert lap[0] > 0.8 * lap[1]
    blue = (pic[..., 2] > 200) & (pic[..., 0] < 60)
    x, y = grid.coords[0] / scale
    assert blue[int(y), int(x) : int(x + grid.footprint / scale)].mean() > 0.8  # the top edge of tile 0


def test_cli_roi_option(tmp_path) -> None:
    slide = open_slide(data_file(CMU))
    roi = write_objects(tmp_path / "roi.geojson",
                        [QuPathObject(shapely.box(0, 0, slide.size[0], 900), class_name="Tumor", color=(200, 0, 0))])
    r = _tile(str(data_file(CMU)), "--roi", str(roi), "--roi-class", "Tumor", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    objects = read_objects(tmp_path / "o" / "CMU-1-Small-Region" / "tiles.geojson")
    assert objects and all(o.geometry.centroid.y < 900 for o in objects)
    r = _pathapp("tile", str(data_file(CMU)), "--roi", str(roi), "--roi-class", "Nope", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "Nope" in r.stderr


def test_cli_missing_mpp_fails_clearly_and_slide_mpp_fixes_it(tmp_path) -> None:
    path = str(data_file(NO_MPP))
    r = _pathapp("tile", path, "--mpp", "0.5", "--out", str(tmp_path))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "--slide-mpp" in err[0]
    assert not (tmp_path / "tcga-cr-7395-01a-01-ts1" / "tiles.geojson").exists()
    r = _tile(path, "--mpp", "0.5", "--slide-mpp", "0.5", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert len(read_objects(tmp_path / "tcga-cr-7395-01a-01-ts1" / "tiles.geojson")) > 10


def test_tiny_slide_gives_no_tiles_without_failing(tmp_path) -> None:
    r = _tile(str(data_file("wsi/aperio/openslide-python-small.svs")), "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert " 0 tiles" in r.stdout
    assert read_objects(tmp_path / "openslide-python-small" / "tiles.geojson") == []
