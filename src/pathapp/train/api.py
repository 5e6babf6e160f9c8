"""What `pathapp train` and `pathapp evaluate` do, as Python functions.

Data: an image-level labels.csv or ImageFolder tree; QuPath GeoJSON class annotations paired with
their slides, or a QuPath project; or a slides.csv for attention-MIL with a class (slide,label),
survival (slide,time,event) or continuous (slide,value) target per slide, and optionally patient.
Every path embeds tiles through the bundle's own PathModel (cached), so training, evaluation and
`pathapp infer` see the same numbers: a labelled image is opened as a one-level slide at its µm/px,
tiled at the bundle's µm/px and tile size by the same `make_grid` as `infer`, and stands for the
mean of its tiles' embeddings (`models.bundle.pool_tiles`), which is what `infer` reports for it too.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.errors import PathappError
from pathapp.train.cache import DEFAULT_CACHE, SlideTiles, embed_slide_grid
from pathapp.train.labels import MAX_OTHER, MIN_INSIDE, LabelError

TRAIN_METHODS = ("linear", "knn", "prototype", "mlp", "lora", "abmil", "segment")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class TrainError(PathappError):
    """Options that do not fit together."""


@dataclass
class LabelledImage:
    """One labelled image as inference sees it: the file, its µm/px and its tile grid at the bundle's."""

    path: Path
    mpp: float
    grid: Any  # tiles.TileGrid

    def open(self):
        from pathapp.slide import open_slide

        return open_slide(self.path, slide_mpp=self.mpp)


@dataclass
class LabelledTiles:
    """Labelled items from any source: annotated slide tiles (`parts`: (slide, grid) per slide; one
    label per tile) or images (`images`; one label per image, which stands for its tiles).
    `tiles[i]` -> uint8 HxWx3 pixels of item i (tiles only; `image_tiles` expands images for LoRA).
    `grouping` names what `groups` holds (a CSV column, "slide", "image")."""

    class_names: list[str]
    labels: np.ndarray
    groups: np.ndarray
    tiles: Any
    source: str  # "images" | "annotations"
    parts: list[tuple[Any, Any]] = field(default_factory=list)  # (slide, grid) per slide, for annotations
    images: list[LabelledImage] = field(default_factory=list)
    grouping: str = "slide"
    dropped: list[str] = field(default_factory=list)  # images left out, with why

    @property
    def paths(self) -> list[Path]:
        """The data files behind the items: the images, or the annotated slides."""
        return [im.path for im in self.images] if self.source == "images" else [Path(sl.path) for sl, _ in self.parts]


class ConcatTiles:
    """Several tile sources read as one (item i of the concatenation)."""

    def __init__(self, sources: Sequence[Any]) -> None:
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[k][i - int(self.offsets[k])]


def is_slide_csv(path: Path) -> bool:
    """A CSV with a `slide` and no `image` column: slide-level labels for MIL (a tile CSV may name
    the slide as its group column)."""
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        return False
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:  # read_rows reports bad bytes
        header = next(csv.reader(f), [])
    return "slide" in header and "image" not in header


def load_labelled(
    data: Sequence[Path],
    bundle,
    slides: Sequence[Path] = (),
    group_by: str | None = None,
    slide_mpp: float | None = None,
    min_inside: float = MIN_INSIDE,
    max_other: float = MAX_OTHER,
    class_names: Sequence[str] | None = None,
    image_mpp: float | None = None,
    progress: bool = False,
) -> LabelledTiles:
    """Labelled tiles from image data (one path; each image at its labels.csv `mpp`, else `image_mpp`,
    else its file's own), GeoJSON annotations (one per slide, in order) or a QuPath project.qpproj
    (classified annotations of every entry, read from its data files)."""
    from pathapp.train.labels import read_image_data

    data = [Path(d) for d in data]
    if not data:
        raise TrainError("--data is required")
    if all(d.suffix.lower() in (".geojson", ".json", ".qpproj") for d in data):
        return _annotated_tiles(data, [Path(s) for s in slides], bundle, slide_mpp, min_inside, max_other, class_names)
    if len(data) != 1 or slides:
        raise TrainError("give one --data image folder or labels.csv, or one GeoJSON per --slides slide")
    s = read_image_data(data[0], group_by)
    names = _align_classes(s.class_names, class_names, data[0])
    labels = np.asarray([names.index(s.class_names[c]) for c in s.labels])
    images, keep, dropped = _tile_images(s, bundle, image_mpp, progress)
    if not keep.any():
        raise LabelError(f"{data[0]}: no image holds a tissue tile at {bundle.mpp:g} µm/px, {bundle.tile_size} px "
                         f"({dropped[0]}); check the images' µm/px (--image-mpp or an mpp column)")
    return LabelledTiles(names, labels[keep], s.groups[keep], None, "images", images=images,
                         grouping=s.group_by or "image", dropped=dropped)


