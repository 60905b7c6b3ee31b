"""Checkpoint and resume: a killed run, resumed, writes the same bytes as one that never
stopped; checkpoints that do not fit the run are refused with one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, dicesim_command

from dicesim.checkpoint import complete

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


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    run = (*RUN, "dtype=float64", "checkpoint.every=4", "steps=8")
    out = tmp_path / "run"
    ok(dicesim(*run, f"out_dir={out}"))
    for change, key in (("optim.lr=0.07", "optim.lr"), ("seed=3", "seed"),
                        ("influence.hops=1", "influence.hops")):
        proc = dicesim(*run, change, f"out_dir={out}", f"resume={out}")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dicesim: error: resume:"), proc.stderr
        assert key in lines[0] and "Traceback" not in proc.stderr


def test_resume_without_checkpoint_is_one_line_and_auto_starts_fresh(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = dicesim(*RUN, "steps=4", f"out_dir={empty}", f"resume={empty}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("dicesim: error: resume=")
    fresh = tmp_path / "fresh"
    proc = dicesim(*RUN, "steps=4", f"out_dir={fresh}", "resume=auto")
    ok(proc)
    assert "resuming" not in proc.stdout and (fresh / "metrics.csv").is_file()


@pytest.mark.parametrize("ranks", [0, 2])
def test_sigterm_leaves_a_checkpoint_and_resume_auto_finishes_the_same_run(tmp_path, ranks):
    """SLURM's SIGTERM before a time limit: the ranks stop where they next agree (one
    process: the next step; several: the next evaluation), write a checkpoint of that step
    and exit 143; `resume=auto` with the same command line then writes the same bytes."""
    run = (*RUN, "dtype=float64", "checkpoint.every=100", "resume=auto")
    ok(dicesim(*run, f"out_dir={tmp_path / 'whole'}", ranks=ranks))
    cut = tmp_path / "cut"
    stopped = dicesim(*run, f"out_dir={cut}", ranks=ranks, fault="term:0:5")
    assert stopped.returncode != 0
    if not ranks:
        assert stopped.returncode == 143
        assert stopped.stderr.strip().splitlines() == [
            f"dicesim: interrupted at step 6 (SIGTERM); finished rows are in {cut}"]
    step = 6  # one process: the step after the signal; 2 ranks: the next eval (eval_every=2)
    assert [p.name for p in complete(cut)] == [f"step_{step:06d}"]
    assert '"status": "interrupted"' in (cut / "summary.json").read_text()
    resumed = dicesim(*run, f"out_dir={cut}", ranks=ranks)
    ok(resumed)
    for name in OUTPUTS:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_the_launcher_refuses_a_checkpoint_of_another_rank_count(tmp_path):
    out = tmp_path / "run"
    ok(dicesim(*RUN, "steps=8", "checkpoint.every=4", f"out_dir={out}"))
    assert [p.name for p in complete(out)] == ["step_000004"]  # none at the last step
    proc = subprocess.run([sys.executable, "-m", "dicesim.launch", "torchrun", "--procs", "2",
                           "--", *RUN, "steps=8", "checkpoint.every=4", f"out_dir={out}",
                           f"resume={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"dicesim: error: resume: the checkpoint {out}/checkpoints/step_000004 was written by "
        "1 rank(s), this run has 2; resume with the same number of ranks"]


def test_the_checkpoint_holds_each_stateful_part_and_refuses_an_old_layout():
    """Trainer.state_dict is one entry per stateful part; loading it back gives the same
    state, and a checkpoint of the former flat layout (step, theta, … at the top) is refused
    with a ConfigError (one line, exit 2) instead of a KeyError."""
    import torch
    from conftest import make_config

    from dicesim.comm import Comm
    from dicesim.engine import Simulation, build_trainer
    from dicesim.errors import ConfigError

    sim = Simulation(make_config(*RUN, "dtype=float64"))
    trainer = build_trainer(sim, Comm("gloo", 60, torch.device("cpu")))
    state = trainer.state_dict()
    assert set(state) == {"position", "metrics", "optimizer", "aggregator", "tracking",
                          "result"}
    state["position"] = {"step": 3, "theta": state["position"]["theta"] + 1}
    trainer.load_state_dict(state)
    assert trainer.position.step == 3 == trainer.result.start_step
    torch.testing.assert_close(trainer.theta, trainer.parts.theta0 + 1)
    old = {"step": 3, "theta": trainer.theta, "train_loss": state["metrics"]["train_loss"]}
    with pytest.raises(ConfigError, match="older version"):
        trainer.load_state_dict(old)
