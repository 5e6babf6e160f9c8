"""`pathapp explain`: why the model called these tiles what it did, as saliency maps on the patch grid.

Per slide: run inference as `pathapp infer` does (same tiles, same numbers), choose the tiles to explain
(the N with the highest probability of the class, or for an attention-MIL slide head the N with the
highest attention; inside --roi only), compute each method's saliency inside each chosen tile, and
optionally how faithful it is (deletion/insertion against random orders). The files are written by
`pathapp.explain.outputs`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.errors import PathappError
from pathapp.explain.saliency import METHODS, ExplainError, Scorer, explain_tiles, patch_grid
from pathapp.results import SlideResult

DEFAULT_TOP = 8


@dataclass
class ExplainOptions:
    """What `pathapp explain` was asked, filled by the CLI."""

    model: str | Path
    methods: list[str] = field(default_factory=lambda: ["vitcx"])
    class_name: str | None = None  # None: each tile's own top class (slide head: the slide's)
    roi: str | Path | None = None
    roi_class: list[str] = field(default_factory=list)
    top: int | None = None  # None: DEFAULT_TOP, or every tile inside --roi
    faithfulness: bool = False
    mpp: float | None = None
    tile_size: int | None = None
    slide_mpp: float | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    seed: int = 0


@dataclass
class SlideExplanation:
    """The explained tiles of one slide: which, for which class, their pixels and saliency maps."""

    result: SlideResult
    tiles: np.ndarray  # (n,) indices into result
    targets: np.ndarray  # (n,) class index explained in each tile
    scores: np.ndarray  # (n,) what ranked the tiles: prob of the class, or attention
    score_name: str
    images: np.ndarray  # (n, H, W, 3) uint8, as the model saw them
    saliency: dict[str, np.ndarray]  # method -> (n, rows, cols) on the patch-token grid
    faithfulness: list[dict[str, dict[str, float]]] | None
    params: dict[str, Any]
    timings: dict[str, float]
    class_names: list[str] = field(default_factory=list)  # the bundle's (a slide head's result has none per tile)
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return next(iter(self.saliency.values())).shape[1:]  # type: ignore[return-value]


def _roi_geometry(roi: str | Path, classes: Sequence[str]) -> Any:
    """The union of the polygons in a QuPath GeoJSON export: annotations, or tiles/detections
    (the pathapp tiles a user selected in QuPath)."""
    import dataclasses

    from pathapp.qupath.geojson import read_objects, rois_from_objects

    objects = [dataclasses.replace(o, object_type="annotation") for o in read_objects(roi)]
    return rois_from_objects(objects, list(classes) or None, str(roi))


def choose_tiles(result: SlideResult, names: list[str], class_name: str | None, top: int | None,
                 inside: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(tile indices, target class per tile, ranking score, its name), best first; `names`: the
    bundle's classes."""
    if class_name is not None and class_name not in names:
        raise ExplainError(f"--class {class_name!r}: the model's classes are {', '.join(names) or 'none'}")
    candidates = np.flatnonzero(inside) if inside is not None else np.arange(len(result))
    if result.probs is not None:
        k = names.index(class_name) if class_name is not None else None
        score = result.probs[:, k] if k is not None else result.probs.max(axis=1)
        target = np.full(len(result), k) if k is not None else result.probs.argmax(axis=1)
        score_name = f"prob: {class_name}" if k is not None else "max prob"
    elif "attention" in result.extra:
        slide = result.params.get("slide_prediction") or {}
        k = names.index(class_name) if class_name is not None else int(np.argmax([slide[n] for n in names]))
        score, target, score_name = np.asarray(result.extra["attention"]), np.full(len(result), k), "attention"
    else:
        raise ExplainError("explanations explain a class probability: give a bundle with a head "
                           "(`pathapp train` makes one)")
    order = candidates[np.argsort(-score[candidates], kind="stable")]
    n = top if top is not None else (len(order) if inside is not None else DEFAULT_TOP)
    order = order[:n]
    return order, target[order].astype(np.int64), score[order].astype(np.float64), score_name


