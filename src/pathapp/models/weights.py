"""Backbone weights from the hub or from a local file, whatever layout the file uses (a bundle given
as weights is `models.loader`'s business).

Layouts recognised from the keys (not the file name):
- timm state dicts (.pth/.pt/.bin/.safetensors), bare or wrapped ({"model"|"state_dict"|"teacher"|...})
  and prefixed (`module.`, `backbone.`, `teacher.backbone.`, `_orig_mod.` ...);
- the official facebookresearch DINOv2 checkpoints (`mask_token`, `register_tokens`, `blocks.N.ls1.gamma`,
  SwiGLU `w12`/`w3`, chunked `blocks.C.N.`), including its training checkpoints (teacher preferred);
- Hugging Face transformers `Dinov2Model` weights (`embeddings.*`, `encoder.layer.N.*`), as Midnight ships.
The last two are renamed to the official layout, then timm's own `checkpoint_filter_fn` does the
DINOv2 -> timm conversion and resamples position embeddings to the model's grid.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathapp.errors import PathappError
from pathapp.models.registry import BackboneSpec

if TYPE_CHECKING:
    from torch import Tensor, nn

HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("teacher", "model_ema", "state_dict", "model", "module", "student")
_ANCHORS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")


class WeightsError(PathappError):
    """A weights file that cannot be read or does not fit the chosen backbone."""


class HubUnavailableError(WeightsError):
    """Hub weights are not reachable (offline, no cache, gated, no network)."""


def _hf_cache_dir() -> Path:
    """The hub cache as the environment says now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host resolves and accepts a connection: checked once up front, so an
    air-gapped machine gets the --weights message at once instead of a minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_weights_file(spec: BackboneSpec) -> Path:
    """Local path of the spec's hub weights: from the cache, or downloaded when online."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError)

    if not spec.hub_repo:
        raise HubUnavailableError(f"backbone {spec.name!r} has no hub weights; pass --weights FILE")
    offline, cache = _offline(), _hf_cache_dir()
    for filename in HUB_FILENAMES:  # a cached file needs no network, whichever name the repo uses
        cached = try_to_load_from_cache(spec.hub_repo, filename, cache_dir=cache)
        if isinstance(cached, str):
            return Path(cached)
    problem = "offline (HF_HUB_OFFLINE=1) and not in the cache"
    if not offline and not _hub_reachable():
        offline, problem = True, "not in the cache, and the hub cannot be reached (no network)"
    if not offline:
        for filename in HUB_FILENAMES:
            try:
                return Path(hf_hub_download(spec.hub_repo, filename, cache_dir=cache))
            except GatedRepoError:
                raise HubUnavailableError(
                    f"{spec.hub_repo} is gated: request access on huggingface.co and log in (`hf auth login`), "
                    f"or pass --weights FILE") from None
            except RepositoryNotFoundError:
                raise HubUnavailableError(f"{spec.hub_repo} not found on the hub (or private); "
                                          f"pass --weights FILE") from None
            except LocalEntryNotFoundError as e:  # no network: the other name would fail the same way
                problem = f"not downloadable ({' '.join(str(e).split())[:160]})"
                break
            except RemoteEntryNotFoundError:
                continue  # this repo ships the other file name
    raise HubUnavailableError(
        f"weights for {spec.name} ({spec.hub_repo}) are {problem}; cache {cache}; "
        f"pass --weights FILE with a local checkpoint")


def why_unreadable(e: BaseException) -> str:
    """Why torch or safetensors could not read a file, in one whole sentence: torch's own messages
    about refused pickles run to paragraphs, and cut short they stop mid-sentence."""
    import pickle

    text = " ".join(str(e).split())
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
    if found or isinstance(e, pickle.UnpicklingError):
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds pickled Python code{what} besides tensors, which pathapp never runs; re-save it with "
                f"tensors only (torch.save(model.state_dict(), path)) or as .safetensors")
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped and with the backbone's prefix removed."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors" or path.suffix == ".pathapp":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # each reader raises its own types; all mean "not a checkpoint we read"
        raise WeightsError(f"{path}: not a readable checkpoint (.pth/.bin/.safetensors with tensors only): "
                           f"{why_unreadable(e)}") from None
    state = _unwrap(obj)
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    return _strip_prefix(state)


def _unwrap(obj: Any) -> dict[str, Tensor]:
    import torch

    while isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if any(k.endswith(a) for k in tensors for a in _ANCHORS):
            return tensors
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            return tensors
        obj = inner
    return {}


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the one backbone in the file (the teacher's if both) and drop its key prefix."""
    prefixes = {k[: -len(a)] for k in state for a in _ANCHORS if k.endswith(a)}
    if not prefixes:
        return state
    prefix = min(prefixes, key=lambda p: ("teacher" not in p, len(p)))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers Dinov2Model names -> official DINOv2 names (q, k, v fused into qkv)."""
    import torch

    renames = [
        (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."), (r"\.attention\.output\.dense\.", ".attn.proj."),
        (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"), (r"\.mlp\.weights_in\.", ".mlp.w12."),
        (r"\.mlp\.weights_out\.", ".mlp.w3."), (r"^layernorm\.", "norm."),
    ]
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", key)
        if m:
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = value
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    out.setdefault("mask_token", torch.zeros(1, out["cls_token"].shape[-1]))  # marks the DINOv2 layout
    return out


def to_timm_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename any supported layout to the model's timm keys and resample position embeddings."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if "embeddings.patch_embeddings.projection.weight" in state:
        state = _from_transformers(state)
    if any(re.match(r"^blocks\.\d+\.\d+\.", k) for k in state):  # DINOv2 block_chunks: blocks.<chunk>.<i>.
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    state = dict(checkpoint_filter_fn(dict(state), model))
    # A classifier is not part of the backbone (models are built with num_classes=0).
    return {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _mismatch(state: dict[str, Tensor], own: dict[str, Tensor]) -> str:
    """'missing keys: ...; unexpected keys: ...; shape mismatch: ...' (empty when all fit)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    parts = [f"missing keys: {_first(missing)}" if missing else "",
             f"unexpected keys: {_first(unexpected)}" if unexpected else "",
             f"shape mismatch: {_first(shapes, 3)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def load_weights_into(model: nn.Module, state: dict[str, Tensor], path: str | Path,
                      spec: BackboneSpec | None = None) -> None:
    """Convert `state` to timm keys and load it strictly; WeightsError naming what does not fit."""
    what = f"backbone {spec.name} ({spec.timm_name})" if spec else type(model).__name__
    own = model.state_dict()
    hint = ". Check --backbone (and that the file is a backbone checkpoint)"
    try:
        converted = to_timm_state(state, model)
    except Exception as e:  # timm's resampling trips on grids of another architecture
        keys = _mismatch({k: v for k, v in state.items() if k != "pos_embed"},
                         {k: v for k, v in own.items() if k != "pos_embed"})
        raise WeightsError(f"{path}: does not match {what}; {keys or str(e).splitlines()[0][:200]}{hint}") from None
    problem = _mismatch(converted, own)
    if problem:
        raise WeightsError(f"{path}: does not match {what}; {problem}{hint}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in converted.items()}, strict=True)
