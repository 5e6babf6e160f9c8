"""`torchrun --nproc-per-node 2 -m pathapp infer` shares slides between ranks (each claims the next
unfinished slide through a lease) and writes each slide exactly once; a run killed for real (SIGKILL to
torchrun and its workers, as a node crash would) is finished by a rerun that recomputes only what was
incomplete, taking over the dead run's lease at once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import data_file, run_main
from vit_factory import tiny_bundle

from pathapp.infer.lease import holder

INPUTS = [
    "wsi/aperio/CMU-1-Small-Region.svs",
    "wsi/aperio/openslide-python-small.svs",  # 16 x 16 px: no tile fits, still a complete result
    "wsi/aperio/luna-1065626.svs",  # seconds of work, killed midway
    "dicom/cmu-1-small-region-wsi2dcm",
]
NAMES = ["CMU-1-Small-Region", "openslide-python-small", "luna-1065626", "cmu-1-small-region-wsi2dcm"]


def torchrun_cmd(args: list[str]) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe), "--nproc-per-node", "2", "--master-port", "0", "-m", "pathapp", "infer", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def lines(text: str, kind: str, tail: str = "") -> list[tuple[int, str]]:
    """(rank, slide) of each `[rank r/2] <kind>: <slide>: ...<tail>` line."""
    found = re.findall(rf"^\[rank (\d)/2\] {kind}: (.+?): .*{re.escape(tail)}$", text, flags=re.MULTILINE)
    return [(int(r), s) for r, s in found]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker (they run in sessions of their own), and wait until all are gone:
    a process killed inside a system call (a rename, a flush to disk) ends only when the call returns, so
    a file it was writing can still appear after the signal was sent."""
    parent = psutil.Process(proc.pid)
    tree = [*parent.children(recursive=True), parent]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


@pytest.mark.slow
def test_torchrun_shards_once_and_resumes_after_a_kill(shared_data, tmp_path, monkeypatch, capsys):
    bundle = tiny_bundle(tmp_path, num_classes=2)
    srcs = [str(data_file(rel)) for rel in INPUTS]
    out = tmp_path / "out"
    args = [*srcs, "--model", str(bundle), "--mpp", "2.0", "--out", str(out), "--workers", "0"]

    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(torchrun_cmd(args), stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 300
    while holder(out / NAMES[2]) is None:  # a rank is working on luna now
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kill_tree(first)
    log.close()
    complete = {n for n in NAMES if (out / n / ".done").exists()}
    assert NAMES[2] not in complete  # killed for real, midway
    stamps = {n: (out / n / "run.json").stat().st_mtime_ns for n in complete}
    first_done = lines((tmp_path / "first.log").read_text(), "done")
    assert {Path(s).name for _, s in first_done} <= {Path(srcs[NAMES.index(n)]).name for n in complete}

    second = subprocess.run(torchrun_cmd(args), capture_output=True, text=True, timeout=600, env=ENV)
    assert second.returncode == 0, second.stderr[-3000:]
    redone = lines(second.stderr, "done")
    skipped = lines(second.stderr, "skip", "(use --overwrite to redo)")  # complete before this run
    todo = [s for s, n in zip(srcs, NAMES) if n not in complete]
    assert sorted(s for _, s in redone) == sorted(todo), second.stderr  # only the rest, each once
    assert sorted(skipped) == sorted((r, s) for r in (0, 1) for s in set(srcs) - set(todo))  # seen by both ranks
    assert len({s for _, s in redone + first_done}) == len(redone + first_done)  # nothing computed twice
    for n in NAMES:
        run = json.loads((out / n / "run.json").read_text())
        assert (out / n / ".done").exists()
        assert run["parameters"]["world_size"] == 2 and run["parameters"]["rank"] in (0, 1), (n, run["parameters"])
        if n in complete:
            assert (out / n / "run.json").stat().st_mtime_ns == stamps[n], f"{n} was rewritten"
        assert not [p.name for p in (out / n).iterdir() if ".tmp" in p.name or p.name == ".lease"], n  # no leftovers
    assert json.loads((out / NAMES[1] / "run.json").read_text())["counts"]["tiles"] == 0

    # The same command with a changed model: nothing is skipped as complete, nothing is destroyed;
    # each slide gets one line naming what differs and --overwrite, which then replaces them all
    # (one process, through the console entry point in process: no third torch start).
    headless = tiny_bundle(tmp_path, num_classes=0, filename="headless.pathapp", depth=1)  # another backbone
    changed = [a if a != str(bundle) else str(headless) for a in args]
    stamps = {n: (out / n / "run.json").stat().st_mtime_ns for n in NAMES}
    code, third = run_main(monkeypatch, capsys, "infer", *changed)
    assert code == 1 and "Traceback" not in third, third[-3000:]
    failed = [line for line in third.splitlines() if line.startswith("failed: ")]
    assert len(failed) == len(NAMES), third
    assert all("backbone (bundle fingerprint) " in f and "head (classes and weights) " in f and "--overwrite" in f
               for f in failed), failed
    assert {n: (out / n / "run.json").stat().st_mtime_ns for n in NAMES} == stamps
    code, fourth = run_main(monkeypatch, capsys, "infer", *changed, "--overwrite")
    assert code == 0, fourth[-3000:]
    for n in NAMES:
        names = {p.name for p in (out / n).iterdir()}
        assert not [m for m in names if m.startswith("heatmap-")], (n, names)  # the old model's maps are gone
        assert ("pca.png" in names) == (n != NAMES[1])  # the 16-px slide has no tile to colour
        assert json.loads((out / n / ".done").read_text())["head"] is None
