"""Many slides: which inputs (slides, folders, QuPath projects, DICOMweb addresses, worklists), where
each one's results go, what a previous run already finished (`.done` markers, which record the
settings that made the results), and who runs what: every process (torchrun rank, Slurm array task, or
another `pathapp infer` on the same --out) claims the next unfinished slide through a lease
(`infer.lease`), so slides are shared dynamically and a dead process's slide is taken over. One failing
slide is reported in one line and the others still run; a slide without any tile is reported as
empty, with why."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathapp.engine.distributed import dist_env
from pathapp.errors import failure_line
from pathapp.infer.ahead import PlanAhead
from pathapp.infer.lease import Lease, claim
from pathapp.infer.options import QC_MODES, InferOptions
from pathapp.infer.pipeline import (InferenceError, Runtime, TilePlan, check_tile_size, infer_slide, prepare_model,
                                    qc_slide)
from pathapp.models.header import SEG_HEAD_KINDS
from pathapp.models.loader import DEFAULT_MPP, load_model, model_label
from pathapp.results import read_done, write_index, write_results
from pathapp.results.run import DONE
from pathapp.slide import expand_slide_inputs, is_url, open_slide, slide_name

if TYPE_CHECKING:
    from pathapp.models.bundle import Bundle
    from pathapp.qupath.project import ProjectEntry, QuPathProject
    from pathapp.slide import Slide
    from pathapp.tiles.stain import StainFit

RESULTS_FOLDER = "pathapp"  # results go to <slide folder>/pathapp/<slide name>/ unless --out is given
NEEDS_ANNOTATIONS = ("--roi-class selects annotations: those of --roi FILE, or without --roi each QuPath "
                     "project image's own; give --roi FILE for slides outside a project")
WORKLIST_SUFFIX = ".txt"  # an infer input listing slides, one per line
QC_TILE_SIZE = 224  # `pathapp qc` tiles, when no --tile-size: the default model's


@dataclass
class Job:
    """One image to run: where its pixels are and where its results go."""

    label: str  # what the user sees in messages
    source: Path | str | None  # slide file, DICOM folder or DICOMweb address; None when an image is missing
    out_dir: Path | None  # None only when the input cannot run (see error)
    entry_mpp: float | None = None  # µm/px recorded by QuPath, used when the file has none
    error: str | None = None  # why this input cannot run (reported, counted as failed)
    project: QuPathProject | None = None  # for a project entry: its project and entry
    entry: ProjectEntry | None = None

    def open(self, slide_mpp: float | None = None) -> Slide:
        """The job's slide, calibrated from its QuPath entry where the file has no µm/px."""
        slide = open_slide(self.source, slide_mpp=slide_mpp)
        if slide.mpp is None and self.entry_mpp:
            slide.calibrate(self.entry_mpp)
        return slide


@dataclass
class RunSummary:
    """What a run did, per input: written, written without any tile (empty), skipped (already
    complete), or failed with a reason."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # complete before this run
    elsewhere: list[Path] = field(default_factory=list)  # completed by another process during this run
    failed: list[tuple[str, str]] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)  # written, but without a single tile
    # --write-project without QuPath: the GeoJSON left to import, and why (said once, at the end)
    unimported: list[Path] = field(default_factory=list)
    no_qupath: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """'2 written, 1 empty (...), 1 already complete, 1 failed': the CLI's closing line."""
        parts = [f"{len(self.done)} written", f"{len(self.skipped)} already complete"]
        if self.empty:
            parts.insert(1, f"{len(self.empty)} empty (no tiles; see the warnings)")
        if self.elsewhere:
            parts.append(f"{len(self.elsewhere)} written by other processes")
        return ", ".join(parts + ([f"{len(self.failed)} failed"] if self.failed else []))


