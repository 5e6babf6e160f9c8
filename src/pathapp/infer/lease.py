"""Dynamic work sharing between processes that share an output folder (torchrun ranks, Slurm array
tasks, several `pathapp infer` commands): a process claims a slide by writing a lease file into the
slide's output folder and keeps it alive with a heartbeat (the file's mtime). Another process takes a
lease over only when it has expired (no heartbeat for `ttl` seconds) or, on the same host, when its
owner's pid is gone. A big slide or a dead node therefore never stalls the rest.

Claims are decided under an flock on a sibling `.lease.lock`, so two processes never both win the
same slide; the lease itself is written under a temporary name and renamed (atomic on POSIX and NFS)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pathapp.atomic import pid_alive
from pathapp.results import is_done

LEASE = ".lease"
LOCK = ".lease.lock"
DEFAULT_TTL_S = 120.0  # a lease without a heartbeat for this long is taken over


@dataclass
class Lease:
    """A held claim on one output folder; `lost` turns true if another process took it over."""

    path: Path
    token: str
    ttl: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _lost: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set() or not self._owned()

    def _owned(self) -> bool:
        return _read(self.path).get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if not self._owned():
                self._lost.set()
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path.parent.name}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _locked(self.path.parent):
            if self._owned():
                self.path.unlink(missing_ok=True)
            if is_done(self.path.parent):
                # A finished folder is never claimed again (whoever takes this lock next, or a new one,
                # sees `.done` first), so its lock file goes: results folders hold results only.
                (self.path.parent / LOCK).unlink(missing_ok=True)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def holder(folder: Path, ttl: float = DEFAULT_TTL_S) -> dict | None:
    """The live lease on `folder` ({host, pid, token, ...}), or None when free or expired."""
    path = Path(folder) / LEASE
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    info = _read(path)
    if age > float(info.get("ttl", ttl)):
        return None
    if info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", 0))):
        return None  # its owner on this host is gone: no need to wait for the lease to expire
    return info


def claim(folder: str | Path, ttl: float = DEFAULT_TTL_S, done_before: float | None = None) -> Lease | str:
    """Claim `folder` for this process: a started Lease, or why not — "done" (its `.done` marker exists;
    with `done_before` only one written after that time counts, for --overwrite) or "busy" (another
    live process holds it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        if is_done(folder) and (done_before is None or (folder / ".done").stat().st_mtime >= done_before):
            (folder / LOCK).unlink(missing_ok=True)  # see Lease.release
            return "done"
        if holder(folder, ttl) is not None:
            return "busy"
        token = uuid.uuid4().hex
        path = folder / LEASE
        tmp = folder / f"{LEASE}.new{os.getpid()}"
        tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                                   "ttl": ttl, "claimed": time.time()}))
        os.replace(tmp, path)
    return Lease(path, token, ttl).start()
