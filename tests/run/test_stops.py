"""Stopping early on purpose: Ctrl-C / SIGTERM (exit 130 / 143) and a diverged loss
(exit 4), each with one line, the finished influence rows on disk and a strictly valid
summary.json. The commands start together (module fixture); unit tests cover the rules."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import CPU_PATH, REPO
from test_faults import events_complete, processes_with, strict_json

from dicesim.common.stopping import SIGNALS, Guard
from dicesim.report.summary import write_json

SMALL = [*CPU_PATH, "nodes=4", "batch_size=8", "data.probe_size=40", "progress=false",
         "plots=false", "data.max_train=400"]
LONG = [*SMALL, "progress=true", "model.hidden=[8]", "steps=100000", "eval_every=10",
        "influence.hops=1", "influence.flush_every=10",
        "influence.events=[{node:0,step:2},{node:1,step:5}]"]
DIVERGING = [*SMALL, "data=synthetic_regression", "model=linear", "optim.lr=5", "steps=40",
             "eval_every=5", "influence.events=4", "influence.hops=1", "influence.flush_every=5"]


class Command:
    def __init__(self, tmp: Path, args: list[str], launcher: int = 0,
                 signum: int | None = None):
        self.out = tmp / "run"
        self.token = uuid.uuid4().hex
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_TEST_TOKEN": self.token}
        env.pop("DICESIM_FAULT", None)
        head = (["-m", "dicesim.launch", "torchrun", "--procs", str(launcher), "--no-preflight",
                 "--"] if launcher else ["-m", "dicesim"])
        self.proc = subprocess.Popen([sys.executable, *head, *args, f"out_dir={self.out}"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.signum = signum
        self.signalled = 0.0
        self.ended = 0.0
        self.stdout = self.stderr = ""
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(self.proc.stderr.read()),
                                  daemon=True)
        reader.start()
        out = []
        for line in self.proc.stdout:
            out.append(line)
            if self.signum is not None and line.startswith("step "):  # after the first step
                time.sleep(1.5)  # some steps and a flush or two
                self.signalled = time.time()
                self.proc.send_signal(self.signum)
        self.proc.wait(timeout=150)
        self.ended = time.time()
        reader.join()
        self.stdout, self.stderr = "".join(out), "".join(err)

    def result(self) -> Command:
        self.thread.join(timeout=180)
        return self


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    def tmp(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    cmds = {
        "sigint": Command(tmp("sigint"), LONG, signum=signal.SIGINT),
        "sigterm-launcher-2": Command(tmp("sigterm"), LONG, launcher=2, signum=signal.SIGTERM),
        "diverged": Command(tmp("diverged"), DIVERGING),
        "diverged-continue": Command(tmp("continue"), [*DIVERGING, "abort_on_nonfinite=false"]),
    }
    yield cmds
    for c in cmds.values():
        if c.proc.poll() is None:
            c.proc.kill()


def one_line(stderr: str) -> str:
    ours = [ln for ln in stderr.splitlines() if ln.startswith("dicesim:")]
    assert len(ours) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return ours[0]


@pytest.mark.parametrize("name, code, signame", [("sigint", 130, "SIGINT"),
                                                 ("sigterm-launcher-2", 143, "SIGTERM")])
def test_a_signal_stops_with_one_line_and_the_finished_rows(commands, name, code, signame):
    c = commands[name].result()
    assert c.proc.returncode == code, c.stderr[-3000:]
    line = one_line(c.stderr)
    assert re.fullmatch(rf"dicesim: interrupted at step \d+ \({signame}\); finished rows are "
                        rf"in {re.escape(str(c.out))}", line), line
    assert set(events_complete(c.out / "influence.csv", 1)) == {0, 1}
    summary = strict_json((c.out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["stopped_at"] == int(line.split("step ")[1].split()[0])
    assert c.ended - c.signalled < 10  # the next evaluation step, then out
    assert processes_with(c.token) == []


def test_a_diverged_loss_stops_with_exit_4(commands):
    c = commands["diverged"].result()
    assert c.proc.returncode == 4, c.stderr[-3000:]
    line = one_line(c.stderr)
    assert re.search(r"(non-finite|exploding) training loss \(.*\) at step \d+ on node \d+", line)
    summary = strict_json((c.out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"] is True
    assert summary["first_nonfinite"]["metric"] == "train_loss"  # metrics.csv's column
    assert (c.out / "metrics.csv").exists()
    events_complete(c.out / "influence.csv", 1)


def test_a_diverged_run_that_continues_writes_strict_json(commands):
    c = commands["diverged-continue"].result()
    assert c.proc.returncode == 0, c.stderr[-3000:]
    text = (c.out / "summary.json").read_text()
    summary = strict_json(text)  # no bare NaN / Infinity
    assert summary["status"] == "complete" and summary["diverged"] is True
    assert "final.probe_loss" in summary["nonfinite"]
    assert "warning: the run diverged" in c.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_starting_is_one_line(tmp_path, signum, code):
    """Ctrl-C / SIGTERM while Python still imports torch and Hydra (right after
    dicesim/__main__.py caught SIGTERM, which Python itself leaves alone): one line, no
    traceback, nothing written."""
    proc = subprocess.Popen([sys.executable, "-m", "dicesim", *SMALL, f"out_dir={tmp_path}/run"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.time() + 30
    while time.time() < deadline:  # SigCgt: the caught signals, a hex mask (bit s − 1)
        caught = next(ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt"))
        if int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-3000:]
    assert err.splitlines() == [
        f"dicesim: interrupted while starting ({signal.Signals(signum).name})"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- unit rules
def test_guard_rules():
    g = Guard(divergence_factor=100.0)
    g.observe(0, [0, 1], torch.tensor([2.0, 3.0]), "training")
    g.observe(1, [0, 1], torch.tensor([150.0, 3.0]), "training")
    assert g.first is None  # 75× the step-0 loss: below the factor
    g.observe(2, [0, 1], torch.tensor([1.0, 301.0]), "training")
    assert (g.first.step, g.first.node, g.first.what) == (2, 1, "training")
    g = Guard()
    g.observe(3, [5], torch.tensor([float("nan")]), "probe")
    assert g.first.node == 5 and "non-finite probe loss" in g.first.describe()
    assert g.stop_here() and g.agreed[0] == "diverged"
    assert not Guard(abort_on_nonfinite=False, first=g.first).stop_here()


def test_guard_agreement_over_ranks():
    """Every rank writes only its own slots; the sum tells every rank every rank's flags."""
    a, b = Guard(world=2, rank=0), Guard(world=2, rank=1)
    b.observe(7, [3], torch.tensor([float("inf")]), "training")
    total = a.slots(torch.zeros(1)) + b.slots(torch.zeros(1))
    for g in (a, b):
        g.agree(total)
        assert g.agreed[0] == "diverged"
        assert (g.agreed[1].step, g.agreed[1].node) == (7, 3)
    SIGNALS.received = signal.SIGTERM
    try:
        c = Guard(world=2, rank=1)
        c.agree(Guard(world=2, rank=0).slots(torch.zeros(1)) + c.slots(torch.zeros(1)))
        assert c.agreed == ("signal", signal.SIGTERM)
    finally:
        SIGNALS.received = None