def expand_inputs(inputs: Sequence[str | Path], out: Path | None) -> list[Job]:
    """Slides, folders of slides (a DICOM series folder is one slide), QuPath projects, DICOMweb
    addresses (a study is each of its slides) and worklists (.txt: one of those per line), in order."""
    from pathapp.qupath.project import is_project, read_project, results_dir

    jobs: list[Job] = []
    for raw in read_worklists(inputs):
        if not is_url(raw) and is_project(Path(raw)):  # project.qpproj, or the folder holding it
            p = Path(raw)
            project = read_project(p)
            if not project.entries:
                jobs.append(Job(label=str(p), source=None, out_dir=None,
                                error=f"{p}: the project has no images; add them in QuPath"))
            for e in project.entries:
                where = out / str(e.entry_id) if out is not None else results_dir(project, e)
                jobs.append(Job(label=f"{p}: {e.name} (entry {e.entry_id})", source=e.image_path,
                                out_dir=where, entry_mpp=e.mpp, error=e.error,
                                project=project, entry=e))
        elif is_url(raw) or Path(raw).is_dir():  # DICOMweb studies and folders: the slides they hold
            slides, errors = expand_slide_inputs([raw])
            jobs += [Job(label=message.split(": ", 1)[0], source=None, out_dir=None, error=message)
                     for message in errors]
            jobs += [Job(label=str(s), source=s, out_dir=slide_out_dir(s, out)) for s in slides]
        else:
            jobs.append(Job(label=str(raw), source=Path(raw), out_dir=slide_out_dir(Path(raw), out)))
    return jobs


def read_worklists(inputs: Sequence[str | Path]) -> list[str | Path]:
    """`inputs` with each worklist (a .txt file: one slide, folder, project or DICOMweb address per
    line; blank lines and # comments skipped) replaced by its lines. Paths in a worklist are relative
    to its folder."""
    items: list[str | Path] = []
    for raw in inputs:
        if is_url(raw) or Path(raw).suffix.lower() != WORKLIST_SUFFIX or not Path(raw).is_file():
            items.append(raw)
            continue
        for line in Path(raw).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                items.append(line if is_url(line) else Path(raw).parent / line)
    return items


def slide_out_dir(slide: Path | str, out: Path | None) -> Path:
    """OUT/<slide name>/, or without --out beside the slide in <slide folder>/pathapp/<slide name>/
    (for a DICOMweb address, ./pathapp/<series UID>/)."""
    if out is None:
        out = (Path.cwd() if isinstance(slide, str) else slide.parent) / RESULTS_FOLDER
    return out / slide_name(slide)


def report_failure(job: Job, error: Exception, failed: list[tuple[str, str]], echo: Callable[[str], None]) -> None:
    """One line for an input that failed (never a traceback unless debugging), its reason kept for the summary."""
    line = failure_line(job.label, error)
    failed.append((job.label, line.removeprefix("failed: ")))
    echo(line)


def _limit_threads() -> None:
    """Several ranks on one CPU machine: split the cores between them instead of oversubscribing."""
    local_world = dist_env().local_world_size
    if local_world > 1:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def steady_malloc() -> None:
    """Have glibc give every large block (≥ 1 MiB: a batch, an activation) back to the system when it
    is freed. By default its threshold rises with the first blocks freed, after which the model's
    activations are carved from a heap that only grows: about 100 MB more peak memory for ViT-S/14 at
    batch 32 (benchmarks/results/infer_memory.txt). And keep TOP_PAD free at the top of the heap: with
    the threshold fixed, glibc trims the heap after every free, so each tile's smaller arrays (decoding,
    QC) faulted their pages in again, ~2,400 page faults and half the QC time per tile
    (benchmarks/results/qc_speed_top_pad.txt). Elsewhere than glibc, nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TOP_PAD, TOP_PAD)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD, M_TOP_PAD = -3, -2  # mallopt parameters (glibc malloc.h); the first also stops the dynamic raise
MMAP_THRESHOLD, TOP_PAD = 1 << 20, 8 << 20


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_qc(inputs: Sequence[str | Path], options: InferOptions | None = None, *,
           echo: Callable[[str], None] = _stderr) -> RunSummary:
    """Only quality control over every input (no model): `run_inference` with `qc_only`."""
    from dataclasses import replace

    return run_inference(inputs, replace(options or InferOptions(), qc_only=True), echo=echo)


class _OnFirstWait(Future):
    """A Future computed by the first caller of `result()`."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__()
        self._fn: Callable[[], Any] | None = fn

    def result(self, timeout: float | None = None) -> Any:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            self.set_running_or_notify_cancel()
            try:
                self.set_result(fn())
            except BaseException as e:  # kept, and raised to every waiter, as a thread pool would
                self.set_exception(e)
        return super().result(timeout)


