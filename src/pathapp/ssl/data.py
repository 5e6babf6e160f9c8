"""Where pretraining pixels come from: tiles sampled online from slides (no tile dump on disk) or
images from a tile folder, turned into multi-crop views and iBOT masks.

Sample i is a pure function of (seed, i): its slide, µm/px, position, augmentations and masks all come
from `np.random.default_rng([seed, i])`. That makes resume exact, keeps DataLoader workers
independent, and shards across ranks by index (rank r of R takes micro-batches r, r+R, ...)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pathapp.engine.workers import SlideHandle
from pathapp.errors import PathappError
from pathapp.slide import IMAGE_SUFFIXES
from pathapp.ssl.augment import MultiCrop
from pathapp.ssl.config import MIN_BATCH
from pathapp.ssl.masking import BlockMasking

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry
    from pathapp.tiles.stain import StainFit, StainNormalizer


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@dataclass
class _SlideEntry:
    handle: SlideHandle  # the slide, opened once in each DataLoader worker
    geometries: list  # per µm/px: the tiles.grid.TileGeometry a tile is read with
    centres: list[np.ndarray]  # per µm/px: (M, 2) level-0 x, y of candidate tile centres
    cell: float  # level-0 px per tissue-mask pixel (positions are jittered within a cell)
    tissue_um2: float  # tissue area (inside `roi`), for balance="tissue"
    roi: BaseGeometry | None = None  # level-0 region tile centres are drawn in (a project's annotations)
    stain: StainNormalizer | None = None  # this slide's stains onto the run's target (one fit per slide)

    @property
    def slide(self):
        return self.handle.slide


def _inside(mask: np.ndarray, cell: float, roi: BaseGeometry) -> np.ndarray:
    """The tissue mask pixels whose centre lies inside `roi` (level-0 geometry)."""
    import shapely

    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[ys, xs] = shapely.contains_xy(roi, (xs + 0.5) * cell, (ys + 0.5) * cell)
    return out


def _candidate_centres(mask: np.ndarray, cell: float, footprint: float, min_tissue: float,
                       region: np.ndarray | None = None) -> np.ndarray:
    """Centres (level-0 x, y) of mask pixels (of `region` when given: the tissue inside annotations)
    around which a tile of `footprint` level-0 px is mostly tissue in the low-res mask (all of them
    when none is), so few sampled tiles are rejected."""
    from scipy import ndimage as ndi

    size = max(1, int(round(footprint / cell)))
    frac = ndi.uniform_filter(mask.astype(np.float32), size=size, mode="constant")
    region = mask if region is None else region
    good = region & (frac > min_tissue)
    ys, xs = np.nonzero(good if good.any() else region)
    return np.column_stack(((xs + 0.5) * cell, (ys + 0.5) * cell)).astype(np.float64)


class SlideTileSource:
    """Tissue tiles read on the fly: a slide chosen uniformly (`balance="slides"`: each slide equally
    often, whatever its size) or in proportion to its tissue area (`"tissue"`: every region of tissue
    equally often, so a tiny crop is not drawn as often as a whole slide), a µm/px from `mpps`, a
    random point of the slide's tissue mask, moved inwards so the tile lies inside the slide; the
    tile is kept when its HSV tissue fraction exceeds `min_tissue`, else another point is tried (the
    best of `max_tries` is used, so sampling never stalls). `rois` (one level-0 geometry or None per
    slide) keeps tile centres inside each slide's region, as `make_grid` does for inference."""

    def __init__(self, slides: list, mpps: list[float], tile_size: int, min_tissue: float = 0.6,
                 max_tries: int = 10, balance: str = "slides",
                 rois: Sequence[BaseGeometry | None] | None = None) -> None:
        from pathapp.tiles import detect_tissue, tile_geometry
        from pathapp.tiles.tissue import require_brightfield

        self.mpps = [float(m) for m in mpps]
        self.tile_size = tile_size
        self.min_tissue = min_tissue
        self.max_tries = max_tries
        self.entries: list[_SlideEntry] = []
        for slide, roi in zip(slides, rois or [None] * len(slides), strict=True):
            geometries = [tile_geometry(slide, m, tile_size) for m in self.mpps]
            if max(g.footprint for g in geometries) > min(slide.size):
                _warn(f"{slide.path}: smaller than one {tile_size}px tile at {max(self.mpps)} µm/px; skipped")
                continue
            tm = detect_tissue(slide)
            require_brightfield(slide, tm)
            if not tm.mask.any():
                _warn(f"{slide.path}: no tissue detected; skipped")
                continue
            region = None if roi is None else _inside(tm.mask, tm.scale, roi)
            if region is not None and not region.any():
                _warn(f"{slide.path}: no tissue detected inside its annotations; skipped")
                continue
            centres = [_candidate_centres(tm.mask, tm.scale, g.footprint, min_tissue, region) for g in geometries]
            area = float((tm.mask if region is None else region).sum()) * (tm.scale * slide.mpp) ** 2
            self.entries.append(_SlideEntry(SlideHandle(slide), geometries, centres, float(tm.scale), area, roi))
        if not self.entries:
            raise PathappError("no usable slide: each was too small for a tile or had no tissue (inside its "
                               "annotations, with --roi-class); check the slides or lower --mpp / tile_size")
        self.balance = balance
        self._set_entries(self.entries)

    def _set_entries(self, entries: list[_SlideEntry]) -> None:
        self.entries = entries
        weights = np.array([e.tissue_um2 if self.balance == "tissue" else 1.0 for e in entries])
        self.cumulative = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def read(entry: _SlideEntry, k: int, cx: float, cy: float) -> np.ndarray:
        """The tile at the k-th µm/px centred on level-0 (cx, cy), read with the one tile geometry."""
        from pathapp.tiles import read_tile_at

        g = entry.geometries[k]
        return read_tile_at(entry.slide, g, round(cx - g.footprint / 2), round(cy - g.footprint / 2))

    def pick(self, rng: np.random.Generator) -> int:
        """Index of the slide the next tile comes from (by `balance`)."""
        return min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.entries) - 1)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        import shapely

        from pathapp.tiles.tissue import tissue_fraction_rgb

        entry = self.entries[self.pick(rng)]
        k = int(rng.integers(len(self.mpps)))
        centres = entry.centres[k]
        half = entry.geometries[k].footprint / 2
        lo, hi = np.full(2, half), np.asarray(entry.slide.size, dtype=np.float64) - half
        best, best_frac = None, -1.0
        for _ in range(self.max_tries):
            centre = centres[int(rng.integers(len(centres)))]
            cx, cy = np.clip(centre + rng.uniform(-0.5, 0.5, 2) * entry.cell, lo, hi)
            if entry.roi is not None and not shapely.contains_xy(entry.roi, cx, cy):
                cx, cy = np.clip(centre, lo, hi)  # the jitter left the annotation: its mask cell's centre
            rgb = self.read(entry, k, cx, cy)
            frac = tissue_fraction_rgb(rgb, focus=False)  # the HSV check of DINOv2 pathology recipes
            if frac > self.min_tissue:
                best = rgb
                break
            if frac > best_frac:
                best, best_frac = rgb, frac
        return best if entry.stain is None else entry.stain.tile(best)

    def normalise_onto(self, target: StainFit) -> dict[str, Any]:
        """Fit each slide's stains once, on its tissue tiles at the first µm/px, to map its tiles onto
        `target` as they are sampled (before the augmentations, which run per tile in the workers).
        A slide whose fit fails is used as it is (warned); one of other stains than the reference's
        (IHC against H&E) or a fluorescence slide is skipped (warned). Returns what stain.json records."""
        from pathapp.tiles.stain import StainError, slide_normalizer

        slides, kept = {}, []
        for entry in self.entries:
            try:
                entry.stain, slides[str(entry.slide.path)] = slide_normalizer(
                    entry.slide, None, target, mpp=self.mpps[0], tile_size=self.tile_size)
            except StainError as e:
                _warn(f"{e}; skipped")
                continue
            if entry.stain is None:
                _warn(f"stain: {entry.slide.path}: {slides[str(entry.slide.path)]['fallback']}")
            kept.append(entry)
        if not kept:
            raise PathappError(f"no slide can be normalised onto {target.source}; give a reference of the slides' "
                               f"stain or drop --stain-norm")
        self._set_entries(kept)
        return {"method": target.method, "target": target.to_dict(), "slides": slides}


