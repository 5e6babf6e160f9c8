"""Run a model over whole slides: stream tiles -> batches -> model -> SlideResult -> files.

`infer_slide` streams one slide through DataLoader workers, so only the per-tile results (coordinates,
probabilities, embeddings) grow with the slide, never its pixels. `run_inference` expands the inputs
(slides, folders, QuPath projects), shares them out across torchrun ranks (input i -> rank i mod world
size), skips slides whose `.done` marker exists, and keeps going when one slide fails."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.errors import PathappError
from pathapp.models.device import resolve_device
from pathapp.models.loader import DEFAULT_MODEL, load_model, model_label
from pathapp.results import SlideResult, is_done, write_results
from pathapp.slide import Slide, find_slides, open_slide, slide_name

if TYPE_CHECKING:
    import torch

    from pathapp.models.bundle import Bundle, PathModel
    from pathapp.qupath.project import ProjectEntry, QuPathProject

PRECISIONS = ("fp32", "bf16", "int8")
NEEDS_ANNOTATIONS = ("--roi-class selects annotations: those of --roi FILE, or without --roi each QuPath "
                     "project image's own; give --roi FILE for slides outside a project")
RESULTS_FOLDER = "pathapp"  # results go to <slide folder>/pathapp/<slide name>/ unless --out is given
THUMBNAIL_PX = 1024
MIN_THUMBNAIL_PX = 512
PROGRESS_EVERY_S = 30.0  # interval of `progress:` lines when stderr is not a terminal


class InferenceError(PathappError):
    """Inputs or options that inference cannot use."""


# ------------------------------------------------------------------------------------ one slide


@dataclass
class Runtime:
    """Where and how the model runs: built once, reused for every slide of a run."""

    bundle: Bundle
    model: PathModel
    device: torch.device
    precision: str
    name: str
    fingerprint: str  # of the bundle, marked when the precision changes what embeddings are


def prepare_model(bundle: Bundle, device: str = "auto", precision: str = "fp32", name: str = "") -> Runtime:
    """Build the bundle's model on `device`; int8 = dynamic quantisation of the Linear layers (CPU)."""
    if precision not in PRECISIONS:
        raise InferenceError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = resolve_device(device)
    if precision == "int8":
        if dev.type != "cpu":
            raise InferenceError("--precision int8 runs on the CPU only; use --device cpu or --precision bf16")
        from pathapp.models.quantize import quantize_int8

        model = quantize_int8(bundle.build("cpu"))
    else:
        model = bundle.build(dev)
    fingerprint = bundle.fingerprint() + ("" if precision == "fp32" else f":{precision}")
    return Runtime(bundle, model, dev, precision, name or bundle.spec.name, fingerprint)