class _ModelBuild:
    """The run's one Runtime (none for QC only), built in a thread from the first claimed slide on, so
    the model is built while that slide is opened, its tissue found and its reading workers started.
    `on_first_wait`: the first slide is planned and its first tiles read by another process
    (`infer.ahead`), so this process has nothing else to do meanwhile: the model is built in this
    thread when `run_model` first waits for it (before it forks the reading workers, which so never
    inherit an import half done in a thread)."""

    def __init__(self, o: InferOptions, on_first_wait: bool = False) -> None:
        self.o = o
        self.on_first_wait = on_first_wait
        self.bundle: Bundle | None = None
        self.stain: StainFit | None = None
        self.device = o.device
        if not o.qc_only:
            from pathapp.models.device import resolve_device
            from pathapp.tiles.stain import stain_target

            self.device = str(resolve_device(o.device))  # a --device this machine lacks: refused before any slide
            self.bundle = load_model(o.model, weights=o.weights, mpp=o.mpp, tile_size=o.tile_size)
            self.stain = stain_target(o.stain_norm, o.stain_ref, mpp=self.bundle.mpp, tile_size=self.bundle.tile_size)
        self._pool: ThreadPoolExecutor | None = None
        self.future: Future[Runtime] | None = None
        self._settings: dict[str, Any] | None = None

    def _build(self) -> Runtime:
        assert self.bundle is not None
        rt = prepare_model(self.bundle, self.device, self.o.precision, model_label(self.o.model), traced=True)
        check_tile_size(rt, int(self.o.tile_size or self.bundle.tile_size))
        if self.stain is not None:  # embeddings made on normalised tiles are told apart from plain ones
            rt.fingerprint += ":" + self.stain.fingerprint()
        # The model holds its own copy of the weights now (fingerprinted above); this run's bundle lets go
        # of the file's, so they are not resident twice (88 MB for ViT-S/14).
        self.bundle.backbone_state = {}
        return rt

    def get(self) -> Future[Runtime] | None:
        if self.bundle is None:
            return None
        if self.future is None and self.on_first_wait:
            self.future = _OnFirstWait(self._build)
        elif self.future is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="model build")
            self.future = self._pool.submit(self._build)
        return self.future

    def settings(self) -> dict[str, Any]:
        """This run's `run_settings` (they hold the model's fingerprint, so the model is waited for)."""
        if self._settings is None:
            future = self.get()
            self._settings = run_settings(None if future is None else future.result(), self.o, self.stain)
        return self._settings

    def failed(self, e: BaseException) -> bool:
        """`e` is the build's own error (bad model or options): it ends the run instead of one slide."""
        return self.future is not None and self.future.done() and self.future.exception() is e

    def keep_trace(self) -> None:
        """After the run's slides: trace the model into the cache if this run built it with timm."""
        if self.future is not None and self.future.done() and self.future.exception() is None:
            self.future.result().keep_trace()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def run_inference(inputs: Sequence[str | Path], options: InferOptions | None = None, *,
                  echo: Callable[[str], None] = _stderr) -> RunSummary:
    """Run `options.model` over every input and write each slide's results; see the module docstring.

    Every process claims slides one at a time (`infer.lease`); slides another live process holds are
    waited for and taken over if their lease expires, so the run ends with every slide done or failed."""
    started = time.time()  # a slide finished after this was finished during this run (by another process)
    o = options or InferOptions()
    rois = None
    if o.roi is not None:
        from pathapp.qupath.geojson import read_rois

        rois = read_rois(o.roi, classes=list(o.roi_class) if o.roi_class else None)
    env = dist_env()
    if env.world_size > 1:
        say = echo
        echo = lambda m: say(f"[rank {env.rank}/{env.world_size}] {m}")  # noqa: E731
    jobs = expand_inputs(inputs, Path(o.out) if o.out is not None else None)
    if rois is None and o.roi_class and not any(j.project is not None for j in jobs):
        raise InferenceError(NEEDS_ANNOTATIONS)
    summary = RunSummary()
    if not jobs:
        return summary
    if o.qc not in QC_MODES:
        raise InferenceError(f"--qc must be one of {', '.join(QC_MODES)}, not {o.qc!r}")
    ahead = PlanAhead.first(jobs, o, rois)  # before torch is imported, which _ModelBuild does
    _limit_threads()
    steady_malloc()
    build = _ModelBuild(o, on_first_wait=ahead is not None)
    for note in build.stain.notes if build.stain is not None else []:  # e.g. Vahadane fell back to Macenko
        echo(f"stain: reference {build.stain.source}: {note}")
    pending, waiting_said = jobs, False
    try:
        while pending:
            busy = []
            for job in pending:
                if _attempt(job, build, ahead, o, rois, echo, summary, started) == "busy":
                    busy.append(job)
            if busy and not waiting_said:
                echo(f"waiting: {len(busy)} slide(s) held by other processes; taken over if they stop")
                waiting_said = True
            if busy:
                time.sleep(min(5.0, o.lease_seconds / 4))
            pending = busy
        build.keep_trace()
    finally:
        build.close()
        if ahead is not None:
            ahead.close()
    if summary.unimported:  # once per run, not once per entry
        from pathapp.qupath.paquo_bridge import import_instructions

        echo(f"{summary.no_qupath}\n{import_instructions(summary.unimported)}")
    for folder in sorted({p.parent for p in summary.done + summary.skipped}):
        index = write_index(folder)  # every slide folder there, this run's and earlier ones
        if index is not None:
            echo(f"index: {index}")
    return summary


