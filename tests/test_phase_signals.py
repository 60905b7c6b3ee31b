"""Every phase answers SIGTERM: the final evaluation, the attribution reverse pass,
the outputs, the figures, a checkpoint's files and an experiment's next run. Each command
pauses at its phase's check (DICESIM_TEST_PAUSE, dicesim.stopping.pause_for_test) and writes
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
from pathlib import Path

import pytest
from conftest import REPO

from dicesim.checkpoint import complete

TINY = ["nodes=4", "steps=6", "batch_size=8", "data.probe_size=40", "data.max_train=400",
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
    from dicesim.stopping import Interrupted, Signals

    signals = Signals()
    signals.check("outputs")
    signals.received = signal.SIGINT
    with pytest.raises(Interrupted) as info:
        signals.check("figures")
    assert (info.value.phase, info.value.code) == ("figures", 130)
    signals.check("outputs")  # answered: the writing that follows goes on
