"""The one way to turn a model source into something that runs: a bundle file, or a registry backbone
name with weights (a checkpoint file in any layout, a bundle, or the hub), becomes a `Bundle`.

Inference, training, pretraining and `pathapp model create` all come through here, so a backbone is
built once, the defaults (model, µm/px, tile size) live in one place, and every bundle records where
its weights came from under the same provenance key, "weights". Light at import (no torch), so the
CLI can read the defaults without loading a model library.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathapp.errors import PathappError
from pathapp.models.registry import (DEFAULT_MODEL, DEFAULT_MPP, DEFAULT_TILE_SIZE, BackboneSpec, list_backbones,
                                     resolve_spec)

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathapp.models.bundle import Bundle

__all__ = ["DEFAULT_MODEL", "DEFAULT_MPP", "DEFAULT_TILE_SIZE", "ModelSourceError", "create_bundle",
           "load_backbone", "load_model", "model_label"]


class ModelSourceError(PathappError):
    """A model source that names nothing pathapp can load."""


def _bundle_file(path: str | Path | None) -> bool:
    from pathapp.models.header import is_bundle

    return path is not None and Path(path).is_file() and is_bundle(path)


def _check_same_backbone(bundle: Bundle, name: str | BackboneSpec | None, path: str | Path) -> None:
    """A bundle given as weights carries its own backbone; a different --backbone is a mistake."""
    if name is not None and resolve_spec(name).name != bundle.spec.name:
        raise ModelSourceError(f"{path}: a {bundle.spec.name} bundle, not {resolve_spec(name).name}; "
                               f"fix --backbone or drop it")


def load_backbone(
    name: str | BackboneSpec | None = None,
    weights: str | Path | None = None,
    *,
    drop_path_rate: float | None = None,
    **overrides: Any,
) -> tuple[nn.Module, BackboneSpec]:
    """(backbone in eval mode, its spec), built once and filled from `weights`.

    `weights`: None = the hub (cache honoured, HF_HUB_OFFLINE respected), a checkpoint file in any
    layout `models.weights` reads, or a bundle (then `name` may be None). `overrides` change the
    spec (tests: depth=2, ...); `drop_path_rate` is for training only and is not part of the spec."""
    from pathapp.models.registry import create_backbone

    build = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    if _bundle_file(weights):
        from pathapp.models.bundle import load_bundle

        bundle = load_bundle(weights)
        _check_same_backbone(bundle, name, weights)
        if overrides and resolve_spec(name or bundle.spec).replace(**overrides) != bundle.spec:
            raise ModelSourceError(f"{weights}: the bundle's {bundle.spec.name} is another architecture than the "
                                   f"one asked for ({overrides}); use a bundle of that architecture")
        return bundle.build_backbone(**build), bundle.spec
    if name is None:
        raise ModelSourceError(f"{weights}: not a pathapp bundle, so the backbone must be named (--backbone)")
    from pathapp.models.weights import hub_weights_file, load_weights_into, read_state_dict

    spec = resolve_spec(name)
    spec = spec.replace(**overrides) if overrides else spec
    path = Path(weights) if weights is not None else hub_weights_file(spec)
    model = create_backbone(spec, **build)
    load_weights_into(model, read_state_dict(path), path, spec)
    return model.eval(), spec


def load_model(
    model: str | Path | None = DEFAULT_MODEL,
    *,
    weights: str | Path | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    head: bool = True,
) -> Bundle:
    """A Bundle from any model source.

    `model`: a `.pathapp` bundle file, or a registry backbone name whose weights come from `weights`
    (checkpoint file, bundle of that backbone, or None for the hub); None when `weights` is a bundle.
    `mpp` and `tile_size` replace the bundle's preprocessing (a new backbone gets DEFAULT_MPP and its
    input size); `head=False` keeps only the backbone and preprocessing (a base to train on)."""
    from pathapp.models.bundle import load_bundle

    if model is not None and Path(model).is_file():
        if weights is not None:
            raise ModelSourceError(f"{model}: a bundle carries its own weights; drop --weights, or give a "
                                   f"backbone name to --model")
        bundle = load_bundle(model)
        bundle.provenance = {"weights": str(model), "source_provenance": bundle.provenance}
    elif model is not None and Path(model).is_dir() and str(model) not in list_backbones():
        raise ModelSourceError(_folder_not_model(Path(model)))
    elif model is not None and (Path(model).suffix or os.sep in str(model)):
        raise ModelSourceError(f"{model}: no such model file; give a .pathapp bundle or a backbone name "
                               f"(see `pathapp model list`)")
    elif _bundle_file(weights):
        bundle = load_bundle(weights)
        _check_same_backbone(bundle, model, weights)
        bundle.provenance = {"weights": str(weights), "source_provenance": bundle.provenance}
    else:
        if model is None:
            raise ModelSourceError("name the backbone with --backbone (see `pathapp model list`)")
        bundle = _checkpoint_bundle(model, weights)
    if not head:
        bundle = dataclasses.replace(bundle, head_kind=None, head_config={}, head_tensors={}, class_names=[],
                                     class_colors=[])
    return dataclasses.replace(  # re-runs the consistency checks of Bundle.__post_init__
        bundle, mpp=float(mpp) if mpp is not None else bundle.mpp,
        tile_size=int(tile_size) if tile_size is not None else bundle.tile_size)


def _checkpoint_bundle(name: str | BackboneSpec, weights: str | Path | None) -> Bundle:
    """A headless bundle of backbone `name` with a checkpoint file's weights (None: the hub's).
    Converting a checkpoint takes timm, whose imports (torchvision, torch._dynamo) cost 1-2 s and
    ~160 MiB at every start. So the fingerprint of a converted file's weights is kept beside the
    traced backbones under the file's identity: later runs take it from there, find their trace
    without timm, and convert again only if they read the weights (`_ConvertedWhenRead`)."""
    from pathapp.atomic import atomic_write_text
    from pathapp.models.bundle import Bundle
    from pathapp.models.weights import hub_weights_file

    spec = resolve_spec(name)
    path = Path(weights) if weights is not None else hub_weights_file(spec)
    provenance = {"weights": str(weights) if weights else f"hub:{spec.hub_repo}"}
    bundle = Bundle(spec=spec, backbone_state=_ConvertedWhenRead(spec, path),  # type: ignore[arg-type]
                    mpp=DEFAULT_MPP, tile_size=spec.img_size, provenance=provenance)
    record = _conversion_record(spec, path)
    try:
        fingerprint = json.loads(record.read_text())["fingerprint"] if record is not None else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: converted (again)
        fingerprint = None
    if not fingerprint:
        fingerprint = bundle.fingerprint()  # converts the file here, so a bad one fails now
        if record is not None:
            try:
                atomic_write_text(record, json.dumps({"fingerprint": fingerprint, "weights": str(path)}))
            except OSError:  # a read-only cache: converted again next time
                pass
    bundle.record_fingerprint(fingerprint)
    return bundle


def _conversion_record(spec: BackboneSpec, path: Path) -> Path | None:
    """Where the fingerprint of `path` converted to `spec` is kept, keyed by the file's identity (real
    path, size, inode, modification and change times: rewriting a file changes its change time), the
    spec and pathapp's version. None if there is no such file."""
    import hashlib

    from pathapp import __version__
    from pathapp.models.traced import TRACED_CACHE

    try:
        real = path.resolve()
        st = real.stat()
    except OSError:
        return None
    key = json.dumps([str(real), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, spec.to_dict(), __version__],
                     sort_keys=True, default=str)
    return TRACED_CACHE / "checkpoints" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


