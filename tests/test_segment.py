"""Segmentation heads (#22): train from EBHI-Seg image + mask pairs, evaluate Dice/mIoU, infer on a
slide with overlapping tiles blended without seams, regions written as QuPath annotations."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.affinity
import torch
from click.testing import CliRunner
from conftest import data_file
from vit_factory import tiny_bundle, tiny_spec, tiny_vit

from pathapp.cli import cli
from pathapp.infer.pipeline import prepare_model
from pathapp.infer.segment import segment_slide
from pathapp.models.bundle import Bundle, load_bundle, save_bundle
from pathapp.models.seg import new_seg_head
from pathapp.results.segmentation import SegMap, class_polygons, segmentation_objects
from pathapp.slide import open_slide
from pathapp.train.segment import confusions, seg_metrics

SLIDE = "wsi/aperio/CMU-1-Small-Region.svs"


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.output + (str(r.exception) if r.exception and r.exit_code else "")


def ebhi_pairs(tmp_path: Path, per_class: int = 3) -> Path:
    """A labels.csv of `per_class` images (one per case) of two EBHI classes, with their masks."""
    csv_path = data_file("labeled/ebhi-seg/labels.csv")
    rows = list(csv.DictReader(open(csv_path)))
    picked, seen = [], {}
    for r in rows:
        cases = seen.setdefault(r["label"], set())
        if r["label"] in ("Adenocarcinoma", "Normal") and r["mask"] and len(cases) < per_class \
                and r["case_prefix"] not in cases:
            cases.add(r["case_prefix"])
            picked.append({**r, "image": str(csv_path.parent / r["image"]), "mask": str(csv_path.parent / r["mask"])})
    out = tmp_path / "pairs.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    return out


def test_dice_and_iou_from_pixel_counts() -> None:
    truth = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    pred = np.array([[[0, 1, 1, 1], [0, 0, 0, 1]]])
    conf = confusions(truth, pred, 2)
    assert conf[0].tolist() == [[3, 1], [1, 3]]
    m = seg_metrics(conf)
    assert m["dice"] == pytest.approx([0.75, 0.75]) and m["iou"] == pytest.approx([0.6, 0.6])
    assert m["miou"] == pytest.approx(0.6) and m["pixel_accuracy"] == pytest.approx(0.75)
    ignored = confusions(np.array([[[-1, 1]]]), np.array([[[1, 1]]]), 2)  # -1: not counted
    assert ignored.sum() == 1


def test_polygons_keep_holes_and_drop_small_regions() -> None:
    labels = np.zeros((40, 40), np.uint8)
    labels[5:35, 5:35] = 1
    labels[15:25, 15:25] = 0  # a hole
    labels[37:39, 37:39] = 1  # a speck of 4 map px
    seg = SegMap(labels, np.where(labels > 0, 200, 0).astype(np.uint8), 4.0, ["Background", "Gland"],
                 [(0, 0, 0), (0, 128, 255)])
    # slide 0.5 µm/px, map 2 µm/px: the speck is 16 µm², the ring (30² - 10²) × 4 = 3200 µm²
    polys = class_polygons(seg, (160, 160), 0.5, simplify_um=0.5, min_area_um2=50)[1]
    assert len(polys) == 1 and polys[0].is_valid and len(polys[0].interiors) == 1
    objs = segmentation_objects(seg, (160, 160), 0.5, simplify_um=0.5, min_area_um2=50)
    assert objs[0].class_name == "Gland" and objs[0].measurements["Area µm^2"] == pytest.approx(3200, rel=0.05)
    assert objs[0].measurements["Mean prob"] == pytest.approx(200 / 255, abs=1e-3)
    assert len(class_polygons(seg, (160, 160), 0.5, simplify_um=0.5, min_area_um2=1)[1]) == 2
    # made inside an ROI: the regions are clipped to it (a hair inside, so QuPath's covers holds)
    roi = shapely.box(0, 0, 80, 160)
    clipped = class_polygons(replace(seg, roi=roi), (160, 160), 0.5, simplify_um=0.5, min_area_um2=50)[1]
    assert len(clipped) == 1 and roi.buffer(-0.04).covers(clipped[0]) and not roi.buffer(-0.06).covers(clipped[0])
    assert clipped[0].area == pytest.approx(polys[0].intersection(roi).area, rel=0.01)


def test_train_and_evaluate_segmentation_from_masks(tmp_path) -> None:
    pairs = ebhi_pairs(tmp_path)
    base = tiny_bundle(tmp_path, 0, filename="base.pathapp")
    out = tmp_path / "seg.pathapp"
    code, text = run_cli("train", "--data", str(pairs), "--model", str(base), "--method", "segment", "--seg-head",
                         "decoder", "--mask-classes", "Background,Lesion", "--epochs", "4", "--out", str(out))
    assert code == 0, text
    bundle = load_bundle(out)
    assert bundle.head_kind == "seg_decoder" and bundle.task == "segmentation"
    assert bundle.class_names == ["Background", "Lesion"]
    history = bundle.provenance["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]  # the head learns
    model = bundle.build()
    x = torch.randint(0, 255, (2, 3, 56, 56), dtype=torch.uint8)
    assert model.segment(x).shape == (2, 2, 56, 56)
    assert model(x)[1] is None  # no tile probabilities from a segmentation head

    code, text = run_cli("evaluate", "--data", str(pairs), "--model", str(out), "--mask-classes", "Background,Lesion",
                         "--bootstrap", "20", "--out", str(tmp_path / "held"))
    assert code == 0, text
    report = json.loads((tmp_path / "held" / "report.json").read_text())
    assert report["task"] == "segmentation" and len(report["metrics"]["dice"]) == 2
    lo, hi = report["metrics"]["ci95"]["mean_dice"]
    assert lo <= report["metrics"]["mean_dice"] <= hi and "mean Dice" in text
    assert (tmp_path / "held" / "examples.png").stat().st_size > 0

    code, text = run_cli("evaluate", "--data", str(pairs), "--model", str(base), "--method", "segment", "--seg-layers",
                         "4", "--folds", "2", "--out", str(tmp_path / "cv"))
    assert code != 0 and "has 2 blocks; use --seg-layers 1" in text  # one line, not timm's assertion
    base = tiny_bundle(tmp_path, 0, filename="base4.pathapp", depth=4)
    code, text = run_cli("evaluate", "--data", str(pairs), "--model", str(base), "--method", "segment", "--seg-head",
                         "linear", "--seg-layers", "4", "--folds", "2", "--epochs", "2", "--bootstrap", "20",
                         "--fewshot", "--out", str(tmp_path / "cv"))
    assert code == 0, text
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert report["mode"].startswith("2-fold cross-validation grouped by case (6 cases)")
    assert report["head"]["layers"] == 4 and "majority_class" in report["floors"]
    assert report["fewshot"][-1]["images"] == "all" and (tmp_path / "cv" / "fewshot.png").exists()


def test_images_with_a_scale_are_tiled_at_the_bundle_resolution(tmp_path) -> None:
    from PIL import Image

    from pathapp.train.segment import read_mask_data

    pairs = ebhi_pairs(tmp_path, per_class=1)
    bundle = load_bundle(tiny_bundle(tmp_path, 0, filename="base.pathapp", mpp=1.0))
    ms = read_mask_data([pairs], image_mpp=0.5, bundle=bundle)  # 224 px at 0.5 µm/px: 2 × 2 tiles of 56 px at 1.0
    images, masks = ms.pixels
    assert images.shape == (8, 56, 56, 3) and len(set(ms.groups)) == 2
    truth = np.asarray(Image.open(ms.masks[0]).convert("L"))[:112:2, :112:2] >= 128  # the first tile, by hand
    assert (masks[0] == truth).mean() > 0.97


def test_segment_lora_changes_the_backbone(tmp_path) -> None:
    pairs = ebhi_pairs(tmp_path, per_class=1)
    base = tiny_bundle(tmp_path, 0, filename="base.pathapp")
    out = tmp_path / "lora.pathapp"
    code, text = run_cli("train", "--data", str(pairs), "--model", str(base), "--method", "segment", "--seg-lora",
                         "--lora-rank", "2", "--epochs", "2", "--out", str(out))
    assert code == 0, text
    before, after = load_bundle(base).backbone_state, load_bundle(out).backbone_state
    assert set(before) == set(after)  # adapters merged back into plain ViT weights
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_from_qupath_annotations(tmp_path) -> None:
    from pathapp.qupath.geojson import QuPathObject, write_objects
    from pathapp.train.segment import annotated_tiles

    slide_path = data_file(SLIDE)
    tumour = shapely.box(400, 400, 1400, 1400).difference(shapely.box(700, 700, 1000, 1000))  # with a hole
    geojson = write_objects(tmp_path / "regions.geojson", [
        QuPathObject(tumour, class_name="Tumor"), QuPathObject(shapely.box(1400, 400, 2000, 1400), class_name="Stroma")])
    base = tiny_bundle(tmp_path, 0, filename="base.pathapp", mpp=2.0)
    ms = annotated_tiles([geojson], [slide_path], load_bundle(base))
    assert ms.class_names == ["Background", "Stroma", "Tumor"] and len(set(ms.groups)) == 1
    images, masks = ms.pixels
    assert images.shape[1:] == (56, 56, 3) and masks.shape == images.shape[:3]
    assert {-1, 1, 2} <= set(np.unique(masks))  # the hole and the outside are ignored, not background
    out = tmp_path / "seg.pathapp"
    code, text = run_cli("train", "--data", str(geojson), "--slides", str(slide_path), "--model", str(base),
                         "--method", "segment", "--epochs", "2", "--out", str(out))
    assert code == 0, text
    assert load_bundle(out).class_names == ["Background", "Stroma", "Tumor"]


def local_seg_bundle(tmp_path: Path) -> Path:
    """A tiny ViT whose patch tokens depend on their own patch only (no position embedding, attention
    output zeroed) + a linear segmentation head calibrated to split real tissue into two classes: a
    model for which tiling must reproduce the one-piece result exactly, up to resampling."""
    spec = tiny_spec(depth=1)
    vit = tiny_vit(spec)
    with torch.no_grad():
        vit.pos_embed.zero_()
        for block in vit.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    torch.manual_seed(0)
    head = new_seg_head("linear", spec.embed_dim, 2).eval()
    b = Bundle.from_model(vit, spec, head=head, class_names=["Background", "Tissue"],
                          class_colors=[(0, 0, 0), (0, 128, 255)], mpp=2.0, tile_size=56)
    slide = open_slide(data_file(SLIDE))
    at = int(168 * 2.0 / slide.require_mpp())  # the region the seamless test compares
    region = torch.from_numpy(np.ascontiguousarray(slide.read(at, at, at, at, 0)[::4, ::4][:168, :168]))
    with torch.no_grad():
        logits = b.build().segment(region.permute(2, 0, 1)[None])
        head.conv.bias[1] -= float((logits[0, 1] - logits[0, 0]).median())  # about half each class
    b = Bundle.from_model(vit, spec, head=head, class_names=b.class_names, class_colors=b.class_colors, mpp=2.0,
                          tile_size=56)
    return save_bundle(b, tmp_path / "local.pathapp")


def test_overlapping_tiles_give_the_one_piece_polygons(tmp_path) -> None:
    bundle = load_bundle(local_seg_bundle(tmp_path))
    rt = prepare_model(bundle, "cpu")
    slide = open_slide(data_file(SLIDE))
    ds = bundle.mpp / slide.require_mpp()
    roi = shapely.box(168 * ds, 168 * ds, 336 * ds, 336 * ds)  # one 168 px tile at 2 µm/px, on the patch grid
    kwargs = {"rois": roi, "min_tissue": 0.0, "workers": 0, "progress": False}
    whole = segment_slide(slide, rt, tile_size=168, overlap=0, **kwargs)
    tiled = segment_slide(slide, rt, overlap=14, **kwargs)
    assert len(whole) == 1 and len(tiled) == 16
    assert whole.segmentation.scale == pytest.approx(tiled.segmentation.scale)
    inner = roi.buffer(-7 * ds)  # the one piece has no neighbours to blend with at its own border
    whole_geom, tiled_geom = (shapely.union_all(class_polygons(r.segmentation, slide.size, slide.mpp, 0.25, 0)[1])
                              for r in (whole, tiled))
    a, b = whole_geom.intersection(inner), tiled_geom.intersection(inner)
    assert 0.2 < a.area / inner.area < 0.8  # both classes present: a real boundary to compare
    px = whole.segmentation.scale  # level-0 px per map pixel
    outline = whole_geom.boundary.intersection(inner).length

    def mean_offset(geom) -> float:  # area between the outlines / their length, in map pixels
        return a.symmetric_difference(geom).area / outline / px

    assert mean_offset(b) < 0.5  # within half a map pixel along the outline (measured: 0.09)
    # a tile grid placed one map pixel off moves the outlines by that much: the check sees it
    assert mean_offset(shapely.affinity.translate(tiled_geom, px, 0).intersection(inner)) > 0.5


def test_infer_writes_segmentation_annotations(tmp_path) -> None:
    model = local_seg_bundle(tmp_path)
    out = tmp_path / "out"
    code, text = run_cli("infer", data_file(SLIDE).as_posix(), "--model", str(model), "--mpp", "4", "--out", str(out),
                         "--workers", "0")
    assert code == 0, text
    folder = out / "CMU-1-Small-Region"
    features = json.loads((folder / "annotations.geojson").read_text())["features"]
    regions = [f for f in features if f["properties"].get("classification", {}).get("name") == "Tissue"]
    assert regions, "no Tissue annotation"
    for f in regions:
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and geom.area * 0.499**2 >= 100 - 1e-6
        m = f["properties"]["measurements"]
        assert m["Area µm^2"] > 0 and 0.5 <= m["Mean prob"] <= 1.0
    assert (folder / "overlay-segmentation.png").stat().st_size > 10_000
    import tifffile

    with tifffile.TiffFile(folder / "labels.ome.tif") as tif:  # the label image other tools read
        labels = tif.series[0].levels[0].asarray()
        um = float(tif.ome_metadata.split('PhysicalSizeX="')[1].split('"')[0])
    assert um == pytest.approx(7 * 4.0, rel=0.01)  # half a 14 px patch per map pixel, at 4 µm/px
    assert labels.shape == (int(np.ceil(2967 * 0.499 / um)), int(np.ceil(2220 * 0.499 / um)))
    assert set(np.unique(labels)) == {0, 1}
    run = json.loads((folder / "run.json").read_text())
    assert "overlay-segmentation.png" in run["files"] and not (folder / "tiles.geojson").exists()
