"""Many slides: which inputs (slides, folders, QuPath projects), where each one's results go, what a
previous run already finished (`.done` markers), and who runs what: every process (torchrun rank, Slurm
array task, or another `pathapp infer` on the same --out) claims the next unfinished slide through a
lease (`infer.lease`), so slides are shared dynamically and a dead process's slide is taken over. One
failing slide is reported in one line and the others still run."""

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
from pathapp.errors import PathappError
from pathapp.infer.lease import Lease, claim
from pathapp.infer.options import InferOptions
from pathapp.infer.pipeline import (
    InferenceError,
    Runtime,
    check_tile_size,
    infer_slide,
    prepare_model,
)
from pathapp.models.loader import load_model, model_label
from pathapp.results import write_results
from pathapp.results.run import DONE
from pathapp.slide import find_slides, open_slide, slide_name

if TYPE_CHECKING:
    from pathapp.models.bundle import Bundle

RESULTS_FOLDER = "pathapp"  # results go to <slide folder>/pathapp/<slide name>/ unless --out is given


@dataclass
class Job:
    """One image to run: where its pixels are and where its results go."""

    label: str  # what the user sees in messages
    source: Path | None  # slide file or DICOM folder; None when a project entry's image is missing
    out_dir: Path | None  # None only when the input cannot run (see error)
    entry_mpp: float | None = None  # µm/px recorded by QuPath, used when the file has none
    error: str | None = None  # why this input cannot run (reported, counted as failed)
    project: Path | None = None
    entry_id: str | None = None


@dataclass
class RunSummary:
    """What a run did, per input: written, skipped (already complete), or failed with a reason."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # complete before this run
    elsewhere: list[Path] = field(default_factory=list)  # completed by another process during this run
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
                                project=project.path, entry_id=str(e.entry_id)))
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


def _limit_threads() -> None:
    """Several ranks on one CPU machine: split the cores between them instead of oversubscribing."""
    local_world = dist_env().local_world_size
    if local_world > 1:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ModelBuild:
    """The run's one Runtime, built in a thread from the first claimed slide on, so the model is built
    while that slide is opened, its tissue found and its reading workers started."""

    def __init__(self, bundle: Bundle, o: InferOptions) -> None:
        self.bundle, self.o = bundle, o
        self._pool: ThreadPoolExecutor | None = None
        self.future: Future[Runtime] | None = None

    def _build(self) -> Runtime:
        rt = prepare_model(self.bundle, self.o.device, self.o.precision, model_label(self.o.model))
        check_tile_size(rt, int(self.o.tile_size or self.bundle.tile_size))
        return rt

    def get(self) -> Future[Runtime]:
        if self.future is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="model build")
            self.future = self._pool.submit(self._build)
        return self.future

    def failed(self, e: BaseException) -> bool:
        """`e` is the build's own error (bad model or options): it ends the run instead of one slide."""
        return self.future is not None and self.future.done() and self.future.exception() is e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def run_inference(inputs: Sequence[str | Path], options: InferOptions | None = None, *,
                  echo: Callable[[str], None] = _stderr) -> RunSummary:
    """Run `options.model` over every input and write each slide's results; see the module docstring.

    Every process claims slides one at a time (`infer.lease`); slides another live process holds are
    waited for and taken over if their lease expires, so the run ends with every slide done or failed."""
    o = options or InferOptions()
    rois = None
    if o.roi is not None:
        from pathapp.qupath.geojson import read_rois

        rois = read_rois(o.roi, classes=list(o.roi_class) if o.roi_class else None)
    elif o.roi_class:
        raise InferenceError("--roi-class filters the annotations of --roi FILE; give --roi too")
    env = dist_env()
    if env.world_size > 1:
        say = echo
        echo = lambda m: say(f"[rank {env.rank}/{env.world_size}] {m}")
    jobs = expand_inputs(inputs, Path(o.out) if o.out is not None else None)
    summary = RunSummary()
    if not jobs:
        return summary
    _limit_threads()
    build = _ModelBuild(load_model(o.model, weights=o.weights, mpp=o.mpp, tile_size=o.tile_size), o)
    started = time.time()
    pending, waiting_said = jobs, False
    try:
        while pending:
            busy = []
            for job in pending:
                outcome = _attempt(job, build, o, rois, echo, summary, started)
                if outcome == "busy":
                    busy.append(job)
            if busy and not waiting_said:
                echo(f"waiting: {len(busy)} slide(s) held by other processes; taken over if they stop")
                waiting_said = True
            if busy:
                time.sleep(min(5.0, o.lease_seconds / 4))
            pending = busy
    finally:
        build.close()
    return summary


def _attempt(job: Job, build: _ModelBuild, o: InferOptions, rois: Any, echo: Callable[[str], None],
             summary: RunSummary, started: float) -> str:
    """Claim and run one job, recording the outcome in `summary`; "busy" when another process holds it."""
    if job.error or job.out_dir is None:
        summary.failed.append((job.label, job.error or "no output folder"))
        echo(f"failed: {job.error}")
        return "failed"
    lease = claim(job.out_dir, o.lease_seconds, done_before=started if o.overwrite else None)
    if lease == "busy":
        return "busy"
    if lease == "done":
        ours = (job.out_dir / DONE).stat().st_mtime < started
        echo(f"skip: {job.label}: complete in {job.out_dir}"
             + (" (use --overwrite to redo)" if ours else " (by another process)"))
        (summary.skipped if ours else summary.elsewhere).append(job.out_dir)
        return "skipped"
    try:
        _run_job(job, lease, build, o, rois, echo)
    except Exception as e:  # one bad slide must not stop the others; one line each
        if build.failed(e):
            raise
        if isinstance(e, PathappError):
            summary.failed.append((job.label, str(e)))
            echo(f"failed: {e}")
        else:
            summary.failed.append((job.label, f"{type(e).__name__}: {e}"))
            echo(f"failed: {job.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return "failed"
    finally:
        lease.release()
    summary.done.append(job.out_dir)
    return "done"


def _run_job(job: Job, lease: Lease, build: _ModelBuild, o: InferOptions, rois: Any,
             echo: Callable[[str], None]) -> None:
    """Run one claimed job and write its results. Raises on failure."""
    t0 = time.perf_counter()
    slide = open_slide(job.source, slide_mpp=o.slide_mpp)
    if slide.mpp is None and job.entry_mpp:
        slide.calibrate(job.entry_mpp)
    out_dir = job.out_dir
    with slide:
        t_open = time.perf_counter() - t0
        result = infer_slide(slide, build.bundle, mpp=o.mpp, tile_size=o.tile_size, rois=rois,
                             min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers,
                             device=o.device, runtime=build.get(), progress=o.progress, log=echo)
    result.timings = {"open": t_open, **result.timings}
    if lease.lost:
        raise InferenceError(f"{job.label}: another process took this slide over (no heartbeat for "
                             f"{o.lease_seconds:g} s); its results are theirs")
    files = write_results(result, out_dir, object_type=o.object_type)
    n, secs = len(result), result.timings["model"]
    echo(f"done: {job.label}: {n} tiles in {secs:.1f} s ({n / max(secs, 1e-9):.1f} tiles/s) -> {out_dir}")
    if o.write_project and job.project is not None:
        from pathapp.qupath.paquo_bridge import write_geojson_to_project

        message = write_geojson_to_project(job.project, job.entry_id, files, image_path=job.source)
        if message:
            echo(message)