class _ConvertedWhenRead(Mapping):
    """A checkpoint's backbone tensors in timm's names, converted (by timm) when first read."""

    def __init__(self, spec: BackboneSpec, path: Path) -> None:
        self._spec, self._path = spec, path
        self._state: dict[str, Tensor] | None = None

    def _tensors(self) -> dict[str, Tensor]:
        if self._state is None:
            from pathapp.models.bundle import Bundle

            self._state = Bundle.from_model(*load_backbone(self._spec, self._path)).backbone_state
        return self._state

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors())

    def __len__(self) -> int:
        return len(self._tensors())


def planned_preprocessing(model: str | Path | None = DEFAULT_MODEL, *, weights: str | Path | None = None,
                          mpp: float | None = None, tile_size: int | None = None) -> tuple[float, int, str | None] | None:
    """(µm/px, tile size, head kind) of the bundle `load_model` will return for these arguments, read
    without torch from a bundle's header or the registry; None where only loading can tell (a bad source)."""
    from pathapp.models.header import read_metadata

    try:
        if model is not None and Path(model).is_file():
            meta = read_metadata(model)
        elif _bundle_file(weights):
            meta = read_metadata(weights)
        else:
            meta = {"preprocessing": {"mpp": DEFAULT_MPP, "tile_size": resolve_spec(model).img_size}}
    except (PathappError, TypeError):
        return None
    pre = meta["preprocessing"]
    return (float(pre["mpp"] if mpp is None else mpp), int(pre["tile_size"] if tile_size is None else tile_size),
            (meta.get("head") or {}).get("kind"))


