"""One slide through the model: tissue -> tile grid -> batches read by DataLoader workers -> model ->
SlideResult. Only the per-tile results (coordinates, probabilities, embeddings) grow with the slide,
never its pixels."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.engine.distributed import dist_env
from pathapp.errors import PathappError
from pathapp.results import SlideResult
from pathapp.results.result import TileQC
from pathapp.slide import Slide
from pathapp.tiles.qc import ARTEFACTS, MEASURES, OK, PREFIX, QCThresholds, TileMeasurer, columns, qc_classes, with_fold

if TYPE_CHECKING:
    from concurrent.futures import Future
    from pathlib import Path

    import torch

    from pathapp.infer.ahead import PlanAhead
    from pathapp.models.bundle import Bundle, PathModel
    from pathapp.tiles import TileGrid
    from pathapp.tiles.stain import StainFit

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matmuls
THUMBNAIL_PX = 1024
PROGRESS_EVERY_S = 30.0  # interval of `progress:` lines when stderr is not a terminal


class InferenceError(PathappError):
    """Inputs or options that inference cannot use."""


@dataclass
class Runtime:
    """Where and how the model runs: built once, reused for every slide of a run."""

    bundle: Bundle
    model: PathModel
    device: torch.device
    precision: str  # fp32, bf16 or int8 ("auto" resolved)
    name: str
    fingerprint: str  # of the bundle, marked when the precision changes what embeddings are
    bundle_fingerprint: str  # of the bundle alone
    channels_last: bool = False  # feed batches in channels-last layout (conv patch embedding on GPU)
    trace_to: Path | None = None  # where `keep_trace` keeps the backbone's trace (built with timm this run)

    def keep_trace(self) -> None:
        """Trace the backbone into the cache for later runs (`models.traced`), once this run's slides are
        done: tracing beside the slide work took a bundle's first run to 1037 MiB, after it 987 MiB."""
        if self.trace_to is not None:
            from pathapp.models.traced import keep_traced

            keep_traced(self.model, self.bundle, self.trace_to)
            self.trace_to = None

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """A batch from the DataLoader on the model's device: asynchronous from pinned memory on GPU."""
        import torch

        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        return x.to(self.device, non_blocking=True, memory_format=fmt)


@dataclass
class TilePlan:
    """`plan_tiles`'s answer for one slide (tiles, thumbnail, why none, stage times), when it was
    made ahead of `infer_slide`, in another process (infer.ahead), which may have read its first
    tiles too (`ahead`)."""

    grid: TileGrid
    thumbnail: np.ndarray
    empty: str | None
    timings: dict[str, float]
    ahead: PlanAhead | None = None


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 weights and activations on CUDA and on CPUs with native bf16 (AVX-512-BF16, AMX),
    where it is 2-3x faster than fp32 at embedding cosine > 0.999; fp32 elsewhere, where bf16 is
    emulated and slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if device.type == "cpu" and cpu_flags() & set(BF16_CPU_FLAGS) else "fp32"


def prepare_model(bundle: Bundle, device: str = "auto", precision: str = "auto", name: str = "",
                  channels_last: bool | None = None, traced: bool = False) -> Runtime:
    """Build the bundle's model on `device` at `precision` (see `resolve_precision`). bf16 casts the
    backbone's weights (inputs follow inside PathModel); the head stays fp32. int8 = dynamic
    quantisation of the Linear layers (CPU). `channels_last` (default: on CUDA, where the patch
    convolution is faster in that layout) converts the backbone and every batch. `traced`: for
    inference only, the backbone comes from the cache of traced backbones (`models.traced`: no timm
    import); where it is not there yet, `Runtime.keep_trace` puts it there."""
    import torch

    from pathapp.models.device import resolve_device

    if precision not in PRECISIONS:
        raise InferenceError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    base = bundle.fingerprint()
    trace_to = None
    if precision == "int8":
        if dev.type != "cpu":
            raise InferenceError("--precision int8 runs on the CPU only; use --device cpu or --precision bf16")
        from pathapp.models.quantize import quantize_int8

        model = quantize_int8(bundle.build("cpu"))
    else:
        from pathapp.models.traced import load_traced, traced_path

        path = traced_path(bundle, base, dev, precision) if traced else None
        model = load_traced(bundle, path, dev)
        if model is None:
            from pathapp.models.quantize import fold_layer_scale

            model = bundle.build(dev)
            fold_layer_scale(model.backbone)
            if precision == "bf16":
                model.backbone.to(torch.bfloat16)
            trace_to = path
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    fingerprint = base + ("" if precision == "fp32" else f":{precision}")
    return Runtime(bundle, model, dev, precision, name or bundle.spec.name, fingerprint, base, channels_last, trace_to)


