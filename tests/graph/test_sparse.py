"""W^t as a sparse operator: the engine mixes, routes and reaches with CSR and gives the
dense simulation's numbers; builders and validation never allocate n × n."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config, read_csv, run_dicesim
from scipy import sparse

from dicesim.comm.exchange import Channel, Comm, Layout, mix, route
from dicesim.common.errors import ConfigError
from dicesim.config import FileTopology, section
from dicesim.graph.topology import TOPOLOGIES, build_topology
from dicesim.influence.events import reach_sets
from dicesim.run.engine import Simulation
from dicesim.testing.oracle import dense_trajectory

SMALL = {"ring": 16, "directed_ring": 16, "torus": 16, "exponential": 64,
         "one_peer_exponential": 16, "complete": 8, "star": 8, "erdos_renyi": 16,
         "small_world": 16, "hub": 8, "file": 12}



def file_topology(path: object) -> FileTopology:
    return FileTopology(name="file", path=str(path))

def _random_W(n: int, seed: int = 0, density: float = 0.3) -> np.ndarray:
    """A non-symmetric row-stochastic W with self-loops, a directed ring (so it is
    strongly connected) and zeros."""
    rng = np.random.default_rng(seed)
    w = (rng.random((n, n)) < density) * rng.random((n, n)) + np.eye(n)
    w += np.roll(np.eye(n), 1, axis=1) * 0.1
    return w / w.sum(1, keepdims=True)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_sparse_mixing_gives_the_dense_trajectory(tmp_path: Path, name: str) -> None:
    """float64: every θ^t of the engine (CSR mixing) equals the dense simulation
    θ ← W^t (θ − η∇L) with the n × n W^t to 1e-12, for every topology (n ≤ 64)."""
    n = SMALL[name]
    extra = []
    if name == "file":
        np.save(tmp_path / "W.npy", _random_W(n))
        extra = [f"topology.path={tmp_path / 'W.npy'}"]
    sim = Simulation(make_config(
        f"nodes={n}", "steps=8", "batch_size=8", "dtype=float64", "model.hidden=[8]",
        "data.probe_size=40", "eval_every=1", "influence.events=0", "progress=false",
        f"topology={name}", *extra))
    result = sim.execute(Comm("gloo", 60, torch.device("cpu")))
    trajectory = dense_trajectory(sim)
    torch.testing.assert_close(result.final_params, trajectory[-1], rtol=0, atol=1e-12)
    s = sim.run
    xp, yp = sim.data.x_probe.to(s.dtype), sim.data.y_probe.to(torch.long)
    expected = np.stack([sim.model.probe_losses(th, xp, yp).numpy() for th in trajectory])
    got = np.full_like(expected, np.nan)
    for r in result.metrics:
        got[r.step, r.node] = r.probe_loss
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_route_and_mix_match_the_dense_formulas(world: int) -> None:
    n = 16
    w = _random_W(n, seed=world, density=0.2)
    W = sparse.csr_array(w)
    edge = w > 0
    owner = np.arange(n) // (n // world)
    rng = np.random.default_rng(1)
    for rank in range(world):
        lay = Layout(n, world, rank)
        r = route(W, lay)
        mine = owner == rank
        for other in range(world):  # the dense definition the engine used before
            to_them = mine & edge[owner == other].any(axis=0)
            from_them = (owner == other) & edge[mine].any(axis=0)
            if other == rank or not to_them.any():
                assert other not in r.send
            else:
                assert np.array_equal(r.send[other], to_them)
            if other == rank or not from_them.any():
                assert other not in r.recv
            else:
                assert np.array_equal(r.recv[other], from_them)
    nodes = np.sort(rng.choice(n, 7, replace=False))  # a perturbation's reach set
    ch = Channel(nodes, torch.zeros(0))
    ch.available = torch.randn(len(nodes), 5, dtype=torch.float64)
    ch.available_nodes = nodes
    out = np.array([0, 3, 4, 15])
    torch.testing.assert_close(mix(W, out, ch),
                               torch.as_tensor(w[np.ix_(out, nodes)]) @ ch.available,
                               rtol=0, atol=1e-15)
    assert mix(W, out[:0], ch).shape == (0, 5)


@pytest.mark.parametrize("name", ["exponential", "one_peer_exponential", "hub"])
def test_reach_sets_follow_the_dense_out_neighbours(name: str) -> None:
    top = build_topology(section("topology", {"name": name}), 12, 0)
    for source, step in ((0, 0), (5, 2)):
        sets = reach_sets(top, source, step, 3)
        for s in range(3):
            dense = np.flatnonzero((top.W(step + s)[:, sets[s]] > 0).any(axis=1))
            assert sets[s + 1].tolist() == dense.tolist()


def test_builders_and_validation_stay_sparse_at_16384_nodes() -> None:
    """A dense W^t of 16,384 nodes is 2 GiB; the graph, its checks and its routes take
    a few MB."""
    tracemalloc.start()
    try:
        for name in ("ring", "exponential", "one_peer_exponential"):
            top = build_topology(section("topology", {"name": name}), 16384, 0)
            route(top.W_sparse(0), Layout(16384, 2, 0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert top.period == 14 and top.W_sparse(3).nnz == 2 * 16384


def test_validation_on_the_sparse_form(tmp_path: Path) -> None:
    w = _random_W(6)
    bad = {"negative": (w - np.eye(6) * 2, r"W\[0,0\]=-1.* is negative"),
           "row sums": (w * 1.1, "row 0 sums to 1.1"),
           "nan": (np.where(np.eye(6) > 0, np.nan, w), "NaN or inf"),
           "disconnected": (np.eye(6), "not strongly connected")}
    for what, (matrix, message) in bad.items():
        np.save(tmp_path / f"{what}.npy", matrix)
        with pytest.raises(ConfigError, match=message):
            build_topology(file_topology(tmp_path / f"{what}.npy"), 6, 0)
    directed = np.roll(np.eye(6), 1, axis=1) * 0.5 + np.eye(6) * 0.5  # a directed ring
    assert build_topology(file_topology(_saved(tmp_path, directed)), 6, 0).n == 6
    one_way = directed.copy()
    one_way[5] = np.eye(6)[5]  # node 5 no longer hears node 0: 0 reaches nobody past 5
    with pytest.raises(ConfigError, match="not strongly connected"):
        build_topology(file_topology(_saved(tmp_path, one_way)), 6, 0)


def _saved(tmp_path: Path, w: np.ndarray) -> str:
    path = tmp_path / f"w{abs(hash(w.tobytes()))}.npy"
    np.save(path, w)
    return str(path)


# ---- ranks against one process at scale ---------------------------------------------------
def _rank_equality(tmp_path: Path, nodes: int, steps: int, topology: str) -> None:
    """float64: 2 ranks give one process's probe losses (every step) and final θ to 1e-9."""
    samples = nodes * 16 + 400
    overrides = (f"nodes={nodes}", f"steps={steps}", "batch_size=8", "dtype=float64",
                 "data=synthetic", f"data.n_samples={samples}", "data.probe_size=100",
                 "data.max_test=200", "model=mlp", "model.hidden=[8]", "eval_every=1",
                 "influence.events=0", f"topology={topology}", "save_params=true")
    runs = {}
    for ranks in (0, 2):
        out = tmp_path / f"ranks{ranks}"
        run_dicesim(out, *overrides, ranks=ranks, timeout=900)
        losses = np.full((steps + 1, nodes), np.nan)
        for row in read_csv(out / "metrics.csv"):
            losses[int(row["step"]), int(row["node"])] = float(row["probe_loss"])
        runs[ranks] = losses, torch.load(out / "params.pt")
    (one, theta_one), (two, theta_two) = runs[0], runs[2]
    assert np.isfinite(one).all()
    np.testing.assert_allclose(two, one, rtol=1e-9, atol=0)
    torch.testing.assert_close(theta_two, theta_one, rtol=1e-9, atol=1e-12)


