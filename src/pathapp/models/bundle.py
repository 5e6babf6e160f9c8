"""The model bundle: one safetensors file (`*.pathapp`) that is enough to run inference.

Layout: tensors `backbone.<timm key>` and `head.<key>`; the safetensors header's `__metadata__`
holds `format` ("pathapp.bundle"), `format_version`, and `pathapp`, a JSON document with the backbone
spec, the head kind/config, class names and colours, preprocessing (µm/px, tile size, mean/std,
embedding recipe) and provenance. No pickle, one file, memory-mappable.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pathapp.atomic import atomic_path
from pathapp.errors import one_line
from pathapp.models.header import (FORMAT, FORMAT_VERSION, SEG_HEAD_KINDS, SLIDE_HEAD_KINDS, BundleError, is_bundle,
                                   read_header)
from pathapp.models.heads import Head, build_head, head_state
from pathapp.models.registry import DEFAULT_MPP, DEFAULT_TILE_SIZE, BackboneSpec, create_backbone, embed

BUNDLE_SUFFIX = ".pathapp"

# Distinct, readable on H&E; the first ones match QuPath's usual tumour/stroma/immune colours.
PALETTE: list[tuple[int, int, int]] = [
    (200, 0, 0), (150, 200, 150), (160, 90, 160), (50, 50, 50), (0, 128, 255),
    (255, 200, 0), (0, 200, 200), (255, 128, 0), (128, 64, 0), (255, 0, 255),
]


def default_colors(n: int) -> list[tuple[int, int, int]]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


@dataclass
class Bundle:
    """A backbone spec + weights, an optional head, classes and preprocessing."""

    spec: BackboneSpec
    backbone_state: dict[str, Tensor]
    head_kind: str | None = None
    head_config: dict[str, Any] = field(default_factory=dict)
    head_tensors: dict[str, Tensor] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    class_colors: list[tuple[int, int, int]] = field(default_factory=list)
    mpp: float = DEFAULT_MPP
    tile_size: int = DEFAULT_TILE_SIZE
    mean: tuple[float, float, float] | None = None  # None: the spec's
    std: tuple[float, float, float] | None = None
    recipe: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # (the tensors read from a file, the preprocessing then, the fingerprint its header records): see
    # fingerprint(). `dataclasses.replace` carries it; it holds only while tensors and preprocessing do.
    _recorded: tuple[weakref.ref, tuple[Any, ...], str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mean = tuple(self.mean or self.spec.mean)  # type: ignore[assignment]
        self.std = tuple(self.std or self.spec.std)  # type: ignore[assignment]
        self.recipe = self.recipe or self.spec.recipe
        self.class_colors = [tuple(int(v) for v in c) for c in self.class_colors]  # type: ignore[misc]
        if self.class_names and not self.class_colors:
            self.class_colors = default_colors(len(self.class_names))
        if len(self.class_colors) != len(self.class_names):
            raise BundleError(f"{len(self.class_names)} class names but {len(self.class_colors)} colours")
        patch = int(self.spec.patch_size)
        if self.tile_size % patch:  # timm's patch embedding asserts on it, on every slide
            lo = max(patch, self.tile_size // patch * patch)
            raise BundleError(f"tile size {self.tile_size} px is not a multiple of {self.spec.name}'s {patch} px "
                              f"patches; use --tile-size {lo} or {lo + patch}")
        if self.head_kind:
            n = int(self.head_config.get("num_classes", len(self.class_names)))
            if self.class_names and n != len(self.class_names):
                raise BundleError(f"the head predicts {n} classes but {len(self.class_names)} names were given")

    @classmethod
    def from_model(
        cls,
        backbone: nn.Module,
        spec: BackboneSpec,
        head: Head | None = None,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Bundle:
        """A bundle of a live backbone (+ head); kwargs are the remaining Bundle fields."""
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        kind, config, tensors = head_state(head) if head is not None else (None, {}, {})
        kwargs.setdefault("tile_size", spec.img_size)
        if head is not None and not class_names:
            class_names = [f"Class {i + 1}" for i in range(head.num_classes)]
        return cls(spec=spec, backbone_state=state, head_kind=kind, head_config=config, head_tensors=tensors,
                   class_names=list(class_names or []), **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_head(self) -> bool:
        return self.head_kind is not None

    @property
    def task(self) -> str | None:
        """What the head predicts: "classification", "segmentation" (a models.seg head), or for a slide
        head "survival" / "regression" (heads.SLIDE_TASKS); None without a head."""
        return str(self.head_config.get("task", "classification")) if self.head_kind else None

    @property
    def embedding_dim(self) -> int:
        return self.spec.embed_dim * (2 if self.recipe == "cls+mean" else 1)

    def metadata(self) -> dict[str, Any]:
        """The JSON document stored in the file header (also what `pathapp model info` prints)."""
        return {
            "backbone": self.spec.to_dict(),
            "head": {"kind": self.head_kind, "config": self.head_config} if self.head_kind else None,
            "task": self.task,
            "classes": [{"name": n, "color": list(c)} for n, c in zip(self.class_names, self.class_colors)],
            "preprocessing": {"mpp": self.mpp, "tile_size": self.tile_size, "mean": list(self.mean),
                              "std": list(self.std), "recipe": self.recipe, "input": "RGB float 0..1 or uint8"},
            "embedding_dim": self.embedding_dim,
            "provenance": self.provenance,
        }

    def build_head(self) -> Head | None:
        return build_head(self.head_kind, self.head_config, self.head_tensors) if self.head_kind else None

    def build_backbone(self, **build_kwargs: Any) -> nn.Module:
        """The backbone with the bundle's weights; `build_kwargs` go to timm (e.g. drop_path_rate)."""
        # Built on the meta device (no random init: it cost more than the whole model stage of a small
        # slide), then filled with copies of the bundle's tensors. A model with non-persistent buffers
        # (not in the state dict) is built for real, since those buffers would stay empty.
        with torch.device("meta"):
            model = create_backbone(self.spec, **build_kwargs)
        assign = not set(dict(model.named_buffers())) - set(model.state_dict())
        if not assign:
            model = create_backbone(self.spec, **build_kwargs)
        state = {k: v.clone() for k, v in self.backbone_state.items()} if assign else self.backbone_state
        try:
            model.load_state_dict(state, strict=True, assign=assign)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise BundleError(f"bundle weights do not fit its backbone spec {self.spec.name!r}: "
                              f"{' '.join(first[:3])[:300]}") from None
        return model.eval()

    def fingerprint(self) -> str:
        """sha256 over the backbone tensors and everything that changes what an embedding means, so
        cached or written embeddings are reused only with the model that made them. A bundle read
        from a file takes it from the file's header (`save_bundle` writes it with the tensors) while
        it holds the tensors and preprocessing it was read with: hashing them at every start cost
        more than loading the traced model (88 MB for ViT-S/14, 4.5 GB for ViT-g/14)."""
        import hashlib

        if self._recorded is not None:
            tensors, preprocessing, value = self._recorded
            if tensors() is self.backbone_state and preprocessing == self._preprocessing():
                return value
        h = _hash_tensors(hashlib.sha256(), self.backbone_state)
        h.update(repr(self._preprocessing()).encode())
        return h.hexdigest()

    def record_fingerprint(self, value: str) -> None:
        """Take `value` (a file's or a cache's record) as `fingerprint()` while the bundle holds the
        tensors and preprocessing it holds now. The tensors must be weakly referable (not a plain dict)."""
        self._recorded = (weakref.ref(self.backbone_state), self._preprocessing(), value)

    def _preprocessing(self) -> tuple[Any, ...]:
        return self.recipe, tuple(self.mean), tuple(self.std), self.tile_size

    def head_fingerprint(self) -> str:
        """sha256 over the head (kind, config, tensors) and its classes and colours: with
        `fingerprint()`, everything in the bundle that decides a slide's results."""
        import hashlib

        h = _hash_tensors(hashlib.sha256(), self.head_tensors)
        h.update(json.dumps([self.head_kind, self.head_config, self.class_names, self.class_colors],
                            sort_keys=True, default=str).encode())
        return h.hexdigest()

    def build(self, device: str | torch.device = "cpu") -> PathModel:
        """The runnable model (eval mode) on `device`."""
        return PathModel(self.build_backbone(), self.build_head(), self.mean, self.std, self.recipe).to(device).eval()