def check_tile_size(rt: Runtime, tile_size: int) -> None:
    """A ViT built for one input size takes another only if timm built it with dynamic size."""
    backbone = rt.model.backbone
    fixed = getattr(backbone, "patch_embed", None) is not None and not getattr(backbone, "dynamic_img_size", False)
    if fixed and tile_size != rt.bundle.spec.img_size:
        raise InferenceError(f"--tile-size {tile_size}: the model takes {rt.bundle.spec.img_size} px tiles; "
                             f"choose --mpp to change the field of view instead")


def _device(rt: Runtime | Future[Runtime], device: str) -> torch.device:
    """The device a runtime (or the one still being built for `device`) runs on."""
    if isinstance(rt, Runtime):
        return rt.device
    from pathapp.models.device import resolve_device

    return resolve_device(device)


def default_workers(device: torch.device) -> int:
    """DataLoader workers: enough to decode ahead of the model without starving its threads."""
    import os

    per_rank = max(1, (os.cpu_count() or 1) // dist_env().local_world_size)
    return min(8, per_rank) if device.type == "cuda" else min(4, max(1, per_rank // 2))


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
    precision: str = "auto",
    runtime: Runtime | Future[Runtime] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    qc: str = "flag",
    stain: StainFit | None = None,
    plan: TilePlan | None = None,
) -> SlideResult:
    """Tile `slide` at `mpp` (default: the bundle's) inside tissue (and `rois`, level-0 shapely),
    run the model on every tile, and return the per-tile results. `runtime` reuses a built model; a
    Future of one (the planner builds it in a thread) is waited for only once the tiles are planned
    and the reading workers started, so the model builds while the slide is read.
    `qc`: "flag" measures every tile's artefacts beside the model's input, "exclude" also keeps
    flagged tiles from the model and the results, "off" does neither. `stain`: a target every
    tile is normalised onto, by one fit on this slide's tissue tiles. `plan`: this slide's tiles,
    already planned with these `mpp`, `tile_size`, `rois` and `min_tissue`.

    Progress: a tqdm bar on a terminal; otherwise (a log file, QuPath's log window) a `progress:`
    line through `log` every PROGRESS_EVERY_S seconds."""
    import torch

    from pathapp.models.bundle import image_level, pool_tiles

    rt = runtime or prepare_model(bundle, device, precision)
    mpp = float(mpp or bundle.mpp)
    tile_size = int(tile_size or bundle.tile_size)
    slide_mpp = slide.require_mpp()
    if plan is None:
        timings: dict[str, float] = {}
        grid, thumbnail, empty = plan_tiles(slide, mpp, tile_size, rois, min_tissue, timings)
    else:
        from pathapp.tiles import tile_geometry

        tile_geometry(slide, mpp, tile_size)  # its scale warning, said in this process (the planning child is quiet)
        grid, thumbnail, empty, timings = plan.grid, plan.thumbnail, plan.empty, dict(plan.timings)
    dev = _device(rt, device)
    n_workers = default_workers(dev) if workers is None else workers
    normalize, stain_record = None, None
    if stain is not None and len(grid):
        from pathapp.tiles.stain import slide_normalizer

        t = time.perf_counter()
        normalize, stain_record = slide_normalizer(slide, grid, stain)
        timings["stain fit"] = time.perf_counter() - t
        if log is not None:
            for note in [stain_record["fallback"]] if normalize is None else normalize.source.notes:
                log(f"stain: {slide.name}: {note}")
    embeddings, probs, qc_rows = run_model(rt, slide, grid, batch_size, n_workers, timings, device=dev,
                                           progress=progress, log=log, measure=tile_measurer(qc, grid.geometry),
                                           normalize=normalize, exclude=qc == "exclude",
                                           ahead=None if plan is None else plan.ahead)
    if not isinstance(rt, Runtime):
        rt = rt.result()  # finished: run_model waited for it
    tile_qc, kept, extra = slide_qc(grid, qc_rows, exclude=qc == "exclude")
    if tile_qc is not None and tile_qc.excluded and log is not None:
        log(f"qc: {slide.name}: {int((~kept).sum())} of {len(grid)} tiles excluded ({excluded_counts(tile_qc)})")
    extra["tissue fraction"] = np.asarray(grid.tissue_fraction, np.float64)[kept]
    extra.update({k: v[kept] for k, v in grid.edge_measurements(slide.background).items()})
    embeddings = embeddings[kept]
    probs = None if probs is None else probs[kept]
    slide_outputs: dict[str, float] = {}  # class probabilities, {"risk": r} or {target: value}
    if rt.model.slide_head is not None and len(embeddings):  # none when --qc exclude dropped every tile
        with torch.inference_mode():
            out, attention = rt.model.slide_head(torch.from_numpy(embeddings).to(rt.device))
        slide_outputs = dict(zip(bundle.class_names, map(float, out.float().cpu().numpy())))
        extra["attention"] = attention.float().cpu().numpy()
    elif image_level(bundle) and rt.model.tile_head is not None and len(embeddings):
        # a head trained on whole images predicts for the input's pooled tiles, as train and evaluate pool them
        with torch.inference_mode():
            out = rt.model.tile_head(torch.from_numpy(pool_tiles(embeddings)[None]).to(rt.device))[0]
        slide_outputs = dict(zip(bundle.class_names, map(float, out.float().cpu().numpy())))
    env = dist_env()
    return SlideResult(
        slide_path=str(slide.path),
        slide_name=slide.name,
        coords=np.asarray(grid.coords, np.int64).reshape(-1, 2)[kept],
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
        slide_outputs=slide_outputs,
        slide_task=bundle.task if slide_outputs else None,
        thumbnail=thumbnail,
        dicom_headers=slide.dicom_headers(),
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
            "rank": env.rank,
            "world_size": env.world_size,
            "slide_prediction": slide_outputs or None,
            "slide_task": bundle.task if slide_outputs else None,
            "qc": qc,
            "stain": stain_record,
            "empty": empty,
            "read_ahead": 0 if plan is None or plan.ahead is None else plan.ahead.count,
        },
        timings=timings,
        qc=tile_qc,
        geometry=grid.geometry,
    )


def qc_slide(slide: Slide, *, mpp: float, tile_size: int, rois: Any = None, min_tissue: float | None = None,
             batch_size: int = 32, workers: int | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> SlideResult:
    """Only quality control (no model): tile `slide` as inference would, measure every tile where
    it is decoded, and return a SlideResult whose tiles carry their `qc: …` measures and QC class."""
    import os

    slide_mpp = slide.require_mpp()
    timings: dict[str, float] = {}
    grid, thumbnail, empty = plan_tiles(slide, mpp, tile_size, rois, min_tissue, timings)
    n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
    _, _, qc_rows = run_model(None, slide, grid, batch_size, n_workers, timings, progress=progress, log=log,
                              measure=TileMeasurer.for_geometry(grid.geometry))
    tile_qc, _, extra = slide_qc(grid, qc_rows, exclude=False)
    extra["tissue fraction"] = np.asarray(grid.tissue_fraction, np.float64)
    extra.update(grid.edge_measurements(slide.background))
    return SlideResult(
        slide_path=str(slide.path), slide_name=slide.name, coords=np.asarray(grid.coords, np.int64).reshape(-1, 2),
        footprint=float(grid.footprint), tile_size=tile_size, mpp=mpp, slide_mpp=float(slide_mpp),
        slide_size=tuple(slide.size), extra=extra, thumbnail=thumbnail, model_name="(quality control only)",
        params={"batch_size": batch_size, "workers": n_workers, "level": grid.level, "read_size": grid.read_size,
                "min_tissue": min_tissue, "rois": rois is not None, "qc": "flag", "empty": empty},
        timings=timings, qc=tile_qc, geometry=grid.geometry,
    )


def tile_measurer(qc: str, geometry: Any) -> TileMeasurer | None:
    """What measures each tile where it is read, for `--qc` (none when it is "off")."""
    return None if qc == "off" else TileMeasurer.for_geometry(geometry)


def plan_tiles(slide: Slide, mpp: float, tile_size: int, rois: Any, min_tissue: float | None,
               timings: dict[str, float], overlap: int = 0) -> tuple[TileGrid, np.ndarray, str | None]:
    """The tissue tiles to run (`overlap` px between neighbours), a thumbnail to draw results on, and
    why there is no tile when there is none (stage times into `timings`)."""
    from pathapp.tiles import DEFAULT_MIN_TISSUE, detect_tissue, make_grid, why_empty
    from pathapp.tiles.tissue import TISSUE_MAX_PX, TISSUE_MPP, working_downsample

    t = time.perf_counter()
    # one pass over the pyramid for both low-resolution views: the tissue mask's and the pictures'
    tissue_view, thumb_view = slide.read_views([working_downsample(slide, TISSUE_MPP, TISSUE_MAX_PX),
                                                slide.thumbnail_downsample(THUMBNAIL_PX)])
    thumbnail = slide.thumbnail(THUMBNAIL_PX, view=thumb_view[0])
    timings["low-res read"] = time.perf_counter() - t
    t = time.perf_counter()
    tissue = detect_tissue(slide, target_mpp=TISSUE_MPP, max_px=TISSUE_MAX_PX, view=tissue_view)
    timings["tissue"] = time.perf_counter() - t
    t = time.perf_counter()
    grid_kwargs = {} if min_tissue is None else {"min_tissue": min_tissue}
    grid = make_grid(slide, mpp, tile_size, overlap=overlap, tissue=tissue, rois=rois, **grid_kwargs)
    timings["grid"] = time.perf_counter() - t
    empty = None if len(grid) else why_empty(grid, tissue, rois, DEFAULT_MIN_TISSUE if min_tissue is None else min_tissue)
    return grid, thumbnail, empty


def run_model(rt: Runtime | Future[Runtime] | None, slide: Slide, grid: TileGrid, batch_size: int, n_workers: int,
              timings: dict[str, float], *, device: torch.device | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, measure: TileMeasurer | None = None,
              normalize: Callable | None = None, exclude: bool = False,
              ahead: PlanAhead | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(embeddings (N, D), per-tile probabilities (N, C) or None, QC measure rows (N, M) or None) of
    every tile of `grid`, read once by `n_workers` DataLoader workers, which also measure QC
    (`measure`) and start reading before a runtime still being built is waited for. `normalize` maps
    each uint8 batch on the device before the model; `exclude` keeps tiles QC flags from the model
    (their rows stay zero; `fold` needs the whole slide, so folded tiles are run and dropped later, in
    `slide_qc`). Without `rt` (QC only) no model runs. Stage times go into `timings`.
    `ahead`: the child that planned the slide reads its first tiles until the model is built; the
    workers read the rest."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from pathapp.tiles import TileDataset

    n = len(grid)
    t_model = time.perf_counter()
    if device is None:
        device = rt.device if isinstance(rt, Runtime) else torch.device("cpu")
    start = 0
    if ahead is not None:
        rt = _runtime(rt, timings)
        start = min(ahead.stop(), n)
    batches: Any = iter(())
    if n > start:
        loader = DataLoader(TileDataset(slide, grid, measure=measure),
                            batch_sampler=ramped_batches(n, batch_size, first=max(8, start), start=start),
                            num_workers=n_workers, **loader_options(device.type == "cuda", n_workers))
        batches = iter(loader)  # forks the workers, which start reading now
    if ahead is not None:
        batches = chain((tuple(map(torch.from_numpy, b)) for b in ahead.batches(start, batch_size)), batches)
    rt = _runtime(rt, timings)
    dim = rt.bundle.embedding_dim if rt is not None else 0
    embeddings = np.zeros((n, dim), np.float32)
    probs = np.zeros((n, rt.bundle.num_classes), np.float32) if rt is not None and rt.model.tile_head is not None else None
    qc_rows = np.zeros((n, len(MEASURES)), np.float32) if measure is not None else None
    wait = compute = 0.0
    if n:
        tty = sys.stderr.isatty()
        bar = tqdm(total=n, unit="tile", desc=slide.name, disable=not (progress and tty), dynamic_ncols=True,
                   leave=False)
        log_lines = progress and not tty and log is not None
        last_log, seen = t_model, 0
        with torch.inference_mode(), bar:
            t = time.perf_counter()
            for batch in batches:
                x, idx = batch[0], batch[1]
                t1 = time.perf_counter()
                wait += t1 - t
                i = idx.numpy()
                if qc_rows is not None:
                    qc_rows[i] = batch[2].numpy()
                run = np.ones(len(i), bool)
                if exclude and qc_rows is not None:
                    run = qc_classes(columns(qc_rows[i])) == OK
                if rt is not None and run.any():
                    x = rt.place(x if run.all() else x[torch.from_numpy(run)])
                    if normalize is not None:
                        x = normalize(x)
                    emb, p = rt.model(x)
                    embeddings[i[run]] = emb.float().cpu().numpy()
                    if probs is not None and p is not None:
                        probs[i[run]] = p.float().cpu().numpy()
                t = time.perf_counter()
                compute += t - t1
                bar.update(len(i))
                seen += len(i)
                if log_lines and t - last_log >= PROGRESS_EVERY_S:
                    last_log = t
                    log(f"progress: {slide.name}: {seen}/{n} tiles, {seen / (t - t_model):.1f} tiles/s")
    timings["model" if rt is not None else "qc"] = time.perf_counter() - t_model
    timings["data_wait"], timings["compute"] = wait, compute
    return embeddings, probs, qc_rows


def _runtime(rt: Runtime | Future[Runtime] | None, timings: dict[str, float]) -> Runtime | None:
    """The runtime, waited for if it is still being built (the wait goes into `timings`)."""
    if rt is None or isinstance(rt, Runtime):
        return rt
    t = time.perf_counter()
    built = rt.result()
    timings["model_wait"] = time.perf_counter() - t
    return built


def ramped_batches(n: int, batch_size: int, first: int = 8, start: int = 0) -> list[list[int]]:
    """Tile indices `start`… `n` - 1 in order, in batches of `first`, twice that, … up to `batch_size`:
    the model starts on the first tiles read instead of idling until a worker has read a whole batch
    (on a 2-core CPU one worker reads and measures 32 tiles in about a second). The tiles after the
    ramp are spread evenly over as few batches as `batch_size` allows, so no small batch is left at the
    end (a batch of 8 costs ViT-S/14 1.2-1.3× as much per tile as one of 24-32, bf16 on a 2-core CPU)."""
    sizes, size = [], min(first, batch_size)
    while start < n and size < batch_size:
        sizes.append(list(range(start, min(start + size, n))))
        start += size
        size = min(2 * size, batch_size)
    rest = max(n - start, 0)
    count = -(-rest // batch_size)
    for j in range(count):
        step = rest // count + (j < rest % count)
        sizes.append(list(range(start, start + step)))
        start += step
    return sizes


def loader_options(on_gpu: bool, n_workers: int) -> dict[str, Any]:
    """DataLoader settings: pinned host memory on GPU (so `Runtime.place` copies asynchronously) and
    four batches read ahead per worker."""
    return {"pin_memory": on_gpu, "prefetch_factor": 4 if n_workers else None}


def slide_qc(grid: TileGrid, qc_rows: np.ndarray | None, *, exclude: bool) -> tuple[TileQC | None, np.ndarray, dict]:
    """The slide's TileQC, which tiles stay in the results, and the `qc: …` measurement columns of
    those tiles (for SlideResult.extra)."""
    n = len(grid)
    if qc_rows is None:
        return None, np.ones(n, bool), {}
    measures = with_fold(columns(qc_rows))  # folds are judged against the whole slide, so only here
    classes = qc_classes(measures)
    kept = classes == OK if exclude else np.ones(n, bool)
    tile_qc = TileQC(coords=np.asarray(grid.coords, np.int64).reshape(-1, 2), footprint=float(grid.footprint),
                     classes=classes, kept=kept, colors=dict(ARTEFACTS), thresholds=QCThresholds().to_dict(),
                     excluded=exclude)
    return tile_qc, kept, {PREFIX + k: v[kept] for k, v in measures.items()}


def excluded_counts(tile_qc: TileQC) -> str:
    """'blur 3, pen 2' for a log line."""
    kinds, counts = np.unique(tile_qc.classes[~tile_qc.kept], return_counts=True)
    return ", ".join(f"{k} {c}" for k, c in zip(kinds, counts)) or "none"
