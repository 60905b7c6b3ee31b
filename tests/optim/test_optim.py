"""Stateful local optimizers (docs/design.md §2 "Stateful optimizers"): the step against
torch.optim, its tangent and adjoint against torch.func, the engine against a dense
oracle of one torch.optim instance per node over 1, 2 and 4 ranks, and the influence
exactness properties with momentum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import events_arg, execute, make_config, probe_losses, read_csv, run_dicesim
from torch.func import hessian, jvp, vjp

from dicesim.optim.local import Adam, Schedule, build_optimizer
from dicesim.run.engine import Simulation
from dicesim.testing.oracle import dense_run, dense_trajectory

TINY = ("nodes=4", "steps=30", "batch_size=8", "dtype=float64", "model.hidden=[8]",
        "data.probe_size=40", "eval_every=1", "influence.events=0")
QUADRATIC = ("data=synthetic_regression", "model=linear", "dtype=float64", "nodes=4",
             "batch_size=8", "steps=8", "optim.lr=0.05", "data.probe_size=50")
SETTINGS = {  # optim overrides → what they exercise
    "momentum": ("optim=momentum",),
    "nesterov_decay_cosine": ("optim=momentum", "optim.nesterov=true", "optim.weight_decay=0.01",
                              "optim.schedule=cosine", "optim.min_lr=0.005"),
    "dampening_step": ("optim=momentum", "optim.dampening=0.3", "optim.schedule=step",
                       "optim.step_size=3", "optim.gamma=0.5"),
    "adam_warmup": ("optim=adam", "optim.weight_decay=0.01", "optim.schedule=linear_warmup_cosine",
                    "optim.warmup_steps=3"),
    "adamw": ("optim=adamw", "optim.lr=0.01"),
    "momentum_gossip_state": ("optim=momentum", "optim.gossip_state=true"),
    "adam_gossip_state": ("optim=adam", "optim.gossip_state=true"),
}


def optimizer(*overrides: str, steps: int = 10):
    cfg = make_config(*overrides)
    return build_optimizer(cfg.optim, steps)


# ---- the pure step and its derivatives ---------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("t", [0, 4])
def test_tangent_and_adjoint_are_the_steps_jvp_and_vjp(name, t):
    """Against torch.func on the pure step, float64, at a random point (v > 0)."""
    opt = optimizer(*SETTINGS[name])
    gen = torch.Generator().manual_seed(t)
    rows, P = 3, 7
    nodes = np.arange(rows)

    def rand(scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(rows, P, generator=gen, dtype=torch.float64)

    theta, grad = rand(), rand()
    state = {n: (rand().abs() if n == "v" else rand()) for n in opt.state_names}
    tangents = (rand(), {n: rand(0.1) for n in opt.state_names}, rand())

    def f(th, st, g):
        return opt.step(t, nodes, th, st, g)

    _, (want_update, want_state) = jvp(f, (theta, state, grad), tangents)
    got_update, got_state = opt.tangent(t, nodes, theta, state, grad, *tangents)
    torch.testing.assert_close(got_update, want_update, rtol=1e-12, atol=1e-14)
    for n in opt.state_names:
        torch.testing.assert_close(got_state[n], want_state[n], rtol=1e-12, atol=1e-14)

    bars = (rand(), {n: rand() for n in opt.state_names})
    _, pullback = vjp(f, theta, state, grad)
    want_theta, want_s, want_g = pullback(bars)
    got_theta, got_g, got_s = opt.adjoint(t, nodes, theta, state, grad, *bars)
    torch.testing.assert_close(got_theta, want_theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-14)
    for n in opt.state_names:
        torch.testing.assert_close(got_s[n], want_s[n], rtol=1e-12, atol=1e-14)


def test_adam_tangent_is_finite_where_the_second_moment_is_zero():
    """A parameter with zero gradient (dead ReLU unit) has v' = 0: √v has no derivative
    there, but its tangent 2(1 − β2) g dg is 0 too; the linearization must not be nan."""
    opt = Adam(Schedule(1e-3))
    zero = torch.zeros(1, 4, dtype=torch.float64)
    one = torch.ones(1, 4, dtype=torch.float64)
    d_update, d_state = opt.tangent(0, np.array([0]), zero, {"m": zero, "v": zero}, zero,
                                    one, {"m": zero, "v": zero}, one)
    assert torch.isfinite(d_update).all() and torch.isfinite(d_state["v"]).all()
    bar_theta, bar_g, _ = opt.adjoint(0, np.array([0]), zero, {"m": zero, "v": zero}, zero,
                                      one, {"m": zero, "v": zero})
    assert torch.isfinite(bar_g).all()


def test_schedules_give_the_documented_learning_rates():
    cos = Schedule(0.1, "cosine", steps=10, min_lr=0.0)
    assert cos(0) == pytest.approx(0.1) and cos(5) == pytest.approx(0.05) and cos(10) < 1e-12
    step = Schedule(0.1, "step", step_size=3, gamma=0.5)
    assert [step(t) for t in (0, 2, 3, 6)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    warm = Schedule(0.1, "linear_warmup_cosine", steps=10, warmup_steps=4, min_lr=0.01)
    assert [warm(t) for t in (0, 3, 4)] == pytest.approx([0.025, 0.1, 0.1])
    assert warm(7) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + np.cos(np.pi * 3 / 6)))


# ---- the engine against torch.optim per node --------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_one_process_equals_a_torch_optimizer_per_node(name):
    overrides = (*TINY, "topology=one_peer_exponential", *SETTINGS[name])
    sim, result = execute(*overrides)
    _, theta = dense_run(sim)
    torch.testing.assert_close(result.final_params, theta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "ranks"), [("nesterov_decay_cosine", 2),
                                             ("adam_warmup", 4),
                                             ("momentum_gossip_state", 2)])
def test_ranks_equal_a_torch_optimizer_per_node(tmp_path, name, ranks):
    """float64, 1e-9: per-step probe losses and final θ, nodes spread over ranks."""
    overrides = (*TINY, "topology=ring", *SETTINGS[name], "save_params=true")
    sim = Simulation(make_config(*overrides))
    losses, theta = dense_run(sim)
    run_dicesim(tmp_path, *overrides, ranks=ranks)
    expected = torch.stack(losses).numpy()
    got = np.full_like(expected, np.nan)
    for row in read_csv(tmp_path / "metrics.csv"):
        got[int(row["step"]), int(row["node"])] = float(row["probe_loss"])
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    torch.testing.assert_close(torch.load(tmp_path / "params.pt"), theta, rtol=1e-9,
                               atol=1e-12)


# ---- influence through the optimizer -----------------------------------------------------

@pytest.mark.parametrize(("nesterov", "topology"), [(False, "ring"), (True, "hub"),
                                                    (False, "one_peer_exponential")])
def test_momentum_on_a_quadratic_loss_is_exact_up_to_the_curvature_term(nesterov, topology):
    """Linear regression, float64, heavy ball / Nesterov with weight decay: the dynamics
    are affine in (θ, b), so δ̂ = δ and E − G = ½ q δᵀH'δ (s ≥ 1), and dice_mid = G, to
    1e-9. At s = 0 with the whole batch removed the counterfactual still moves by its
    momentum and weight decay (Δ̃ ≠ 0); E is taken there, at θ_j^t + Δ̃ = θ̃_j^{t+½}, so
    E − G = −½ q δᵀH'δ as for SGD."""
    mom = ("optim=momentum", "optim.momentum=0.8", "optim.weight_decay=0.02",
           f"optim.nesterov={str(nesterov).lower()}")
    events = [{"node": 0, "step": 1}, {"node": 2, "step": 3}, {"node": 3, "step": 0}]
    overrides = (*QUADRATIC, *mom, f"topology={topology}", "influence.hops=4",
                 "influence.estimators=[dice_e,dice_mid]", events_arg(events))
    sim, result = execute(*overrides)
    rows = {(r.event, r.hop, r.node): r for r in result.influence}
    halves: list[torch.Tensor] = []
    real = dense_trajectory(sim, halves)
    xp, yp = sim.data.x_probe.double(), sim.data.y_probe.double()
    H = hessian(sim.model.probe_loss)(real[0][0], xp, yp)
    q = sim.q
    checked = 0
    for index, e in enumerate(events):
        removal = f"counterfactual.remove=[{{node:{e['node']},step:{e['step']},samples:all}}]"
        cf_halves: list[torch.Tensor] = []
        cf = dense_trajectory(Simulation(make_config(*overrides, removal)), cf_halves)
        j, t = e["node"], e["step"]
        d = halves[t][j] - cf_halves[t][j]  # δ_j^{t+½}, from torch.optim's two steps
        moved = cf_halves[t][j] - real[t][j]  # Δ̃: the counterfactual's own update
        assert moved.abs().max() > 0 or t == 0
        r = rows[(index, 0, j)]
        np.testing.assert_allclose(r.dice_e - r.dice_gt, -0.5 * q[j] * float(d @ H @ d),
                                   rtol=1e-9)
        np.testing.assert_allclose(r.dice_mid, r.dice_gt, rtol=1e-9)
        for s in range(1, 5):
            delta = real[t + s] - cf[t + s]
            for k in range(sim.run.nodes):
                if (index, s, k) not in rows:
                    assert delta[k].abs().max() == 0  # unreached: no perturbation
                    continue
                r = rows[(index, s, k)]
                curv = 0.5 * q[k] * float(delta[k] @ H @ delta[k])
                np.testing.assert_allclose(r.dice_e - r.dice_gt, curv, rtol=1e-9, atol=1e-18)
                np.testing.assert_allclose(r.dice_mid, r.dice_gt, rtol=1e-9, atol=1e-18)
                checked += 1
    assert checked >= 12


