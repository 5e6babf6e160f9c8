"""Tile labels from QuPath class regions (straddling tiles, holes, unlabelled) and table readers."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from pathapp.train.labels import (
    LabelError,
    assign_tile_labels,
    cap_per_group,
    read_image_data,
    read_image_folder,
)


def _tiles(n_x, n_y, size=10):
    return [box(x * size, y * size, (x + 1) * size, (y + 1) * size) for y in range(n_y) for x in range(n_x)]


def test_straddling_holes_and_unlabelled():
    classes = ["tumor", "stroma"]
    # tumor: x 0..40 with a hole at x 10..20, y 0..10 (exactly tile 1); stroma: x 40..80
    tumor = Polygon([(0, 0), (40, 0), (40, 10), (0, 10)], holes=[[(10, 0.0001), (20, 0.0001), (20, 9.9999), (10, 9.9999)]])
    stroma = box(44, 0, 80, 10)
    tiles = _tiles(10, 1)  # x 0..100
    lab = assign_tile_labels(tiles, {"tumor": tumor, "stroma": stroma}, classes)
    # tile 0 inside tumor, tile 1 = the hole -> unlabelled, tiles 2-3 tumor,
    # tile 4 (40..50) is 60% stroma and 0% tumor -> stroma; 5-7 stroma; 8-9 outside every region
    assert lab.tolist() == [0, -1, 0, 0, 1, 1, 1, 1, -1, -1]


def test_straddling_two_classes_is_ambiguous_unless_mostly_one():
    classes = ["a", "b"]
    tiles = [box(0, 0, 10, 10)]
    for split, expected in [(5, -1), (8, -1), (2, -1), (9.5, 0), (0.5, 1)]:
        regions = {"a": box(0, 0, split, 10), "b": box(split, 0, 10, 10)}
        # a at 80%, b at 20% -> b exceeds the 10% other-class limit: ambiguous, dropped
        assert assign_tile_labels(tiles, regions, classes).tolist() == [expected], split
    # overlapping regions claim the same tile twice: ambiguous
    assert assign_tile_labels(tiles, {"a": box(0, 0, 10, 10), "b": box(0, 0, 10, 10)}, classes).tolist() == [-1]
    # a looser rule labels the 80/20 tile
    loose = assign_tile_labels(tiles, {"a": box(0, 0, 8, 10), "b": box(8, 0, 10, 10)}, classes, 0.5, 0.25)
    assert loose.tolist() == [0]
    # a class with no region and a tile half outside everything
    assert assign_tile_labels([box(0, 0, 10, 10)], {"a": box(0, 0, 4, 10)}, classes).tolist() == [-1]


def test_image_folder_and_csv(tmp_path, shared_data):
    from PIL import Image

    for cls in ("x", "y"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"case{i}-00{i}.png")
    s = read_image_folder(tmp_path, r"(case\d+)")
    assert s.class_names == ["x", "y"] and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.groups.tolist()[:3] == ["case0", "case1", "case2"]
    with pytest.raises(LabelError, match="group pattern"):
        read_image_folder(tmp_path, r"nomatch(\d)")

    ebhi = read_image_data(shared_data / "labeled" / "ebhi-seg")
    assert len(ebhi) == 694 and len(ebhi.class_names) == 6 and ebhi.group_by == "case_prefix"
    assert all(p.exists() for p in ebhi.paths[:5])
    small = cap_per_group(ebhi, 1)
    assert len(small) == len(np.unique(ebhi.groups)) and len(np.unique(small.groups)) == len(small)
    ucsb = read_image_data(shared_data / "labeled" / "ucsb-breast-cancer" / "labels.csv")
    assert ucsb.class_names == ["benign", "malignant"] and ucsb.group_by == "tma_batch"

    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(LabelError, match="missing column 'image'"):
        read_image_data(bad)
