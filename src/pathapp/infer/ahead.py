"""A run's first slide, planned and read ahead. A child process forked before torch is imported plans
the slide's tiles (low-resolution read, tissue, grid: 2-3 s on a 2-core CPU) and then reads and
measures its first tiles into memory it shares with this process, on the other core, while this
process imports torch and timm and builds the model (5-6 s). The model then starts on tiles already
read, and the reading workers take only the rest. Linux only: fork is absent on Windows and unsafe
on macOS; elsewhere the first slide is planned and read like the others."""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from pathapp.infer.pipeline import TilePlan, plan_tiles, ramped_batches, tile_measurer
from pathapp.tiles.dataset import read_tiles
from pathapp.tiles.qc import MEASURES

if TYPE_CHECKING:
    from pathapp.infer.options import InferOptions
    from pathapp.infer.planner import Job
    from pathapp.tiles import TileGrid

READ_AHEAD_BYTES = 32 << 20  # memory for the tiles read ahead: ~200 of 224 px (untouched pages cost nothing)
CHUNK = 8  # tiles read at once (a DICOMweb slide fetches their frames in one request)


class PlanAhead:
    """The child that plans and reads the first slide, and the memory it reads the tiles into: tile i
    at slot i, with its QC measures, `count` tiles complete."""

    def __init__(self, job: Job, o: InferOptions, rois: Any, mpp: float, tile_size: int,
                 budget: int = READ_AHEAD_BYTES) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.job = job
        self.tile_shape = (tile_size, tile_size, 3)
        slot = tile_size * tile_size * 3 + 4 * len(MEASURES)
        self.capacity = budget // slot
        self.count = 0  # tiles read ahead, once `stop` has been called
        self._memory: mmap.mmap | None = mmap.mmap(-1, max(1, self.capacity * slot))
        self._count = ctx.Value("q", 0)  # its lock orders the child's writes before this process's reads
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._process: Any = ctx.Process(target=_plan_and_read, args=(self, child_end, o, rois, mpp, tile_size),
                                         name="pathapp plan", daemon=True)
        self._process.start()
        child_end.close()

    @classmethod
    def first(cls, jobs: list[Job], o: InferOptions, rois: Any) -> PlanAhead | None:
        """Planning ahead for the first job where the run tiles it as `infer_slide` would (a tile model,
        the same ROIs for every slide) and it still needs doing."""
        from pathapp.models.header import SEG_HEAD_KINDS
        from pathapp.models.loader import planned_preprocessing
        from pathapp.results.run import DONE

        job = jobs[0]
        if not sys.platform.startswith("linux"):
            return None
        if o.qc_only or (rois is None and o.roi_class) or job.error or job.out_dir is None:
            return None
        if (job.out_dir / DONE).exists() and not o.overwrite:
            return None
        pre = planned_preprocessing(o.model, weights=o.weights, mpp=o.mpp, tile_size=o.tile_size)
        if pre is None or pre[2] in SEG_HEAD_KINDS:
            return None
        return cls(job, o, rois, pre[0], pre[1])

    def views(self) -> tuple[np.ndarray, np.ndarray]:
        """(tiles (capacity, H, W, 3) uint8, QC rows (capacity, len(MEASURES)) float32) over the shared memory."""
        assert self._memory is not None
        rows = np.frombuffer(self._memory, np.float32, count=self.capacity * len(MEASURES))
        tiles = np.frombuffer(self._memory, np.uint8, offset=rows.nbytes,
                              count=self.capacity * int(np.prod(self.tile_shape)))
        return tiles.reshape(self.capacity, *self.tile_shape), rows.reshape(self.capacity, len(MEASURES))

    def take(self, job: Job) -> TilePlan | None:
        """`job`'s plan if it is the one planned and planning worked (its `ahead` is this object, whose
        tiles `infer_slide` takes); otherwise None, and the job is planned in this process (which
        reports its errors the usual way)."""
        if job is not self.job or self._process is None:
            return None
        try:
            plan = self._conn.recv()
        except (EOFError, OSError):
            plan = None
        if plan is None:
            self.close()
            return None
        plan.ahead = self
        return plan

    def stop(self) -> int:
        """End the child; how many tiles (0, 1, …) it has read and measured."""
        with self._count.get_lock():
            self.count = int(self._count.value)
        self._end_child()
        return self.count

    def batches(self, count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The first `count` tiles as DataLoader batches are: (tiles (B, 3, H, W) uint8, indices, QC
        rows), in batches of at most `batch_size` (`ramped_batches`: even sizes), copied out of the shared
        memory, which is let go after the last one."""
        for indices in ramped_batches(count, batch_size, first=batch_size):
            tiles, rows = self.views()
            start, end = indices[0], indices[-1] + 1
            batch = (np.ascontiguousarray(tiles[start:end].transpose(0, 3, 1, 2)), np.arange(start, end),
                     rows[start:end].copy())
            del tiles, rows  # no view may outlive the memory
            yield batch
        self.close()

    def _end_child(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join()
            self._conn.close()
            self._process = None

    def close(self) -> None:
        self._end_child()
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def _fill(self, slide: Any, grid: TileGrid, measure: Any) -> None:
        """In the child: read and measure tiles 0, 1, … into their slots until the memory is full, the
        slide ends, or a tile cannot be read (the parent's workers read it again and report it)."""
        tiles, rows = self.views()
        n = min(len(grid), self.capacity)
        try:
            for start in range(0, n, CHUNK):
                chunk = range(start, min(start + CHUNK, n))
                for i, tile in zip(chunk, read_tiles(slide, grid, chunk)):
                    tiles[i] = tile
                    if measure is not None:
                        rows[i] = measure(tile)
                    with self._count.get_lock():
                        self._count.value = i + 1
        except Exception:  # noqa: BLE001 - see the docstring
            pass


def _plan_and_read(ahead: PlanAhead, conn: Any, o: InferOptions, rois: Any, mpp: float, tile_size: int) -> None:
    """The child: plan the job and send the TilePlan (None if that failed), then read its first tiles,
    without a word: the parent says what is to be said about the slide, once (`infer_slide`), and plans
    it again itself if this failed. The parent's end of the pipe is closed here, so if the parent is
    gone (killed) sending fails and this process ends instead of waiting forever for a reader."""
    ahead._conn.close()
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - this process ends after its work
    sender: threading.Thread | None = None
    try:
        with ahead.job.open(o.slide_mpp) as slide:
            timings: dict[str, float] = {}
            slide.require_mpp()
            grid, thumbnail, empty = plan_tiles(slide, mpp, tile_size, rois, o.min_tissue, timings)
            # sent while the tiles are read: the parent takes the plan when it is ready for it
            sender = threading.Thread(target=_send, args=(conn, TilePlan(grid, thumbnail, empty, timings)))
            sender.start()
            ahead._fill(slide, grid, tile_measurer(o.qc, grid.geometry))
    except Exception:  # noqa: BLE001 - the parent plans again and reports the error itself
        pass
    if sender is None:
        _send(conn, None)
    else:
        sender.join()


def _send(conn: Any, message: Any) -> None:
    try:
        conn.send(message)
    except OSError:  # the parent is gone
        pass