@pytest.mark.parametrize("name", ["momentum", "adam_warmup", "adam_gossip_state"])
def test_ground_truth_equals_two_separate_runs(name):
    """G[e,s,k] from shadows carrying (θ̃, s̃) = q_k (L'_k real − L'_k of a complete run with
    the removal applied from the start), for a whole batch and two samples."""
    base = (*TINY, "steps=7", "topology=ring", *SETTINGS[name])
    events = [{"node": 2, "step": 1}, {"node": 0, "step": 2, "samples": 2}]
    overrides = (*base, "influence.hops=4", "influence.estimators=[dice_e]",
                 events_arg(events))
    sim, result = execute(*overrides)
    real = probe_losses(result)
    checked = 0
    for ev in sim.events:
        ids = ",".join(str(int(i)) for i in ev.sample_ids)
        removal = f"counterfactual.remove=[{{node:{ev.source},step:{ev.step},samples:[{ids}]}}]"
        _, cf_result = execute(*base, "influence.events=0", removal)
        cf = probe_losses(cf_result)
        for r in result.influence:
            if r.event != ev.index or r.hop == 0:
                continue
            step = ev.step + r.hop
            np.testing.assert_allclose(r.dice_gt, sim.q[r.node] * (real[step, r.node]
                                                                  - cf[step, r.node]),
                                       rtol=1e-9, atol=1e-16)
            checked += 1
    assert checked >= 10