def default_workers(device: torch.device) -> int:
    """DataLoader workers: enough to decode ahead of the model without starving its threads."""
    n = os.cpu_count() or 1
    per_rank = max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return min(8, per_rank) if device.type == "cuda" else min(4, max(1, per_rank // 2))


def _reopen_slide(worker_id: int) -> None:
    """Give each DataLoader worker its own slide handle (a forked file handle is shared state)."""
    import pickle

    import torch.utils.data

    ds = torch.utils.data.get_worker_info().dataset
    ds.slide = pickle.loads(pickle.dumps(ds.slide))


def infer_slide(
    slide: Slide,
    bundle: Bundle,
    *,
    mpp: float | None = None,
    tile_size: int | None = None,
    rois: Any = None,
    min_tissue: float | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    runtime: Runtime | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SlideResult:
    """Tile `slide` at `mpp` (default: the bundle's) inside tissue (and `rois`, level-0 shapely),
    run the model on every tile, and return the per-tile results. `runtime` reuses a built model.

    Progress: a tqdm bar on a terminal; otherwise (a log file, QuPath's log window) a `progress:`
    line through `log` every PROGRESS_EVERY_S seconds."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from pathapp.tiles import TileDataset, detect_tissue, make_grid

    rt = runtime or prepare_model(bundle, device, precision)
    mpp = float(mpp or bundle.mpp)
    tile_size = int(tile_size or bundle.tile_size)
    slide_mpp = slide.require_mpp()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    tissue = detect_tissue(slide)
    timings["tissue"] = time.perf_counter() - t
    t = time.perf_counter()
    grid_kwargs = {} if min_tissue is None else {"min_tissue": min_tissue}
    grid = make_grid(slide, mpp, tile_size, tissue=tissue, rois=rois, **grid_kwargs)
    timings["grid"] = time.perf_counter() - t
    t = time.perf_counter()
    # The tissue detector already decoded a low-resolution view; reuse it unless it is too small to look at.
    low_res = getattr(tissue, "rgb", None)
    if low_res is not None and max(low_res.shape[:2]) >= MIN_THUMBNAIL_PX:
        thumbnail = low_res
    else:
        thumbnail = slide.thumbnail(THUMBNAIL_PX)
    timings["thumbnail"] = time.perf_counter() - t

    n = len(grid)
    dim = bundle.embedding_dim
    embeddings = np.zeros((n, dim), np.float32)
    probs = np.zeros((n, bundle.num_classes), np.float32) if rt.model.tile_head is not None else None
    n_workers = default_workers(rt.device) if workers is None else workers
    wait = compute = 0.0
    t_model = time.perf_counter()
    if n:
        loader = DataLoader(
            TileDataset(slide, grid),
            batch_size=batch_size,
            num_workers=n_workers,
            pin_memory=rt.device.type == "cuda",
            worker_init_fn=_reopen_slide if n_workers else None,
            prefetch_factor=4 if n_workers else None,
        )
        autocast = torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.precision == "bf16")
        tty = sys.stderr.isatty()
        bar = tqdm(total=n, unit="tile", desc=slide.name, disable=not (progress and tty), dynamic_ncols=True,
                   leave=False)
        log_lines = progress and not tty and log is not None
        last_log, seen = t_model, 0
        with torch.inference_mode(), bar:
            t = time.perf_counter()
            for x, idx in loader:
                t1 = time.perf_counter()
                wait += t1 - t
                with autocast:
                    emb, p = rt.model(x.to(rt.device, non_blocking=True))
                i = idx.numpy()
                embeddings[i] = emb.float().cpu().numpy()
                if probs is not None and p is not None:
                    probs[i] = p.float().cpu().numpy()
                t = time.perf_counter()
                compute += t - t1
                bar.update(len(i))
                seen += len(i)
                if log_lines and t - last_log >= PROGRESS_EVERY_S:
                    last_log = t
                    log(f"progress: {slide.name}: {seen}/{n} tiles, {seen / (t - t_model):.1f} tiles/s")
    timings["model"] = time.perf_counter() - t_model
    timings["data_wait"], timings["compute"] = wait, compute

    extra: dict[str, np.ndarray] = {"tissue fraction": np.asarray(grid.tissue_fraction, np.float64)}
    slide_probs = None
    if rt.model.slide_head is not None and n:
        with torch.inference_mode():
            sp, attention = rt.model.slide_head(torch.from_numpy(embeddings).to(rt.device))
        slide_probs = sp.float().cpu().numpy()
        extra["attention"] = attention.float().cpu().numpy()
    return SlideResult(
        slide_path=str(slide.path),
        slide_name=slide.name,
        coords=np.asarray(grid.coords, np.int64).reshape(-1, 2),
        footprint=float(grid.footprint),
        tile_size=tile_size,
        mpp=mpp,
        slide_mpp=float(slide_mpp),
        slide_size=tuple(slide.size),
        class_names=list(bundle.class_names) if probs is not None else [],
        class_colors=list(bundle.class_colors) if probs is not None else [],
        probs=probs,
        embeddings=embeddings,
        extra=extra,
        thumbnail=thumbnail,
        model_name=rt.name,
        model_fingerprint=rt.fingerprint,
        params={
            "batch_size": batch_size,
            "workers": n_workers,
            "device": str(rt.device),
            "precision": rt.precision,
            "level": grid.level,
            "read_size": grid.read_size,
            "min_tissue": min_tissue,
            "rois": rois is not None,
            "torch_threads": torch.get_num_threads(),
            "rank": int(os.environ.get("RANK", 0)),
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "slide_prediction": None if slide_probs is None else dict(zip(bundle.class_names, map(float, slide_probs))),
        },
        timings=timings,
    )


# ------------------------------------------------------------------------------------ many slides


@dataclass
class Job:
    """One image to run: where its pixels are and where its results go."""

    label: str  # what the user sees in messages
    source: Path | None  # slide file or DICOM folder; None when a project entry's image is missing
    out_dir: Path | None  # None only when the input cannot run (see error)
    entry_mpp: float | None = None  # µm/px recorded by QuPath, used when the file has none
    error: str | None = None  # why this input cannot run (reported, counted as failed)
    project: QuPathProject | None = None  # for a project entry: its project and entry
    entry: ProjectEntry | None = None


@dataclass
class RunSummary:
    """What a run did, per input: written, skipped (already complete), or failed with a reason."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def expand_inputs(inputs: Sequence[str | Path], out: Path | None) -> list[Job]:
    """Slides, folders of slides (a DICOM series folder is one slide) and QuPath projects, in order."""
    from pathapp.qupath.project import is_project, read_project, results_dir

    jobs: list[Job] = []
    for raw in inputs:
        p = Path(raw)
        if is_project(p):  # project.qpproj, or the folder holding it
            project = read_project(p)
            for e in project.entries:
                where = out / str(e.entry_id) if out is not None else results_dir(project, e)
                jobs.append(Job(label=f"{p}: {e.name} (entry {e.entry_id})", source=e.image_path,
                                out_dir=where, entry_mpp=e.mpp, error=e.error,
                                project=project, entry=e))
        elif p.is_dir():
            found = find_slides(p)
            if not found:
                jobs.append(Job(label=str(p), source=None, out_dir=None,
                                error=f"{p}: no slides found in this folder"))
            jobs += [Job(label=str(s), source=s, out_dir=slide_out_dir(s, out)) for s in found]
        else:
            jobs.append(Job(label=str(p), source=p, out_dir=slide_out_dir(p, out)))
    return jobs


def slide_out_dir(slide: Path, out: Path | None) -> Path:
    """OUT/<slide name>/, or beside the slide in <slide folder>/pathapp/<slide name>/ without --out."""
    return (out if out is not None else slide.parent / RESULTS_FOLDER) / slide_name(slide)


def shard(jobs: list[Job]) -> list[Job]:
    """This torchrun rank's share: input i goes to rank i mod world size (no process group needed)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    return jobs[rank::world] if world > 1 else jobs


def check_tile_size(rt: Runtime, tile_size: int) -> None:
    """A ViT built for one input size takes another only if timm built it with dynamic size."""
    backbone = rt.model.backbone
    fixed = getattr(backbone, "patch_embed", None) is not None and not getattr(backbone, "dynamic_img_size", False)
    if fixed and tile_size != rt.bundle.spec.img_size:
        raise InferenceError(f"--tile-size {tile_size}: the model takes {rt.bundle.spec.img_size} px tiles; "
                             f"choose --mpp to change the field of view instead")


def _limit_threads() -> None:
    """Several ranks on one CPU machine: split the cores between them instead of oversubscribing."""
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def run_inference(
    inputs: Sequence[str | Path],
    model: str | Path = DEFAULT_MODEL,
    out: str | Path | None = None,
    *,
    weights: str | Path | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    roi: str | Path | None = None,
    roi_class: Sequence[str] | None = None,
    slide_mpp: float | None = None,
    min_tissue: float | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    object_type: str = "tile",
    overwrite: bool = False,
    write_project: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> RunSummary:
    """Run `model` over every input and write each slide's results; see the module docstring."""
    out_root = Path(out) if out is not None else None
    rois = None
    if roi is not None:
        from pathapp.qupath.geojson import read_rois

        rois = read_rois(roi, classes=list(roi_class) if roi_class else None)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        rank, say = int(os.environ.get("RANK", 0)), echo
        echo = lambda m: say(f"[rank {rank}/{world}] {m}")  # noqa: E731
    jobs = expand_inputs(inputs, out_root)
    if roi is None and roi_class and not any(j.project is not None for j in jobs):
        raise InferenceError(NEEDS_ANNOTATIONS)
    jobs = shard(jobs)
    summary = RunSummary()
    if not jobs:
        return summary
    _limit_threads()
    bundle = load_model(model, weights=weights, mpp=mpp, tile_size=tile_size)
    rt = prepare_model(bundle, device, precision, model_label(model))
    check_tile_size(rt, int(tile_size or bundle.tile_size))
    for job in jobs:
        try:
            result_dir = _run_job(job, rt, rois=rois, roi_class=roi_class, mpp=mpp, tile_size=tile_size, slide_mpp=slide_mpp,
                                  min_tissue=min_tissue, batch_size=batch_size, workers=workers,
                                  object_type=object_type, overwrite=overwrite, write_project=write_project,
                                  progress=progress, echo=echo)
        except PathappError as e:
            summary.failed.append((job.label, str(e)))
            echo(f"failed: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; one line each
            summary.failed.append((job.label, f"{type(e).__name__}: {e}"))
            echo(f"failed: {job.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if result_dir is None:
            continue
        skipped, path = result_dir
        (summary.skipped if skipped else summary.done).append(path)
    return summary


def _run_job(job: Job, rt: Runtime, *, rois: Any, roi_class: Sequence[str] | None, mpp: float | None, tile_size: int | None,
             slide_mpp: float | None, min_tissue: float | None, batch_size: int, workers: int | None,
             object_type: str, overwrite: bool, write_project: bool, progress: bool,
             echo: Callable[[str], None]) -> tuple[bool, Path] | None:
    """Run one job; (skipped?, its folder). Raises on failure."""
    if job.error:
        raise InferenceError(job.error)
    if job.out_dir is not None and is_done(job.out_dir) and not overwrite:
        echo(f"skip: {job.label}: complete in {job.out_dir} (use --overwrite to redo)")
        return True, job.out_dir
    if rois is None and roi_class:  # no --roi: each project image's own annotations of those classes
        if job.project is None:
            raise InferenceError(f"{job.label}: {NEEDS_ANNOTATIONS}")
        from pathapp.qupath.qpdata import read_entry_rois

        rois = read_entry_rois(job.project, job.entry, roi_class)
    t0 = time.perf_counter()
    slide = open_slide(job.source, slide_mpp=slide_mpp)
    if slide.mpp is None and job.entry_mpp:
        slide.calibrate(job.entry_mpp)
    out_dir = job.out_dir
    with slide:
        t_open = time.perf_counter() - t0
        result = infer_slide(slide, rt.bundle, mpp=mpp, tile_size=tile_size, rois=rois, min_tissue=min_tissue,
                             batch_size=batch_size, workers=workers, runtime=rt, progress=progress, log=echo)
    result.timings = {"open": t_open, **result.timings}
    files = write_results(result, out_dir, object_type=object_type)
    n, secs = len(result), result.timings["model"]
    echo(f"done: {job.label}: {n} tiles in {secs:.1f} s ({n / max(secs, 1e-9):.1f} tiles/s) -> {out_dir}")
    if write_project and job.project is not None:
        from pathapp.qupath.paquo_bridge import write_geojson_to_project

        message = write_geojson_to_project(job.project.path, job.entry.entry_id, files)
        if message:
            echo(message)
    return False, out_dir
