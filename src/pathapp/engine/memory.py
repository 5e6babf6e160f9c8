"""How many images a training step may take: measured on the machine it runs on, not guessed.

Two probe steps (forward and backward at two small batch sizes) give the step's fixed memory and its
memory per image; the batch is then the largest power of two (up to the default) whose peak stays
inside the budget: MEMORY_SHARE of the machine's RAM on a CPU (shared by the processes of a node),
DEVICE_SHARE of a GPU's memory. A batch size the user asks for is checked the same way and refused
with the largest that fits. Pretraining (`ssl`) and LoRA fine-tuning (`train`) both use this."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pathapp.engine.distributed import dist_env
from pathapp.errors import PathappError

MEMORY_SHARE = 0.45  # of a machine's RAM for one training process's peak (DataLoader workers need the rest)
DEVICE_SHARE = 0.9  # of a GPU's memory
_GIB = 2**30


@dataclass(frozen=True)
class BatchFit:
    """What the probe found: bytes the step needs whatever the batch, bytes per image, the budget and
    the largest batch inside it."""

    fixed: float
    per_image: float
    budget: float
    largest: int

    def need(self, batch: int) -> float:
        return self.fixed + self.per_image * batch

    def describe(self, batch: int) -> str:
        return f"about {self.need(batch) / _GIB:.1f} GiB at peak of the {self.budget / _GIB:.1f} GiB allowed"


def memory_budget(device: torch.device) -> float:
    """Bytes one training process may use at peak on `device`."""
    if device.type == "cuda":
        return DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
    import psutil

    return MEMORY_SHARE * psutil.virtual_memory().total / max(1, dist_env().local_world_size)


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc), so a probe's peak is not hidden by memory
    the previous one freed but the allocator kept."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _peak_rss(run: Callable[[], None]) -> float:
    """Peak resident bytes of this process while `run` runs (Linux resets the high-water mark
    through /proc/self/clear_refs; elsewhere the RSS is sampled)."""
    import gc

    gc.collect()
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if sys.platform.startswith("linux") and clear.exists():
        _trim()
        clear.write_text("5")
        run()
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        return float(line.split()[1]) * 1024
    import threading

    import psutil

    proc, peak, done = psutil.Process(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(peak[0], proc.memory_info().rss)


def peak_memory(run: Callable[[], None], device: torch.device) -> float:
    """Peak bytes in use on `device` (process RSS on a CPU, allocated memory on a GPU) during `run`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    return _peak_rss(run)


def probe(step: Callable[[int], None], device: torch.device, *, smallest: int = 2,
          state_bytes: float = 0.0, image_bytes: float = 1.0) -> BatchFit:
    """Run `step(b)` (one forward and backward of b images, leaving no gradients behind) at b =
    `smallest` and 2 × `smallest`; `state_bytes` is memory the real step adds that the probe does
    not allocate (the optimiser's moments); `image_bytes`, what one image's input tensors take, is
    the least an image can cost (a floor under measurement noise)."""
    low = peak_memory(lambda: step(smallest), device)
    high = peak_memory(lambda: step(2 * smallest), device)
    per = max((high - low) / smallest, image_bytes)
    fixed = max(low - per * smallest, 0.0) + state_bytes
    budget = memory_budget(device)
    return BatchFit(fixed, per, budget, max(0, int((budget - fixed) // per)))


def choose_batch(fit: BatchFit, requested: int | None, default: int, *, smallest: int, what: str,
                 fix: str) -> int:
    """`requested` when it fits (else one line naming the largest that does), or without one the
    largest power of two up to `default` that fits. `fix` says what else lowers memory."""
    if requested is not None:
        if requested > fit.largest:
            fits = (f"the largest that fits is --batch-size {fit.largest}" if fit.largest >= smallest
                    else f"not even --batch-size {smallest} fits")
            raise PathappError(f"{what}: --batch-size {requested} needs {fit.describe(requested)}; {fits} "
                               f"({fix})")
        return requested
    if fit.largest < smallest:
        raise PathappError(f"{what}: even a batch of {smallest} needs {fit.describe(smallest)}; {fix}, "
                           f"or use a machine with more memory")
    return min(default, 2 ** int(math.log2(fit.largest)))