def _tile_images(s, bundle, image_mpp: float | None, progress: bool) -> tuple[list[LabelledImage], np.ndarray, list[str]]:
    """Each image's tile grid at the bundle's µm/px and tile size, made as `infer` makes a slide's
    (tissue detection, the default minimum tissue); images without a tile are left out, with why."""
    from tqdm import tqdm

    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid
    from pathapp.train.labels import resolve_image_mpp

    images, keep, dropped = [], np.zeros(len(s.paths), bool), []
    for i, (path, own) in enumerate(tqdm(list(zip(s.paths, s.mpps)), desc="tiling images", unit="image",
                                         disable=not progress, leave=False)):
        mpp = resolve_image_mpp(path, own if own is not None else image_mpp)
        grid = make_grid(open_slide(path, slide_mpp=mpp), bundle.mpp, bundle.tile_size)
        if len(grid):
            images.append(LabelledImage(Path(path), mpp, grid))
            keep[i] = True
        else:
            dropped.append(f"{path}: no tissue tile of {bundle.tile_size} px at {bundle.mpp:g} µm/px "
                           f"(the image is {grid.slide_size[0]}×{grid.slide_size[1]} px at {mpp:g} µm/px)")
    if dropped:
        print(f"warning: {len(dropped)} of {len(s.paths)} images have no tile and are left out, e.g. {dropped[0]}", file=sys.stderr)
    return images, keep, dropped


def image_tiles(lt: LabelledTiles) -> tuple[Any, np.ndarray, np.ndarray]:
    """(tiles, labels, groups) of every tile of labelled images, each tile taking its image's label:
    what LoRA fine-tunes on (pixels, not embeddings)."""
    parts = [(im.open(), im.grid) for im in lt.images]
    reps = np.asarray([len(g) for _, g in parts])
    return ConcatTiles([SlideTiles(sl, g) for sl, g in parts]), np.repeat(lt.labels, reps), np.repeat(lt.groups, reps)


def _align_classes(found: Sequence[str], expected: Sequence[str] | None, where: Path) -> list[str]:
    """The class order to use: the model's (when evaluating) or the data's own."""
    if expected is None:
        return list(found)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise LabelError(f"{where}: classes {extra} are not among the model's classes {list(expected)}")
    return list(expected)


def _annotation_sources(data: list[Path], slides: list[Path], slide_mpp: float | None) -> list[tuple[Path, list, float | None]]:
    """(slide, QuPath objects, slide µm/px override) per annotated slide: GeoJSON exports paired with
    --slides in order, or every entry of a QuPath project (annotations read from its data files,
    without Java). A project entry that cannot be used is one warning line; the others go on."""
    from pathapp.qupath.geojson import read_objects

    if len(data) == 1 and data[0].suffix.lower() == ".qpproj":
        from pathapp.qupath.project import read_project
        from pathapp.qupath.qpdata import QpdataError, read_entry_objects

        project = read_project(data[0])
        if not project.entries:
            raise LabelError(f"{data[0]}: the project has no images; add them in QuPath")
        usable = [e for e in project.entries if e.image_path is not None and not e.error]
        if not usable:
            why = "; ".join(f"{e.name}: {e.error or 'image not found'}" for e in project.entries[:3])
            raise LabelError(f"{data[0]}: no project image can be opened ({why}); relink the images in QuPath")
        sources = []
        for e in project.entries:
            if e.image_path is None or e.error:
                _warn(f"{e.error or e.name + ': image not found'}; skipped")
                continue
            try:
                sources.append((e.image_path, read_entry_objects(project, e, {"annotation"}), slide_mpp or e.mpp))
            except QpdataError as err:
                _warn(f"{err}; skipped")
        return sources
    if slides and len(slides) != len(data):
        raise TrainError(f"{len(data)} annotation files but {len(slides)} --slides; pair each GeoJSON with its slide")
    if not slides:
        raise TrainError("GeoJSON --data needs the slide it annotates: add --slides SLIDE (one per GeoJSON, same order)")
    return [(slide, read_objects(g), slide_mpp) for g, slide in zip(data, slides)]