def _hash_tensors(h: Any, state: dict[str, torch.Tensor]) -> Any:
    """Feed named tensors into a hashlib object in name order (bytes exactly as stored)."""
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(memoryview(t.view(-1).view(dtype=torch.uint8).numpy()))  # no copy of the weights
    return h


class PathModel(nn.Module):
    """Backbone + normalisation + optional head.

    forward(x) takes RGB images (B, 3, H, W), float in 0..1 or uint8 0..255 (normalised inside with
    the bundle's mean/std) and returns (embeddings (B, D), probabilities (B, C) or None). A slide
    head (abmil) is not applied per tile: run `slide_head(embeddings)` on the slide's bag. A
    segmentation head gives per-pixel logits through `segment(x)`.
    """

    def __init__(self, backbone: nn.Module, head: Head | None, mean: Any, std: Any, recipe: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.recipe = recipe
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def tile_head(self) -> Head | None:
        return self.head if self.head is not None and self.head.kind not in SLIDE_HEAD_KINDS + SEG_HEAD_KINDS else None

    @property
    def slide_head(self) -> Head | None:
        return self.head if self.head is not None and self.head.kind in SLIDE_HEAD_KINDS else None

    @property
    def seg_head(self) -> Head | None:
        return self.head if self.head is not None and self.head.kind in SEG_HEAD_KINDS else None

    def segment(self, x: Tensor) -> Tensor:
        """(B, C, H, W) class logits per pixel of RGB images x (a segmentation bundle)."""
        from pathapp.models.seg import segment_logits

        dtype = next(self.backbone.parameters()).dtype  # bf16 when built for --precision bf16 / auto
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return segment_logits(self.backbone, self.seg_head, self.normalize(x).to(dtype)).float()

    def normalize(self, x: Tensor) -> Tensor:
        """RGB uint8 or float 0..1 -> the backbone's input (the bundle's mean/std)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        return (x.to(self.mean.dtype) - self.mean) / self.std  # in fp32 whatever the backbone runs at

    def embed(self, x: Tensor) -> Tensor:
        if isinstance(self.backbone, torch.jit.ScriptModule):  # traced (models.traced): it casts and embeds itself
            with torch.jit.optimized_execution(False):  # a frozen graph of aten ops: no profiling runs first
                return self.backbone(self.normalize(x))
        return embed(self.backbone, self.normalize(x).to(next(self.backbone.parameters()).dtype), self.recipe)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        e = self.embed(x)
        head = self.tile_head
        return e, (head(e.float()) if head is not None else None)


def pool_tiles(embeddings: np.ndarray) -> np.ndarray:
    """An image's embedding: the mean of its tiles' embeddings. Train, evaluate and infer pool an image
    this one way, so a head trained on images predicts the same for an image wherever it runs."""
    return np.asarray(embeddings, np.float32).mean(0)


def image_level(bundle: Bundle) -> bool:
    """Whether the bundle's tile head was trained on whole labelled images (pooled tiles): then
    `infer` reports its prediction for the pooled tiles of each input too."""
    if bundle.head_kind is None:
        return False
    record = bundle.provenance.get("training") or bundle.provenance.get("source_provenance", {}).get("training")
    return (record or {}).get("unit") == "image"  # (models.loader keeps a loaded file's own under source_provenance)


def _to_tensors(bundle: Bundle) -> dict[str, Tensor]:
    tensors = {f"backbone.{k}": v for k, v in bundle.backbone_state.items()}
    tensors.update({f"head.{k}": v for k, v in bundle.head_tensors.items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def check_bundle_out(path: str | Path) -> Path:
    """`path`, where a bundle may be written: nothing there, or a bundle (replaced). Anything else (a
    labels.csv given as --out by mistake) is refused in one line, so no file of the user's is lost;
    callers check before long work too."""
    path = Path(path)
    if path.exists() and not is_bundle(path):
        raise BundleError(f"{path}: exists and is not a pathapp bundle, so it is left as it is; give --out a new "
                          f"file name (e.g. model.pathapp)")
    return path


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write the bundle atomically (temp name, then rename) where `check_bundle_out` allows. Returns
    the path."""
    from safetensors.torch import save_file

    path = check_bundle_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "created" not in bundle.provenance:
        bundle.provenance["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    from pathapp import __version__

    bundle.provenance.setdefault("pathapp_version", __version__)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "pathapp": json.dumps(bundle.metadata()),
            "fingerprint": bundle.fingerprint()}
    with atomic_path(path) as tmp:
        try:
            save_file(_to_tensors(bundle), str(tmp), metadata=meta)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own SafetensorError
            raise BundleError(f"{path}: cannot be written ({one_line(e)}); free disk space there or give "
                              f"another --out") from None
    return path


def load_bundle(path: str | Path) -> Bundle:
    """Read a `*.pathapp` file; BundleError naming the file if it is not one."""
    from safetensors.torch import load_file

    header = read_header(path)
    meta = json.loads(header["pathapp"])
    tensors = load_file(str(path))
    backbone = _Tensors((k.removeprefix("backbone."), v) for k, v in tensors.items() if k.startswith("backbone."))
    head_tensors = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    pre, head = meta["preprocessing"], meta.get("head") or {}
    bundle = Bundle(
        spec=BackboneSpec.from_dict(meta["backbone"]),
        backbone_state=backbone,
        head_kind=head.get("kind"),
        head_config=head.get("config", {}),
        head_tensors=head_tensors,
        class_names=[c["name"] for c in meta.get("classes", [])],
        class_colors=[tuple(c["color"]) for c in meta.get("classes", [])],
        mpp=float(pre["mpp"]),
        tile_size=int(pre["tile_size"]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        recipe=pre["recipe"],
        provenance=meta.get("provenance", {}),
    )
    if "fingerprint" in header:  # bundles written before pathapp recorded it are hashed when asked
        bundle.record_fingerprint(header["fingerprint"])
    return bundle


class _Tensors(dict):
    """A bundle file's backbone tensors: a dict that can be weakly referenced, so a recorded
    fingerprint never keeps tensors alive that the bundle has let go of (`infer.planner` does)."""