def test_write_json_is_strict(tmp_path):
    clean = write_json(tmp_path / "s.json", {"a": float("nan"), "b": {"c": [1.0, float("inf")]},
                                             "d": 2.5})
    text = (tmp_path / "s.json").read_text()
    assert strict_json(text) == clean
    assert clean["a"] is None and clean["b"]["c"] == [1.0, None] and clean["d"] == 2.5
    assert clean["nonfinite"] == ["a", "b.c[1]"]
    json.loads(text)


# ---- the default divergence rule: lr=1e6 stops, a high but healthy lr does not
@pytest.mark.parametrize(("lr", "diverges"), [(1e6, True), (3.0, False)])
def test_default_divergence_factor_stops_a_huge_lr_not_a_high_one(lr: float, diverges: bool):
    """The default config (digits, mlp, sgd; only steps and nodes cut down). lr=1e6: the
    training loss jumps from ~2.3 to ~4e5 at step 1, far past the default 1000× its start
    (exit 4 in the CLI; the old default 1e6 let it finish with exit 0). lr=3 (30× the
    preset's 0.1) stays within ~1.02× its start (60 steps, 16 nodes): it runs to the end."""
    from conftest import make_config

    from dicesim.cli import guard_for
    from dicesim.comm.exchange import Comm
    from dicesim.common.stopping import Stopped
    from dicesim.run.engine import Simulation

    cfg = make_config("nodes=4", "steps=10", "eval_every=2", "influence.events=0", "progress=false",
                      f"optim.lr={lr}")
    assert cfg.divergence_factor == 1e3
    sim = Simulation(cfg)
    comm = Comm("gloo", 60, torch.device("cpu"))
    comm.guard = guard_for(cfg, 1, 0)
    if diverges:
        with pytest.raises(Stopped) as info:
            sim.execute(comm)
        assert info.value.reason == "diverged" and info.value.code == 4
        assert info.value.detail.value > 1e3 * 2.0
    else:
        result = sim.execute(comm)
        measured = [r.train_loss for r in result.metrics if not math.isnan(r.train_loss)]
        assert measured and max(measured) < 10  # rows between evaluations hold NaN