def _attempt(job: Job, build: _ModelBuild, ahead: PlanAhead | None, o: InferOptions, rois: Any,
             echo: Callable[[str], None], summary: RunSummary, started: float) -> str:
    """Claim and run one job, recording the outcome in `summary`; "busy" when another process holds it.
    Finished results of other settings in the way are a failure (never replaced without --overwrite)."""
    lease: Lease | str | None = None
    try:
        if job.error or job.out_dir is None:
            raise InferenceError(job.error or f"{job.label}: no output folder")
        lease = claim(job.out_dir, o.lease_seconds, done_before=started if o.overwrite else None)
        if lease == "busy":
            return "busy"
        if lease == "done":
            differs = settings_differ(read_done(job.out_dir) or {}, build.settings())
            if differs:
                raise InferenceError(f"{job.label}: {job.out_dir} holds results of other settings ({differs}); "
                                     f"pass --overwrite to replace them, or another --out to keep both")
            ours = (job.out_dir / DONE).stat().st_mtime < started
            echo(f"skip: {job.label}: complete in {job.out_dir}"
                 + (" (use --overwrite to redo)" if ours else " (by another process)"))
            (summary.skipped if ours else summary.elsewhere).append(job.out_dir)
            return "skipped"
        status = _run_job(job, lease, build, o, rois, echo, summary, None if ahead is None else ahead.take(job))
    except Exception as e:  # one bad slide must not stop the others; one line each
        if build.failed(e):
            raise
        report_failure(job, e, summary.failed, echo)
        return "failed"
    finally:
        if isinstance(lease, Lease):
            lease.release()
    getattr(summary, status).append(job.out_dir)
    return status


# What decides a slide's results, as `.done` records it; a rerun with other values must not skip.
SETTING_NAMES = {"model": "backbone (bundle fingerprint)", "head": "head (classes and weights)", "mpp": "--mpp",
                 "tile_size": "--tile-size", "roi": "--roi/--roi-class", "min_tissue": "--min-tissue",
                 "precision": "--precision", "object_type": "--object-type", "qc": "--qc"}


def run_settings(rt: Runtime | None, o: InferOptions, stain: StainFit | None = None) -> dict[str, Any]:
    """The settings that make a slide's results what they are (see SETTING_NAMES); `rt` None: QC only.
    The model is the bundle's fingerprint (marked with a stain target), the precision the one it ran at
    ("auto" resolved, so `auto` on a bf16 CPU and an explicit `bf16` are the same results)."""
    import hashlib

    from pathapp.tiles import DEFAULT_MIN_TISSUE

    roi = None
    if o.roi is not None:
        roi = {"sha256": hashlib.sha256(Path(o.roi).read_bytes()).hexdigest(), "classes": sorted(o.roi_class)}
    elif o.roi_class:  # each project image's own annotations of these classes
        roi = {"classes": sorted(o.roi_class), "from": "project annotations"}
    min_tissue = float(DEFAULT_MIN_TISSUE if o.min_tissue is None else o.min_tissue)
    if rt is None:
        model = head = None
        mpp, tile_size = float(o.mpp or DEFAULT_MPP), int(o.tile_size or QC_TILE_SIZE)
    else:
        model = rt.bundle_fingerprint + ("" if stain is None else ":" + stain.fingerprint())
        head = rt.bundle.head_fingerprint() if rt.bundle.head_kind else None
        mpp, tile_size = float(rt.bundle.mpp), int(rt.bundle.tile_size)
    return {"model": model, "head": head, "mpp": mpp, "tile_size": tile_size, "roi": roi, "min_tissue": min_tissue,
            "precision": rt.precision if rt is not None else o.precision, "object_type": o.object_type, "qc": o.qc}