def _annotated_tiles(data, slides, bundle, slide_mpp, min_inside, max_other, class_names) -> LabelledTiles:
    import shapely

    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid, tile_polygons
    from pathapp.train.labels import assign_tile_labels, class_regions

    sources = _annotation_sources(data, slides, slide_mpp)
    regions = [class_regions(objects) for _, objects, _ in sources]
    found = sorted({name for r in regions for name in r})
    if class_names is None and len(found) < 2:
        raise LabelError(f"{data[0]}: need classified annotations of at least two classes (found {found})")
    names = _align_classes(found, class_names, data[0])
    labels, groups, parts = [], [], []
    for (path, _, own_mpp), reg in zip(sources, regions):
        if not reg:
            continue
        slide = open_slide(path, slide_mpp=own_mpp)
        grid = make_grid(slide, bundle.mpp, bundle.tile_size, rois=shapely.union_all(list(reg.values())))
        lab = assign_tile_labels(tile_polygons(grid), reg, names, min_inside, max_other)
        keep = lab >= 0
        parts.append((slide, grid.subset(keep)))
        labels.append(lab[keep])
        groups += [slide.name] * int(keep.sum())
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if len(np.unique(y)) < 2:
        raise LabelError(f"{data[0]}: fewer than two classes have tiles inside their regions at "
                         f"{bundle.mpp} µm/px, {bundle.tile_size} px; draw larger regions or lower --tile-size")
    tiles = ConcatTiles([SlideTiles(s, g) for s, g in parts])
    return LabelledTiles(names, y, np.asarray(groups), tiles, "annotations", parts=parts)


def _slide_features(bundle, slide, grid, cache, batch_size, device, model, progress, embeddings: Path | None,
                    stain=None):
    """A slide grid's embeddings: from inference's EMBEDDINGS/<slide>/embeddings.h5 when there is one,
    else computed through the cache (stain-normalised onto `stain`, a StainFit, when given)."""
    from pathapp.train.cache import reuse_inference_embeddings

    h5 = Path(embeddings) / slide.name / "embeddings.h5" if embeddings else None
    if h5 is not None and h5.exists():
        return reuse_inference_embeddings(h5, bundle, grid.coords, stain)[0]
    return embed_slide_grid(bundle, slide, grid, cache, batch_size, device, model, progress, stain)


def embed_labelled(lt: LabelledTiles, bundle, cache: Path | None = DEFAULT_CACHE, device: str = "auto",
                   batch_size: int = 32, progress: bool = True, embeddings: Path | None = None,
                   stain=None) -> np.ndarray:
    """(N, D) embeddings of the labelled items, through the embedding cache (or inference's files):
    a tile's own, or an image's pooled tiles (`pool_tiles`, as `infer` pools them); `stain` (a
    StainFit): normalise each image or slide onto it first, by one fit on its tissue tiles."""
    from tqdm import tqdm

    from pathapp.models.bundle import pool_tiles
    from pathapp.models.device import resolve_device

    model = bundle.build(resolve_device(device))
    if lt.source == "images":
        return np.stack([pool_tiles(embed_slide_grid(bundle, im.open(), im.grid, cache, batch_size, device, model,
                                                     False, stain))
                         for im in tqdm(lt.images, desc="embedding images", unit="image", disable=not progress,
                                        leave=False)])
    return np.concatenate([_slide_features(bundle, s, g, cache, batch_size, device, model, progress, embeddings,
                                           stain) for s, g in lt.parts])


def slide_bags(sl, bundle, slide_mpp: float | None = None, cache: Path | None = DEFAULT_CACHE, device: str = "auto",
               batch_size: int = 32, progress: bool = True, embeddings: Path | None = None, stain=None) -> list[np.ndarray]:
    """Every tissue tile of each slide of `sl` (labels.SlideLabels), embedded (cached; stain-normalised
    onto `stain`, a StainFit, when given)."""
    from pathapp.models.device import resolve_device
    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid

    model = bundle.build(resolve_device(device))
    bags = []
    for p in sl.slides:
        slide = open_slide(p, slide_mpp=slide_mpp)
        grid = make_grid(slide, bundle.mpp, bundle.tile_size)
        if not len(grid):
            raise LabelError(f"{p}: no tissue tiles at {bundle.mpp} µm/px; check the slide or its --slide-mpp")
        bags.append(_slide_features(bundle, slide, grid, cache, batch_size, device, model, progress, embeddings,
                                    stain))
    return bags