def explain_slide(slide: Any, runtime: Any, options: ExplainOptions, rois: Any = None,
                  log: Callable[[str], None] | None = None) -> SlideExplanation:
    """Infer, choose tiles, read them, and compute every requested method's saliency (and faithfulness)."""
    import shapely
    import torch

    from pathapp.explain.faithfulness import evaluate_tile
    from pathapp.infer import infer_slide
    from pathapp.tiles import read_tile_at, tile_geometry

    t0 = time.perf_counter()
    tile_head = runtime.model.tile_head is not None
    # A tile head scores each tile on its own: infer only inside the ROI. A slide head needs the whole bag.
    result = infer_slide(slide, runtime.bundle, mpp=options.mpp, tile_size=options.tile_size,
                         rois=rois if tile_head else None,
                         batch_size=options.batch_size, workers=options.workers, runtime=runtime,
                         progress=True, log=log)
    timings = {"infer": time.perf_counter() - t0}
    inside = None
    if rois is not None:
        centre = result.coords + result.footprint / 2
        inside = shapely.contains_xy(rois, centre[:, 0], centre[:, 1])
    bundle = runtime.bundle
    tiles, targets, scores, score_name = choose_tiles(result, bundle.class_names, options.class_name, options.top,
                                                      inside)
    geometry = tile_geometry(slide, result.mpp, result.tile_size)  # the rule inference read them with
    images = np.stack([read_tile_at(slide, geometry, x, y) for x, y in result.coords[tiles]]) if len(tiles) else \
        np.zeros((0, result.tile_size, result.tile_size, 3), np.uint8)
    model = runtime.model
    bag = None if tile_head else torch.from_numpy(result.embeddings).to(runtime.device)
    scorer = Scorer(model, bag)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(runtime.device)
    t = time.perf_counter()
    done = [0]

    def progress(i: int) -> None:
        done[0] = i + 1
        if log is not None:
            log(f"progress: {slide.name}: ViT-CX {done[0]}/{len(images)} tiles")

    saliency = explain_tiles(model, x, targets.tolist(), options.methods, scorer=scorer, indices=tiles.tolist(),
                             batch_size=options.batch_size, seed=options.seed, on_tile=progress) if len(images) else \
        {m: np.zeros((0, *patch_grid(model, x)), np.float32) for m in options.methods}
    timings["saliency"] = time.perf_counter() - t
    faithfulness = None
    if options.faithfulness:
        t = time.perf_counter()
        xn = model.normalize(x)
        faithfulness = [
            evaluate_tile(scorer.at(int(tiles[i])) if bag is not None else scorer, xn[i:i + 1], int(targets[i]),
                          {m: saliency[m][i] for m in options.methods}, batch_size=options.batch_size,
                          seed=options.seed + i)
            for i in range(len(images))]
        timings["faithfulness"] = time.perf_counter() - t
    params = {"methods": list(options.methods), "class": options.class_name, "top": options.top,
              "roi": str(options.roi) if options.roi else None, "seed": options.seed,
              "vitcx": {"distance_threshold": 0.1, "noise_sigma": 0.1, "feature_layer": "blocks[-1].norm1"}}
    return SlideExplanation(result, tiles, targets, scores, score_name, images, saliency, faithfulness, params, timings,
                            list(bundle.class_names), list(bundle.class_colors))


@dataclass
class ExplainSummary:
    """Per input: the folder written, or why it failed."""

    done: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def run_explain(inputs: Sequence[str | Path], options: ExplainOptions, out: str | Path | None = None,
                echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> ExplainSummary:
    """Explain every input (slides, images, folders, QuPath projects) into OUT/<slide name>/ (default:
    beside each slide, as `pathapp infer`). A failing input is reported in one line; the others run."""
    from pathapp.explain.outputs import write_explanation
    from pathapp.infer import check_tile_size, expand_inputs, prepare_model, report_failure
    from pathapp.models.loader import load_model, model_label
    from pathapp.slide import open_slide

    bad = [m for m in options.methods if m not in METHODS]
    if bad:
        raise ExplainError(f"--method {bad[0]}: use one of {', '.join(METHODS)}")
    rois = _roi_geometry(options.roi, options.roi_class) if options.roi is not None else None
    jobs = expand_inputs(inputs, Path(out) if out is not None else None)
    summary = ExplainSummary()
    runtime = None
    for job in jobs:
        try:
            if job.error:
                raise PathappError(job.error)
            if runtime is None:
                runtime = prepare_model(load_model(options.model), options.device, "fp32", model_label(options.model))
                check_tile_size(runtime, int(options.tile_size or runtime.bundle.tile_size))
                if runtime.model.head is None:
                    raise ExplainError(f"{options.model}: explanations explain a class probability; give a bundle "
                                       f"with a head (`pathapp train` makes one)")
            slide = open_slide(job.source, slide_mpp=options.slide_mpp)
            if slide.mpp is None and job.entry_mpp:  # QuPath knows the µm/px the file does not record
                slide.calibrate(job.entry_mpp)
            with slide:
                explanation = explain_slide(slide, runtime, options, rois, log=echo)
            files = write_explanation(explanation, job.out_dir)
        except ExplainError:
            raise  # the model or the options, not this input: every other input would fail the same way
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; one line each
            report_failure(job, e, summary.failed, echo)
            continue
        summary.done.append(job.out_dir)
        echo(f"done: {job.label}: {len(explanation.tiles)} tiles explained ({', '.join(options.methods)}) "
             f"in {sum(explanation.timings.values()):.1f} s -> {job.out_dir} ({len(files)} files)")
    return summary