def settings_differ(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """What differs between a finished run's settings and this run's, in words ('' when nothing)."""
    if not recorded:
        return "the earlier run did not record its settings"

    def show(v: Any) -> str:
        if isinstance(v, dict):
            return f"{v['sha256'][:8]}… {v['classes'] or 'all classes'}" if "sha256" in v else str(v)
        return f"{v[:12]}…" if isinstance(v, str) and len(v) > 16 else "none" if v is None else f"{v}"

    parts = [f"{name} {show(recorded.get(key))} → {show(settings[key])}"
             for key, name in SETTING_NAMES.items() if recorded.get(key) != settings[key]]
    return ", ".join(parts)


def _run_job(job: Job, lease: Lease, build: _ModelBuild, o: InferOptions, rois: Any,
             echo: Callable[[str], None], summary: RunSummary, plan: TilePlan | None = None) -> str:
    """Run one claimed job (the model, or for QC only no model) and write its results; "done" or
    "empty" (GeoJSON --write-project could not add for want of QuPath go to `summary.unimported`).
    `plan`: its tiles, planned ahead. Raises on failure."""
    if rois is None and o.roi_class:  # no --roi: each project image's own annotations of those classes
        if job.project is None or job.entry is None:
            raise InferenceError(f"{job.label}: {NEEDS_ANNOTATIONS}")
        from pathapp.qupath.qpdata import read_entry_rois

        rois = read_entry_rois(job.project, job.entry, o.roi_class)
    t0 = time.perf_counter()
    slide = job.open(o.slide_mpp)
    out_dir = job.out_dir
    with slide:
        t_open = time.perf_counter() - t0
        if build.bundle is None:
            result = qc_slide(slide, mpp=o.mpp or DEFAULT_MPP, tile_size=o.tile_size or QC_TILE_SIZE, rois=rois,
                              min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers,
                              progress=o.progress, log=echo)
        elif build.bundle.head_kind in SEG_HEAD_KINDS:
            from pathapp.infer.segment import segment_slide

            if build.stain is not None:
                raise InferenceError("--stain-norm is not applied to segmentation bundles yet; drop it")
            result = segment_slide(slide, build.get().result(), mpp=o.mpp, tile_size=o.tile_size, rois=rois,
                                   min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers,
                                   progress=o.progress, log=echo)
        else:
            result = infer_slide(slide, build.bundle, mpp=o.mpp, tile_size=o.tile_size, rois=rois,
                                 min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers,
                                 device=build.device, runtime=build.get(), progress=o.progress, log=echo,
                                 qc=o.qc, stain=build.stain, plan=plan)
    result.timings = {"open": t_open, **result.timings}
    if lease.lost:
        raise InferenceError(f"{job.label}: another process took this slide over (no heartbeat for "
                             f"{o.lease_seconds:g} s); its results are theirs")
    if o.dicom_out is not None or o.dicomweb_store is not None:  # before write_results marks the slide done
        from pathapp.results.dicom import export_dicom

        folder = Path(o.dicom_out) / result.slide_name if o.dicom_out is not None else out_dir / "dicom"
        written = export_dicom(result, folder, o.dicomweb_store)
        stored = "" if o.dicomweb_store is None else ", stored with STOW-RS"
        echo(f"dicom: {job.label}: {', '.join(f.name for f in written)} in {folder}{stored}")
    files = write_results(result, out_dir, object_type=o.object_type, settings=build.settings())
    n, secs = len(result), result.timings["model" if build.bundle is not None else "qc"]
    echo(f"done: {job.label}: {n} tiles in {secs:.1f} s ({n / max(secs, 1e-9):.1f} tiles/s) -> {out_dir}")
    if not n:
        echo(f"warning: {job.label}: no tiles: {result.params['empty']}")
    if o.write_project and job.project is not None:
        from pathapp.qupath.paquo_bridge import QuPathNotAvailableError, geojson_files, write_geojson_to_project

        try:
            echo(write_geojson_to_project(job.project.path, job.entry.entry_id, files, image_path=job.source))
        except QuPathNotAvailableError as e:
            summary.unimported += geojson_files(files)
            summary.no_qupath = e.reason
    return "empty" if not n else "done"