def bag_array(bags: Sequence[np.ndarray]) -> np.ndarray:
    """Bags as a 1-D object array, indexable by fold like any X (even when all bags have one size)."""
    X = np.empty(len(bags), dtype=object)
    for i, b in enumerate(bags):
        X[i] = b
    return X


def _require_slide_csv(data: Sequence[Path], task: str, target: str | None) -> None:
    from pathapp.train.labels import DEFAULT_TARGETS

    if len(data) != 1 or not is_slide_csv(Path(data[0])):
        raise TrainError(f"attention-MIL ({task}) needs one --data slides.csv with columns "
                         f"slide,{target or DEFAULT_TARGETS[task]}[,patient]")


def _with_head(bundle, head, class_names: Sequence[str], training: dict):
    """The base bundle plus a trained head and its classes."""
    import dataclasses

    import torch

    return dataclasses.replace(
        bundle,
        head_kind=head.kind,
        head_config=dict(head.config),
        head_tensors={k: torch.as_tensor(v) for k, v in head.build().state_dict().items()},
        class_names=list(class_names),
        class_colors=[],
        provenance={**bundle.provenance, "training": training},
    )


def train_model(
    data: Sequence[Path],
    out: Path,
    method: str,
    *,
    backbone: str | None = None,
    weights: Path | None = None,
    model: Path | None = None,
    slides: Sequence[Path] = (),
    group_by: str | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    slide_mpp: float | None = None,
    cache: Path | None = DEFAULT_CACHE,
    device: str = "auto",
    batch_size: int = 32,
    lora=None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    embeddings: Path | None = None,
    task: str = "classification",
    target: str | None = None,
    stain_norm: str | None = None,
    stain_ref: Path | None = None,
    image_mpp: float | None = None,
    seg=None,
    mask_classes: str | None = None,
) -> tuple[Path, dict]:
    """Train a head (or LoRA + head, or ABMIL) and write the bundle to `out`. Returns (path, info).

    `task` "survival" or "regression" trains ABMIL on the slides.csv columns `target` (default
    time,event or value); the bundle's head then outputs a risk score or a value per slide.
    `stain_norm` / `stain_ref`: normalise the tiles' stains onto REF before embedding them.
    `image_mpp`: the µm/px of labelled images that neither labels.csv nor the file gives.

    "segment" trains a segmentation head (`seg`, a train.segment.SegConfig) on image + mask pairs
    whose pixel values map to classes by `mask_classes`."""
    from pathapp.models.bundle import check_bundle_out, save_bundle
    from pathapp.train.fit import fit_head

    check_bundle_out(out)  # before the work, not after it
    if method not in TRAIN_METHODS:
        raise TrainError(f"--method must be one of {', '.join(TRAIN_METHODS)}, not {method!r}")
    if task != "classification" and method != "abmil":
        raise TrainError(f"--task {task} trains attention-MIL on slides: use --method abmil with --data slides.csv")
    if (backbone is None) == (model is None):
        raise TrainError("give exactly one of --backbone NAME (with optional --weights FILE) or --model BUNDLE")
    from pathapp.models.loader import load_model

    base = load_model(model or backbone, weights=weights, mpp=mpp, tile_size=tile_size, head=False)
    stain = _stain(stain_norm, stain_ref, base)
    if stain is not None and method == "lora":
        raise TrainError("--stain-norm is applied to embeddings (heads, ABMIL), not yet to LoRA fine-tuning; "
                         "drop it or choose another --method")
    options = options or {}
    if method == "segment":
        if stain is not None:
            raise TrainError("--stain-norm is not applied to segmentation training yet; drop it")
        from pathapp.train.segment import SegConfig, read_mask_data, train_segmentation

        ms = read_mask_data(data, group_by, mask_classes, slides, base, slide_mpp, image_mpp)
        bundle, info = train_segmentation(base, ms, seg or SegConfig(), device, progress)
        bundle.provenance["training"].update({"data": [str(d) for d in data], "group_by": group_by})
        return save_bundle(bundle, out), info
    if method == "abmil":
        _require_slide_csv(data, task, target)
        from pathapp.train.labels import read_slide_csv
        from pathapp.train.mil import fit_abmil

        sl = read_slide_csv(Path(data[0]), group_by, task, target)
        bags = slide_bags(sl, base, slide_mpp, cache, device, batch_size, progress, embeddings, stain)
        head = fit_abmil(bags, sl.y, len(sl.class_names), sl.groups, task=task, **options)
        bundle = _with_head(base, head, sl.output_names, {k: v for k, v in head.info.items() if k != "history"})
        info = {"n_slides": len(bags), "classes": sl.output_names, "target": sl.target, **head.info}
        bundle.provenance["training"].update({"unit": "slide", "grouping": sl.grouping, "items": item_keys(sl.slides),
                                              "groups": sorted(set(map(str, sl.groups)))})
    else:
        lt = load_labelled(data, base, slides, group_by, slide_mpp, image_mpp=image_mpp, progress=progress)
        unit = "image" if lt.source == "images" else "tile"
        info = {"n_tiles": int(len(lt.labels)), "unit": unit, "n_groups": int(len(np.unique(lt.groups))),
                "classes": lt.class_names, "support": np.bincount(lt.labels, minlength=len(lt.class_names)).tolist()}
        if method == "lora":
            from pathapp.train.finetune import finetune_lora

            tiles, y, groups = image_tiles(lt) if lt.source == "images" else (lt.tiles, lt.labels, lt.groups)
            bundle, hist = finetune_lora(base, tiles, y, groups, lt.class_names, lora, checkpoint_dir, resume, device,
                                         progress)
            info.update(hist)
        else:
            X = embed_labelled(lt, base, cache, device, batch_size, progress, embeddings, stain)
            head = fit_head(method, X, lt.labels, lt.groups, len(lt.class_names), **options)
            bundle = _with_head(base, head, lt.class_names, head.info)
            info.update(head.info)
        bundle.provenance["training"].update(_data_record(lt))
        info["grouping"] = lt.grouping
    bundle.provenance["training"].update({"data": [str(d) for d in data], "group_by": group_by,
                                          "classes_support": info.get("support"),
                                          "stain_norm": None if stain is None else stain.to_dict()})
    return save_bundle(bundle, out), info


