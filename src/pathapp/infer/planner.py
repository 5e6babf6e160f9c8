"""Many slides: which inputs (slides, folders, QuPath projects, DICOMweb addresses, worklists), where
each one's results go, what a previous run already finished (`.done` markers), and which torchrun rank
runs what (input i -> rank i mod world size). One failing slide is reported in one line and the
others still run."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathapp.engine.distributed import dist_env
from pathapp.errors import PathappError, one_line
from pathapp.infer.options import InferOptions
from pathapp.infer.options import QC_MODES
from pathapp.infer.pipeline import InferenceError, Runtime, check_tile_size, infer_slide, prepare_model, qc_slide
from pathapp.models.loader import DEFAULT_MPP, load_model, model_label
from pathapp.results import is_done, write_results
from pathapp.slide import expand_slide_inputs, find_slides, is_url, open_slide, slide_name

RESULTS_FOLDER = "pathapp"  # results go to <slide folder>/pathapp/<slide name>/ unless --out is given
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
    project: Path | None = None
    entry_id: str | None = None


@dataclass
class RunSummary:
    """What a run did, per input: written, skipped (already complete), or failed with a reason."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """'2 written, 1 already complete, 1 failed': the CLI's closing line."""
        parts = [f"{len(self.done)} written", f"{len(self.skipped)} already complete"]
        return ", ".join(parts + ([f"{len(self.failed)} failed"] if self.failed else []))


def expand_inputs(inputs: Sequence[str | Path], out: Path | None) -> list[Job]:
    """Slides, folders of slides (a DICOM series folder is one slide), QuPath projects, DICOMweb
    addresses (a study is each of its slides) and worklists (.txt: one of those per line), in order."""
    from pathapp.qupath.project import is_project, read_project, results_dir

    jobs: list[Job] = []
    for raw in read_worklists(inputs):
        if is_url(raw):
            slides, errors = expand_slide_inputs([raw])
            jobs += [Job(label=message.split(": ", 1)[0], source=None, out_dir=None, error=message)
                     for message in errors]
            jobs += [Job(label=str(s), source=s, out_dir=slide_out_dir(s, out)) for s in slides]
            continue
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


def run_qc(inputs: Sequence[str | Path], options: InferOptions | None = None, *,
           echo: Callable[[str], None] = _stderr) -> RunSummary:
    """Only quality control over every input (no model): `run_inference` with `qc_only`."""
    from dataclasses import replace

    return run_inference(inputs, replace(options or InferOptions(), qc_only=True), echo=echo)


def run_inference(inputs: Sequence[str | Path], options: InferOptions | None = None, *,
                  echo: Callable[[str], None] = _stderr) -> RunSummary:
    """Run `options.model` over every input and write each slide's results; see the module docstring."""
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
        echo = lambda m: say(f"[rank {env.rank}/{env.world_size}] {m}")  # noqa: E731
    jobs = shard(expand_inputs(inputs, Path(o.out) if o.out is not None else None))
    summary = RunSummary()
    if not jobs:
        return summary
    if o.qc not in QC_MODES:
        raise InferenceError(f"--qc must be one of {', '.join(QC_MODES)}, not {o.qc!r}")
    _limit_threads()
    rt = stain = None
    if not o.qc_only:
        from pathapp.tiles.stain import stain_target

        bundle = load_model(o.model, weights=o.weights, mpp=o.mpp, tile_size=o.tile_size)
        rt = prepare_model(bundle, o.device, o.precision, model_label(o.model))
        check_tile_size(rt, int(o.tile_size or bundle.tile_size))
        stain = stain_target(o.stain_norm, o.stain_ref, mpp=bundle.mpp, tile_size=bundle.tile_size)
        if stain is not None:  # embeddings made on normalised tiles are told apart from plain ones
            rt.fingerprint += ":" + stain.fingerprint()
    for job in jobs:
        try:
            result_dir = _run_job(job, rt, o, rois, echo, stain)
        except PathappError as e:
            summary.failed.append((job.label, one_line(e)))
            echo(f"failed: {one_line(e)}")
            continue
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; one line each
            summary.failed.append((job.label, f"{type(e).__name__}: {e}"))
            echo(f"failed: {job.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        skipped, path = result_dir
        (summary.skipped if skipped else summary.done).append(path)
    return summary


def _run_job(job: Job, rt: Runtime | None, o: InferOptions, rois: Any, echo: Callable[[str], None],
             stain: Any = None) -> tuple[bool, Path]:
    """Run one job (the model, or with `rt` None only QC); (skipped?, its folder). Raises on failure."""
    if job.error:
        raise InferenceError(job.error)
    if job.out_dir is not None and is_done(job.out_dir) and not o.overwrite:
        echo(f"skip: {job.label}: complete in {job.out_dir} (use --overwrite to redo)")
        return True, job.out_dir
    t0 = time.perf_counter()
    slide = open_slide(job.source, slide_mpp=o.slide_mpp)
    if slide.mpp is None and job.entry_mpp:
        slide.calibrate(job.entry_mpp)
    out_dir = job.out_dir
    with slide:
        t_open = time.perf_counter() - t0
        if rt is None:
            result = qc_slide(slide, mpp=o.mpp or DEFAULT_MPP, tile_size=o.tile_size or QC_TILE_SIZE, rois=rois,
                              min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers,
                              progress=o.progress, log=echo)
        else:
            result = infer_slide(slide, rt.bundle, mpp=o.mpp, tile_size=o.tile_size, rois=rois,
                                 min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers, runtime=rt,
                                 progress=o.progress, log=echo, qc=o.qc, stain=stain)
    result.timings = {"open": t_open, **result.timings}
    if o.dicom_out is not None or o.dicomweb_store is not None:  # before write_results marks the slide done
        from pathapp.results.dicom import export_dicom

        folder = Path(o.dicom_out) / result.slide_name if o.dicom_out is not None else out_dir / "dicom"
        written = export_dicom(result, folder, o.dicomweb_store)
        stored = "" if o.dicomweb_store is None else ", stored with STOW-RS"
        echo(f"dicom: {job.label}: {', '.join(f.name for f in written)} in {folder}{stored}")
    files = write_results(result, out_dir, object_type=o.object_type)
    n, secs = len(result), result.timings["model" if rt is not None else "qc"]
    echo(f"done: {job.label}: {n} tiles in {secs:.1f} s ({n / max(secs, 1e-9):.1f} tiles/s) -> {out_dir}")
    if o.write_project and job.project is not None:
        from pathapp.qupath.paquo_bridge import write_geojson_to_project

        message = write_geojson_to_project(job.project, job.entry_id, files, image_path=job.source)
        if message:
            echo(message)
    return False, out_dir
