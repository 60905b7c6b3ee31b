"""Graph distance from an event's source (Topology.hops_from, InfluenceRow.distance) and
cascade.png, which plots influence against it."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from conftest import execute

from dicesim.config import section
from dicesim.graph.topology import Topology, build_topology
from dicesim.influence.events import InfluenceRow
from dicesim.report import plots


def union_digraph(top: Topology) -> nx.DiGraph:
    """Edges sender l → receiver k wherever W^t[k, l] > 0 for some t of the period."""
    g = nx.DiGraph()
    g.add_nodes_from(range(top.n))
    for t in range(top.period):
        g.add_edges_from(top.graph(t).edges)
    return g


@pytest.mark.parametrize("name, n", [("directed_ring", 9), ("exponential", 16),
                                     ("one_peer_exponential", 12), ("hub", 7),
                                     ("erdos_renyi", 20)])
def test_hops_from_equals_networkx_shortest_paths(name, n):
    top = build_topology(section("topology", {"name": name}), n, 3)
    g = union_digraph(top)
    for source in range(n):
        want = nx.single_source_shortest_path_length(g, source)
        got = top.hops_from(source)
        assert got.tolist() == [want[k] for k in range(n)]
        for limit in (0, 1, 2):
            cut = top.hops_from(source, limit)
            assert cut.tolist() == [want[k] if want[k] <= limit else -1 for k in range(n)]


def test_a_time_varying_graph_is_measured_on_its_union():
    """one_peer_exponential with 8 nodes: W^t sends j → j + 2^t (t = 0, 1, 2); no single W^t
    reaches past one hop, the union over the period reaches everything in ≤ 3 hops."""
    top = build_topology(section("topology", {"name": "one_peer_exponential"}), 8, 0)
    assert top.period == 3
    single = nx.single_source_shortest_path_length(top.graph(0), 0)
    assert max(single.values()) == 7  # W^0 alone is the directed ring
    assert top.hops_from(0).tolist() == [0, 1, 1, 2, 1, 2, 2, 3]


def test_directed_edges_count_one_way():
    # k receives from k − 1
    top = build_topology(section("topology", {"name": "directed_ring"}), 6, 0)
    assert top.hops_from(0).tolist() == [0, 1, 2, 3, 4, 5]
    assert top.hops_from(5).tolist() == [1, 2, 3, 4, 5, 0]


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
def test_every_influence_row_carries_its_distance(topology):
    sim, result = execute("nodes=8", "steps=8", "batch_size=8", "model.hidden=[6]",
                          f"topology={topology}", "influence.hops=3", "influence.events=6")
    assert result.influence
    for r in result.influence:
        assert r.distance == sim.topology.hops_from(r.source)[r.node]
        assert 0 <= r.distance <= r.hop  # a perturbation moves at most one edge per round
    if topology == "ring":  # static with self-loops: hop s reaches exactly distance ≤ s
        for e in {r.event for r in result.influence}:
            for s in range(4):
                nodes = {r.node for r in result.influence if r.event == e and r.hop == s}
                source = next(r.source for r in result.influence if r.event == e)
                assert nodes == set(np.flatnonzero((sim.topology.hops_from(source) >= 0)
                                                   & (sim.topology.hops_from(source) <= s)))


def _rows(gt: bool) -> list[InfluenceRow]:
    """A 6-node ring, two events followed for 2 hops, influence 10^−(distance + hop)."""
    out = []
    for e, j in enumerate((0, 3)):
        for s in range(3):
            for k in range(6):
                d = min((k - j) % 6, (j - k) % 6)
                if d <= s:
                    v = -(10.0 ** -(d + s))
                    out.append(InfluenceRow(e, j, 1, 8, s, k, 1.01 * v, v if gt else None,
                                            None, None, 1.0001 * v, d))
    return out


def test_the_figure_plots_the_exact_column_when_every_row_has_it(tmp_path):
    assert plots.cascade_column(_rows(gt=True)) == ("dice_gt", "DICE-GT")
    assert plots.cascade_column(_rows(gt=False)) == ("dice_gauss2", "dice_gauss2")
    assert plots.cascade_decay(tmp_path, _rows(gt=True)) == "cascade.png"
    assert (tmp_path / "cascade.png").stat().st_size > 10_000


def test_the_figure_needs_two_hops(tmp_path):
    rows = [r for r in _rows(gt=True) if r.hop == 0]
    assert plots.cascade_decay(tmp_path, rows) is None
    assert not (tmp_path / "cascade.png").exists()