def item_keys(paths: Sequence[Path]) -> list[str]:
    """Short stable names of data files (their resolved paths hashed): what the bundle's provenance
    keeps of its training data, so `evaluate` can tell when it is given that data again."""
    import hashlib

    return sorted({hashlib.sha1(str(Path(p).resolve()).encode()).hexdigest()[:16] for p in paths})


def _data_record(lt: LabelledTiles) -> dict[str, Any]:
    """What the bundle's provenance says about its labelled data: the unit a label is given to, the
    real grouping, the items (images, or annotated slides) and groups, and the images' µm/px."""
    record: dict[str, Any] = {"unit": "image" if lt.source == "images" else "tile", "grouping": lt.grouping,
                              "items": item_keys(lt.paths), "groups": sorted(set(map(str, lt.groups)))}
    if lt.source == "images":
        record["image_mpp"] = sorted({im.mpp for im in lt.images})
        record["tiles_per_image"] = float(np.mean([len(im.grid) for im in lt.images]))
        record["images_left_out"] = len(lt.dropped)
    return record


def evaluate_model(
    data: Sequence[Path],
    model: Path,
    out_dir: Path,
    *,
    folds: int | None = None,
    holdout: float | Path | None = None,
    method: str | None = None,
    fewshot: bool = False,
    slides: Sequence[Path] = (),
    group_by: str | None = None,
    slide_mpp: float | None = None,
    cache: Path | None = DEFAULT_CACHE,
    device: str = "auto",
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    embeddings: Path | None = None,
    task: str | None = None,
    target: str | None = None,
    horizons: Sequence[float] | None = None,
    loss: str = "huber",
    stain_norm: str | None = None,
    stain_ref: Path | None = None,
    image_mpp: float | None = None,
    seg=None,
    mask_classes: str | None = None,
) -> Path:
    """Evaluate a bundle on labelled data and write report.json + confusion.png + roc.png to out_dir.

    Without `folds`: the bundle's own head predicts every item (use data it was not trained on).
    With `folds`: grouped k-fold cross-validation re-fits the head (`method`, default the bundle's
    head kind) on the bundle's embeddings; `fewshot` adds the label-efficiency curve. With `holdout` a
    fraction: the head is re-fitted on one grouped train part and scored on the held-out fraction of
    groups; a file (another labelled set): fitted on `data` and scored on it (shared groups counted).
    Every tile/image report carries the floors (train/floors.py) scored the same way, paired.
    The report names the real grouping and says when the bundle's head is scored on its own training
    data (its provenance lists them).
    `task` (default: the bundle head's) "survival" or "regression" scores slide outcomes instead
    (outcomes.py: C-index, time-dependent AUC at `horizons`, Kaplan–Meier; or R², correlations;
    a regression head re-fitted with `loss`). A segmentation bundle, or `method` "segment" (a head
    from `seg`, a train.segment.SegConfig), scores Dice and mIoU on image + mask pairs."""
    from pathapp.models.bundle import load_bundle
    from pathapp.train.evaluate import (
        EvalResult,
        bootstrap_ci,
        cross_validate,
        fewshot_curve,
        holdout_evaluate,
        point_metrics,
        transfer_evaluate,
        write_report,
    )
    from pathapp.train.fit import METHODS, head_fitter

    bundle = load_bundle(model)
    if method == "segment" or (bundle.task == "segmentation" and method is None):
        from pathapp.train.segment import evaluate_segmentation, read_mask_data

        if holdout:
            raise TrainError("segmentation is evaluated with --folds K or on held-out data as is, not --holdout")
        ms = read_mask_data(data, group_by, mask_classes, slides, bundle, slide_mpp, image_mpp)
        return evaluate_segmentation(bundle, ms, Path(out_dir), folds=folds,
                                     cfg=seg, fewshot=fewshot, device=device, n_boot=n_boot, seed=seed,
                                     progress=progress, extra={"model": str(model), "data": [str(d) for d in data]})
    stain = _stain(stain_norm, stain_ref, bundle)
    task = task or (bundle.task if bundle.head_kind == "abmil" else "classification")
    if task != "classification":
        return _evaluate_outcome(data, bundle, model, Path(out_dir), task, target, folds, holdout, method, horizons,
                                 group_by, slide_mpp, cache, device, batch_size, n_boot, seed, progress, embeddings,
                                 loss, stain)
    is_mil = len(data) == 1 and is_slide_csv(Path(data[0]))
    other = Path(holdout) if isinstance(holdout, (str, Path)) else None  # --holdout other.csv: a second labelled set
    fraction = None if other is not None else holdout
    if not (folds or holdout) and bundle.has_head and (bundle.head_kind == "abmil") != is_mil:
        raise TrainError(f"{model}: a {bundle.head_kind} head needs "
                         + ("a slide,label CSV as --data" if bundle.head_kind == "abmil" else "tile-level --data"))
    if folds and holdout:
        raise TrainError("give --folds K or --holdout FRACTION|FILE, not both")
    if other is not None and is_mil:
        raise TrainError("--holdout FILE scores tile and image data; for slides.csv use --holdout FRACTION or --folds")
    refit = bool(folds or holdout)
    expected = bundle.class_names if bundle.has_head and not refit else None

    def load(paths, names=expected, mpp=image_mpp) -> LabelledTiles:
        return load_labelled(paths, bundle, slides, group_by, slide_mpp, class_names=names, image_mpp=mpp,
                             progress=progress)

    def embed(labelled: LabelledTiles, b) -> np.ndarray:
        return embed_labelled(labelled, b, cache, device, batch_size, progress, embeddings, stain)

    lt = train_lt = None
    if is_mil:
        from pathapp.train.labels import read_slide_csv

        sl = read_slide_csv(Path(data[0]), group_by, target=target)
        bags = slide_bags(sl, bundle, slide_mpp, cache, device, batch_size, progress, embeddings, stain)
        names = _align_classes(sl.class_names, expected, Path(data[0]))
        y = np.asarray([names.index(sl.class_names[c]) for c in sl.labels])
        X = bag_array(bags)
        groups, grouping, files = sl.groups, sl.grouping, list(sl.slides)
    else:
        lt = load(data)
        if other is not None:
            train_lt, lt = lt, load([other], names=lt.class_names)
        names, y, groups, grouping = lt.class_names, lt.labels, lt.groups, lt.grouping
        X = embed(lt, bundle)
        files = lt.paths
    extra: dict[str, Any] = {"model": str(model), "data": [str(d) for d in data], "group_by": grouping,
                             "stain_norm": None if stain is None else {"method": stain.method, "reference": stain.source}}
    seen = _seen_in_training(bundle, files, groups)
    if seen:
        extra["training_data"] = seen
    n = len(names)
    if refit:
        method = method or bundle.head_kind or "linear"
        if is_mil or method == "abmil":
            from pathapp.train.mil import abmil_fitter

            fit = abmil_fitter(n)
        elif method in METHODS:
            fit = head_fitter(method, n)
        else:
            raise TrainError(f"--method for cross-validation must be one of {', '.join(METHODS + ('abmil',))}")
    else:  # the floors are fitted as the bundle's head was
        fit = head_fitter(bundle.head_kind if bundle.head_kind in METHODS else "linear", n)

    def protocol(F: np.ndarray, fit_fn, F_train: np.ndarray | None = None) -> EvalResult:
        if folds:
            return cross_validate(F, y, groups, n, fit_fn, folds, seed, n_boot)
        if fraction:
            return holdout_evaluate(F, y, groups, n, fit_fn, fraction, seed, n_boot)
        return transfer_evaluate((F_train, train_lt.labels, train_lt.groups), (F, y, groups), n, fit_fn, seed, n_boot)

    if refit:
        result = protocol(X, fit, embed(train_lt, bundle) if other is not None else None)
        extra["method"] = method
        if folds:
            extra["mode"] = f"{folds}-fold cross-validation grouped by {grouping}"
        elif fraction:
            extra["mode"] = f"held-out {fraction:.0%} of groups ({grouping})"
        else:
            extra["mode"] = f"trained on {data[0]}, scored on {other} (groups: {grouping})"
            extra["shared_groups"] = _shared_groups(train_lt.groups, groups, grouping, other)
        if fewshot and not is_mil and not other:
            extra["fewshot"] = fewshot_curve(X, y, groups, n, fit, n_folds=folds or 5, seed=seed)
    else:
        if not bundle.has_head:
            raise TrainError(f"{model}: the bundle has no head; pass --folds K to cross-validate a --method on its embeddings")
        probs = _bundle_probs(bundle, X, is_mil)
        metrics = point_metrics(y, probs, n)
        metrics["ci95"] = bootstrap_ci(y, probs, n, groups, n_boot=n_boot, seed=seed)
        result = EvalResult(y, probs, groups, np.zeros(len(y), int), metrics, [])
        extra["mode"] = "the bundle's head as trained, on " + (
            f"its own training data ({seen['items_seen']} of {seen['items']} items were trained on: optimistic)"
            if seen and seen["items_seen"] else "data it was not trained on")
        if seen and seen["items_seen"]:
            print(f"warning: {model} was trained on {seen['items_seen']} of these {seen['items']} items "
                  f"({seen['groups_seen']} of {seen['groups']} groups): these are training data and the score is "
                  f"optimistic; evaluate held-out data, or re-fit on grouped folds with --folds K", file=sys.stderr)
        train_lt = _training_data(bundle, load) if lt is not None else None
    extra["floors"] = (_floors(lt, train_lt, bundle, embed, protocol, fit, result, n, n_boot, seed, refit)
                       if lt is not None else {"not measured": "slide bags (attention-MIL): the colour-histogram and "
                                               "random-init floors are measured for tile and image data"})
    items = [str(f) for f in files] if is_mil or lt.source == "images" else [
        f"{sl_.name}@{x},{y_}" for sl_, g in lt.parts for x, y_ in np.asarray(g.coords).tolist()]
    return write_report(result, names, Path(out_dir), extra, items)


