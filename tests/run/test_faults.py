"""A rank that dies or stops answering, in any phase, ends the run with one line and exit 3
(docs/design.md §3): the exchange, the metrics all_reduce, the gathers to rank 0 (influence flush,
final parameters). Also divergence (exit 4) under several ranks.

The multi-rank runs go through dicesim's own launcher and start all at once (module
fixture), so the suite waits for the slowest, not for the sum. The fault hook is
DICESIM_FAULT=KIND:RANK:N:PHASE (dicesim/common/faults.py); the faulty rank writes the moment of
the fault to DICESIM_FAULT_MARK, and the survivors must be gone within timeout_s + 5 s of it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CPU_PATH, REPO

TIMEOUT_S = 3
SMALL = [*CPU_PATH, "nodes=4", "batch_size=8", "data.probe_size=40", "progress=false",
         "plots=false", "data.max_train=400"]


def processes_with(token: str) -> list[int]:
    """Pids of live processes whose environment holds `token` (orphan check)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if token.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(entry.name))
        except OSError:
            pass
    return found


def strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def events_complete(path: Path, hops: int) -> dict[int, set[int]]:
    """Every event in influence.csv has all its hops 0..hops; returns event → hops."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    per: dict[int, set[int]] = defaultdict(set)
    for r in rows:
        per[int(r["event"])].add(int(r["hop"]))
        assert r["dice_e"] != ""
    for event, got in per.items():
        assert got == set(range(hops + 1)), (event, got)
    return per


@dataclass
class Case:
    ranks: int
    fault: str | None
    overrides: list[str] = field(default_factory=list)
    code: int = 3
    needle: str = ""
    proc: subprocess.Popen | None = None
    out: Path | None = None
    mark: Path | None = None
    token: str = ""
    ended: float = 0.0
    stdout: str = ""
    stderr: str = ""
    how: str = "launcher"  # or "torchrun" (plain torchrun), "single" (python -m dicesim)
    model: tuple[str, ...] = ("model.hidden=[8]",)
    watcher: threading.Thread | None = None


CASES = {
    # SIGKILL / SIGSTOP during the exchange
    "kill-exchange-2": Case(2, "kill:1:3:exchange", needle="closed the connection"),
    "stop-exchange-4": Case(4, "stop:2:3:exchange", needle="no answer"),
    # ... during the metrics all_reduce (evaluations at steps 0, 2, 4, ...)
    "kill-metrics-2": Case(2, "kill:0:4:metrics", ["eval_every=2"], needle="closed the connection"),
    "stop-metrics-2": Case(2, "stop:1:4:metrics", ["eval_every=2"], needle="no answer"),
    # ... during the gathers to rank 0. steps=8, eval_every=4, flush_every=4: gathers are
    # metrics(t=0)=0, flush(t=3)=1, metrics(4)=2, flush(7)=3, metrics(8)=4, final flush=5,
    # final parameters=6
    "kill-flush-2": Case(2, "kill:1:5:gather", ["influence.events=6", "influence.hops=1"],
                         needle="closed the connection"),
    "stop-merge-2": Case(2, "stop:1:6:gather", ["influence.events=6", "influence.hops=1"],
                         needle="no answer"),
    # a diverging run on two ranks: every rank stops at the same evaluation, exit 4
    "diverged-2": Case(2, None, ["data=synthetic_regression", "model=linear", "optim.lr=5",
                                 "eval_every=2", "influence.events=4", "influence.hops=1",
                                 "influence.flush_every=2"], code=4, needle="exploding",
                       model=()),
}
# not the launcher: plain torchrun (each rank that sees the failure prints its own line and
# torchrun exits 1 with its report), and one process that crashes mid-run
OTHERS = {
    "raw-torchrun": Case(2, "die:1:2", code=1, how="torchrun"),
    "single-crash": Case(1, "die:0:25", ["steps=40", "influence.events=12", "influence.hops=2",
                                         "influence.flush_every=10"], code=1, how="single"),
}


def start(case: Case, tmp: Path) -> None:
    case.out = tmp / "run"
    case.mark = tmp / "mark"
    case.token = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_TEST_TOKEN": case.token,
           "DICESIM_FAULT_MARK": str(case.mark)}
    env.pop("DICESIM_FAULT", None)
    if case.fault:
        env["DICESIM_FAULT"] = case.fault
    launcher = {
        "launcher": ["-m", "dicesim.launch", "torchrun", "--procs", str(case.ranks),
                     "--no-preflight", "--"],
        "torchrun": ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={case.ranks}", "-m", "dicesim"],
        "single": ["-m", "dicesim"],
    }[case.how]
    cmd = [sys.executable, *launcher, *SMALL, *case.model, "steps=8", "eval_every=4",
           "influence.events=0", "influence.flush_every=4", *case.overrides,
           f"timeout_s={TIMEOUT_S}", f"out_dir={case.out}"]
    case.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    case.watcher = threading.Thread(target=wait_for, args=(case,), daemon=True)
    case.watcher.start()


def wait_for(case: Case) -> None:
    """Collect the output and the moment the command ended."""
    try:
        case.stdout, case.stderr = case.proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        case.proc.kill()
        case.stdout, case.stderr = case.proc.communicate()
        case.stderr += "\n(test: killed after 150 s)"
    case.ended = time.time()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    everything = {**CASES, **OTHERS}
    for name, case in everything.items():
        start(case, tmp_path_factory.mktemp(name))
    yield everything
    for case in everything.values():
        if case.proc is not None and case.proc.poll() is None:
            case.proc.kill()
            case.proc.communicate()


def finish(case: Case) -> Case:
    assert case.watcher is not None
    case.watcher.join()
    return case


@pytest.mark.parametrize("name", list(CASES))
def test_a_failing_rank_ends_the_run_with_one_line(name, launched):
    case = finish(launched[name])
    ours = [ln for ln in case.stderr.splitlines() if ln.startswith("dicesim:")]
    assert case.proc.returncode == case.code, case.stderr[-3000:]
    assert len(ours) == 1, case.stderr[-3000:]
    assert "Traceback" not in case.stderr, case.stderr[-3000:]
    assert case.needle in ours[0], ours[0]
    if case.fault:
        fault_rank = case.fault.split(":")[1]
        assert f"rank {fault_rank}" in ours[0], ours[0]  # the line names the faulty rank
        # survivors and torchrun gone within timeout_s + 5 s of the fault, nothing left over
        took = case.ended - float(case.mark.read_text())
        print(f"{name}: ended {took:.1f} s after the fault")
        assert took < TIMEOUT_S + 5, f"{took:.1f} s after the fault"
        assert not (case.out / "summary.json").exists()
    else:
        summary = strict_json((case.out / "summary.json").read_text())
        assert summary["status"] == "diverged" and summary["diverged"] is True
        assert "step" in ours[0] and "node" in ours[0]
    assert processes_with(case.token) == []
    if (case.out / "influence.csv").exists():
        events_complete(case.out / "influence.csv", 1)


def test_rows_flushed_before_the_failure_are_complete(launched):
    """kill-flush-2: the rank died at the final flush, so the periodic flushes (steps 3, 7)
    are on disk and complete; nothing half-written."""
    case = finish(launched["kill-flush-2"])
    per = events_complete(case.out / "influence.csv", 1)
    assert per  # some events finished by step 7


def test_raw_torchrun_a_rank_stops_with_its_own_line(launched):
    """Under plain torchrun each rank that sees the failure prints its own line (no launcher
    to pick one); the survivor's line names the true cause; torchrun exits 1."""
    case = finish(launched["raw-torchrun"])
    assert case.proc.returncode == 1
    lines = [ln for ln in case.stderr.splitlines() if ln.startswith("dicesim: error: rank 0")]
    assert len(lines) == 1, case.stderr[-2000:]
    assert "rank 1 closed the connection" in lines[0]
    assert "exitcode  : 3" in case.stderr  # torchrun's report names rank 0's exit code 3
    assert not (case.out / "summary.json").exists()


def test_a_crash_keeps_the_influence_rows_already_flushed(launched):
    """Finished events are gathered and written every influence.flush_every steps."""
    case = finish(launched["single-crash"])
    assert case.proc.returncode == 1
    per = events_complete(case.out / "influence.csv", 2)
    assert per  # events finished by step 20 are on disk
    with (case.out / "influence.csv").open() as f:
        steps = {int(r["step"]) for r in csv.DictReader(f)}
    assert max(steps) + 2 <= 20  # and only those: their last hop was recorded by step 20
    assert not (case.out / "summary.json").exists()
