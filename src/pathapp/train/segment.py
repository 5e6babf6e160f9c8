"""`pathapp train --method segment` and `pathapp evaluate` of segmentation heads.

Data: image + mask pairs, from a CSV with `image` and `mask` columns (paths relative to the CSV; an
optional `label` column and a group column as for classification, e.g. EBHI-Seg's labels.csv) or a
folder whose `image/` folders have a sibling `label/` (or `mask/`) folder with the same file names.
Mask pixel values map to classes by `mask_classes`: two names (default Background,Foreground) take
a binary mask thresholded at 128; more names take pixel value v as class v; "label" makes the row's
label column the foreground class (classes Background + every label). Rows without a mask are left out.

Images are read as every labelled image is (`train.cache.load_tile_image`: centre square resized to
the bundle's tile size); masks through the same crop, nearest-neighbour. With a frozen backbone the
patch features are computed once and every head, fold and few-label point reuses them; LoRA trains
the adapters with the head, on the fly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.errors import PathappError
from pathapp.slide import IMAGE_SUFFIXES
from pathapp.train.labels import LabelError, _group_of, group_column, parse_mpp, read_rows

BACKGROUND = "Background"
DEFAULT_MASK_CLASSES = (BACKGROUND, "Foreground")
FEW_LABELS = (5, 10, 25, 50, 100, None)  # labelled images on the train side of each fold (None: all)


class SegmentError(PathappError):
    """Segmentation data or options that cannot be used."""


@dataclass
class MaskSet:
    """Images with their masks: paths (or the pixels themselves, for tiles read from annotated
    slides), group (case) and image-level label per image, class names."""

    images: list[Path]
    masks: list[Path]
    groups: np.ndarray
    labels: list[str]
    class_names: list[str]
    foreground: list[int]  # per image: the class a binary mask's foreground takes (0: value = class)
    pixels: tuple[np.ndarray, np.ndarray] | None = None  # (N, T, T, 3) uint8 tiles, (N, T, T) int64 classes

    def __len__(self) -> int:
        return len(self.groups)


def _rows_from_csv(path: Path, group_by: str | None) -> tuple[list[dict], str | None]:
    rows = read_rows(path)
    cols = rows[0].keys() if rows else []
    for col in ("image", "mask"):
        if col not in cols:
            raise LabelError(f"{path}: segmentation needs columns image,mask[,label,group] (has {', '.join(cols)})")
    group_by = group_column(path, cols, group_by)
    out = [{"image": path.parent / r["image"], "mask": path.parent / r["mask"], "label": r.get("label", ""),
            "group": r[group_by] if group_by else r["image"], "mpp": parse_mpp(r.get("mpp"), f"{path}, row {n + 2}")}
           for n, r in enumerate(rows) if r["mask"].strip()]
    return out, group_by


def _rows_from_folder(root: Path, group_by: str | None) -> list[dict]:
    rows = []
    for image_dir in sorted(p for p in root.rglob("image") if p.is_dir()):
        mask_dir = next((image_dir.parent / n for n in ("label", "mask", "masks") if (image_dir.parent / n).is_dir()),
                        None)
        if mask_dir is None:
            continue
        for img in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            mask = mask_dir / img.name
            if mask.exists():
                rows.append({"image": img, "mask": mask, "label": image_dir.parent.name,
                             "group": _group_of(img.stem, group_by)})
    return rows


def read_mask_data(data: Sequence[Path], group_by: str | None = None, mask_classes: str | None = None,
                   slides: Sequence[Path] = (), bundle=None, slide_mpp: float | None = None,
                   image_mpp: float | None = None) -> MaskSet:
    """Image + mask pairs from CSVs or image/+label/ folders (see the module docstring), or tiles of
    QuPath-annotated slides (GeoJSON + `slides`, or a project) at `bundle`'s µm/px (`annotated_tiles`).
    With a scale (a CSV `mpp` cell, else `image_mpp`) image and mask are tiled at the bundle's µm/px
    and tile size as `pathapp infer` tiles a slide (`tiled_pairs`)."""
    if data and all(Path(d).suffix.lower() in (".geojson", ".json", ".qpproj") for d in data):
        return annotated_tiles([Path(d) for d in data], [Path(s) for s in slides], bundle, slide_mpp)
    rows: list[dict] = []
    for d in map(Path, data):
        if d.is_file() and d.suffix.lower() == ".csv":
            rows += _rows_from_csv(d, group_by)[0]
        elif d.is_dir() and (d / "labels.csv").exists():
            rows += _rows_from_csv(d / "labels.csv", group_by)[0]
        elif d.is_dir():
            found = _rows_from_folder(d, group_by)
            if not found:
                raise LabelError(f"{d}: no image/ folder with a label/ or mask/ folder beside it holding the "
                                 f"same file names; give a CSV with columns image,mask instead")
            rows += found
        else:
            raise LabelError(f"{d}: segmentation --data is a CSV with columns image,mask or a folder of "
                             f"image/ + label/ pairs")
    if len(rows) < 2:
        raise LabelError(f"{', '.join(map(str, data))}: fewer than two image + mask pairs")
    missing = [r[k] for r in rows for k in ("image", "mask") if not Path(r[k]).exists()]
    if missing:
        raise LabelError(f"{len(missing)} listed images or masks missing, e.g. {missing[0]}; fix the paths")
    labels = [r["label"] for r in rows]
    if mask_classes == "label":
        if not all(labels):
            raise LabelError("--mask-classes label needs a label for every image (a label column or class folders)")
        names = [BACKGROUND, *sorted(set(labels))]
        foreground = [names.index(lab) for lab in labels]
    else:
        names = [n.strip() for n in mask_classes.split(",")] if mask_classes else list(DEFAULT_MASK_CLASSES)
        if len(names) < 2 or len(set(names)) != len(names):
            raise SegmentError(f"--mask-classes needs at least two distinct names (got {mask_classes!r})")
        foreground = [1 if len(names) == 2 else 0] * len(rows)
    ms = MaskSet([Path(r["image"]) for r in rows], [Path(r["mask"]) for r in rows],
                 np.asarray([r["group"] for r in rows]), labels, names, foreground)
    mpps = [r.get("mpp") or image_mpp for r in rows]
    if any(m is not None for m in mpps):
        if not all(mpps):
            raise LabelError("some images have an mpp and others not; give every image its scale (--image-mpp or "
                             "the mpp column)")
        return tiled_pairs(ms, bundle, mpps)
    return ms


def tiled_pairs(ms: MaskSet, bundle, mpps: Sequence[float]) -> MaskSet:
    """Every tile of each image at the bundle's µm/px and tile size (TileGeometry, as infer tiles a
    slide), its mask read through the same geometry (thresholded or taken as class values after the
    one resampling, so index masks are best given at the model's scale)."""
    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid
    from pathapp.tiles.dataset import read_tile

    images, masks, keep = [], [], []
    for i, (img, msk, mpp) in enumerate(zip(ms.images, ms.masks, mpps)):
        slide, mask_slide = open_slide(img, slide_mpp=mpp), open_slide(msk, slide_mpp=mpp)
        grid = make_grid(slide, bundle.mpp, bundle.tile_size, min_tissue=0.0)
        for t in range(len(grid)):
            images.append(read_tile(slide, grid, t))
            m = read_tile(mask_slide, grid, t)[..., 0]
            fg = ms.foreground[i]
            masks.append(np.where(m >= 128, fg, 0).astype(np.int64) if fg else m.astype(np.int64))
            keep.append(i)
    if len(images) < 2:
        raise LabelError(f"fewer than two {bundle.tile_size} px tiles at {bundle.mpp:g} µm/px fit in the images; "
                         f"check --image-mpp or the mpp column")
    idx = np.asarray(keep)
    return MaskSet([ms.images[i] for i in idx], [ms.masks[i] for i in idx], ms.groups[idx],
                   [ms.labels[i] for i in idx], ms.class_names, [ms.foreground[i] for i in idx],
                   pixels=(np.stack(images), np.stack(masks)))


def annotated_tiles(data: list[Path], slides: list[Path], bundle, slide_mpp: float | None = None) -> MaskSet:
    """Tiles of the bundle's geometry whose centre lies in a classified annotation, with each pixel
    labelled by the annotation under its centre (holes excluded): class 0 Background (or a QuPath
    class named so), the others in name order; pixels under no annotation are ignored (-1), never
    guessed. Each slide is its own group."""
    import shapely

    from pathapp.slide import open_slide
    from pathapp.tiles import make_grid
    from pathapp.tiles.dataset import read_tile
    from pathapp.train.api import _annotation_sources
    from pathapp.train.labels import class_regions

    sources = [(path, class_regions(objects), mpp) for path, objects, mpp in _annotation_sources(data, slides, slide_mpp)]
    names = [BACKGROUND, *sorted({n for _, regions, _ in sources for n in regions} - {BACKGROUND})]
    images, masks, groups = [], [], []
    t = bundle.tile_size
    for path, regions, mpp in sources:
        if not regions:
            continue
        slide = open_slide(path, slide_mpp=mpp)
        grid = make_grid(slide, bundle.mpp, t, rois=shapely.union_all(list(regions.values())), min_tissue=0.0)
        offsets = (np.arange(t) + 0.5) * grid.footprint / t
        for i, (x, y) in enumerate(grid.coords):
            xs, ys = np.meshgrid(x + offsets, y + offsets)
            mask = np.full((t, t), -1, np.int64)
            for name, geom in regions.items():
                mask[shapely.contains_xy(geom, xs, ys)] = names.index(name)
            images.append(read_tile(slide, grid, i))
            masks.append(mask)
            groups.append(str(path))
    if len(images) < 2:
        raise LabelError(f"{', '.join(map(str, data))}: fewer than two tiles of {t} px at {bundle.mpp} µm/px lie "
                         f"inside classified annotations; annotate larger regions or lower --mpp")
    return MaskSet([], [], np.asarray(groups), [""] * len(images), names, [0] * len(images),
                   pixels=(np.stack(images), np.stack(masks)))


def load_mask(path: Path, size: int, foreground: int) -> np.ndarray:
    """A mask file as (size, size) int64 class indices, cropped as its image is (`load_tile_image`).

    `foreground` > 0: binary, pixels ≥ 128 take that class; 0: the pixel value is the class."""
    from pathapp.train.cache import load_tile_image

    m = load_tile_image(path, size, mode="L", nearest=True)
    return np.where(m >= 128, foreground, 0).astype(np.int64) if foreground else m.astype(np.int64)


@dataclass
class SegConfig:
    """How a segmentation head is trained (stored in the bundle's provenance)."""

    head: str | None = "linear"  # "linear" | "decoder" (None: the bundle's, else linear)
    layers: int | None = 1  # last blocks whose patch tokens are concatenated, 1 or 4 (None: as head)
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    seed: int = 0
    lora: Any = None  # a train.finetune.LoraConfig: adapters on the backbone, trained with the head

    def resolved(self, bundle=None) -> SegConfig:
        """Unset head/layers from `bundle`'s segmentation head when it has one, else linear on 1 block."""
        own = bundle is not None and bundle.task == "segmentation"
        head = self.head or (bundle.head_kind.removeprefix("seg_") if own else "linear")
        layers = self.layers or (int(bundle.head_config.get("layers", 1)) if own else 1)
        return dataclasses.replace(self, head=head, layers=layers)


def check_layers(bundle, layers: int) -> None:
    """One line instead of timm's assertion when the ViT has fewer blocks than `layers`."""
    depth = len({k.split(".")[1] for k in bundle.backbone_state if k.startswith("blocks.")})
    if layers > depth:
        raise SegmentError(f"--seg-layers {layers}: the backbone {bundle.spec.name} has {depth} blocks; use "
                           f"--seg-layers 1")


class SegData:
    """The images and masks of a MaskSet in memory at one tile size, and (frozen backbone) their patch
    features, computed once with the bundle's backbone."""

    def __init__(self, ms: MaskSet, bundle, layers: int, device: str = "cpu", progress: bool = True,
                 features: bool = True, batch_size: int = 32) -> None:
        import torch
        from tqdm import tqdm

        from pathapp.train.cache import load_tile_image

        check_layers(bundle, layers)
        size = bundle.tile_size
        if ms.pixels is not None:
            self.images, self.masks = ms.pixels
        else:
            self.images = np.stack([load_tile_image(p, size) for p in ms.images])
            self.masks = np.stack([load_mask(p, size, f) for p, f in zip(ms.masks, ms.foreground)])
        self.masks[self.masks >= len(ms.class_names)] = -1  # values no class names: ignored
        self.features = None
        if features:
            from pathapp.models.seg import patch_features

            model = bundle.build(device)
            out = []
            with torch.inference_mode():
                for i in tqdm(range(0, len(self.images), batch_size), desc="patch features", unit="batch",
                              disable=not progress, leave=False):
                    x = torch.from_numpy(self.images[i:i + batch_size]).permute(0, 3, 1, 2).to(device)
                    out.append(patch_features(model.backbone, model.normalize(x), layers).half().cpu())
            self.features = torch.cat(out)


def _device(device: str):
    from pathapp.models.device import resolve_device

    return resolve_device(device)


def fit_seg_head(bundle, data: SegData, idx: np.ndarray, n_classes: int, cfg: SegConfig, device: str = "cpu",
                 progress: bool = True):
    """Train a segmentation head (and LoRA adapters when `cfg.lora`) on the images `idx` of `data`.
    Returns (head, backbone or None when frozen, history)."""
    import torch
    from tqdm import tqdm

    from pathapp.models.seg import new_seg_head, patch_features, seg_loss

    dev = _device(device)
    torch.manual_seed(cfg.seed)
    model = None
    head = new_seg_head(cfg.head, bundle.spec.embed_dim, n_classes, cfg.layers).to(dev)
    params = [{"params": head.parameters(), "lr": cfg.lr}]
    if cfg.lora is not None:
        from pathapp.models.lora import apply_lora, lora_parameters

        model = bundle.build(dev)
        apply_lora(model.backbone, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout)
        params.append({"params": lora_parameters(model.backbone), "lr": cfg.lora.lr})
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-len(idx) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in params], total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    history = []
    size = data.images.shape[1]
    # the loss is taken at 4× the patch grid (the decoder's output), on masks resampled there once
    grid = size // int(bundle.spec.patch_size)
    loss_size = min(size, 4 * grid)
    masks = torch.from_numpy(data.masks)
    if loss_size != size:
        pick = ((np.arange(loss_size) + 0.5) * size / loss_size).astype(np.int64)
        masks = masks[:, pick][:, :, pick]
    bar = tqdm(total=steps, unit="step", desc=f"segment ({cfg.head})", disable=not progress, leave=False)
    head.train()
    for epoch in range(cfg.epochs):
        order = rng.permutation(idx)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            b = np.sort(order[i:i + cfg.batch_size])
            if len(b) < 2 and len(order) > 1:  # batch norm needs two
                continue
            target = masks[torch.from_numpy(b)].to(dev)
            if model is None:
                feats = data.features[b].to(dev).float()
            else:
                x = torch.from_numpy(data.images[b]).permute(0, 3, 1, 2).to(dev)
                feats = patch_features(model.backbone, model.normalize(x), cfg.layers)
            logits = torch.nn.functional.interpolate(head.logits(feats), size=(loss_size, loss_size),
                                                     mode="bilinear", align_corners=False)
            loss = seg_loss(logits, target, cfg.dice_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None})
    bar.close()
    head.eval()
    backbone = None
    if model is not None:
        from pathapp.models.lora import merge_lora

        backbone = merge_lora(model.backbone).eval()
    return head.cpu(), (backbone.cpu() if backbone is not None else None), history


