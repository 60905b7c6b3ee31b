"""Properties the rest of the suite did not assert: each test here fails on one
realistic mistake that every other test let pass (named in its docstring)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, dicesim_command, make_config, run_dicesim
from test_attribution import QUADRATIC, SMALL_MLP, _attribution_table, execute, network_loss
from torch.func import hessian

from dicesim.comm.exchange import Comm
from dicesim.common.stopping import Guard
from dicesim.report.attribution import write_attribution
from dicesim.report.summary import LOSS_METRIC, write_all
from dicesim.run.engine import Simulation
from dicesim.run.trainer import METRIC_COLUMNS
from dicesim.testing.oracle import dense_trajectory

#: the two-point Gauss–Legendre estimator's column (one name to change if it is renamed)
TWO_POINT = "dice_gauss2"


# ---- 1. the reverse pass under a time-varying, asymmetric topology --------------------------
def test_attribution_is_the_linearized_counterfactual_when_every_phase_is_asymmetric():
    """one_peer_exponential on 6 nodes: shifts by 1, 2 and 4 (period 3), none of them its own
    inverse mod 6, so every W^t ≠ (W^t)ᵀ. Linear regression, SGD, float64: A − G equals
    ½ Σ_k q_k δ_kᵀ H' δ_k (rtol 1e-9) for batches removed in each phase. Mistake caught: W^t
    instead of (W^t)ᵀ in the reverse pass at one phase (at 4 nodes shift 2 is symmetric)."""
    base = (*QUADRATIC, "topology=one_peer_exponential", "nodes=6", "steps=9")
    sim, result = execute(*base)
    topology = sim.topology
    assert topology.period == 3
    for t in range(topology.period):
        W = topology.W(t)
        assert np.abs(W - W.T).max() > 0.1, t
    a = result.attribution
    real = dense_trajectory(sim)
    xp, yp = sim.data.x_probe.double(), sim.data.y_probe.double()
    H = hessian(sim.model.probe_loss)(real[0][0], xp, yp)  # H' (constant: quadratic loss)
    for j, t in [(0, 0), (3, 1), (5, 2), (1, 4), (4, 5), (2, 6)]:  # steps of every phase
        cf_sim = Simulation(make_config(
            *base, f"counterfactual.remove=[{{node:{j},step:{t},samples:all}}]"))
        cf = dense_trajectory(cf_sim)
        d = real[-1] - cf[-1]  # δ_k at T
        G = network_loss(sim, real[-1]) - network_loss(sim, cf[-1])
        curvature = 0.5 * sum(sim.q[k] * float(d[k] @ H @ d[k]) for k in range(sim.run.nodes))
        assert abs(G) > 1e-6
        np.testing.assert_allclose(a.batch[t, 0, j] - G, curvature, rtol=1e-9, atol=1e-18,
                                   err_msg=f"node {j}, step {t}")


# ---- 2. resume with attribution and a stateful optimizer -------------------------------------
@pytest.mark.parametrize("optim", [("optim=momentum",), ("optim=adam", "optim.lr=0.01")],
                         ids=["momentum", "adam"])
def test_a_resumed_run_attributes_as_one_that_never_stopped_with_optimizer_state(tmp_path,
                                                                                 optim):
    """Killed after step 7 (checkpoints every 2 steps, θ and s kept every 3): the resumed
    run's attribution.csv equals the uninterrupted run's (1e-12). The kept s^t (momentum
    buffer / Adam's m, v) feed the reverse pass's tangent. Mistake caught: the keeper's
    checkpoint without the optimizer state (loading tolerating the missing key); the plain
    SGD resume test cannot see it (s is empty)."""
    overrides = (*SMALL_MLP, *optim, "nodes=4", "steps=8", "influence.events=0",
                 "attribution.keep_every=3", "checkpoint.every=2")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    sim, result = execute(*overrides)  # the uninterrupted run, in this process
    write_attribution(whole, sim, result.attribution, False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_FAULT": "kill:0:7"}
    killed = subprocess.run([*dicesim_command(), *overrides, f"out_dir={cut}", "progress=false",
                             "plots=false"], cwd=REPO, capture_output=True, text=True,
                            timeout=240, env=env)
    assert killed.returncode != 0 and (cut / "checkpoints").is_dir()
    assert not (cut / "attribution.csv").exists()
    run_dicesim(cut, *overrides, f"resume={cut}")
    expected, resumed = _attribution_table(whole), _attribution_table(cut)
    assert expected.keys() == resumed.keys() and len(expected) == 8 * 4
    assert any(abs(v) > 1e-6 for v in expected.values())
    for key, v in expected.items():
        assert abs(resumed[key] - v) <= 1e-12 * max(1.0, abs(v)), key


# ---- 3. the two-point rule through a stateful optimizer ---------------------------------------
def _errors_by_hop(lr: float, *optim: str) -> dict[int, tuple[float, float]]:
    """hop → (Σ|two-point − G|, Σ|dice_mid − G|) over 4 whole-batch events at step 1."""
    events = "influence.events=[" + ",".join(f"{{node:{n},step:1}}" for n in range(4)) + "]"
    _, result = execute("nodes=4", "batch_size=32", "dtype=float64", "model.hidden=[64]",
                        "data.probe_size=40", "steps=6", "topology=ring", "influence.hops=3",
                        f"optim.lr={lr}", events, f"influence.estimators=[dice_mid,{TWO_POINT}]",
                        "eval_every=1", *optim)
    return {hop: (sum(abs(getattr(r, TWO_POINT) - r.dice_gt) for r in result.influence
                      if r.hop == hop),
                  sum(abs(r.dice_mid - r.dice_gt) for r in result.influence if r.hop == hop))
            for hop in range(4)}


def test_two_point_rule_keeps_its_fifth_order_under_momentum():
    """Momentum is affine in (θ, b): the rule's error comes from ∇L's curvature alone and
    falls like η⁵ at every hop: ≥ 24× per halving (measured 26.1–33.6), dice_mid's ≈ 8×."""
    per_lr = [_errors_by_hop(lr, "optim=momentum") for lr in (0.1, 0.05, 0.025)]
    for big, small in zip(per_lr, per_lr[1:], strict=False):
        for hop in range(4):
            assert big[hop][0] / small[hop][0] >= 24.0, (hop, big[hop], small[hop])
            assert big[hop][1] / small[hop][1] < 10.0


def test_two_point_rule_evaluates_adams_state_at_each_gauss_point():
    """Adam: the tangent reads s = (m, v) at each point θ − uδ̂, s − uδ̂s. A removed batch
    moves m and v by O(1), not O(η), so past the first local step (hops 2, 3) no rule's
    error falls with η; there the two-point rule still halves dice_mid's error (measured
    Σ|two-point − G| / Σ|dice_mid − G| = 0.51 at hops 2, 3; ≤ 0.001 at hops 0, 1). Before
    the state is perturbed (hops 0, 1) its error falls ≥ 15× per halving of η (measured
    16–31). Mistake caught: s at the midpoint for both Gauss points (ratio 1.00 at hops 2,
    3; every SGD test of the rule passes with it, the SGD tangent not reading s)."""
    big, small = (_errors_by_hop(lr, "optim=adam") for lr in (0.01, 0.005))
    for hop in range(4):
        assert small[hop][0] <= 0.7 * small[hop][1], (hop, small[hop])
        assert big[hop][0] <= 0.7 * big[hop][1], (hop, big[hop])
    for hop in (0, 1):
        assert big[hop][0] / small[hop][0] >= 15.0, (hop, big[hop], small[hop])


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