def _seen_in_training(bundle, files: Sequence[Path], groups: np.ndarray) -> dict[str, int] | None:
    """How many of the evaluated items (images or slides) and groups the bundle's head was trained on,
    from its provenance; None when the bundle does not record its training data."""
    training = bundle.provenance.get("training") or {}
    if not training.get("items"):
        return None
    keys, trained_groups = set(item_keys(files)), set(training.get("groups") or [])
    return {"items": len(keys), "items_seen": len(keys & set(training["items"])),
            "groups": len(set(map(str, groups))), "groups_seen": len(set(map(str, groups)) & trained_groups),
            "trained_on": training.get("data")}


def _shared_groups(train_groups: np.ndarray, test_groups: np.ndarray, grouping: str, other: Path) -> dict[str, Any]:
    """Groups (cases) on both sides of a --holdout FILE evaluation, with a warning when there are any."""
    shared = sorted(set(map(str, train_groups)) & set(map(str, test_groups)))
    if shared:
        print(f"warning: {other}: {len(shared)} of its {len(set(test_groups))} {grouping} groups are also in --data "
              f"(e.g. {shared[0]}): the score is optimistic; hold out whole groups", file=sys.stderr)
    return {"count": len(shared), "of": int(len(set(test_groups))), "examples": shared[:10]}


