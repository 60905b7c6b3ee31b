"""The distributed engine against the dense single-process oracle (docs/design.md §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config, read_csv, run_dicesim

from dicesim.comm.exchange import Comm, Layout, route, send_first
from dicesim.config import section
from dicesim.graph.topology import build_topology
from dicesim.run.engine import Simulation
from dicesim.testing.oracle import dense_run


def run_in_process(*overrides: str):
    sim = Simulation(make_config(*overrides, "progress=false"))
    return sim, sim.execute(Comm("gloo", 60, torch.device("cpu")))


@pytest.mark.parametrize(("topology", "nodes", "rank_counts"), [
    # static, symmetric; with 2 ranks each has interior nodes stepped while edges travel
    ("ring", 8, (1, 2, 4)),
    ("hub", 4, (2,)),  # directed: non-symmetric W, two nodes per rank
    ("one_peer_exponential", 4, (4,)),  # time-varying
])
def test_ranks_reproduce_dense_oracle(tmp_path, tiny, topology, nodes, rank_counts):
    """float64: per-step probe losses and final θ of every node match the dense
    simulation θ ← W^t(θ − η∇L) to 1e-9 relative, however nodes are spread over ranks."""
    overrides = (*tiny, f"topology={topology}", f"nodes={nodes}", "save_params=true")
    sim = Simulation(make_config(*overrides))
    losses, theta = dense_run(sim)
    expected = torch.stack(losses).numpy()  # [T+1, n]
    for ranks in rank_counts:
        out = tmp_path / f"ranks{ranks}"
        run_dicesim(out, *overrides, ranks=ranks)
        got = np.full_like(expected, np.nan)
        for row in read_csv(out / "metrics.csv"):
            got[int(row["step"]), int(row["node"])] = float(row["probe_loss"])
        np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=f"{ranks} ranks")
        params = torch.load(out / "params.pt")
        torch.testing.assert_close(params, theta, rtol=1e-9, atol=1e-12)


def test_edge_rows_are_stepped_first_so_interior_ones_overlap_the_exchange():
    W = build_topology(section("topology", {"name": "ring"}), 8, 0).W_sparse(0)
    left, right = (send_first(route(W, Layout(8, 2, rank)), Layout(8, 2, rank))
                   for rank in (0, 1))
    assert [g.tolist() for g in left] == [[0, 3], [1, 2]]  # nodes 0 and 3 face rank 1
    assert [g.tolist() for g in right] == [[0, 3], [1, 2]]
    alone = Layout(8, 1, 0)
    assert [g.tolist() for g in send_first(route(W, alone), alone)] == [list(range(8))]


def test_single_process_matches_oracle_on_time_varying_graph(tiny):
    overrides = (*tiny, "topology=one_peer_exponential", "nodes=8", "steps=9")
    sim, result = run_in_process(*overrides)
    losses, theta = dense_run(sim)
    torch.testing.assert_close(result.final_params, theta, rtol=1e-9, atol=1e-12)
    assert sim.topology.period == 3


@pytest.mark.parametrize("optim", [("optim=sgd",), ("optim=momentum",),
                                   ("optim=momentum", "optim.gossip_state=true"),
                                   ("optim=adam",)])
def test_local_step_in_row_chunks_matches_oracle(tiny, monkeypatch, optim):
    """A large block takes its local step in cache-sized chunks of rows (gradient, optimizer
    step and θ^{t+½} per chunk), writing into blocks reused from step to step (θ^{t+½},
    s^{t+½}, θ^{t+1}): forced here to 16 rows of 40, the trajectory is still the dense
    oracle's (one torch.optim per node)."""
    import dicesim.model.models as model_module

    overrides = (*tiny, *optim, "nodes=40", "steps=6", "influence.events=0")
    sim = Simulation(make_config(*overrides, "progress=false"))
    per_row = sim.model.P + sim.run.batch_size * sum(
        layer.out + layer.inp for layer in sim.model.dense)
    monkeypatch.setattr(model_module, "GRAD_BUDGET", 16 * per_row)
    assert sim.model.rows_per_chunk(sim.run.batch_size) == 16
    sim, result = run_in_process(*overrides)
    _, theta = dense_run(sim)
    torch.testing.assert_close(result.final_params, theta, rtol=1e-9, atol=1e-12)


def test_step_clock_splits_the_loop_into_gossip_and_the_rest(tiny):
    _, result = run_in_process(*tiny, "steps=20", "nodes=8", "model.hidden=[64]")
    assert 0 < result.gossip_s < result.wall_s
    assert 0 < result.gossip_cpu_s < result.cpu_s  # one process: mixing only, on CPU


def test_nodes_are_averaged_not_copied(tiny):
    """θ^1 = W^0 θ^{½}, θ_k^{½} = θ^0 − η ∇L_k(θ^0; B_k^0) from a local step taken here (one
    gradient per node with torch.func): on a ring, where W^0[k] weighs three nodes by 1/3,
    a node copying one neighbour (or keeping its own step) would not match."""
    from torch.func import grad

    from dicesim.testing.oracle import _batch

    sim, result = run_in_process(*tiny, "steps=1", "nodes=8", "topology=ring")
    theta0 = sim.model.flat_init(sim.run.seed, sim.run.dtype)
    half = torch.stack([theta0 - sim.optim.lr * grad(sim.model.weighted_loss)(
        theta0, *_batch(sim, k, 0)) for k in range(8)])
    W = torch.as_tensor(sim.topology.W_sparse(0).toarray())
    expected = W @ half
    torch.testing.assert_close(result.final_params, expected, rtol=1e-12, atol=1e-14)
    # copying any single row of θ^{½} is far from the average: the check above can tell
    gaps = torch.cdist(expected, half)
    assert gaps.min() > 1e3 * 1e-12 * half.abs().max()


def test_digits_mlp_ring_learns():
    """16 nodes, ring, mlp on digits: ≥ 0.90 test accuracy averaged over nodes (300 steps)."""
    sim, result = run_in_process("nodes=16", "steps=300", "topology=ring", "model=mlp",
                                 "influence.events=0", "optim.lr=0.1", "eval_every=100")
    assert np.mean(result.test_acc) >= 0.90


def test_attack_end_stops_the_attack_at_that_step(tiny):
    """attack.end=E: a free rider sends no step for start <= t < E only: the run equals
    the endless attack up to θ^E and departs from it after; E = steps is the endless
    attack to the last bit."""
    free_rider = ("attack=free_rider", "attack.nodes=[1]")
    probe = {}
    for end in ("null", "3", "6"):
        _, result = run_in_process(*tiny, *free_rider, f"attack.end={end}")
        probe[end] = np.array([[r.probe_loss for r in result.metrics if r.step == t]
                               for t in range(7)])
    assert np.array_equal(probe["6"], probe["null"])
    assert np.array_equal(probe["3"][:4], probe["null"][:4])
    assert not np.allclose(probe["3"][4:], probe["null"][4:])