def test_two_ranks_equal_one_process_at_512_nodes(tmp_path: Path) -> None:
    _rank_equality(tmp_path, 512, 10, "exponential")


@pytest.mark.slow
def test_two_ranks_equal_one_process_at_4096_nodes(tmp_path: Path) -> None:
    _rank_equality(tmp_path, 4096, 10, "exponential")


def test_file_topology_reads_a_sparse_npz(tmp_path: Path) -> None:
    w = _random_W(20, seed=5, density=0.1)
    sparse.save_npz(tmp_path / "W.npz", sparse.csr_array(w))
    top = build_topology(file_topology(tmp_path / "W.npz"), 20, 0)
    np.testing.assert_array_equal(top.W(0), w)
    assert top.W_sparse(0).nnz == np.count_nonzero(w)
    with pytest.raises(ConfigError, match=r"expected \(21, 21\)"):
        build_topology(file_topology(tmp_path / "W.npz"), 21, 0)


@pytest.mark.parametrize("direct_up_to", [0, 20_000])  # 0: every block through scipy
def test_block_tensor_is_scipys_block(monkeypatch, direct_up_to):
    """block_tensor(W, rows, cols) reads W's CSR arrays itself: the same stored entries, in
    the same order, as sparse_tensor(W[rows][:, cols]) (hence bit-equal mixing), for
    repeated and unsorted rows, unsorted columns, W with unsorted indices, empty picks."""
    import dicesim.comm.exchange as comm_module
    from dicesim.comm.exchange import block_tensor, sparse_tensor

    monkeypatch.setattr(comm_module, "DIRECT_BLOCK", direct_up_to)
    rng = np.random.default_rng(5)
    cpu = torch.device("cpu")
    for trial in range(60):
        n = int(rng.integers(1, 40))
        W = sparse.csr_array(_random_W(n, seed=trial) if n > 1 else np.ones((1, 1)))
        if trial % 4 == 1:  # the same matrix with each row's entries stored backwards
            spans = list(zip(W.indptr[:-1], W.indptr[1:], strict=True))
            W = sparse.csr_array((np.concatenate([W.data[a:b][::-1] for a, b in spans]),
                                  np.concatenate([W.indices[a:b][::-1] for a, b in spans]),
                                  W.indptr), shape=W.shape)
            assert n == 1 or not W.has_sorted_indices
        rows = rng.integers(0, n, int(rng.integers(1, n + 3)))
        cols = rng.permutation(n)[:int(rng.integers(1, n + 1))]
        if trial % 2:
            cols = np.sort(cols)
        got = block_tensor(W, rows, cols, torch.float64, cpu)
        want = sparse_tensor(W[rows][:, cols], torch.float64, cpu)
        assert got.shape == want.shape == (len(rows), len(cols))
        for part in ("crow_indices", "col_indices", "values"):
            assert torch.equal(getattr(got, part)(), getattr(want, part)()), (trial, part)
