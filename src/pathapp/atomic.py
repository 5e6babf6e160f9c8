"""Write a file under a temporary name and rename it when complete, so an interrupted run never
leaves a half-written file that a rerun would mistake for a finished one."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    The temporary name keeps the suffix (some libraries pick the format from it) and starts with
    a dot so that folder listings and globbing for results do not see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.exists():  # some writers (safetensors) create private files; ours follow the umask
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to a temporary sibling and rename it (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """torch.save under a temporary name, then rename: a killed run never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def writer_alive(tmp: Path) -> bool:
    """Whether the process named in an `atomic_path` temporary name still runs here: a sweep of
    leftovers must not delete the files a live (if slow) writer is still writing."""
    found = re.search(r"\.tmp(\d+)", tmp.name)
    return found is not None and pid_alive(int(found.group(1)))


def _umask() -> int:
    """The process's umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


OUTPUT_MARKER = ".pathapp"  # in every folder pathapp writes results into: outputs are never inputs


def mark_output_folder(folder: str | Path) -> Path:
    """Create `folder` and mark it as pathapp's output, so that folder discovery (find_slides) never
    takes its PNGs and TIFFs for slides on the next run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    if not marker.exists():
        atomic_write_text(marker, "pathapp output folder: results, not inputs; pathapp never reads slides here\n")
    return folder


def is_output_folder(folder: str | Path) -> bool:
    return (Path(folder) / OUTPUT_MARKER).is_file()