class TileFolderSource:
    """Images under a folder (recursively), each chosen uniformly; larger ones are randomly cropped
    to `tile_size`. For pre-extracted tiles; no labels are read."""

    def __init__(self, folder: str | Path, tile_size: int) -> None:
        self.folder = folder = Path(folder)
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise PathappError(f"{folder}: no image tiles found ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                               f"give a folder of tiles or use --slides")
        self.tile_size = tile_size
        self.target: StainFit | None = None
        self._stains: dict[Path, StainNormalizer | None] = {}  # per worker process: each image fitted once

    def __len__(self) -> int:
        return len(self.files)

    def require_batch(self, batch_size: int) -> None:
        """Refuse fewer images than one batch: every batch would repeat the same few (the folder
        `pathapp tile` writes holds one image, its thumbnail.png)."""
        n = len(self.files)
        if n >= batch_size:
            return
        shown = ", ".join(p.name for p in self.files[:3]) + (", …" if n > 3 else "")
        fix = f"give a folder of at least {batch_size} tile images"
        if n >= MIN_BATCH:
            fix += f" or a --batch-size of {n} or less"
        tiled = next(self.folder.rglob("tiles.geojson"), None)
        if tiled is not None:
            fix += f" ({tiled.parent} is `pathapp tile` output, GeoJSON and a picture: pretrain on the slide with --slides)"
        raise PathappError(f"{self.folder}: {n} image{'s' if n != 1 else ''} found ({shown}), fewer than one batch of "
                           f"{batch_size}; {fix}")

    def normalise_onto(self, target: StainFit) -> dict[str, Any]:
        """Normalise each image onto `target` by a fit on its own pixels (an image is its own scan),
        made the first time a worker draws it; an image whose fit fails is used as it is."""
        self.target = target
        return {"method": target.method, "target": target.to_dict(), "images": "each fitted on its own pixels"}

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        from pathapp.tiles.tissue import to_rgb

        path = self.files[int(rng.integers(len(self.files)))]
        try:
            with Image.open(path) as im:
                rgb = to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")))
        except OSError as e:
            raise PathappError(f"{path}: unreadable image ({e}); remove it from the tile folder") from e
        stain = None
        if self.target is not None:
            from pathapp.tiles.stain import image_normalizer

            if path not in self._stains:  # fitted on the whole image, applied to the crop
                self._stains[path] = image_normalizer(rgb, self.target, str(path))
            stain = self._stains[path]
        h, w = rgb.shape[:2]
        t = self.tile_size
        if h > t and w > t:
            y, x = int(rng.integers(0, h - t + 1)), int(rng.integers(0, w - t + 1))
            rgb = rgb[y:y + t, x:x + t]
        return np.ascontiguousarray(rgb) if stain is None else stain.tile(rgb)


class SSLDataset(Dataset):
    """Item i → (global views, local views, one flat iBOT mask per global view)."""

    def __init__(self, source: SlideTileSource | TileFolderSource, cfg, patch_size: int) -> None:
        self.source = source
        self.cfg = cfg
        self.multicrop = MultiCrop(cfg)
        g = cfg.global_crop_size // patch_size
        self.masking = BlockMasking((g, g), max_num_patches=int(0.5 * g * g))

    def __len__(self) -> int:
        return 2**62  # online sampling: indices never run out; the sampler decides the order

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[np.ndarray]]:
        rng = np.random.default_rng([self.cfg.seed, int(i)])
        img = self.source.sample(rng)
        glob, loc = self.multicrop(img, rng)
        masks = [self.masking.sample(self.cfg.mask_sample_probability, self.cfg.mask_ratio, rng).ravel()
                 for _ in glob]
        return glob, loc, masks


