"""Checkpoint and resume: a killed run, resumed, writes the same bytes as one that never
stopped; checkpoints that do not fit the run are refused with one line."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO, dicesim_command

from dicesim.run.checkpoint import complete

# ground truth, curvature, proximal influence, an attack and a defense, all at once
RUN = ("nodes=4", "steps=14", "batch_size=8", "model.hidden=[8]", "data.probe_size=40",
       "eval_every=2", "influence.events=6", "influence.hops=2", "influence.proximal=true",
       "attack=scaled_update", "attack.nodes=[2]", "defense=dice", "defense.warmup=2",
       "progress=false", "plots=false")
OUTPUTS = ("metrics.csv", "influence.csv", "proximal.csv")


def dicesim(*overrides: str, ranks: int = 0, fault: str | None = None
            ) -> subprocess.CompletedProcess:
    cmd = dicesim_command(ranks)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DICESIM_FAULT", None)
    if fault:
        env["DICESIM_FAULT"] = fault
    return subprocess.run([*cmd, *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env=env)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize(("dtype", "ranks"), [("float64", 0), ("float32", 0),
                                              ("float64", 2), ("float32", 2)])
def test_killed_and_resumed_run_writes_the_same_bytes(tmp_path, dtype, ranks):
    run = (*RUN, f"dtype={dtype}", "checkpoint.every=4")
    ok(dicesim(*run, f"out_dir={tmp_path / 'whole'}", ranks=ranks))
    cut = tmp_path / "cut"
    victim = max(ranks - 1, 0)  # with 2 ranks the second dies; rank 0 gives up after it
    killed = dicesim(*run, f"out_dir={cut}", "timeout_s=10", ranks=ranks,
                     fault=f"kill:{victim}:9")
    assert killed.returncode != 0
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_000004",
                                                                        "step_000008"]
    assert not (cut / "metrics.csv").exists()
    resumed = dicesim(*run, f"out_dir={cut}", f"resume={cut}", ranks=ranks)
    ok(resumed)
    assert "resuming from" in resumed.stdout and "step_000008" in resumed.stdout
    for name in OUTPUTS:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize(("optim", "ranks"), [
    (("optim=momentum", "optim.nesterov=true", "optim.schedule=linear_warmup_cosine",
      "optim.warmup_steps=3"), 0),
    (("optim=adam", "optim.gossip_state=true", "optim.schedule=step", "optim.step_size=5"), 2),
])
def test_resume_is_exact_with_optimizer_state_and_a_schedule(tmp_path, optim, ranks):
    """The momentum buffer / Adam's m, v of the real rows and the shadows' and DICE-E's
    state perturbations are in the checkpoint; η_t follows the step index."""
    run = (*RUN, "dtype=float64", "checkpoint.every=4", *optim)
    ok(dicesim(*run, f"out_dir={tmp_path / 'whole'}", ranks=ranks))
    cut = tmp_path / "cut"
    killed = dicesim(*run, f"out_dir={cut}", "timeout_s=10", ranks=ranks,
                     fault=f"kill:{max(ranks - 1, 0)}:9")
    assert killed.returncode != 0
    ok(dicesim(*run, f"out_dir={cut}", f"resume={cut}", ranks=ranks))
    for name in OUTPUTS:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path):
    run = (*RUN, "dtype=float64", "checkpoint.every=4")
    ok(dicesim(*run, f"out_dir={tmp_path / 'whole'}"))
    cut = tmp_path / "cut"
    died = dicesim(*run, f"out_dir={cut}", fault="die:0:8:checkpoint")
    assert died.returncode == 1
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert names[0] == "step_000004" and names[1].startswith("step_000008.tmp-")
    resumed = dicesim(*run, f"out_dir={cut}", "resume=auto")
    ok(resumed)
    assert "step_000004" in resumed.stdout
    for name in OUTPUTS:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert [p.name for p in complete(cut)] == ["step_000008", "step_000012"]  # keep=2
