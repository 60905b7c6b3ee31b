"""Experiments are interruptible and resumable: SIGTERM after case k keeps the k finished
cases (summary.json says interrupted), `resume=auto` / `resume=<dir>` skips them and redoes
the rest, and the final summary.json equals an uninterrupted run's. Also through the
generated sbatch script with a fake srun (runs dicesim here) and scontrol (records the
requeue), as SLURM would run it before and after a requeue."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from dicesim.launch import LaunchSpec, render_sbatch

TINY = ["experiment=collaborators", "nodes=6", "steps=40", "attack.nodes=[1]",
        "collaborators.topologies=[complete]", "plots=false", "progress=false"]
CASES = ["complete/no_attack", "complete/no_defense", "complete/dice", "complete/trimmed_mean",
         "complete/oracle"]
NOT_COMPARED = ("wall_s", "provenance")


def env_for(pause: Path | None = None, at: int = 3) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("DICESIM_TEST_PAUSE", "DICESIM_FAULT", "WORLD_SIZE", "RANK",
                "DICESIM_STATUS_DIR"):
        env.pop(key, None)
    if pause is not None:  # wait before the at-th run: cases 1 … at-1 are finished
        env["DICESIM_TEST_PAUSE"] = f"experiment@{at}:{pause}"
    return env


def dicesim(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicesim", *TINY, *args], cwd=REPO,
                          env=env or env_for(), capture_output=True, text=True, timeout=240)


def wait_and_stop(proc: subprocess.Popen, marker: Path, pid_of_marker: bool = False) -> None:
    """SIGTERM once the pause is reached (to the process that wrote the marker)."""
    deadline = time.monotonic() + 200
    while not marker.exists() or not marker.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"never paused (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    pid = int(marker.read_text()) if pid_of_marker else proc.pid
    os.kill(pid, signal.SIGTERM)


def numbers(summary: dict) -> dict:
    """summary.json without what differs between two runs of the same settings."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if not k.endswith(NOT_COMPARED)}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return strip(summary)


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = dicesim(f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr
    return numbers(summary_of(out))


@pytest.mark.parametrize("how", ["auto", "dir"])
def test_interrupted_after_two_cases_resumes_to_the_same_summary(tmp_path, uninterrupted,
                                                                 how):
    out, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-m", "dicesim", *TINY, f"out_dir={out}"],
                            cwd=REPO, env=env_for(marker), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_and_stop(proc, marker)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert len(stderr.splitlines()) == 1 and "interrupted in the experiment phase" in stderr
    assert "2 of 5 cases finished" in stdout
    stopped = summary_of(out)
    assert stopped["status"] == "interrupted" and stopped["finished"] == CASES[:2]
    kept = sorted(p.parent.name for p in (out / "cases").glob("*/result.pkl"))
    assert kept == ["complete__no_attack", "complete__no_defense"]

    refused = dicesim(f"out_dir={out}")  # without resume: the directory is not taken over
    assert refused.returncode == 2 and "already holds another run's outputs" in refused.stderr
    resume = "resume=auto" if how == "auto" else f"resume={out}"
    args = (f"out_dir={out}", resume) if how == "auto" else (resume,)
    again = dicesim(*args)
    assert again.returncode == 0, again.stderr
    assert "2 of 5 cases finished earlier are read back" in again.stdout
    ran = [ln for ln in again.stdout.splitlines() if ln.startswith("  [")]
    assert [ln.split("]")[0] for ln in ran] == ["  [3/5", "  [4/5", "  [5/5"]
    assert numbers(summary_of(out)) == uninterrupted


def test_resume_auto_refuses_a_directory_of_other_settings(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 99\n")
    proc = dicesim(f"out_dir={out}", "resume=auto")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "holds a run with other settings" in proc.stderr


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_sbatch_job_interrupted_requeues_and_finishes(tmp_path, uninterrupted):
    """The rendered script under bash: srun (fake) runs dicesim's own arguments here; a
    SIGTERM after two cases makes the job requeue itself; the requeued job (same job id,
    same RUN_DIR) resumes and writes the uninterrupted run's summary."""
    bindir, requeued, marker = tmp_path / "bin", tmp_path / "requeued", tmp_path / "marker"
    bindir.mkdir()
    _exe(bindir / "scontrol", f'if [ "$1" = requeue ]; then echo "$2" >> {requeued}; '
                              'else printf "node-1\\n"; fi\n')
    # torchrun's own flags are dropped: one rank, run by the python that runs the tests
    _exe(bindir / "srun", 'while [ "$1 $2" != "-m dicesim" ]; do shift; done; shift 2\n'
                          f'exec {shlex.quote(sys.executable)} -m dicesim "$@"\n')
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(LaunchSpec(python="py", overrides=TINY)))
    run_dir = tmp_path / "run"
    env = {**env_for(marker), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node-1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77",
           "SLURM_CPUS_PER_TASK": "1", "RUN_DIR": str(run_dir)}
    job = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_and_stop(job, marker, pid_of_marker=True)  # SIGTERM reaches dicesim, as from srun
    _, err = job.communicate(timeout=60)
    assert job.returncode == 143, err
    assert requeued.read_text() == "77\n" and "requeueing to resume" in err
    env.pop("DICESIM_TEST_PAUSE")
    again = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert requeued.read_text() == "77\n"  # not requeued again
    assert "2 of 5 cases finished earlier are read back" in again.stdout
    assert numbers(summary_of(run_dir)) == uninterrupted
