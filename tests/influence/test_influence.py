"""DICE-GT and DICE-E against the exactness properties of docs/design.md §2."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import events_arg, execute, make_config, probe_losses, read_csv, run_dicesim
from torch.func import hessian

from dicesim.run.engine import Simulation
from dicesim.testing.oracle import dense_trajectory, walk_sum

QUADRATIC = ("data=synthetic_regression", "model=linear", "dtype=float64", "nodes=4",
             "batch_size=8", "steps=7", "optim.lr=0.05", "data.probe_size=50")
SMALL_MLP = ("nodes=4", "batch_size=8", "dtype=float64", "model.hidden=[6]", "influence.events=0",
             "data.probe_size=40", "steps=6")


def table(rows) -> dict[tuple[int, int, int], tuple[float, float | None]]:
    """(event, hop, node) → (E, G)."""
    return {(r.event, r.hop, r.node): (r.dice_e, r.dice_gt) for r in rows}


# ---- quadratic exactness ------------------------------------------------------------------
@pytest.mark.parametrize("topology", ["ring", "hub", "one_peer_exponential"])
def test_quadratic_losses_make_the_estimator_exact_up_to_the_curvature_term(topology):
    """Linear regression, float64: δ̂ = δ, so E − G = ½ q δᵀH'δ (s ≥ 1) and
    E − G = −½ q δᵀH'δ (s = 0, whole batch), to 1e-9 relative."""
    events = [{"node": 0, "step": 1}, {"node": 2, "step": 2}, {"node": 3, "step": 0}]
    overrides = (*QUADRATIC, f"topology={topology}", "influence.hops=4", events_arg(events))
    sim, result = execute(*overrides)
    rows = table(result.influence)
    real = dense_trajectory(sim)
    xp, yp = sim.data.x_probe.double(), sim.data.y_probe.double()
    H = hessian(sim.model.probe_loss)(real[0][0], xp, yp)  # H'_k: constant, shared probe set
    q = sim.q
    checked = 0
    for index, e in enumerate(events):
        removal = f"counterfactual.remove=[{{node:{e['node']},step:{e['step']},samples:all}}]"
        cf_sim = Simulation(make_config(*overrides, removal))
        cf = dense_trajectory(cf_sim)
        # s = 0: δ^{t+½} = −η ∇L_B(θ_j^t): the whole batch removed
        j, t = e["node"], e["step"]
        x, y, w = (torch.as_tensor(a) for a in _batch(sim, j, t))
        g, _ = sim.model.grads(real[t][j][None], x[None], y[None], w[None])
        d = -sim.optim.lr * g[0]
        E, G = rows[(index, 0, j)]
        np.testing.assert_allclose(E - G, -0.5 * q[j] * float(d @ H @ d), rtol=1e-9)
        for s in range(1, 5):
            delta = real[t + s] - cf[t + s]
            for k in range(sim.run.nodes):
                key = (index, s, k)
                if key not in rows:
                    assert delta[k].abs().max() == 0  # unreached nodes carry no perturbation
                    continue
                E, G = rows[key]
                curv = 0.5 * q[k] * float(delta[k] @ H @ delta[k])
                np.testing.assert_allclose(E - G, curv, rtol=1e-9, atol=1e-18)
                checked += 1
    assert checked >= 10


def _batch(sim: Simulation, node: int, step: int):
    from dicesim.testing.oracle import _batch as oracle_batch

    return oracle_batch(sim, node, step)


# ---- propagation equals the sum over walks -----------------------------------------------
@pytest.mark.parametrize("curvature", [True, False])
def test_propagated_estimate_equals_sum_over_walks(curvature):
    """Theorem 1 as an explicit sum over all walks j → k1 → k2 → k3 (r = 3)."""
    events = [{"node": 1, "step": 1}, {"node": 0, "step": 2, "samples": 3}]
    overrides = (*SMALL_MLP, "topology=exponential", "influence.hops=3",
                 f"influence.curvature={curvature}", "influence.ground_truth=false",
                 events_arg(events))
    sim, result = execute(*overrides)
    rows = table(result.influence)
    trajectory = dense_trajectory(sim)
    for ev in sim.events:
        walks = walk_sum(sim, trajectory, ev.source, ev.step, ev.positions, 3, curvature)
        for s in range(4):
            for k in range(sim.run.nodes):
                got = rows.get((ev.index, s, k), (0.0, None))[0]
                np.testing.assert_allclose(got, walks[s, k], rtol=1e-8, atol=1e-15)


# ---- ground truth equals two separate runs -------------------------------------------------
@pytest.mark.parametrize(("probe", "defended"), [("shared", False), ("per_node", False),
                                                 ("shared", True)])
