"""Labelled data from what users have: QuPath class regions on slides, image folders, CSV tables.

Tile labels from class regions follow one stated rule (see `assign_tile_labels`): a tile gets class c
when at least `min_inside` of its area lies inside c's region (holes excluded) and less than
`max_other` lies inside any other class's region; every other tile is ambiguous or unlabelled and
is dropped (label -1), never guessed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pathapp.errors import PathappError
from pathapp.slide import IMAGE_SUFFIXES

MIN_INSIDE = 0.5  # a tile must lie at least half inside its class region
MAX_OTHER = 0.1  # ... and at most a tenth inside any other class region
GROUP_COLUMNS = ("case_prefix", "patient", "patient_id", "case", "slide", "tma_batch")


class LabelError(PathappError):
    """The labelled data cannot be read or has too few labels."""


def assign_tile_labels(
    tiles: Sequence,
    regions: Mapping[str, object],
    class_names: Sequence[str],
    min_inside: float = MIN_INSIDE,
    max_other: float = MAX_OTHER,
) -> np.ndarray:
    """Class index per tile polygon, -1 where unlabelled or ambiguous (the rule in the module doc)."""
    import shapely

    if not 0 < min_inside <= 1 or not 0 <= max_other < min_inside:
        raise ValueError("need 0 < min_inside <= 1 and 0 <= max_other < min_inside")
    tiles_arr = np.asarray(tiles, dtype=object)
    area = shapely.area(tiles_arr)
    frac = np.zeros((len(class_names), len(tiles_arr)))
    for c, name in enumerate(class_names):
        region = regions.get(name)
        if region is None or region.is_empty:
            continue
        shapely.prepare(region)
        hit = shapely.intersects(region, tiles_arr)
        if hit.any():
            frac[c, hit] = shapely.area(shapely.intersection(tiles_arr[hit], region)) / area[hit]
    labels = np.full(len(tiles_arr), -1, np.int64)
    if not len(class_names):
        return labels
    best = frac.argmax(0)
    top = frac.max(0)
    others = frac.copy()
    others[best, np.arange(len(tiles_arr))] = 0
    ok = (top >= min_inside) & (others.max(0) < max_other)
    labels[ok] = best[ok]
    return labels


def class_regions(objects: Sequence) -> dict[str, object]:
    """Union of the classified annotation polygons per class name (points, lines, unclassified skipped)."""
    import shapely

    parts: dict[str, list] = {}
    for o in objects:
        if o.object_type != "annotation" or not o.class_name:
            continue
        g = o.geometry
        if g is None or g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        parts.setdefault(o.class_name, []).append(shapely.make_valid(g))
    return {k: shapely.union_all(v) for k, v in sorted(parts.items())}


@dataclass
class ImageSet:
    """Labelled images (each one a tile): path, class index and group (slide/patient) per image."""

    paths: list[Path]
    labels: np.ndarray
    groups: np.ndarray
    class_names: list[str]
    group_by: str | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(
            [self.paths[i] for i in idx], self.labels[idx], self.groups[idx], self.class_names, self.group_by, self.meta
        )


def read_image_folder(root: Path, group_pattern: str | None = None) -> ImageSet:
    """ImageFolder layout: root/<class>/**/*.png|tif|jpg. Groups come from `group_pattern`, a regex
    whose first group (or whole match) on the file stem names the slide/patient; else each image is
    its own group (then nothing stops two tiles of one slide from landing on both sides of a split,
    so pass a pattern when the names carry one)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [c] * len(files)
    if len(classes) < 2 or not paths:
        raise LabelError(f"{root}: expected at least two class folders <class>/*.png|tif|jpg with images")
    groups = [_group_of(p.stem, group_pattern) for p in paths]
    return ImageSet(paths, np.asarray(labels), np.asarray(groups), classes, group_pattern)


def _group_of(stem: str, pattern: str | None) -> str:
    if pattern is None:
        return stem
    m = re.search(pattern, stem)
    if m is None:
        raise LabelError(f"group pattern {pattern!r} does not match file name {stem!r}; fix --group-by")
    return m.group(1) if m.groups() else m.group(0)


def read_labels_csv(
    path: Path, image_column: str = "image", label_column: str = "label", group_by: str | None = None
) -> ImageSet:
    """A CSV with image (relative to the CSV) and label columns, plus a group column when present.

    `group_by` names the column with the slide/patient id; by default the first of GROUP_COLUMNS
    found is used, else each image is its own group."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise LabelError(f"{path}: no rows; expected columns {image_column},{label_column}[,group]")
    cols = rows[0].keys()
    for col in (image_column, label_column):
        if col not in cols:
            raise LabelError(f"{path}: missing column {col!r} (has {', '.join(cols)})")
    if group_by is None:
        group_by = next((c for c in GROUP_COLUMNS if c in cols), None)
    elif group_by not in cols:
        raise LabelError(f"{path}: --group-by column {group_by!r} not found (has {', '.join(cols)})")
    classes = sorted({r[label_column] for r in rows})
    if len(classes) < 2:
        raise LabelError(f"{path}: column {label_column!r} has fewer than two classes")
    paths = [path.parent / r[image_column] for r in rows]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise LabelError(f"{path}: {len(missing)} listed images missing, e.g. {missing[0]}")
    labels = np.asarray([classes.index(r[label_column]) for r in rows])
    groups = np.asarray([r[group_by] if group_by else str(p) for r, p in zip(rows, paths)])
    return ImageSet(paths, labels, groups, classes, group_by)


def read_image_data(data: Path, group_by: str | None = None) -> ImageSet:
    """Image-level labels from a labels.csv, a folder holding one, or an ImageFolder tree."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        return read_labels_csv(data, group_by=group_by)
    if data.is_dir():
        if (data / "labels.csv").exists():
            return read_labels_csv(data / "labels.csv", group_by=group_by)
        return read_image_folder(data, group_by)
    raise LabelError(f"{data}: not a labels.csv or a folder of <class>/ images")


def cap_per_group(s: ImageSet, per_group: int, seed: int = 0) -> ImageSet:
    """At most `per_group` images of each group (a cheap, still grouped, subset)."""
    rng = np.random.default_rng(seed)
    keep = []
    for g in np.unique(s.groups):
        idx = np.flatnonzero(s.groups == g)
        keep.append(idx if len(idx) <= per_group else np.sort(rng.choice(idx, per_group, replace=False)))
    return s.subset(np.sort(np.concatenate(keep)))


@dataclass
class SlideLabels:
    """Slide-level labels for MIL: slide path, class index and patient (group) per slide."""

    slides: list[Path]
    labels: np.ndarray
    groups: np.ndarray
    class_names: list[str]


def read_slide_csv(path: Path, group_by: str | None = None) -> SlideLabels:
    """CSV of slide,label[,patient]: slide paths relative to the CSV; patient groups splits."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "slide" not in rows[0] or "label" not in rows[0]:
        raise LabelError(f"{path}: expected a CSV with columns slide,label[,patient]")
    col = group_by or ("patient" if "patient" in rows[0] else None)
    if col is not None and col not in rows[0]:
        raise LabelError(f"{path}: --group-by column {col!r} not found")
    classes = sorted({r["label"] for r in rows})
    slides = [path.parent / r["slide"] for r in rows]
    groups = np.asarray([r[col] if col else r["slide"] for r in rows])
    return SlideLabels(slides, np.asarray([classes.index(r["label"]) for r in rows]), groups, classes)
