"""A rank that stops answering must not hang the others (DESIGN §3)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port


@pytest.mark.parametrize("fault", ["hang", "die"])
def test_peers_stop_with_a_clear_message_when_a_rank_fails(tmp_path, fault):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "dicesim",
           "nodes=4", "steps=8", "timeout_s=5", "influence.events=0", "progress=false",
           "plots=false", f"out_dir={tmp_path}/run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_FAULT": f"{fault}:1:2"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dicesim: error: rank 0")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "did not answer within timeout_s=5" in lines[0]
    assert elapsed < 60  # start-up + 5 s timeout, not a hang
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_crash_keeps_the_influence_rows_already_flushed(tmp_path):
    """Finished events are gathered and written every influence.flush_every steps."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dicesim", "nodes=4", "steps=40", "influence.events=12",
           "influence.hops=2", "influence.flush_every=10", "progress=false", "plots=false",
           f"out_dir={out}"]
    env = {**os.environ, "DICESIM_FAULT": "die:0:25"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    rows = (out / "influence.csv").read_text().splitlines()[1:]
    finished = {int(r.split(",")[0]) for r in rows}
    assert finished  # events finished by step 20 are on disk
    steps = {int(r.split(",")[2]) for r in rows}
    assert max(steps) + 2 <= 20  # and only those: their last hop was recorded by step 20
    assert not (out / "summary.json").exists()
