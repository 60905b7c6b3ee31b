"""Resume's checks and its other entries: checkpoints and run directories that do not fit
the run are refused with one line; SIGTERM leaves a checkpoint that resume=auto finishes;
run directories and checkpoints of older versions resume. (Split from test_resume.py so
that the two halves run in parallel.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, make_config
from test_resume import OUTPUTS, RUN, dicesim, ok

from dicesim.run.checkpoint import complete


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


def test_resume_auto_on_a_run_directory_from_before_eval_budget(tmp_path):
    """A config.yaml and checkpoints written before `eval:` existed count as eval.budget=null
    (every node evaluated on everything, as those runs did): resume=auto with
    eval.budget=null continues the run (from its checkpoint, or afresh in the directory
    without one) and writes the same metrics; with the default budget it is refused with
    one line that says so."""
    import json
    import shutil

    import yaml

    run = (*RUN, "dtype=float64", "checkpoint.every=4", "steps=8")
    old = tmp_path / "old"
    ok(dicesim(*run, f"out_dir={old}"))
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["eval"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    for meta in (old / "checkpoints").glob("*/meta.json"):
        written = json.loads(meta.read_text())
        del written["settings"]["eval.budget"]
        meta.write_text(json.dumps(written))
    metrics = (old / "metrics.csv").read_bytes()
    bare = tmp_path / "bare"  # killed before its first checkpoint
    shutil.copytree(old, bare, ignore=shutil.ignore_patterns("checkpoints"))
    for folder, line_start in ((old, "dicesim: error: resume: the checkpoint step_000004"),
                               (bare, f"dicesim: error: resume=auto: {bare} holds")):
        refused = dicesim(*run, f"out_dir={folder}", "resume=auto")
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
        assert lines[0].startswith(line_start), lines[0]
        assert "eval.budget: absent, written before that setting existed, so it ran as " \
               "eval.budget=null; now eval.budget=1000000; resume with eval.budget=null" \
               in lines[0], lines[0]
        resumed = dicesim(*run, "eval.budget=null", f"out_dir={folder}", "resume=auto")
        ok(resumed)
        assert ("resuming from" in resumed.stdout) == (folder == old), resumed.stdout
        assert (folder / "metrics.csv").read_bytes() == metrics


def test_settings_added_later_read_back_as_the_value_old_runs_ran_with():
    """A config.yaml or checkpoint written before a key existed counts as the value such a
    run ran with (allow_tf32: no run had used CUDA), so the current default resumes it."""
    from dicesim.run.checkpoint import as_written, first_difference, result_settings

    now = result_settings(make_config("nodes=8"))
    old = {k: v for k, v in now.items() if k != "allow_tf32"}
    assert first_difference(old, now) == "allow_tf32"
    assert first_difference(as_written(old), now) is None
    assert first_difference(as_written(old), {**now, "allow_tf32": True}) == "allow_tf32"


def test_the_checkpoint_holds_each_stateful_part_and_reads_the_former_layout():
    """Trainer.state_dict is one entry per stateful part; loading it back gives the same
    state; a checkpoint of the former flat layout (step, theta, … at the top) loads as the
    same values; anything else is a ConfigError (one line, exit 2), not a KeyError."""
    import torch
    from conftest import make_config

    from dicesim.comm.exchange import Comm
    from dicesim.common.errors import ConfigError
    from dicesim.run.engine import Simulation, build_trainer

    sim = Simulation(make_config(*RUN, "dtype=float64"))
    trainer = build_trainer(sim, Comm("gloo", 60, torch.device("cpu")))
    state = trainer.state_dict()
    assert set(state) == {"position", "metrics", "optimizer", "aggregator", "tracking",
                          "result"}
    state["position"] = {"step": 3, "theta": state["position"]["theta"] + 1}
    trainer.load_state_dict(state)
    assert trainer.position.step == 3 == trainer.result.start_step
    torch.testing.assert_close(trainer.theta, trainer.parts.theta0 + 1)
    flat = {"step": 5, "theta": trainer.theta * 2, **state["metrics"],
            "book": state["tracking"]["book"],
            "optimizer": state["optimizer"], "aggregator": state["aggregator"],
            "trackers": state["tracking"]["trackers"], "result": state["result"]}
    trainer.load_state_dict(flat)  # the former flat layout: the same values, per part
    assert trainer.position.step == 5 == trainer.result.start_step
    torch.testing.assert_close(trainer.theta, (trainer.parts.theta0 + 1) * 2)
    with pytest.raises(ConfigError, match="older version"):
        trainer.load_state_dict({"step": 3, "theta": trainer.theta})