def _folder_not_model(folder: Path) -> str:
    """Why a folder is no model, naming the bundle inside it when there is one (a pretraining run's
    teacher.pathapp is the usual one)."""
    inside = sorted(folder.glob("*.pathapp"))
    fix = f"give the bundle file, e.g. --model {inside[0]}" if inside else \
        "give a .pathapp bundle file or a backbone name (see `pathapp model list`)"
    return f"{folder}: a folder, not a model; {fix}"


def model_label(model: str | Path) -> str:
    """How run.json names a model source: the bundle's file name, or the backbone's registry name."""
    p = Path(model)
    return p.name if p.is_file() else resolve_spec(str(model)).name


def create_bundle(
    out: str | Path,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    head: str | Path | None = None,
    class_names: list[str] | None = None,
    class_colors: list[tuple[int, int, int]] | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
) -> Path:
    """What `pathapp model create` does: a backbone (+ weights) and an optional head, as one file.

    `weights` may itself be a bundle (e.g. a pretraining teacher): its backbone, preprocessing and,
    unless `head` replaces it, its head are kept. `head` is a head file (heads.read_head_file) or a
    bundle whose head is taken."""
    from pathapp.models.bundle import BundleError, load_bundle, save_bundle
    from pathapp.models.heads import read_head_file

    bundle = load_model(backbone, weights=weights, mpp=mpp, tile_size=tile_size)
    if head is not None:
        if _bundle_file(head):
            donor = load_bundle(head)
            kind, config, tensors, names = donor.head_kind, donor.head_config, donor.head_tensors, donor.class_names
            if kind is None:
                raise BundleError(f"{head}: this bundle has no head to take")
        else:
            kind, config, tensors, names = read_head_file(head)
        if int(config["in_dim"]) != bundle.embedding_dim:
            raise BundleError(f"{head}: the head takes {config['in_dim']}-d embeddings but {bundle.spec.name} "
                              f"with recipe {bundle.recipe} gives {bundle.embedding_dim}-d; use the backbone it "
                              f"was trained on")
        bundle.head_kind, bundle.head_config, bundle.head_tensors = kind, dict(config), dict(tensors)
        bundle.class_names = list(names or [f"Class {i + 1}" for i in range(int(config["num_classes"]))])
        bundle.class_colors = []
        bundle.provenance["head"] = str(head)
    if class_names is not None:
        bundle.class_names, bundle.class_colors = list(class_names), []
    if class_colors is not None:
        bundle.class_colors = list(class_colors)
    return save_bundle(dataclasses.replace(bundle), out)  # replace re-runs the consistency checks
