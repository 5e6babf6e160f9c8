"""Dynamic work sharing: processes on one --out claim slides through leases. Three real `pathapp infer`
processes on one folder, one SIGKILLed mid-slide: every slide is done exactly once and none is left
half-written. Leases expire without a heartbeat, are kept alive by one, and the leftover sweep never
deletes a live writer's temporary files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import data_file
from vit_factory import tiny_bundle

from pathapp.infer.lease import LEASE, claim, holder

SLIDES = {
    "CMU-1-Small-Region": "wsi/aperio/CMU-1-Small-Region.svs",
    "luna-1065626": "wsi/aperio/luna-1065626.svs",  # seconds of work: the one killed midway
    "openslide-python-small": "wsi/aperio/openslide-python-small.svs",
    "tcga-cr-7395-01a-01-ts1": "wsi/aperio/tcga-cr-7395-01a-01-ts1.svs",  # no µm/px: --slide-mpp below
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def write_lease(folder: Path, *, host: str, pid: int, age_s: float, ttl: float = 10.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE).write_text(json.dumps({"host": host, "pid": pid, "token": "theirs", "ttl": ttl}))
    t = time.time() - age_s
    os.utime(folder / LEASE, (t, t))


def test_a_fresh_lease_of_another_host_holds_until_it_expires(tmp_path):
    write_lease(tmp_path, host="node-17", pid=1, age_s=1.0)
    assert claim(tmp_path, ttl=10.0) == "busy"
    write_lease(tmp_path, host="node-17", pid=1, age_s=11.0)  # no heartbeat for longer than its ttl
    lease = claim(tmp_path, ttl=10.0)
    assert lease not in ("busy", "done")
    assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_a_dead_process_on_this_host_loses_its_lease_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lease(tmp_path, host=socket.gethostname(), pid=dead.pid, age_s=0.0)
    assert holder(tmp_path) is None
    lease = claim(tmp_path)
    assert lease not in ("busy", "done")
    lease.release()


def test_heartbeat_keeps_a_lease_and_notices_a_takeover(tmp_path):
    lease = claim(tmp_path, ttl=0.4)
    time.sleep(1.2)  # three ttls: alive only through the heartbeat
    assert holder(tmp_path, ttl=0.4)["pid"] == os.getpid()
    assert claim(tmp_path, ttl=0.4) == "busy" and not lease.lost
    write_lease(tmp_path, host="node-17", pid=1, age_s=0.0, ttl=60)  # another process took it over
    time.sleep(0.3)
    assert lease.lost
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "theirs"  # theirs is left alone


def test_done_folders_are_not_claimed_unless_older_than_an_overwrite_run(tmp_path):
    (tmp_path / ".done").write_text("")
    assert claim(tmp_path) == "done"
    lease = claim(tmp_path, done_before=time.time() + 1)  # --overwrite: done before this run started
    assert lease not in ("busy", "done")
    lease.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".done"]  # a finished folder keeps no lease files


def test_the_leftover_sweep_spares_live_writers(shared_data, tmp_path):
    from click.testing import CliRunner

    from pathapp.cli import cli

    bundle = tiny_bundle(tmp_path, num_classes=2)
    out = tmp_path / "out"
    folder = out / "openslide-python-small"
    folder.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (folder / f".tiles.tmp{live.pid}.geojson").write_text("{")  # a slow writer still at work
        (folder / f".tiles.tmp{dead.pid}.geojson").write_text("{")  # a killed run's leftover
        res = CliRunner().invoke(cli, ["infer", str(data_file(SLIDES["openslide-python-small"])), "--model",
                                       str(bundle), "--mpp", "2.0", "--out", str(out), "--workers", "0"])
        assert res.exit_code == 0, res.output
    finally:
        live.kill()
        live.wait()
    assert (folder / ".done").exists()
    assert (folder / f".tiles.tmp{live.pid}.geojson").exists()
    assert not (folder / f".tiles.tmp{dead.pid}.geojson").exists()


def done_lines(log: str) -> list[str]:
    return [Path(s).name for s in re.findall(r"^done: (.+?): \d+ tiles", log, flags=re.MULTILINE)]


@pytest.mark.slow
def test_three_processes_share_a_folder_and_survive_a_kill(shared_data, tmp_path):
    bundle = tiny_bundle(tmp_path, num_classes=2)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name, rel in SLIDES.items():  # one input folder, as a lab's would be (links to the shared data)
        src = data_file(rel)
        (slides / src.name).symlink_to(src)
    out = tmp_path / "out"
    pathapp = Path(sys.executable).with_name("pathapp")
    args = [str(pathapp), "infer", str(slides), "--model", str(bundle), "--mpp", "2.0", "--out", str(out),
            "--workers", "0", "--lease-seconds", "30", "--slide-mpp", "0.5"]
    logs = [tmp_path / f"p{i}.log" for i in range(3)]
    procs = [subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV) for log in logs]
    victim_slide = out / "luna-1065626"
    deadline = time.monotonic() + 600
    while holder(victim_slide) is None:  # someone is working on luna now
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [log.read_text()[-2000:] for log in logs]
        time.sleep(0.02)
    victim = next(p for p in procs if p.pid == holder(victim_slide)["pid"])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (victim_slide / ".done").exists()  # killed for real, mid-slide
    survivors = [p for p in procs if p is not victim]
    for p in survivors:
        assert p.wait(timeout=600) == 0, [log.read_text()[-2000:] for log in logs]

    texts = [log.read_text() for log in logs]
    done = [s for t in texts for s in done_lines(t)]
    assert sorted(done) == sorted(Path(data_file(r)).name for r in SLIDES.values()), texts  # each exactly once
    assert "luna-1065626.svs" in [s for t, p in zip(texts, procs) if p is not victim for s in done_lines(t)]
    assert sum(1 for t in texts if done_lines(t)) >= 2, texts  # the work was shared, not run by one
    for name in SLIDES:
        folder = out / name
        assert (folder / ".done").exists(), name
        run = json.loads((folder / "run.json").read_text())
        assert run["slide"] == name
        assert not [p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith(LEASE)], name
    for t in texts:
        assert "Traceback" not in t
