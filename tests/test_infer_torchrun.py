"""`torchrun --nproc-per-node 2 -m pathapp infer` shares slides between ranks (input i -> rank
i mod 2), writes each slide exactly once, and a rerun after an interruption finishes only the rest.

The interruption is simulated, not a real kill: after a complete run, one slide's folder is put
in the state a kill during writing leaves (no `.done`, a stray temporary file, a stale output)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_file
from vit_factory import tiny_bundle

INPUTS = [
    "wsi/aperio/CMU-1-Small-Region.svs",
    "dicom/cmu-1-small-region-wsi2dcm",
    "wsi/ome-tiff/OS-1-detail.ome.tif",
    "wsi/aperio/openslide-python-small.svs",  # 16 x 16 px: no tile fits, still a complete result
]
NAMES = ["CMU-1-Small-Region", "cmu-1-small-region-wsi2dcm", "OS-1-detail", "openslide-python-small"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(exe), "--nproc-per-node", "2", "--master-port", "0", "-m", "pathapp", "infer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def lines(text: str, kind: str) -> list[tuple[int, str]]:
    """(rank, slide) of each `[rank r/2] <kind>: <slide>: ...` line."""
    found = re.findall(rf"^\[rank (\d)/2\] {kind}: (.+?): ", text, flags=re.M)
    return [(int(r), s) for r, s in found]


@pytest.mark.slow
def test_torchrun_shards_once_and_resumes(shared_data, tmp_path):
    bundle = tiny_bundle(tmp_path, num_classes=2)
    srcs = [str(data_file(rel)) for rel in INPUTS]
    out = tmp_path / "out"
    args = [*srcs, "--model", str(bundle), "--mpp", "2.0", "--out", str(out), "--workers", "0"]

    first = torchrun(args)
    assert first.returncode == 0, first.stderr[-3000:]
    done = lines(first.stderr, "done")
    assert sorted(s for _, s in done) == sorted(srcs), first.stderr  # each slide exactly once
    assert all(srcs.index(s) % 2 == r for r, s in done), done  # input i -> rank i mod 2
    for i, name in enumerate(NAMES):
        run = json.loads((out / name / "run.json").read_text())
        assert run["parameters"]["world_size"] == 2
        assert run["parameters"]["rank"] == i % 2, (name, run["parameters"])
        assert (out / name / ".done").exists()
    assert json.loads((out / NAMES[3] / "run.json").read_text())["counts"]["tiles"] == 0
    stamps = {n: (out / n / "run.json").stat().st_mtime_ns for n in NAMES}

    # What a kill while writing the DICOM slide leaves behind: no marker, a temp file, old outputs.
    victim = out / NAMES[1]
    (victim / ".done").unlink()
    (victim / ".tiles.tmp999.geojson").write_text('{"type": "FeatureColl')
    second = torchrun(args)
    assert second.returncode == 0, second.stderr[-3000:]
    redone = lines(second.stderr, "done")
    assert redone == [(1, srcs[1])], second.stderr
    assert len(lines(second.stderr, "skip")) == 3
    assert (victim / ".done").exists()
    for n in NAMES:
        changed = (out / n / "run.json").stat().st_mtime_ns != stamps[n]
        assert changed == (n == NAMES[1]), n