def test_ground_truth_equals_two_separate_runs(probe, defended):
    """G[e,s,k] (s ≥ 1) from shadow rows = q_k (L'_k of the real run − L'_k of a complete
    counterfactual run with the removal applied from the start); L'_k on the shared probe
    set or on node k's own held-out split; also under the oracle cut of an attacked node,
    where the shadows must mix with W^t as the aggregator mixes, not the plain graph."""
    base = (*SMALL_MLP, f"data.probe={probe}")
    if defended:
        base += ("attack=scaled_update", "attack.nodes=[1]", "defense=oracle")
    events = [{"node": 2, "step": 1}, {"node": 0, "step": 2, "samples": [0]}]
    sim0 = Simulation(make_config(*base))
    ids = _batch_ids(sim0, 0, 2)
    events[1]["samples"] = [int(ids[3]), int(ids[5])]
    overrides = (*base, "topology=ring", "influence.hops=3", events_arg(events))
    sim, result = execute(*overrides)
    real = probe_losses(result)
    checked = 0
    for index, e in enumerate(events):
        samples = e.get("samples", "all")
        samples = f"[{','.join(map(str, samples))}]" if isinstance(samples, list) else samples
        removal = f"counterfactual.remove=[{{node:{e['node']},step:{e['step']},samples:{samples}}}]"
        _, cf_result = execute(*base, "topology=ring", "influence.events=0", removal)
        cf = probe_losses(cf_result)
        for (ev, s, k), (_, G) in table(result.influence).items():
            if ev != index or s == 0:
                continue
            step = e["step"] + s
            np.testing.assert_allclose(G, sim.q[k] * (real[step, k] - cf[step, k]),
                                       rtol=1e-9, atol=1e-16)
            checked += 1
    assert checked >= 8


def _batch_ids(sim: Simulation, node: int, step: int) -> np.ndarray:
    from dicesim.model.data import batch_ids

    return batch_ids(sim.parts[node], sim.run.batch_size, step, sim.run.seed, node)


# ---- per-sample additivity ------------------------------------------------------------------
def test_first_order_terms_of_single_samples_add_up_to_the_batch():
    sim0 = Simulation(make_config(*SMALL_MLP))
    ids = _batch_ids(sim0, 1, 2)
    events = [{"node": 1, "step": 2}] + [{"node": 1, "step": 2, "samples": [int(i)]}
                                         for i in ids]
    _, result = execute(*SMALL_MLP, "topology=ring", "influence.hops=2", events_arg(events))
    rows = table(result.influence)
    summed: dict[tuple[int, int], float] = defaultdict(float)
    for (ev, s, k), (E, _) in rows.items():
        if ev > 0:
            summed[(s, k)] += E
    whole = {(s, k): E for (ev, s, k), (E, _) in rows.items() if ev == 0}
    assert set(whole) == set(summed)
    for key, value in whole.items():
        np.testing.assert_allclose(summed[key], value, rtol=1e-10, atol=1e-16)


# ---- error shrinks like η², influence like η ------------------------------------------------
def test_estimator_error_shrinks_quadratically_in_the_learning_rate():
    """mlp: halving η roughly quarters Σ|E − G| while Σ|G| roughly halves."""
    events = [{"node": n, "step": 1} for n in range(4)]
    sums = []
    for lr in (0.2, 0.1, 0.05):
        _, result = execute(*SMALL_MLP, "topology=ring", "influence.hops=3", f"optim.lr={lr}",
                            events_arg(events))
        E = np.array([r.dice_e for r in result.influence])
        G = np.array([r.dice_gt for r in result.influence])
        sums.append((np.abs(E - G).sum(), np.abs(G).sum()))
    for (err_big, g_big), (err_small, g_small) in zip(sums, sums[1:], strict=False):
        assert 3.0 < err_big / err_small < 5.0
        assert 1.6 < g_big / g_small < 2.5


# ---- proximal influence is the hop-1 view of a whole-batch event ---------------------------
def test_proximal_influence_equals_hop_one_estimate():
    events = [{"node": j, "step": 3} for j in range(4)]
    _, result = execute(*SMALL_MLP, "topology=hub", "influence.hops=1", "influence.proximal=true",
                        events_arg(events))
    rows = table(result.influence)
    prox = {(r.step, r.sender, r.receiver): r.value for r in result.proximal}
    assert len(prox) == sum(1 for r in result.proximal)
    checked = 0
    for (ev, s, k), (E, _) in rows.items():
        j = events[ev]["node"]
        if s == 1 and k != j:
            np.testing.assert_allclose(prox[(3, j, k)], E, rtol=1e-9)
            checked += 1
    assert checked == sum(1 for (step, j, k) in prox if step == 3)


# ---- distributed equals single process -----------------------------------------------------
def test_influence_table_does_not_depend_on_ranks(tmp_path):
    events = [{"node": 0, "step": 1}, {"node": 3, "step": 2, "samples": 2},
              {"node": 1, "step": 2}]
    overrides = (*SMALL_MLP, "topology=hub", "influence.hops=3", "influence.proximal=true",
                 "data.probe=per_node", events_arg(events))
    _, result = execute(*overrides)
    single = table(result.influence)
    for ranks in (2, 4):
        out = tmp_path / f"r{ranks}"
        run_dicesim(out, *overrides, ranks=ranks)
        got = {(int(r["event"]), int(r["hop"]), int(r["node"])):
               (float(r["dice_e"]), float(r["dice_gt"]), float(r["dice_gauss2"]))
               for r in read_csv(out / "influence.csv")}
        assert set(got) == set(single)
        mid = {(r.event, r.hop, r.node): r.dice_gauss2 for r in result.influence}
        for key, (E, G) in single.items():
            np.testing.assert_allclose(got[key], (E, G, mid[key]), rtol=1e-8, atol=1e-15)
        prox = {(int(r["step"]), int(r["sender"]), int(r["receiver"])): float(r["value"])
                for r in read_csv(out / "proximal.csv")}
        assert len(prox) == len(result.proximal)
        for row in result.proximal:  # values, not only counts
            np.testing.assert_allclose(prox[(row.step, row.sender, row.receiver)], row.value,
                                       rtol=1e-8, atol=1e-15)
