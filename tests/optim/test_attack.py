"""Crafted attacks (alie, ipm): the update an attacker sends equals its formula, by hand and
in a whole run against a dense reference; 2 ranks give the numbers of 1 (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config, read_csv, run_dicesim
from torch.func import grad

from dicesim.comm.exchange import Channel, Comm
from dicesim.graph.topology import _csr
from dicesim.optim.attack import Attack, CraftedUpdates
from dicesim.run.engine import Simulation
from dicesim.testing.oracle import _batch

F64 = torch.float64


def hand_case() -> tuple:
    """4 nodes; node 1 attacks and receives from 0, 2 (honest) and 3 (a fellow attacker).
    θ^{t−½} of the four nodes and θ^{t−1} of node 1, two coordinates."""
    W = _csr(4, [0, 0, 1, 1, 1, 1, 2, 3], [0, 1, 0, 1, 2, 3, 2, 3],
             [0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 1.0, 1.0])
    half = torch.tensor([[1.0, 4.0], [9.0, 9.0], [3.0, 0.0], [100.0, -100.0]], dtype=F64)
    theta = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64)
    received = Channel(np.arange(4), half, available=half, available_nodes=np.arange(4))
    return W, theta, received


@pytest.mark.parametrize(("kind", "expected"), [
    # u_0 = (1, 4) − (1, 2) = (0, 2), u_2 = (3, 0) − (1, 2) = (2, −2): μ = (1, 0), σ = (1, 2)
    ("alie", [1.0 - 1.5 * 1.0, 0.0 - 1.5 * 2.0]),
    ("ipm", [-0.2 * 1.0, -0.2 * 0.0]),
])
def test_crafted_update_is_its_formula(kind, expected):
    W, theta, received = hand_case()
    crafted = CraftedUpdates(Attack(kind, np.array([1, 3]), start=1, z=1.5, epsilon=0.2),
                             np.arange(4))
    own = torch.full((4, 2), 7.0, dtype=F64)
    assert torch.equal(crafted.update(1, np.arange(4), own), own)  # nothing received yet
    crafted.observe(W, theta, received)
    # node 3 receives from no honest node: it sends its own update
    assert set(crafted.crafted) == {1}
    sent = crafted.update(1, np.arange(4), own)
    want = own.clone()
    want[1] = torch.tensor(expected, dtype=F64)
    assert torch.equal(sent, want)
    assert torch.equal(crafted.update(0, np.arange(4), own), own)  # before attack.start
    assert torch.equal(crafted.update(1, np.array([3, 1]), own[:2]),  # rows in any order
                       torch.stack([own[0], want[1]]))


TINY = ("nodes=4", "steps=5", "batch_size=8", "dtype=float64", "model=logreg",
        "data.probe_size=40", "eval_every=1", "influence.events=0", "topology=ring",
        "attack.nodes=[1]", "attack.start=2", "attack.z=1.5", "attack.epsilon=0.3")


def in_process(*overrides: str):
    sim = Simulation(make_config(*overrides, "progress=false"))
    return sim, sim.execute(Comm("gloo", 60, torch.device("cpu")))


def reference(sim: Simulation, kind: str) -> torch.Tensor:
    """θ^T of plain SGD where node 1, from attack.start on, sends θ_1^t + Δ̃ with Δ̃ made from
    θ_j^{t−½} − θ_1^{t−1} of its honest in-neighbours j (dense, one node at a time)."""
    s, a = sim.run, sim.attack
    theta = sim.model.flat_init(s.seed, s.dtype).repeat(s.nodes, 1)
    last: tuple | None = None  # (θ^{t−1}, θ^{t−½}, W^{t−1})
    for t in range(s.steps):
        g = torch.stack([grad(sim.model.weighted_loss)(theta[k], *_batch(sim, k, t))
                         for k in range(s.nodes)])
        half = theta - sim.optim.lr * g
        if t >= a.start and last is not None:
            before, received, W_prev = last
            honest = [j for j in range(s.nodes) if W_prev[1, j] > 0 and j != 1]
            u = received[honest] - before[1]
            mean = u.mean(0)
            delta = (mean - a.z * u.std(0, unbiased=False) if kind == "alie"
                     else -a.epsilon * mean)
            half[1] = theta[1] + delta
        W = torch.tensor(sim.topology.W(t), dtype=s.dtype)
        last = (theta, half, W)
        theta = W @ half
    return theta


@pytest.mark.parametrize("kind", ["alie", "ipm"])
def test_run_with_crafted_attack_equals_dense_reference(kind):
    sim, result = in_process(*TINY, f"attack={kind}")
    want = reference(sim, kind)
    torch.testing.assert_close(result.final_params, want, rtol=1e-10, atol=1e-12)
    _, honest = in_process(*TINY)  # the attack changed the run
    assert (result.final_params - honest.final_params).abs().max() > 1e-3


@pytest.mark.parametrize(("kind", "defense"), [
    ("alie", "none"), ("ipm", "trimmed_mean"), ("alie", "dice")])
def test_crafted_attack_gives_the_same_values_on_two_ranks(tmp_path, kind, defense):
    """defense=dice: the proximal tracker scores the crafted Δ as sent."""
    overrides = (*TINY, "topology=complete", "attack.nodes=[2]", f"attack={kind}",
                 f"defense={defense}", "save_params=true", "influence.proximal=true",
                 "defense.warmup=2", "defense.window=3")
    _, single = in_process(*overrides)
    out = tmp_path / "two"
    run_dicesim(out, *overrides, ranks=2)
    losses = {(int(r["step"]), int(r["node"])): float(r["probe_loss"])
              for r in read_csv(out / "metrics.csv")}
    assert len(losses) == len(single.metrics)
    for step, node, _, probe_loss, *_ in single.metrics:
        np.testing.assert_allclose(losses[(step, node)], probe_loss, rtol=1e-9)
    torch.testing.assert_close(torch.load(out / "params.pt"), single.final_params,
                               rtol=1e-9, atol=1e-12)