def test_a_removed_batch_keeps_acting_through_the_momentum_after_theta_moved_on(tmp_path):
    """A directed ring without self-loops (W[k, k−1] = 1): θ's perturbation moves one node
    per step, but the source keeps its buffer's perturbation δb and steps away from the
    counterfactual again. The ground truth there equals two separate runs; plain SGD's
    reach sets leave the source at once."""
    n = 4
    W = np.roll(np.eye(n), 1, axis=0)  # row k receives from k − 1 only
    np.save(tmp_path / "W.npy", W)
    base = (*QUADRATIC, "topology=file", f"topology.path={tmp_path / 'W.npy'}",
            "influence.hops=3", "influence.estimators=[dice_e,dice_mid]",
            events_arg([{"node": 0, "step": 1}]))
    _, plain = execute(*base)
    assert {(r.hop, r.node) for r in plain.influence} == {(s, s) for s in range(4)}
    _, mom = execute(*base, "optim=momentum")
    behind = {r.node: r.dice_gt for r in mom.influence if r.hop == 3}
    assert set(behind) == {0, 1, 2, 3}
    _, cf = execute(*base, "optim=momentum", "influence.events=0",
                    "counterfactual.remove=[{node:0,step:1,samples:all}]")
    real, without = probe_losses(mom), probe_losses(cf)
    for k, g in behind.items():
        np.testing.assert_allclose(g, 0.25 * (real[4, k] - without[4, k]), rtol=1e-9,
                                   atol=1e-16)
    assert abs(behind[1]) > 1e-3 * abs(behind[3])  # passed by θ's perturbation, not idle
    for r in mom.influence:  # the linearized (δ̂, δ̂b) carried behind the front: exact here
        np.testing.assert_allclose(r.dice_mid, r.dice_gt, rtol=1e-9, atol=1e-18)


def test_the_ablation_without_state_equals_dice_e_for_plain_sgd_and_differs_with_momentum():
    events = events_arg([{"node": 1, "step": 2}, {"node": 3, "step": 1, "samples": 2}])
    est = "influence.estimators=[dice_e,dice_e_nostate]"
    _, plain = execute(*TINY, "influence.hops=3", "influence.ground_truth=false", est, events)
    for r in plain.influence:
        assert r.dice_e_nostate == r.dice_e
    _, mom = execute(*TINY, "influence.hops=3", "influence.ground_truth=false", est, events,
                     "optim=momentum")
    later = [r for r in mom.influence if r.hop >= 2]
    assert max(abs(r.dice_e_nostate - r.dice_e) / abs(r.dice_e) for r in later) > 0.05
    assert all(r.dice_e_nostate == r.dice_e for r in mom.influence if r.hop == 0)
