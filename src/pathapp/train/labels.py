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
from pathapp.slide.base import MAX_MPP, MIN_MPP

MIN_INSIDE = 0.5  # a tile must lie at least half inside its class region
MAX_OTHER = 0.1  # ... and at most a tenth inside any other class region
GROUP_COLUMNS = ("case_prefix", "patient", "patient_id", "case", "slide", "tma_batch")


class LabelError(PathappError):
    """The labelled data cannot be read or has too few labels."""


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows by column name, as a spreadsheet saves it (the BOM of Excel's "CSV UTF-8" is not
    part of the first column's name); one line naming the file when it is not UTF-8 or not CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"save it as CSV UTF-8") from None
    except csv.Error as e:
        raise LabelError(f"{path}: not a readable CSV ({e}); save it as CSV from a spreadsheet") from None


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


def parse_mpp(cell: str | None, where: str) -> float | None:
    """An `mpp` cell of a CSV as µm/px (None when empty); anything else than a sane positive number is
    refused in one line naming `where` (file and row)."""
    raw = (cell or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not MIN_MPP <= value <= MAX_MPP:
        raise LabelError(f"{where}: mpp {raw!r} is not a number of µm per pixel between {MIN_MPP} and {MAX_MPP}")
    return value


def resolve_image_mpp(path: Path, image_mpp: float | None = None) -> float:
    """The µm/px an image is read at: `image_mpp` (its labels.csv `mpp` cell, else --image-mpp) or the
    one its file records. An image with neither is refused in one line, as a slide is: a plain PNG
    says nothing about its scale, and guessing one would tile it at the wrong size."""
    if image_mpp is not None:
        return float(image_mpp)
    from pathapp.slide import open_slide

    own = open_slide(path).mpp
    if own is None:
        raise LabelError(f"{path}: the image has no µm/px; give its scale with --image-mpp UM_PER_PX (e.g. "
                         f"--image-mpp 0.5) or an mpp column in labels.csv")
    return float(own)


@dataclass
class ImageSet:
    """Labelled images: path, class index, group (case/patient) and the µm/px given for it (labels.csv
    `mpp`, else --image-mpp; None: the file's own) per image. `group_by` names the real grouping."""

    paths: list[Path]
    labels: np.ndarray
    groups: np.ndarray
    class_names: list[str]
    group_by: str | None = None
    meta: dict = field(default_factory=dict)
    mpps: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mpps = list(self.mpps) or [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet([self.paths[i] for i in idx], self.labels[idx], self.groups[idx], self.class_names,
                        self.group_by, self.meta, [self.mpps[i] for i in idx])


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
    return ImageSet(paths, np.asarray(labels), np.asarray(groups), classes,
                    f"file name pattern {group_pattern!r}" if group_pattern else "image")


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
    found is used, else each image is its own group. An `mpp` column gives each image's µm/px."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise LabelError(f"{path}: no rows; expected columns {image_column},{label_column}[,group]")
    cols = rows[0].keys()
    for col in (image_column, label_column):
        if col not in cols:
            raise LabelError(f"{path}: missing column {col!r} (has {', '.join(cols)})")
    group_by = group_column(path, cols, group_by)
    classes = sorted({r[label_column] for r in rows})
    if len(classes) < 2:
        raise LabelError(f"{path}: column {label_column!r} has fewer than two classes")
    paths = listed_images(path, [r[image_column] for r in rows])
    labels = np.asarray([classes.index(r[label_column]) for r in rows])
    groups = np.asarray([r[group_by] if group_by else str(p) for r, p in zip(rows, paths)])
    mpps = [parse_mpp(r.get("mpp"), f"{path}, row {n + 2}") for n, r in enumerate(rows)]
    return ImageSet(paths, labels, groups, classes, group_by or "image", mpps=mpps)


def listed_images(path: Path, names: Sequence[str]) -> list[Path]:
    """The images a CSV lists, relative to its folder; one line naming the CSV and a missing one when any is."""
    paths = [path.parent / n for n in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise LabelError(f"{path}: {len(missing)} of {len(paths)} listed images do not exist, e.g. {missing[0]}; "
                         f"fix those rows (paths are relative to the CSV's folder) or remove them")
    return paths


def group_column(path: Path, cols, group_by: str | None) -> str | None:
    """The CSV column that names each row's slide/patient: `group_by`, else the first of GROUP_COLUMNS."""
    if group_by is None:
        return next((c for c in GROUP_COLUMNS if c in cols), None)
    if group_by not in cols:
        raise LabelError(f"{path}: --group-by column {group_by!r} not found (has {', '.join(cols)})")
    return group_by


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


SLIDE_TASKS = ("classification", "survival", "regression")  # as models.heads.SLIDE_TASKS (no torch here)
DEFAULT_TARGETS = {"classification": "label", "survival": "time,event", "regression": "value"}
MIN_EVENTS = 2  # a Cox model learns nothing from fewer events, and a C-index needs a comparable pair


@dataclass
class SlideLabels:
    """Slide-level targets for MIL: slide path and patient (group) per slide, and per task the
    class index (`labels`), the follow-up time and event indicator (`time`, `event`), or the
    value (`value`)."""

    slides: list[Path]
    labels: np.ndarray
    groups: np.ndarray
    class_names: list[str]
    task: str = "classification"
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    value: np.ndarray | None = None
    target: str = "label"  # the CSV column(s) read
    grouping: str = "slide"  # the column that groups slides (patient), or "slide" when there is none

    @property
    def y(self) -> np.ndarray:
        """What a head learns: class indices, (time, event) rows, or values."""
        if self.task == "survival":
            return np.column_stack([self.time, self.event]).astype(np.float64)
        return self.value if self.task == "regression" else self.labels

    @property
    def output_names(self) -> list[str]:
        """Names of the slide head's outputs: the classes, "risk", or the target column."""
        return {"classification": self.class_names, "survival": ["risk"]}.get(self.task, [self.target])


def read_slide_csv(path: Path, group_by: str | None = None, task: str = "classification",
                   target: str | None = None) -> SlideLabels:
    """CSV of slide[,patient] and the target: `label` (classification), `time,event` (survival:
    follow-up time >= 0 and 1 = event observed / 0 = censored) or `value` (regression); `target`
    names other columns. Slide paths are relative to the CSV; patients group the splits. Every
    unusable row is refused with its row number."""
    path = Path(path)
    if task not in SLIDE_TASKS:
        raise LabelError(f"--task must be one of {', '.join(SLIDE_TASKS)}, not {task!r}")
    target = target or DEFAULT_TARGETS[task]
    columns = [c.strip() for c in target.split(",")]
    if len(columns) != (2 if task == "survival" else 1):
        raise LabelError(f"{path}: --target for {task} is {DEFAULT_TARGETS[task]!r}-like "
                         f"({'TIME,EVENT' if task == 'survival' else 'one COLUMN'}), not {target!r}")
    rows = read_rows(path)
    header = list(rows[0]) if rows else []
    missing = [c for c in ["slide", *columns] if c not in header]
    if missing:
        raise LabelError(f"{path}: missing column(s) {', '.join(missing)}; expected slide,{','.join(columns)}"
                         f"[,patient] (has {', '.join(header) or 'no rows'})")
    col = group_by or ("patient" if "patient" in header else None)
    if col is not None and col not in header:
        raise LabelError(f"{path}: --group-by column {col!r} not found")
    slides = [path.parent / r["slide"] for r in rows]
    groups = np.asarray([r[col] if col else r["slide"] for r in rows])
    if task == "classification":
        classes = sorted({r[columns[0]] for r in rows})
        labels = np.asarray([classes.index(r[columns[0]]) for r in rows])
        return SlideLabels(slides, labels, groups, classes, task, target=columns[0], grouping=col or "slide")
    numbers = {c: _numbers(path, rows, c) for c in columns}
    if task == "regression":
        return SlideLabels(slides, np.zeros(0, np.int64), groups, [], task, value=numbers[columns[0]], target=target,
                           grouping=col or "slide")
    time, event = numbers[columns[0]], numbers[columns[1]]
    bad = np.flatnonzero(time < 0)
    if len(bad):
        raise LabelError(f"{path}: row {bad[0] + 2} ({rows[bad[0]]['slide']}): negative {columns[0]} {time[bad[0]]:g}; "
                         f"follow-up times are counted from diagnosis or surgery and cannot be negative")
    bad = np.flatnonzero((event != 0) & (event != 1))
    if len(bad):
        raise LabelError(f"{path}: row {bad[0] + 2} ({rows[bad[0]]['slide']}): {columns[1]} is {event[bad[0]]:g}; "
                         f"write 1 where the event (death, progression) was observed and 0 where follow-up was censored")
    if event.sum() < MIN_EVENTS:
        raise LabelError(f"{path}: only {int(event.sum())} of {len(event)} slides have {columns[1]} = 1; a survival "
                         f"model needs at least {MIN_EVENTS} observed events (more for honest folds)")
    return SlideLabels(slides, np.zeros(0, np.int64), groups, [], task, time=time, event=event.astype(np.int64),
                       target=target, grouping=col or "slide")


def _numbers(path: Path, rows: list[dict], column: str) -> np.ndarray:
    """A column as finite floats; the first empty or non-numeric cell is refused by row number."""
    out = np.zeros(len(rows))
    for i, r in enumerate(rows):
        raw = (r[column] or "").strip()
        try:
            out[i] = float(raw)
        except ValueError:
            out[i] = np.nan
        if not np.isfinite(out[i]):
            raise LabelError(f"{path}: row {i + 2} ({r['slide']}): {column} {raw!r} is missing or not a number; "
                             f"fill it in or drop the slide from the CSV")
    return out
