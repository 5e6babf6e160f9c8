"""Many slides: which inputs (slides, folders, QuPath projects, DICOMweb addresses, worklists), where
each one's results go, what a previous run already finished (`.done` markers, which record the
settings that made the results), and which torchrun rank runs what (input i -> rank i mod world
size). One failing slide is reported in one line and the others still run; a slide without any tile
is reported as empty, with why."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathapp.engine.distributed import dist_env
from pathapp.errors import failure_line
from pathapp.infer.options import InferOptions
from pathapp.infer.options import QC_MODES
from pathapp.infer.pipeline import InferenceError, Runtime, check_tile_size, infer_slide, prepare_model, qc_slide
from pathapp.models.loader import DEFAULT_MPP, load_model, model_label
from pathapp.results import read_done, write_index, write_results
from pathapp.slide import expand_slide_inputs, find_slides, is_url, open_slide, slide_name

if TYPE_CHECKING:
    from pathapp.qupath.project import ProjectEntry, QuPathProject

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


@dataclass
class RunSummary:
    """What a run did, per input: written, written without any tile (empty), skipped (already
    complete), or failed with a reason."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)  # written, but without a single tile

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """'2 written, 1 empty (...), 1 already complete, 1 failed': the CLI's closing line."""
        parts = [f"{len(self.done)} written", f"{len(self.skipped)} already complete"]
        if self.empty:
            parts.insert(1, f"{len(self.empty)} empty (no tiles; see the warnings)")
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
            for note in stain.notes:  # e.g. a Vahadane fit that did not converge, fitted with Macenko
                echo(f"stain: reference {stain.source}: {note}")
    settings = run_settings(rt, o)
    for job in jobs:
        try:
            status, path = _run_job(job, rt, o, rois, settings, echo, stain)
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; one line each
            report_failure(job, e, summary.failed, echo)
            continue
        getattr(summary, status).append(path)
    for folder in sorted({p.parent for p in summary.done + summary.skipped}):
        index = write_index(folder)  # every slide folder there, this run's and earlier ones
        if index is not None:
            echo(f"index: {index}")
    return summary


# What decides a slide's results, as `.done` records it; a rerun with other values must not skip.
SETTING_NAMES = {"model": "backbone (bundle fingerprint)", "head": "head (classes and weights)", "mpp": "--mpp",
                 "tile_size": "--tile-size", "roi": "--roi/--roi-class", "min_tissue": "--min-tissue",
                 "precision": "--precision", "object_type": "--object-type", "qc": "--qc"}


def run_settings(rt: Runtime | None, o: InferOptions) -> dict[str, Any]:
    """The settings that make a slide's results what they are (see SETTING_NAMES); `rt` None: QC only."""
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
        model, head = rt.fingerprint, rt.bundle.head_fingerprint() if rt.bundle.head_kind else None
        mpp, tile_size = float(rt.bundle.mpp), int(rt.bundle.tile_size)
    return {"model": model, "head": head, "mpp": mpp, "tile_size": tile_size, "roi": roi, "min_tissue": min_tissue,
            "precision": o.precision, "object_type": o.object_type, "qc": o.qc}


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


def _run_job(job: Job, rt: Runtime | None, o: InferOptions, rois: Any, settings: dict[str, Any],
             echo: Callable[[str], None], stain: Any = None) -> tuple[str, Path]:
    """Run one job (the model, or with `rt` None only QC); (done, empty or skipped, its folder). Raises
    on failure, and when finished results of other settings are in the way (never replaced without
    --overwrite)."""
    if job.error:
        raise InferenceError(job.error)
    recorded = read_done(job.out_dir) if job.out_dir is not None else None
    if recorded is not None and not o.overwrite:
        differs = settings_differ(recorded, settings)
        if differs:
            raise InferenceError(f"{job.label}: {job.out_dir} holds results of other settings ({differs}); "
                                 f"pass --overwrite to replace them, or another --out to keep both")
        echo(f"skip: {job.label}: complete in {job.out_dir} (use --overwrite to redo)")
        return "skipped", job.out_dir
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
        if rt is None:
            result = qc_slide(slide, mpp=o.mpp or DEFAULT_MPP, tile_size=o.tile_size or QC_TILE_SIZE, rois=rois,
                              min_tissue=o.min_tissue, batch_size=o.batch_size, workers=o.workers,
                              progress=o.progress, log=echo)
        elif rt.model.seg_head is not None:
            from pathapp.infer.segment import segment_slide

            result = segment_slide(slide, rt, mpp=o.mpp, tile_size=o.tile_size, rois=rois, min_tissue=o.min_tissue,
                                   batch_size=o.batch_size, workers=o.workers, progress=o.progress, log=echo)
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
    files = write_results(result, out_dir, object_type=o.object_type, settings=settings)
    n, secs = len(result), result.timings["model" if rt is not None else "qc"]
    echo(f"done: {job.label}: {n} tiles in {secs:.1f} s ({n / max(secs, 1e-9):.1f} tiles/s) -> {out_dir}")
    if not n:
        echo(f"warning: {job.label}: no tiles: {result.params['empty']}")
    if o.write_project and job.project is not None:
        from pathapp.qupath.paquo_bridge import write_geojson_to_project

        message = write_geojson_to_project(job.project.path, job.entry.entry_id, files, image_path=job.source)
        if message:
            echo(message)
    return ("empty" if not n else "done"), out_dir