def collate(batch: list) -> dict[str, torch.Tensor]:
    """View-major batches: global (2B, 3, G, G), local (n_local·B, 3, L, L), masks (2B, N) bool."""
    n_glob, n_loc = len(batch[0][0]), len(batch[0][1])
    out = {
        "global": torch.stack([b[0][v] for v in range(n_glob) for b in batch]),
        "masks": torch.from_numpy(np.stack([b[2][v] for v in range(n_glob) for b in batch])),
    }
    out["local"] = torch.stack([b[1][v] for v in range(n_loc) for b in batch]) if n_loc else torch.empty(0)
    return out


class MicroBatchSampler(Sampler[int]):
    """Endless sample indices for one rank, from global micro-batch `start`: micro-batch k of this
    rank holds indices ((k·world + rank)·B + j) for j < B."""

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self):
        k = self.start
        while True:
            base = (k * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)
            k += 1

    def __len__(self) -> int:
        return 2**62


def make_loader(dataset: SSLDataset, start_microbatch: int, batch_size: int, rank: int, world_size: int,
                num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size,
        sampler=MicroBatchSampler(start_microbatch, batch_size, rank, world_size),
        num_workers=num_workers, collate_fn=collate,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        # its own generator: creating the loader must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(rank),
    )


def read_slide_list(path: Path, slide_mpp: float | None = None) -> list[tuple[Path, float | None]]:
    """(slide, µm/px override) from a CSV with a `slide` column (paths relative to the CSV) and an
    optional `mpp` column: the µm/px of a file that does not record it, or corrects a wrong one
    (an empty cell keeps --slide-mpp, else the file's)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise PathappError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                           f"as CSV UTF-8") from None
    if not rows or "slide" not in rows[0]:
        raise PathappError(f"{path}: expected a CSV with a header line and columns slide[,mpp]")
    entries: list[tuple[Path, float | None]] = []
    for n, r in enumerate(rows, start=2):
        if not (r["slide"] or "").strip():
            raise PathappError(f"{path}, line {n}: no slide path in the `slide` column")
        cell = (r.get("mpp") or "").strip()
        try:
            row_mpp = float(cell) if cell else slide_mpp
        except ValueError:
            raise PathappError(f"{path}, line {n}: mpp {cell!r} is not a number of µm per pixel") from None
        entries.append((path.parent / r["slide"].strip(), row_mpp))
    return entries


def open_sources(slides: str | Path | None = None, tiles: str | Path | None = None, *, mpps: list[float],
                 tile_size: int, min_tissue: float, slide_mpp: float | None = None,
                 balance: str = "slides", roi_class: Sequence[str] = ()) -> SlideTileSource | TileFolderSource:
    """A tile source from `--slides` (a folder, one slide, a slides.csv or a QuPath .qpproj) or
    `--tiles` (a folder). Slides without µm/px (and no --slide-mpp) or that fail to open are skipped
    with a warning. `roi_class` (a .qpproj only) samples inside each image's own annotations of those
    classes; an image without them (or without a data file) is skipped with a warning."""
    if (slides is None) == (tiles is None):
        raise PathappError("give exactly one of --slides (folder, slide, slides.csv or project.qpproj) "
                           "or --tiles (folder)")
    if roi_class and Path(slides or tiles).suffix != ".qpproj":
        raise PathappError(f"{slides or tiles}: --roi-class samples inside a QuPath project's own annotations; "
                           "give --slides project.qpproj")
    if tiles is not None:
        if not Path(tiles).is_dir():
            raise PathappError(f"{tiles}: not a folder; --tiles needs a folder of image tiles")
        folder = TileFolderSource(tiles, tile_size)
        folder.require_batch(MIN_BATCH)  # the chosen batch size is checked once it is known (ssl.train)
        return folder
    from pathapp.errors import MissingMppError, SlideOpenError
    from pathapp.slide import expand_slide_inputs, open_slide

    src = Path(slides)
    if not src.exists():
        raise PathappError(f"{src}: no such file or folder; --slides takes a folder of slides, a slide, "
                           f"a slides.csv or a .qpproj")
    entries: list[tuple[Path, float | None]] = []  # (slide, µm/px override)
    rois: list[BaseGeometry | None] = []  # per entry: the region tiles are drawn in (None: all tissue)
    if src.suffix == ".qpproj":
        from pathapp.qupath.project import read_project
        from pathapp.qupath.qpdata import read_entry_rois

        project = read_project(src)
        if not project.entries:
            raise PathappError(f"{src}: the project has no images; add them in QuPath")
        for e in project.entries:
            if e.image_path is None or not Path(e.image_path).exists():
                _warn(f"{src}: image {e.name!r} not found ({e.error or e.uri}); skipped")
                continue
            try:  # the entry's own annotations of those classes; without --roi-class all its tissue
                rois.append(read_entry_rois(project, e, roi_class) if roi_class else None)
            except PathappError as err:  # no data file, a bad one, or no annotation of those classes
                _warn(f"{err}; skipped")
                continue
            entries.append((Path(e.image_path), slide_mpp or e.mpp))  # the µm/px QuPath shows
    elif src.suffix.lower() == ".csv":
        entries = read_slide_list(src, slide_mpp)
    else:
        found, errors = expand_slide_inputs([src])  # a folder: the slides under it
        if errors:
            raise PathappError(errors[0])
        entries = [(Path(p), slide_mpp) for p in found]
    rois = rois or [None] * len(entries)
    opened, opened_rois = [], []
    for (p, own_mpp), roi in zip(entries, rois, strict=True):
        try:
            s = open_slide(p, slide_mpp=own_mpp)
            s.require_mpp()
            opened.append(s)
            opened_rois.append(roi)
        except MissingMppError:
            _warn(f"{p}: no µm/px in the file; skipped "
                  f"(pass --slide-mpp, or list it in a slides.csv with an mpp column)")
        except SlideOpenError as e:
            _warn(f"{e}; skipped")
    if not opened and roi_class:
        raise PathappError(f"{src}: no image with annotations of class {', '.join(roi_class)} could be opened "
                           "(see the warnings above); fix --roi-class, or annotate and save the images in QuPath")
    if not opened:
        raise PathappError(f"{src}: no slide with a known µm/px could be opened (see the warnings above); pass "
                           "--slide-mpp or another folder")
    return SlideTileSource(opened, mpps, tile_size, min_tissue, balance=balance, rois=opened_rois)
