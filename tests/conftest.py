"""Shared fixtures: the real data in ../shared/data and small random-weight ViTs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def data_file(rel: str) -> Path:
    """Path of a shared data file; missing is a failure in CI and a skip elsewhere."""
    p = DATA / rel
    if not p.exists():
        if IN_CI:
            pytest.fail(f"shared data file missing in CI: {p}")
        pytest.skip(f"shared data file missing: {p}")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.exists():
        if IN_CI:
            pytest.fail(f"shared data folder missing in CI: {DATA}")
        pytest.skip(f"shared data folder missing: {DATA}")
    return DATA


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (small models are slower on more), then restore the count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
