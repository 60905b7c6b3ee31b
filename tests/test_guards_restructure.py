"""Properties the rest of the suite did not assert (issue 25): each test here fails on one
realistic mistake that every other test let pass (named in its docstring)."""

from __future__ import annotations

import json

import torch
from conftest import make_config

from dicesim.comm import Comm
from dicesim.engine import Simulation
from dicesim.report import LOSS_METRIC, write_all
from dicesim.stopping import Guard
from dicesim.trainer import METRIC_COLUMNS


# ---- 4. the divergence rule's reference -----------------------------------------------------
def _first(losses_by_step: list[float], factor: float = 100.0):
    guard = Guard(divergence_factor=factor)
    for t, loss in enumerate(losses_by_step):
        guard.observe(t, [0], torch.tensor([loss]), "training")
    return guard.first


def test_a_gradually_climbing_loss_is_judged_against_its_first_value():
    """2 → 150 → 15,000 with factor 100: no step is 100× the one before it (15,000 = 100 ×
    150 exactly), but step 2 is 7,500× step 0's loss. Mistake caught: the previous loss
    as the reference."""
    assert _first([2.0, 150.0]) is None  # 75×: below the factor
    found = _first([2.0, 150.0, 15_000.0])
    assert (found.step, found.node, found.what, found.value) == (2, 0, "training", 15_000.0)


def test_a_jump_from_a_high_plateau_is_judged_against_the_start():
    """1 → 50 (a plateau, 50× the start) → 150: 3× the plateau, 150× the start: flagged.
    A loss that starts on the plateau is not flagged by the same jump."""
    found = _first([1.0, 50.0, 50.0, 50.0, 150.0])
    assert (found.step, found.value) == (4, 150.0)
    assert _first([50.0, 50.0, 50.0, 150.0, 4_000.0]) is None  # 80× its own start
    assert _first([0.0, 1.0, 50.0, 120.0]).step == 3  # the first *positive* loss is the start


def test_summary_names_the_diverged_metric_once_as_metrics_csv_does(tmp_path):
    """A run whose losses overflow: the metric rows' first non-finite loss is named by its
    metrics.csv column; when the guard stopped the run, its finding (same naming) is the one
    summary.json keeps, not overwritten by a later row's. Mistake caught: `training_loss`
    in one code path and `train_loss` in the other."""
    sim = Simulation(make_config("nodes=4", "batch_size=8", "data.probe_size=40",
                                 "data.max_train=400", "data=synthetic_regression",
                                 "model=linear", "optim.lr=5", "steps=30", "eval_every=1",
                                 "influence.events=0", "progress=false"))
    comm = Comm("gloo", 60, torch.device("cpu"))
    comm.guard = Guard(abort_on_nonfinite=False, divergence_factor=None)  # run to overflow
    result = sim.execute(comm)
    (tmp_path / "rows").mkdir()
    rows = write_all(tmp_path / "rows", sim, result, plots=False)["first_nonfinite"]
    assert rows["metric"] in METRIC_COLUMNS and set(LOSS_METRIC.values()) <= set(METRIC_COLUMNS)
    guard_found = {"step": 3, "node": 1, "metric": LOSS_METRIC["training"], "value": 6.0e7}
    (tmp_path / "stopped").mkdir()
    summary = write_all(tmp_path / "stopped", sim, result, plots=False,
                        status={"status": "diverged", "first_nonfinite": guard_found})
    assert summary["first_nonfinite"] == guard_found == json.loads(
        (tmp_path / "stopped" / "summary.json").read_text())["first_nonfinite"]
    assert guard_found["metric"] == "train_loss"  # cli.stopped names it by LOSS_METRIC too

