"""Many slides: which inputs (slides, folders, QuPath projects), where each one's results go, what a
previous run already finished (`.done` markers), and which torchrun rank runs what (input i -> rank
i mod world size). One failing slide is reported in one line and the others still run."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathapp.engine.distributed import dist_env
from pathapp.errors import PathappError
from pathapp.infer.options import InferOptions
from pathapp.infer.pipeline import InferenceError, Runtime, check_tile_size, infer_slide, prepare_model
from pathapp.models.loader import load_model, model_label
from pathapp.results import is_done, write_results
from pathapp.slide import find_slides, open_slide, slide_name

if TYPE_CHECKING:
    from pathapp.qupath.project import ProjectEntry, QuPathProject

RESULTS_FOLDER = "pathapp"  # results go to <slide folder>/pathapp/<slide name>/ unless --out is given
NEEDS_ANNOTATIONS = ("--roi-class selects annotations: those of --roi FILE, or without --roi each QuPath "
                     "project image's own; give --roi FILE for slides outside a project")


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
    env = dist_env()
    return jobs[env.rank::env.world_size] if env.world_size > 1 else jobs


def _limit_threads() -> None:
    """Several ranks on one CPU machine: split the cores between them instead of oversubscribing."""
    import torch

    local_world = dist_env().local_world_size
    if local_world > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_inference(inputs: Sequence[str | Path], options: InferOptions | None = None, *,
                  echo: Callable[[str], None] = _stderr) -> RunSummary:
    """Run `options.model` over every input and write each slide's results; see the module docstring."""
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
    jobs = shard(jobs)
    summary = RunSummary()
    if not jobs:
        return summary
    _limit_threads()
    bundle = load_model(o.model, weights=o.weights, mpp=o.mpp, tile_size=o.tile_size)
    rt = prepare_model(bundle, o.device, o.precision, model_label(o.model))
    check_tile_size(rt, int(o.tile_size or bundle.tile_size))
    for job in jobs:
        try:
            result_dir = _run_job(job, rt, o, rois, echo)
        except PathappError as e:
            summary.failed.append((job.label, str(e)))
            echo(f"failed: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; one line each
            summary.failed.append((job.label, f"{type(e).__name__}: {e}"))
            echo(f"failed: {job.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        skipped, path = result_dir
        (summary.skipped if skipped else summary.done).append(path)
    return summary


def _run_job(job: Job, rt: Runtime, o: InferOptions, rois: Any, echo: Callable[[str], None]) -> tuple[bool, Path]:
    """Run one job; (skipped?, its folder). Raises on failure."""
    if job.error:
        raise InferenceError(job.error)
    if job.out_dir is not None and is_done(job.out_dir) and not o.overwrite:
        echo(f"skip: {job.label}: complete in {job.out_dir} (use --overwrite to redo)")
        return True, job.out_dir
    if rois is None and o.roi_class:  # no --roi: each project image's own annotations of those classes
        if job.project is None or job.entry is None:
            raise InferenceError(f"{job.label}: {NEEDS_ANNOTATIONS}")
        from pathapp.qupath.qpdata import read_entry_rois

        rois = read_entry_rois(job.project, job.entry, o.roi_class)
    t0 = time.perf_counter()
    slide = open_slide(job.source, slide_mpp=o.slide_mpp)
    if slide.mpp is None and job.entry_mpp:
        slide.calibrate(job.entry_mpp)
    out_dir = job.out_dir
    with slide:
        t_open = time.perf_counter() - t0
        result = infer_slide(slide, rt.bundle, mpp=o.mpp, tile_size=o.tile_size, rois=rois,
                             min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers, runtime=rt,
                             progress=o.progress, log=echo)
    result.timings = {"open": t_open, **result.timings}
    files = write_results(result, out_dir, object_type=o.object_type)
    n, secs = len(result), result.timings["model"]
    echo(f"done: {job.label}: {n} tiles in {secs:.1f} s ({n / max(secs, 1e-9):.1f} tiles/s) -> {out_dir}")
    if o.write_project and job.project is not None:
        from pathapp.qupath.paquo_bridge import write_geojson_to_project

        message = write_geojson_to_project(job.project.path, job.entry.entry_id, files, image_path=job.source)
        if message:
            echo(message)
    return False, out_dir
