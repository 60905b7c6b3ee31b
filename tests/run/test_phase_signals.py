"""Every phase answers SIGTERM: the final evaluation, the attribution reverse pass,
the outputs, the figures, a checkpoint's files and an experiment's next run. Each command
pauses at its phase's check (DICESIM_TEST_PAUSE, dicesim.common.stopping.pause_for_test) and writes
a marker file; the test then sends SIGTERM and expects exit 143 within a few seconds, one
line naming the phase, and the finished rows on disk. The commands start together."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import CPU_PATH, REPO, free_port
from test_faults import processes_with

from dicesim.common.stopping import SIGNAL_CODES
from dicesim.run.checkpoint import complete

TINY = [*CPU_PATH, "nodes=4", "steps=6", "batch_size=8", "data.probe_size=40", "data.max_train=400",
        "model.hidden=[8]", "influence.events=2", "influence.hops=1", "progress=false",
        "plots=false", "eval_every=2"]
# phase[@N] to pause at: (its extra overrides, the line's words)
CASES = {
    "evaluation": ([], "in the evaluation phase at step 6"),
    "attribution": (["attribution.enabled=true", "influence.events=0"],
                    "in the attribution phase at step 6"),
    "outputs": ([], "in the outputs phase"),
    "figures": (["plots=true"], "in the figures phase"),
    "checkpoint@2": (["checkpoint.every=2"], "in the checkpoint phase at step 4"),
    "experiment@2": (["experiment=attribution", "steps=6", "retrain.batches=2",
                      "retrain.samples=0"], "in the experiment phase"),
}
LATENCY_S = 2.0  # the bound; measured 0.02-0.2 s with the six commands at once
START_S = 240


class Paused:
    def __init__(self, root: Path, phase: str, extra: list[str]):
        self.out = root / "run"
        self.marker = root / "marker"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "DICESIM_TEST_PAUSE": f"{phase}:{self.marker}"}
        for key in ("DICESIM_FAULT", "WORLD_SIZE", "RANK", "DICESIM_STATUS_DIR"):
            env.pop(key, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicesim", *TINY, *extra, f"out_dir={self.out}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def interrupt(self) -> tuple[int, str, float]:
        """(exit code, stderr, seconds from SIGTERM to exit) once the pause is reached."""
        deadline = time.monotonic() + START_S
        while not self.marker.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate(timeout=30)
                pytest.fail(f"never reached the phase (exit {self.proc.returncode}):\n{err}")
            time.sleep(0.05)
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err, time.monotonic() - sent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = {phase: Paused(tmp_path_factory.mktemp(phase.replace("@", "_")), phase, extra)
               for phase, (extra, _) in CASES.items()}
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def metric_rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("phase", list(CASES))
def test_phase_answers_sigterm_with_one_line(runs, phase: str):
    run = runs[phase]
    code, err, latency = run.interrupt()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 143, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dicesim: interrupted") and CASES[phase][1] in lines[0], lines[0]
    assert "(SIGTERM)" in lines[0] and str(run.out) in lines[0], lines[0]
    assert latency < LATENCY_S, f"{phase}: {latency:.2f} s from SIGTERM to exit"
    print(f"{phase}: {latency:.2f} s")  # noqa: T201 - the measured latency (pytest -s)
    if phase.startswith("experiment"):
        # the first case (the reverse-pass run) finished and is kept for a resume; the
        # retraining about to start is dropped
        summary = json.loads((run.out / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["finished"] == ["attributed"]
        assert (run.out / "cases" / "attributed" / "result.pkl").is_file()
        return
    steps = {int(r["step"]) for r in metric_rows(run.out)}
    if phase.startswith("checkpoint"):
        # the step-4 checkpoint was cut short: the step-2 one stays the newest complete one
        assert [p.name for p in complete(run.out)] == ["step_000002"]
        assert not [p for p in (run.out / "checkpoints").iterdir() if "tmp" in p.name]
        assert steps == {0, 2}  # step 4's metrics come when step 4 starts: it never did
        return
    assert steps == {0, 2, 4, 6}  # every evaluated step, the final one included
    summary = run.out / "summary.json"
    if phase in ("evaluation", "attribution"):  # written as an interrupted run's summary
        assert json.loads(summary.read_text())["status"] == "interrupted"
    elif phase == "outputs":
        assert not summary.exists()  # paused before the summary: not half-written
    else:  # figures: the summary was written, the report was not
        assert json.loads(summary.read_text())["status"] == "complete"
        assert not (run.out / "report.md").exists()


def test_check_raises_once_per_signal():
    """No signal: nothing. A signal: the first check raises (with the phase and the exit
    code), later checks do not: the stop that answers it writes the finished rows."""
    from dicesim.common.stopping import Interrupted, Signals

    signals = Signals()
    signals.check("outputs")
    signals.received = signal.SIGINT
    with pytest.raises(Interrupted) as info:
        signals.check("figures")
    assert (info.value.phase, info.value.code) == ("figures", 130)
    signals.check("outputs")  # answered: the writing that follows goes on


# ---- several ranks: every rank answers at the same agreed check point -------------------------
RANKS_TIMEOUT_S = 60  # the run's timeout_s: a rank left waiting would end with exit 3 after it
RANKS_LATENCY_S = 10.0  # signal → every process gone, launcher or torchrun included
# name: (how, phase, extra overrides, whom to signal: a rank, or "all" (the launcher or each
# rank, as torchrun forwards it), the signal)
RANK_CASES = {
    "evaluation-rank1": ("launcher", "evaluation", [], 1, signal.SIGTERM),
    "evaluation-all": ("launcher", "evaluation", [], "all", signal.SIGTERM),
    "attribution-rank0": ("launcher", "attribution", CASES["attribution"][0], 0, signal.SIGTERM),
    "attribution-all": ("launcher", "attribution", CASES["attribution"][0], "all",
                        signal.SIGINT),
    "evaluation-rank1-torchrun": ("torchrun", "evaluation", [], 1, signal.SIGTERM),
}


class PausedRanks:
    """A 2-rank run (dicesim.launch or plain torchrun) whose ranks both pause at the first
    check of `phase` (each writes marker.<rank> holding its pid)."""

    def __init__(self, root: Path, how: str, phase: str, extra: list[str]):
        self.out = root / "run"
        self.marker = root / "marker"
        self.token = uuid.uuid4().hex
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_TEST_TOKEN": self.token,
               "DICESIM_TEST_PAUSE": f"{phase}:{self.marker}"}
        for key in ("DICESIM_FAULT", "WORLD_SIZE", "RANK", "DICESIM_STATUS_DIR"):
            env.pop(key, None)
        head = (["-m", "dicesim.launch", "torchrun", "--procs", "2", "--no-preflight", "--"]
                if how == "launcher" else
                ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                 "-m", "dicesim"])
        self.proc = subprocess.Popen(
            [sys.executable, *head, *TINY, *extra, f"timeout_s={RANKS_TIMEOUT_S}",
             f"out_dir={self.out}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def interrupt(self, whom: int | str, signum: int) -> tuple[int, str, float]:
        """(exit code, stderr, seconds from the signal to the end of the command)."""
        markers = [Path(f"{self.marker}.{rank}") for rank in (0, 1)]
        deadline = time.monotonic() + START_S
        while not all(m.exists() for m in markers):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate(timeout=30)
                pytest.fail(f"never reached the phase (exit {self.proc.returncode}):\n{err}")
            time.sleep(0.05)
        pids = [int(m.read_text()) for m in markers]
        if whom == "all":
            sent = time.monotonic()
            if isinstance(self.proc.args, list) and "dicesim.launch" in self.proc.args:
                self.proc.send_signal(signum)  # the launcher → torchrun → every rank
            else:
                for pid in pids:
                    os.kill(pid, signum)
        else:  # the other rank goes on first and waits in the agreed check's all_reduce
            markers[1 - whom].unlink()
            time.sleep(0.5)
            sent = time.monotonic()
            os.kill(pids[whom], signum)
        _, err = self.proc.communicate(timeout=RANKS_TIMEOUT_S + 60)
        return self.proc.returncode, err, time.monotonic() - sent


@pytest.fixture(scope="module")
def rank_runs(tmp_path_factory):
    started = {name: PausedRanks(tmp_path_factory.mktemp(name), how, phase, extra)
               for name, (how, phase, extra, _, _) in RANK_CASES.items()}
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


@pytest.mark.parametrize("name", list(RANK_CASES))
def test_ranks_answer_a_signal_together(rank_runs, name: str):
    """A signal to one rank (the other already waits in a collective) or to all: every rank
    stops at the same agreed check point with the signal's code and one line, none ends
    with exit 3 (peer lost), and the finished rows and an interrupted summary are on disk."""
    how, phase, _, whom, signum = RANK_CASES[name]
    run = rank_runs[name]
    code, err, latency = run.interrupt(whom, signum)
    print(f"{name}: {latency:.2f} s")  # noqa: T201 - the measured latency (pytest -s)
    ours = [line for line in err.splitlines() if line.startswith("dicesim:")]
    want = SIGNAL_CODES[signum]
    assert len(ours) == 1, err[-3000:]
    line = ours[0]
    assert line.startswith(f"dicesim: interrupted in the {phase} phase at step 6 "
                           f"({signal.Signals(signum).name}); finished rows are in "
                           f"{run.out}"), line
    if how == "launcher":
        assert code == want and "Traceback" not in err, err[-3000:]
    else:  # torchrun exits 1 with its own report: every rank's exit code is the signal's
        assert code == 1 and "exitcode  : 3" not in err, err[-3000:]
        assert err.count(f"exitcode  : {want}") == 2, err[-3000:]
    assert latency < RANKS_LATENCY_S, f"{name}: {latency:.2f} s from the signal to exit"
    assert {int(r["step"]) for r in metric_rows(run.out)} == {0, 2, 4, 6}
    assert json.loads((run.out / "summary.json").read_text())["status"] == "interrupted"
    assert processes_with(run.token) == []


def test_agreed_checks_are_few_and_raise_on_every_rank(monkeypatch):
    """PhaseChecks over n check points makes ⌈n / ⌈n/AGREED_PER_PASS⌉⌉ agreed ones plus the
    end; while a group is live a rank's own check raises nothing, and an agreed one raises
    on a rank with no signal of its own when a peer has one (its number, not this rank's)."""
    from dicesim.common import stopping
    from dicesim.common.stopping import AGREED_PER_PASS, Interrupted, PhaseChecks, Signals

    signals = Signals()
    monkeypatch.setattr(stopping, "SIGNALS", signals)
    calls: list[tuple[int, str]] = []
    peer = {"signal": 0}

    def agree(pending: int, phase: str) -> int:
        calls.append((pending, phase))
        return max(pending, peer["signal"])

    signals.agree = agree
    n = 20
    checks = PhaseChecks("attribution", n)
    for _ in range(n):
        checks()
    checks.end()
    stride = -(-n // AGREED_PER_PASS)
    assert len(calls) == len(range(0, n, stride)) + 1 == 8
    assert calls[0] == (0, "attribution")
    signals.received = signal.SIGINT
    signals.check("evaluation")  # a rank's own check: a peer may wait for this rank
    peer["signal"] = signal.SIGTERM
    with pytest.raises(Interrupted) as info:
        PhaseChecks("evaluation", 3)()
    assert (info.value.signum, info.value.phase) == (signal.SIGTERM, "evaluation")
    assert calls[-1] == (signal.SIGINT, "evaluation")
    alone = PhaseChecks("evaluation", 3, together=False)  # rank 0's own pass: no collective
    alone()
    alone.end()
    assert len(calls) == 9
