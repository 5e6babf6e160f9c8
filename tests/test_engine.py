"""engine/: per-process slide handles in DataLoader workers, the torchrun environment read once, and the
shared augmentation and schedule (train and ssl both use these, so they are tested here once)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import data_file
from pathapp.engine.augment import augment_tiles
from pathapp.engine.distributed import DistEnv, dist_env
from pathapp.engine.schedules import CosineSchedule
from pathapp.engine.workers import SlideHandle
from pathapp.slide import open_slide


class _WhoOpened:
    """Item i -> (pid, id of the open slide, a pixel read through it)."""

    def __init__(self, slide) -> None:
        self.handle = SlideHandle(slide)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        slide = self.handle.slide
        return os.getpid(), id(slide), int(np.asarray(slide.read(64 * i, 64 * i, 8, 8)).sum())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_each_worker_opens_its_own_slide_once(context):
    slide = open_slide(data_file("wsi/aperio/CMU-1-Small-Region.svs"))
    ds = _WhoOpened(slide)
    expected = [ds[i][2] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    seen = list(loader)

    assert [px for _, _, px in seen] == expected
    by_pid: dict[int, set[int]] = {}
    for pid, slide_id, _ in seen:
        by_pid.setdefault(pid, set()).add(slide_id)
    assert os.getpid() not in by_pid and len(by_pid) == 2
    assert all(len(ids) == 1 for ids in by_pid.values()), by_pid  # opened once per worker, then reused
    assert id(slide) not in set().union(*by_pid.values())  # never the parent's (shared) file handle


def test_dist_env_reads_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env() == DistEnv(0, 1, 0, 1) and dist_env().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    env = dist_env()
    assert env == DistEnv(3, 4, 1, 2) and not env.is_main


def test_cosine_schedule_warms_up_then_decays():
    s = CosineSchedule(1.0, 0.1, 100, warmup=10)
    values = [s[i] for i in range(100)]
    assert values[0] < values[9] <= 1.0
    assert max(values) == pytest.approx(1.0, abs=0.02)
    assert values[-1] == pytest.approx(0.1, abs=0.01) and s[500] == 0.1
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_augment_tiles_is_seeded_and_changes_tiles():
    x = torch.rand(4, 3, 32, 32)
    a = augment_tiles(x, np.random.default_rng(0), 0.05)
    b = augment_tiles(x, np.random.default_rng(0), 0.05)
    c = augment_tiles(x, np.random.default_rng(1), 0.05)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
