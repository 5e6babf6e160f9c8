"""What a `*.pathapp` bundle file is, read from its safetensors header alone, without torch: a run
learns the µm/px, tile size and head kind it will tile with before torch has loaded (infer.planner
plans the first slide's tiles meanwhile). The tensors are models.bundle's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pathapp.errors import PathappError

FORMAT = "pathapp.bundle"
FORMAT_VERSION = 1
SLIDE_HEAD_KINDS: tuple[str, ...] = ("abmil",)
SEG_HEAD_KINDS: tuple[str, ...] = ("seg_linear", "seg_decoder")  # models.seg: patch feature maps -> pixel logits


class BundleError(PathappError):
    """A file that is not a readable pathapp bundle."""


def read_header(path: str | Path) -> dict[str, str]:
    """The bundle's safetensors header (its JSON document under "pathapp", and the backbone's
    "fingerprint" where `save_bundle` recorded it) without reading tensors; BundleError if not a bundle."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such model file; create one with `pathapp model create`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for non-safetensors input
        raise BundleError(f"{path}: not a pathapp bundle (not a safetensors file: {e}); "
                          f"create one with `pathapp model create`") from None
    if header.get("format") != FORMAT:
        raise BundleError(f"{path}: a safetensors file but not a pathapp bundle (no format={FORMAT!r} "
                          f"in its metadata); load it with --weights instead, or create a bundle with "
                          f"`pathapp model create`")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {header['format_version']} is newer than this pathapp "
                          f"reads ({FORMAT_VERSION}); upgrade pathapp")
    return header


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The bundle's JSON document without reading tensors; BundleError if not a bundle."""
    return json.loads(read_header(path)["pathapp"])


def is_bundle(path: str | Path) -> bool:
    try:
        read_metadata(path)
    except BundleError:
        return False
    return True
