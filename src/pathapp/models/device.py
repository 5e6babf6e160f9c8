"""Where a model runs, decided once for inference and training alike."""

from __future__ import annotations

import os

import torch

from pathapp.errors import PathappError


class DeviceError(PathappError):
    """A --device this machine does not have."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' = this rank's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU. A named
    device must exist here: `cuda` without a GPU or `cuda:3` on a two-GPU machine fails in one line."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"--device {device}: this machine has no CUDA GPU that torch can use; "
                              f"use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise DeviceError(f"--device {device}: no such device on this machine; use --device cpu (or auto)")
