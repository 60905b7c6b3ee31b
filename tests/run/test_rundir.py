"""Run directories: never two runs' outputs in one directory (dicesim/run/rundir.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CPU_PATH, REPO
from test_faults import strict_json

from dicesim.run import rundir
from dicesim.run.rundir import RunDirError, Target

FAST = [*CPU_PATH, "nodes=4", "steps=4", "batch_size=8", "model.hidden=[8]", "data.probe_size=40",
        "data.max_train=400", "influence.events=0", "progress=false", "plots=false",
        "eval_every=2"]


# ------------------------------------------------------------------------------ unit rules
def test_precedence():
    assert rundir.choose("o/x", [], [], "/cwd") == Target(Path("o/x"), True, "default")
    assert rundir.choose("/a", ["out_dir=/a"], [], "/cwd").unique is False
    hydra = rundir.choose("o/x", [], ["hydra.run.dir=/h"], "/h")
    assert hydra == Target(Path("/h"), False, "hydra.run.dir")
    same = rundir.choose("/h", ["out_dir=/h"], ["hydra.run.dir=/h"], "/h")
    assert same.path == Path("/h")
    with pytest.raises(RunDirError, match="give one of them"):
        rundir.choose("/a", ["out_dir=/a"], ["hydra.run.dir=/h"], "/h")
    sweep = rundir.choose("o/x", [], [], None, job_dir="/m/3", job_num=3)
    assert sweep == Target(Path("/m/3"), False, "hydra.sweep.dir")
    assert rundir.choose("/a", ["out_dir=/a"], [], None, job_dir="/m/3", job_num=3).path == \
        Path("/a/3")


def test_default_names_are_unique_under_a_race(tmp_path):
    base = tmp_path / "outputs" / "run" / "2026-01-01_00-00-00"
    made: list[Path] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        made.append(rundir.create_unique(base))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == sorted(
        [base.name] + [f"{base.name}-{i}" for i in range(1, 8)])


def test_overwrite_removes_only_run_outputs(tmp_path):
    for name in ("config.yaml", "metrics.csv", "proximal.csv", "summary.json", "a.png",
                 ".metrics.csv.123.tmp", "notes.txt", "data.csv"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_10.pt").write_text("x")
    with pytest.raises(RunDirError, match="overwrite=true"):
        rundir.refuse_existing_outputs(tmp_path, overwrite=False)
    rundir.refuse_existing_outputs(tmp_path, overwrite=False, resume=True)  # resume: no check
    rundir.refuse_existing_outputs(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "notes.txt"]


def test_claim_and_probe(tmp_path):
    target = Target(tmp_path / "a" / "b", False, "out_dir")
    rundir.probe(target, overwrite=False)
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind
    out = rundir.claim(target, overwrite=False)
    rundir.write_config(out, "x: 1\n")
    with pytest.raises(RunDirError, match="another run"):
        rundir.write_config(out, "x: 2\n")  # config.yaml is the claim: created exclusively
    with pytest.raises(RunDirError, match="already holds"):
        rundir.probe(target, overwrite=False)
    for bad in (Target(Path("/proc/x/run"), False, "out_dir"), Target(Path("/proc/x"), True,
                                                                          "default")):
        with pytest.raises(RunDirError, match="cannot create"):
            rundir.claim(bad, overwrite=False)
        with pytest.raises(RunDirError):
            rundir.probe(bad, overwrite=False)


# ------------------------------------------------------------------------- real commands
def dicesim(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "DICESIM_FAULT"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "dicesim", *FAST, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def test_runs_and_run_directories(tmp_path):
    """Two runs started at the same moment with the same name get two complete directories;
    hydra.run.dir places the outputs; an unwritable out_dir is one line, exit 2; a rerun
    into a used out_dir is refused, and overwrite=true leaves no stale file."""
    used = tmp_path / "used"
    wave = {
        "twin1": dicesim(tmp_path, "name=twin"),
        "twin2": dicesim(tmp_path, "name=twin"),
        "hydra": dicesim(tmp_path, f"hydra.run.dir={tmp_path / 'hyd'}"),
        "proc": dicesim(tmp_path, "out_dir=/proc/x"),
        "clash": dicesim(tmp_path, f"out_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'h'}"),
        "first": dicesim(tmp_path, f"out_dir={used}", "influence.proximal=true"),
    }
    results = {name: finish(p) for name, p in wave.items()}
    for name in ("twin1", "twin2", "hydra", "first"):
        assert results[name][0] == 0, results[name][1][-2000:]
    twins = sorted((tmp_path / "outputs" / "twin").iterdir())
    assert len(twins) == 2
    for d in twins:
        strict_json((d / "summary.json").read_text())
        assert {"config.yaml", "metrics.csv"} <= {p.name for p in d.iterdir()}
        assert not list(d.glob(".*.tmp"))
    assert (tmp_path / "hyd" / "summary.json").exists()
    assert not (tmp_path / "outputs" / "run").exists()  # hydra.run.dir was honoured

    code, err = results["proc"]
    assert code == 2 and len(err.splitlines()) == 1 and "out_dir=/proc/x" in err, err
    code, err = results["clash"]
    assert code == 2 and len(err.splitlines()) == 1 and "different directories" in err, err
    assert not (tmp_path / "a").exists()

    assert (used / "proximal.csv").exists()
    (used / "notes.txt").write_text("mine")
    before = (used / "summary.json").read_text()
    code, err = finish(dicesim(tmp_path, f"out_dir={used}"))
    assert code == 2 and len(err.splitlines()) == 1 and "overwrite=true" in err, err
    assert (used / "summary.json").read_text() == before  # nothing touched

    code, err = finish(dicesim(tmp_path, f"out_dir={used}", "overwrite=true"))
    assert code == 0, err
    assert not (used / "proximal.csv").exists()  # the old run's file is gone
    assert (used / "notes.txt").read_text() == "mine"  # the user's file is not
    assert "overwrite: true" in (used / "config.yaml").read_text()


def test_launcher_checks_the_config_once_before_torchrun(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dicesim.launch", "torchrun", "--procs", "2",
                           "--", "nodes=3", f"out_dir={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "dicesim: error: nodes=3 is not divisible over 2 ranks; use a multiple of 2 nodes or "
        "a number of ranks that divides 3"]
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "run").exists()