def predict_masks(bundle, data: SegData, idx: np.ndarray, head, backbone=None, device: str = "cpu",
                  batch_size: int = 16) -> np.ndarray:
    """(len(idx), H, W) predicted class per pixel of images `idx` (cached features unless `backbone`)."""
    import torch

    from pathapp.models.seg import patch_features

    dev = _device(device)
    head = head.to(dev).eval()
    size = data.images.shape[1]
    model = None
    if backbone is not None or data.features is None:
        from pathapp.models.bundle import PathModel

        model = PathModel(backbone or bundle.build_backbone(), head, bundle.mean, bundle.std, bundle.recipe).to(dev)
    out = []
    with torch.inference_mode():
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            if model is None:
                feats = data.features[b].to(dev).float()
            else:
                x = torch.from_numpy(data.images[b]).permute(0, 3, 1, 2).to(dev)
                feats = patch_features(model.backbone, model.normalize(x), head.layers)
            logits = torch.nn.functional.interpolate(head.logits(feats), size=(size, size), mode="bilinear",
                                                     align_corners=False)
            out.append(logits.argmax(1).cpu().numpy().astype(np.int16))
    return np.concatenate(out) if out else np.zeros((0, size, size), np.int16)


def train_segmentation(bundle, ms: MaskSet, cfg: SegConfig, device: str = "auto", progress: bool = True):
    """(bundle with the trained segmentation head, info) from image + mask pairs."""
    import torch

    dev = str(_device(device))
    cfg = cfg.resolved()
    data = SegData(ms, bundle, cfg.layers, dev, progress, features=cfg.lora is None)
    head, backbone, history = fit_seg_head(bundle, data, np.arange(len(ms)), len(ms.class_names), cfg, dev, progress)
    state = bundle.backbone_state if backbone is None else \
        {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    support = np.bincount(data.masks[data.masks >= 0].ravel(), minlength=len(ms.class_names))
    training = {"method": "segment", "seg": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"},
                "lora": None if cfg.lora is None else dataclasses.asdict(cfg.lora), "history": history,
                "n_images": len(ms), "pixel_support": support.tolist()}
    out = dataclasses.replace(
        bundle, backbone_state=state, head_kind=head.kind, head_config=dict(head.config),
        head_tensors={k: torch.as_tensor(v).contiguous() for k, v in head.state_dict().items()},
        class_names=list(ms.class_names), class_colors=seg_colors(ms.class_names), provenance={**bundle.provenance, "training": training})
    info = {"n_images": len(ms), "n_groups": int(len(np.unique(ms.groups))), "classes": ms.class_names,
            "pixel_support": support.tolist(), "final_loss": history[-1]["loss"] if history else None}
    return out, info


# ------------------------------------------------------------------------------------------ evaluate


def confusions(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C, C) pixel confusion per image (rows truth, columns prediction); ignored pixels (< 0) left out."""
    out = np.zeros((len(truth), n_classes, n_classes), np.int64)
    for i, (t, p) in enumerate(zip(truth, pred)):
        ok = t >= 0
        out[i] = np.bincount(t[ok].ravel() * n_classes + p[ok].ravel(), minlength=n_classes**2).reshape(n_classes,
                                                                                                       n_classes)
    return out


def seg_metrics(conf: np.ndarray) -> dict[str, Any]:
    """Dice and IoU per class and their means over classes present in truth or prediction, from
    pooled pixel counts (a (C, C) matrix or (N, C, C) summed)."""
    c = conf.sum(0) if conf.ndim == 3 else conf
    tp = np.diag(c).astype(float)
    fp, fn = c.sum(0) - tp, c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return {"dice": dice.tolist(), "iou": iou.tolist(), "mean_dice": float(np.nanmean(dice)),
            "miou": float(np.nanmean(iou)), "pixel_accuracy": float(tp.sum() / max(c.sum(), 1))}


def _scores(conf: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    from pathapp.train.evaluate import group_bootstrap

    m = seg_metrics(conf)
    m["ci95"] = group_bootstrap(lambda i: seg_metrics(conf[i]), groups, n_boot, seed)
    return m


def evaluate_segmentation(bundle, ms: MaskSet, out_dir: Path, *, folds: int | None = None, cfg: SegConfig | None = None,
                          fewshot: bool = False, device: str = "auto", n_boot: int = 1000, seed: int = 0,
                          progress: bool = True, extra: dict | None = None) -> Path:
    """Dice and mIoU per class (95 % CIs over cases): of the bundle's own segmentation head on `ms`
    (held-out data), or with `folds` of a head re-fitted (`cfg`) on case-grouped folds, beside the
    floor of predicting every pixel as the training side's most frequent class. `fewshot`: mean Dice
    vs the number of labelled training images. Writes report.json, examples.png (and fewshot.png)."""
    from pathapp.train.evaluate import grouped_folds, write_json

    dev = str(_device(device))
    n = len(ms.class_names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"task": "segmentation", "class_names": ms.class_names, "n_images": len(ms),
                              "n_groups": int(len(np.unique(ms.groups))), **(extra or {})}
    if folds:
        cfg = (cfg or SegConfig(head=None, layers=None)).resolved(bundle)
        data = SegData(ms, bundle, cfg.layers, dev, progress, features=cfg.lora is None)
        strata = np.asarray(ms.labels) if all(ms.labels) else np.zeros(len(ms))
        split = grouped_folds(strata, ms.groups, folds, seed)
        pred = np.zeros(data.masks.shape, np.int16)
        floor = np.zeros_like(pred)
        for tr, te in split:
            head, backbone, _ = fit_seg_head(bundle, data, tr, n, cfg, dev, progress)
            pred[te] = predict_masks(bundle, data, te, head, backbone, dev)
            train_px = data.masks[tr]
            floor[te] = np.bincount(train_px[train_px >= 0].ravel(), minlength=n).argmax()
        report["mode"] = f"{folds}-fold cross-validation grouped by case ({len(np.unique(ms.groups))} cases)"
        report["head"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"}
        conf = confusions(data.masks, pred, n)
        report["floors"] = {"majority_class": _scores(confusions(data.masks, floor, n), ms.groups, n_boot, seed)}
        if fewshot:
            report["fewshot"] = few_label_curve(bundle, data, ms, split, cfg, dev, seed)
            save_curve(report["fewshot"], out_dir / "fewshot.png")
    else:
        if bundle.task != "segmentation":
            raise SegmentError("the bundle has no segmentation head; pass --folds K to cross-validate one "
                               "(--seg-head linear|decoder)")
        layers = int(bundle.head_config.get("layers", 1))
        unknown = sorted(set(ms.class_names) - set(bundle.class_names))
        if unknown:
            raise SegmentError(f"classes {unknown} of the data are not among the bundle's {bundle.class_names}; "
                               f"check --mask-classes")
        data = SegData(ms, bundle, layers, dev, progress)
        lut = np.asarray([bundle.class_names.index(c) for c in ms.class_names] + [-1])
        data.masks = lut[data.masks]  # the data's class order -> the bundle's (-1 stays -1)
        n = len(bundle.class_names)
        ms = dataclasses.replace(ms, class_names=list(bundle.class_names))
        report["class_names"] = ms.class_names
        pred = predict_masks(bundle, data, np.arange(len(ms)), bundle.build_head(), None, dev)
        conf = confusions(data.masks, pred, n)
        report["mode"] = "held-out evaluation of the bundle's segmentation head"
    report["metrics"] = _scores(conf, ms.groups, n_boot, seed)
    save_examples(data.images, data.masks, pred, seg_colors(ms.class_names), out_dir / "examples.png")
    return write_json(report, out_dir / "report.json")


def few_label_curve(bundle, data: SegData, ms: MaskSet, split, cfg: SegConfig, device: str, seed: int,
                    sizes: Sequence[int | None] = FEW_LABELS) -> list[dict]:
    """Mean Dice over the test folds when each fold's head sees only n labelled training images."""
    rng = np.random.default_rng(seed)
    n = len(ms.class_names)
    curve = []
    for size in sizes:
        scores = []
        for tr, te in split:
            if size is not None and size >= len(tr):
                continue
            sub = tr if size is None else np.sort(rng.choice(tr, size, replace=False))
            head, backbone, _ = fit_seg_head(bundle, data, sub, n, cfg, device, progress=False)
            pred = predict_masks(bundle, data, te, head, backbone, device)
            scores.append(seg_metrics(confusions(data.masks[te], pred, n))["mean_dice"])
        if scores:
            curve.append({"images": "all" if size is None else int(size), "mean_dice": float(np.mean(scores)),
                          "std": float(np.std(scores)), "runs": len(scores)})
    return curve


def seg_colors(names: Sequence[str]) -> list[tuple[int, int, int]]:
    """Black for the background class 0 (drawn transparent), the bundle palette for the others."""
    from pathapp.models.bundle import default_colors

    return [(0, 0, 0), *default_colors(len(names) - 1)]


def save_curve(curve: Sequence[dict], path: Path) -> Path:
    """fewshot.png: mean Dice (± std over folds) vs labelled training images."""
    from pathapp.train.evaluate import save_fewshot_plot

    return save_fewshot_plot(curve, path, x="images", y="mean_dice", xlabel="labelled training images",
                             ylabel="mean Dice (held-out folds)")


def save_examples(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, colors, path: Path, n: int = 6) -> Path:
    """examples.png: image | truth | prediction for `n` images spread over the set (ignored: black)."""
    from PIL import Image

    from pathapp.atomic import atomic_path

    pick = np.linspace(0, len(images) - 1, min(n, len(images))).astype(int)
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8)
    rows = [np.concatenate([images[i], lut[truth[i].clip(0, 255).astype(np.uint8) * (truth[i] >= 0)],
                            lut[pred[i].astype(np.uint8)]], axis=1) for i in pick]
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")
    return path
