"""`pathapp pretrain` under torchrun: 2 CPU processes (gloo), identical weights on both ranks after
every step, with DDP and with FSDP; the checkpoint then resumes in a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import data_file
from pathapp.ssl.config import SSLConfig
from pathapp.ssl.train import pretrain
from ssl_tiny import TINY_SSL


def _torchrun(tmp_path, out, *extra: str) -> list[dict]:
    cfg = SSLConfig(**{k: v for k, v in TINY_SSL.items() if k != "backbone"}, record_checksum=True)
    cfg.save(tmp_path / "tiny.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pathapp", "pretrain", "--tiles", str(data_file("labeled/ebhi-seg/EBHI-SEG/Normal/image")),
           "--config", str(tmp_path / "tiny.yaml"), "--steps", "3", "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("teacher backbone:") == 1  # only rank 0 reports
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_run_keeps_ranks_identical(tmp_path, mode):
    out = tmp_path / "run"
    rows = _torchrun(tmp_path, out, *(["--fsdp"] if mode == "fsdp" else []))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert len(r["checksums"]) == 2 and r["checksums"][0] == r["checksums"][1], r
        assert r["samples_seen"] == r["step"] * 4 * 2  # each rank takes its own shard of the batch
    assert len({r["checksums"][0] for r in rows}) == 3  # and the weights do change
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    # the 2-process checkpoint continues in one process
    cfg = SSLConfig.load(out / "config.yaml")
    cfg.steps, cfg.distributed = 4, "ddp"
    pretrain(cfg, out, resume=True, progress=False)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(rows[-1]["checksums"]) == 1