def _training_data(bundle, load) -> LabelledTiles | None:
    """The bundle's own training images, when its provenance names them and they are readable here
    (the floors of a held-out evaluation are fitted on them, as the head was)."""
    training = bundle.provenance.get("training") or {}
    paths, mpps = training.get("data") or [], training.get("image_mpp") or []
    if training.get("unit") != "image" or not paths or not all(Path(p).exists() for p in paths):
        return None
    try:
        return load([Path(p) for p in paths], names=bundle.class_names, mpp=mpps[0] if len(mpps) == 1 else None)
    except PathappError:
        return None


def _floors(lt: LabelledTiles, train_lt: LabelledTiles | None, bundle, embed, protocol, fit, result, n: int,
            n_boot: int, seed: int, refit: bool) -> dict[str, Any]:
    """Each floor scored by the model's protocol on the same items, with the paired model − floor
    difference; when the bundle's own head is scored, floors are fitted on its training data."""
    from pathapp.train import floors

    if not refit and train_lt is None:
        return {"not measured": "the bundle's training data (its provenance) is not readable here; re-fit with "
                                "--folds K or --holdout FILE to measure floors beside the model"}
    features = floors.floor_features(lt, bundle, embed)
    train = floors.floor_features(train_lt, bundle, embed) if train_lt is not None else {}
    out: dict[str, Any] = {}
    for name, F in features.items():
        r = protocol(F, floors.floor_fitter(name, fit), train.get(name))
        out[name] = {"what": floors.describe(name, bundle), "metrics": r.metrics, "per_fold": r.per_fold,
                     "model_minus_floor": floors.paired_difference(result.y, result.probs, r.probs, result.groups, n,
                                                                   n_boot, seed, result.fold)}
    return out


