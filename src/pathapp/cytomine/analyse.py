"""What the Cytomine job and the App Engine task share: find the model bundle by name, run one
slide through inference, keep confident tiles, and write the usual result files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from pathapp.errors import PathappError
from pathapp.results.result import SlideResult

MODELS_ENV = "PATHAPP_MODELS"
DEFAULT_MODELS_DIR = "/models"
# The bundle baked into the image (Dockerfile build argument MODEL_BUNDLE): the task's default model.
DEFAULT_MODEL_ENV = "PATHAPP_DEFAULT_MODEL"
BUNDLE_SUFFIX = ".pathapp"


def models_dir(explicit: str | Path | None = None) -> Path:
    """Where named bundles live: the option, else $PATHAPP_MODELS, else /models (the image's mount)."""
    return Path(explicit or os.environ.get(MODELS_ENV) or DEFAULT_MODELS_DIR)


def resolve_model(name: str | None, folder: Path) -> Path:
    """A bundle path from a name ("tumor" -> folder/tumor.pathapp), a file name in `folder`, or a
    path; no name means the image's baked-in bundle ($PATHAPP_DEFAULT_MODEL)."""
    name = (name or os.environ.get(DEFAULT_MODEL_ENV) or "").strip()
    if not name:
        raise PathappError(f"no model given and no default bundle (${DEFAULT_MODEL_ENV}); give the model input, "
                           "or build the image with --build-arg MODEL_BUNDLE=<bundle in models/>")
    candidates = [Path(name), folder / name, folder / f"{name}{BUNDLE_SUFFIX}"]
    for c in candidates:
        if c.is_file():
            return c
    found = sorted(p.name for p in folder.glob(f"*{BUNDLE_SUFFIX}")) if folder.is_dir() else []
    have = ", ".join(found) if found else "none"
    raise PathappError(
        f"model bundle {name!r} not found in {folder} (available: {have}); mount the bundles folder "
        f"there (docker -v DIR:{DEFAULT_MODELS_DIR}) or set ${MODELS_ENV}"
    )


def keep_confident(result: SlideResult, min_prob: float) -> SlideResult:
    """The result restricted to tiles whose top class probability is at least `min_prob`."""
    if result.probs is None or min_prob <= 0 or len(result) == 0:
        return result
    keep = np.asarray(result.probs).max(axis=1) >= min_prob
    subset: dict[str, Any] = {"coords": result.coords[keep], "probs": result.probs[keep]}
    if result.embeddings is not None:
        subset["embeddings"] = result.embeddings[keep]
    subset["extra"] = {k: np.asarray(v)[keep] for k, v in result.extra.items()}
    subset["params"] = {**result.params, "min_prob": min_prob}
    return dataclasses.replace(result, **subset)


def load_runtime(model: str | None, folder: Path, device: str = "auto") -> Any:
    """The named bundle, built once on `device` (an `infer.Runtime`) for every image of a run."""
    from pathapp.infer import prepare_model
    from pathapp.models.loader import load_model

    path = resolve_model(model, folder)
    return prepare_model(load_model(path), device, name=path.stem)


def analyse_slide(slide: Any, runtime: Any, out_dir: Path, *, mpp: float | None = None,
                  tile_size: int | None = None, rois: Any = None, batch_size: int = 32,
                  min_prob: float = 0.0) -> tuple[SlideResult, list[Path]]:
    """Infer one opened slide with a built model and write its result files into `out_dir`."""
    from pathapp.infer import check_tile_size, infer_slide
    from pathapp.results import write_results

    if tile_size:
        check_tile_size(runtime, tile_size)
    result = infer_slide(slide, runtime.bundle, mpp=mpp, tile_size=tile_size, rois=rois, batch_size=batch_size,
                         runtime=runtime)
    result = keep_confident(result, min_prob)
    return result, write_results(result, out_dir)
