"""Per-rank memory O(local + received rows): after the exchange a rank holds a compact
block of exactly its own rows and its in-neighbours' rows, and mixing over it gives the
numbers of one process, with proximal influence and an aggregator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_same_run, make_config, run_dicesim
from torch import Tensor

import dicesim.comm.exchange as exchange
from dicesim.comm.exchange import Channel, Comm, Layout, local_block, mix, route
from dicesim.graph.topology import build_topology
from dicesim.run.engine import Simulation


class DoneWork:
    def wait(self) -> None:
        pass


def exchange_on_rank(monkeypatch, W, lay: Layout, channels: list[Channel]) -> None:
    """Rank `lay.rank`'s side of one exchange: each peer's buffer is made by hand as the
    peer would send it, every row of node l holding the value l (in each column)."""
    way = route(W, lay)
    monkeypatch.setattr(exchange.dist, "P2POp", lambda op, tensor, peer, group:
                        SimpleNamespace(op=op, tensor=tensor, peer=peer))
    monkeypatch.setattr(exchange.dist, "batch_isend_irecv",
                        lambda batch: [DoneWork() for _ in batch])
    comm = Comm.__new__(Comm)
    comm.world, comm.rank, comm.device, comm.group = lay.world, lay.rank, torch.device("cpu"), None
    comm.exchanges = 0
    pending = comm.post(lay, channels, way)
    for peer, buf in pending.received.items():
        parts = []
        for c in channels:
            sent = c.nodes[way.recv[peer][c.nodes]]  # the peer's rows, in node order
            parts.append(torch.as_tensor(sent, dtype=torch.float64)[:, None].expand(
                -1, c.rows.shape[1]).reshape(-1))
        buf.copy_(torch.cat(parts))
    pending.wait()


def node_rows(nodes: np.ndarray, width: int) -> Tensor:
    return torch.as_tensor(nodes, dtype=torch.float64)[:, None].repeat(1, width)


@pytest.mark.parametrize(("topology", "world"), [
    ("hub", 2), ("hub", 4),  # directed: W is not symmetric
    ("one_peer_exponential", 2), ("one_peer_exponential", 4),  # time-varying
    ("exponential", 4)])
def test_a_rank_holds_exactly_its_local_and_in_neighbour_rows(monkeypatch, topology, world):
    """Every rank, every step of the period: the parameters' channel (every node) and a
    tracker's channel (a reach set) hold exactly local ∪ {l : W^t[k, l] > 0, k local}
    (of the channel's nodes), counted from the dense W^t, each row its node's; mixing
    them gives W^t[local] @ rows of every node."""
    n = 16
    graph = build_topology(make_config(f"nodes={n}", f"topology={topology}").topology, n, 0)
    some = np.array([0, 2, 3, 5, 8, 9, 12, 15])  # a reach set
    for t in range(graph.period):
        W = graph.W_sparse(t)
        dense = W.toarray()
        for rank in range(world):
            lay = Layout(n, world, rank)
            local = lay.local_nodes
            heard = np.flatnonzero((dense[local] > 0).any(axis=0))  # in-neighbours
            expected = np.union1d(local, heard)
            channels = [Channel(np.arange(n), node_rows(local, 3)),
                        Channel(some, node_rows(some[lay.owner(some) == rank], 2))]
            exchange_on_rank(monkeypatch, W, lay, channels)
            for c, width in ((channels[0], 3), (channels[1], 2)):
                held = np.intersect1d(c.nodes, expected)
                assert np.array_equal(c.available_nodes, held), (t, rank)
                assert c.available.shape == (len(held), width)
                assert torch.equal(c.available, node_rows(held, width))
                every = torch.zeros(n, width, dtype=torch.float64)
                every[torch.as_tensor(c.nodes)] = node_rows(c.nodes, width)
                want = torch.as_tensor(dense[local][:, c.nodes]) @ every[torch.as_tensor(c.nodes)]
                torch.testing.assert_close(mix(W, local, c), want, rtol=1e-15, atol=0)
            cached = local_block(W, route(W, lay), lay, torch.float64, torch.device("cpu"))
            assert torch.equal(mix(W, local, channels[0], cached), mix(W, local, channels[0]))


BASE = ("nodes=8", "steps=8", "batch_size=8", "dtype=float64", "model.hidden=[6]",
        "data.probe_size=40", "eval_every=1", "topology=exponential", "attack.nodes=[1]",
        "attack=scaled_update", "influence.proximal=true",
        "influence.events=[{node:0,step:1},{node:5,step:3,samples:2}]", "influence.hops=2",
        "defense.warmup=2", "defense.window=3", "save_params=true")


@pytest.mark.parametrize("defense", ["dice", "trimmed_mean"])
def test_one_two_and_four_ranks_agree_with_proximal_influence_and_a_defense(tmp_path,
                                                                           defense):
    """float64: metrics, final θ, proximal and influence rows of 2 and 4 ranks (each of the
    4 holds 6 of the 8 nodes' rows) equal one process's to 1e-9."""
    overrides = (*BASE, f"defense={defense}")
    sim = Simulation(make_config(*overrides, "progress=false"))
    single = sim.execute(Comm("gloo", 60, torch.device("cpu")))
    assert len(single.proximal) > 0 and len(single.influence) > 0
    for ranks in (2, 4):
        out = tmp_path / f"ranks{ranks}"
        run_dicesim(out, *overrides, ranks=ranks)
        assert_same_run(out, single)


def test_mixing_the_compact_block_is_bit_equal_to_mixing_every_node():
    """float32: W[rows] @ (every node's rows, zero where not held) and W[rows][:, held] @
    (the held rows) give the same bits: the same stored entries summed in the same order."""
    from scipy import sparse

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, out, width = int(rng.integers(50, 2000)), int(rng.integers(1, 200)), 97
        degree = int(rng.integers(2, 30))
        rows = np.repeat(np.arange(out), degree)
        W = sparse.csr_array((rng.random(out * degree), (rows, rng.integers(0, n, out * degree))),
                             shape=(out, n))
        W.sum_duplicates()
        held = np.union1d(W.indices, rng.choice(n, n // 4, replace=False))  # + rows not mixed
        every = torch.zeros(n, width)
        every[torch.as_tensor(held)] = torch.randn(len(held), width)
        whole = Channel(np.arange(n), every, every, np.arange(n))
        compact = Channel(np.arange(n), every, every[torch.as_tensor(held)], held)
        assert torch.equal(mix(W, np.arange(out), compact), mix(W, np.arange(out), whole))
