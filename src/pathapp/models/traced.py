"""Inference backbones traced once (TorchScript) and kept in a cache, so that `pathapp infer` builds its
model without importing timm. timm imports torchvision.ops, which imports torch._dynamo: 2-3 s and
~200 MB at every start on a 2-core CPU, more than the model itself takes on a small slide.

A traced backbone is one forward pass (normalised fp32 tiles in, cast inside to the backbone's precision,
embeddings out) at one input size, frozen (weights become constants: a third of the load time of an
unfrozen trace, 0.07 s vs 0.23 s for ViT-S/14). It is traced from the timm model the first time a bundle
runs, checked against it on another batch size, and loaded from then on. The key holds everything that
changes what it computes: the backbone's fingerprint and architecture, the precision, the device, the
versions of torch and pathapp, and the trace's own format.
Delete the folder to clear it; where it cannot be written, runs build the model from timm as before.
TorchScript rather than torch.export: loading an exported program imports torch._dynamo, the very
cost this avoids (torch is pinned, so the TorchScript loader is the one tested here)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from pathapp import __version__
from pathapp.atomic import atomic_path
from pathapp.models.bundle import Bundle, PathModel
from pathapp.models.header import SEG_HEAD_KINDS
from pathapp.models.registry import embed

TRACED_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pathapp" / "traced"
TRACEABLE = ("fp32", "bf16")  # int8's dynamically quantised layers stay eager
TRACE_FORMAT = 2  # what a cached trace takes and holds (2: fp32 input, frozen); part of the key


class _Embedder(nn.Module):
    """What is traced: a backbone's embedding of normalised fp32 tiles (`registry.embed`), cast to the
    backbone's precision inside (a frozen trace has no parameters to read it from)."""

    def __init__(self, backbone: nn.Module, recipe: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.recipe = recipe
        self.dtype = next(backbone.parameters()).dtype

    def forward(self, x: Tensor) -> Tensor:
        return embed(self.backbone, x.to(self.dtype), self.recipe)


def traced_path(bundle: Bundle, fingerprint: str, device: torch.device, precision: str) -> Path | None:
    """Where the bundle's traced backbone lives (None: not traced, e.g. a segmentation bundle, whose
    heads read the backbone's inner layers, or a tile size the backbone resizes its input for)."""
    if device.type != "cpu" or precision not in TRACEABLE or bundle.head_kind in SEG_HEAD_KINDS:
        return None
    if bundle.tile_size != bundle.spec.img_size:
        return None
    key = json.dumps([fingerprint, bundle.spec.to_dict(), precision, device.type, torch.__version__, __version__,
                      TRACE_FORMAT],
                     sort_keys=True, default=str)
    return TRACED_CACHE / f"{bundle.spec.name}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def load_traced(bundle: Bundle, path: Path | None, device: torch.device) -> PathModel | None:
    """The bundle's model around its traced backbone, or None when there is none (or it cannot be read)."""
    if path is None or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": see the module docstring
            backbone = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, OSError, ValueError):  # damaged: built from timm and traced again (`keep_traced`)
        path.unlink(missing_ok=True)
        return None
    return PathModel(backbone, bundle.build_head(), bundle.mean, bundle.std, bundle.recipe).to(device).eval()


def keep_traced(model: PathModel, bundle: Bundle, path: Path | None) -> None:
    """Trace `model`'s backbone as built for inference into `path`, if it gives the same embeddings
    as the model on a batch of another size than the one traced (a trace that fixed the batch would not)."""
    if path is None or path.exists():
        return
    device = next(model.backbone.parameters()).device
    generator = torch.Generator().manual_seed(0)
    example, check = (torch.rand(n, 3, bundle.tile_size, bundle.tile_size, generator=generator).to(device)
                      for n in (1, 3))
    embedder = _Embedder(model.backbone, bundle.recipe).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's shape checks become constants: right for this one input size
        traced = torch.jit.freeze(torch.jit.trace(embedder, example, check_trace=False))
        if not torch.allclose(traced(check).float(), embedder(check).float(), atol=1e-4, rtol=1e-3):
            return
    try:
        with atomic_path(path) as tmp:
            traced.save(str(tmp))
    except OSError:  # a read-only or full cache: the next run builds from timm again
        pass