def _stain(method: str | None, ref: Path | None, bundle):
    """The stain target of --stain-norm / --stain-ref at the bundle's µm/px and tile size, or None."""
    from pathapp.tiles.stain import stain_target

    return stain_target(method, ref, mpp=bundle.mpp, tile_size=bundle.tile_size)


def _evaluate_outcome(data, bundle, model, out_dir: Path, task: str, target, folds, holdout, method, horizons,
                      group_by, slide_mpp, cache, device, batch_size, n_boot, seed, progress, embeddings,
                      loss: str, stain=None) -> Path:
    """`evaluate_model` for survival and continuous slide targets (`stain`: a StainFit, as there)."""
    from pathapp.train.labels import read_slide_csv
    from pathapp.train.mil import abmil_fitter
    from pathapp.train.outcomes import cross_validate_outcome, evaluate_outcome, outcome_folds, write_outcome_report

    _require_slide_csv(data, task, target)
    if method not in (None, "abmil"):
        raise TrainError(f"--task {task} is evaluated with --method abmil (attention-MIL), not {method!r}")
    refit = bool(folds or holdout)
    if folds and holdout:
        raise TrainError("give --folds K or --holdout FRACTION, not both")
    if not refit and bundle.task != task:
        raise TrainError(f"{model}: its head predicts {bundle.task or 'nothing (no head)'}, not {task}; pass --folds K "
                         f"to cross-validate a {task} head on its embeddings, or give a {task} bundle")
    sl = read_slide_csv(Path(data[0]), group_by, task, target)
    folds = outcome_folds(task, sl.y, sl.groups, folds or 5, seed, holdout, str(data[0])) if refit else None
    X = bag_array(slide_bags(sl, bundle, slide_mpp, cache, device, batch_size, progress, embeddings, stain))
    grouping = sl.grouping
    extra: dict[str, Any] = {"model": str(model), "data": [str(d) for d in data], "group_by": grouping,
                             "target": sl.target, "method": "abmil"}
    if refit:
        fit = abmil_fitter(task=task, **({"loss": loss} if task == "regression" else {}))
        extra.update({"loss": loss} if task == "regression" else {})
        result = cross_validate_outcome(X, sl.y, sl.groups, task, fit, folds, n_boot, seed, horizons)
        extra["mode"] = (f"held-out {holdout:.0%} of groups ({grouping})" if holdout
                         else f"{len(folds)}-fold cross-validation grouped by {grouping}")
    else:
        pred = _bundle_probs(bundle, X, True)[:, 0]
        result = evaluate_outcome(sl.y, pred, sl.groups, task, n_boot, seed, horizons)
        extra["mode"] = "held-out evaluation of the bundle's head"
    return write_outcome_report(result, out_dir, extra, [str(p) for p in sl.slides])


def _bundle_probs(bundle, X: np.ndarray, is_mil: bool) -> np.ndarray:
    """The bundle's head applied as inference applies it (tile head per row, slide head per bag)."""
    import torch

    head = bundle.build_head()
    with torch.no_grad():
        if is_mil:
            return np.stack([head(torch.as_tensor(b, dtype=torch.float32))[0].double().numpy() for b in X])
        return head(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
