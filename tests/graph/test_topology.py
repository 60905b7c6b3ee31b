"""Mixing matrices: stochasticity, connectivity, closed-form spectra and bad-input errors."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from dicesim.common.errors import ConfigError
from dicesim.common.graphfile import file_nodes
from dicesim.config import FileTopology, section
from dicesim.graph.topology import TOPOLOGIES, Topology, build_topology

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "topology"
GENERATED = [t for t in TOPOLOGIES if t != "file"]
UNDIRECTED = ["ring", "torus", "complete", "star", "erdos_renyi", "small_world"]


def build(name: str, n: int, seed: int = 0, **kw) -> Topology:
    return build_topology(section("topology", {"name": name, **kw}, nodes=n), n, seed)


def union_strongly_connected(top: Topology) -> bool:
    g = nx.DiGraph()
    g.add_nodes_from(range(top.n))
    for t in range(top.period):
        g.add_edges_from(top.graph(t).edges)
    return nx.is_strongly_connected(g)


@pytest.mark.parametrize("n", [2, 3, 8, 16])
@pytest.mark.parametrize("name", GENERATED)
def test_every_topology_is_row_stochastic_and_connected(name: str, n: int) -> None:
    if name == "small_world" and n <= 4:  # default k=4 needs k < n
        with pytest.raises(ConfigError, match=r"topology\.k"):
            build(name, n)
        return
    for weights in ("uniform", "metropolis_hastings") if name in UNDIRECTED else ("uniform",):
        top = build(name, n, weights=weights)
        assert top.n == n and top.name == name
        for t in range(top.period):
            w = top.W(t)
            assert w.shape == (n, n) and w.dtype == np.float64
            assert np.all(w >= 0)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
            assert np.all(np.diag(w) > 0)
        assert union_strongly_connected(top)
        assert 0.0 < top.spectral_gap() <= 1.0 + 1e-12


@pytest.mark.parametrize("name", TOPOLOGIES[:-1])
def test_single_node_is_identity(name: str) -> None:
    top = build(name, 1)
    assert top.W(0).tolist() == [[1.0]] and top.spectral_gap() == 1.0


def test_complete_graph_has_gap_one() -> None:
    top = build("complete", 8)
    np.testing.assert_allclose(top.W(0), np.full((8, 8), 1 / 8), atol=1e-15)
    assert top.spectral_gap() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [5, 8, 16])
def test_ring_gap_matches_closed_form(n: int) -> None:
    eig = [(1 + 2 * math.cos(2 * math.pi * m / n)) / 3 for m in range(1, n)]
    assert build("ring", n).spectral_gap() == pytest.approx(1 - max(map(abs, eig)), abs=1e-12)


@pytest.mark.parametrize("n", [4, 7, 16])
def test_directed_ring_gap_matches_closed_form(n: int) -> None:
    # eigenvalues (1 + e^{-2πim/n}) / 2 have modulus |cos(πm/n)|; the largest after 1 is cos(π/n)
    top = build("directed_ring", n)
    assert not np.allclose(top.W(0), top.W(0).T)
    assert top.in_neighbours(1, 0).tolist() == [0, 1]
    assert top.out_neighbours(1, 0).tolist() == [1, 2]
    assert top.spectral_gap() == pytest.approx(1 - math.cos(math.pi / n), abs=1e-12)


@pytest.mark.parametrize("name", UNDIRECTED)
def test_metropolis_hastings_is_symmetric_and_doubly_stochastic(name: str) -> None:
    w = build(name, 16, seed=3, weights="metropolis_hastings").W(0)
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_star_metropolis_hastings_weights() -> None:
    w = build("star", 5, center=2, weights="metropolis_hastings").W(0)
    assert w[0, 2] == w[2, 0] == pytest.approx(1 / 5)
    assert w[0, 0] == pytest.approx(4 / 5) and w[0, 1] == 0


@pytest.mark.parametrize("hub, hub_weight", [(0, 0.5), (3, 0.3)])
def test_hub_is_non_symmetric_with_hub_weight_column(hub: int, hub_weight: float) -> None:
    top = build("hub", 8, hub=hub, hub_weight=hub_weight)
    w = top.W(0)
    assert not np.allclose(w, w.T)
    leaves = [k for k in range(8) if k != hub]
    np.testing.assert_allclose(w[leaves, hub], hub_weight, atol=1e-15)
    np.testing.assert_allclose(w[hub], 1 / 8, atol=1e-15)
    assert top.in_neighbours(leaves[0], 0).size == 4  # self, hub, two ring neighbours


@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_one_peer_exponential_cycles_single_peers(n: int) -> None:
    top = build("one_peer_exponential", n)
    assert top.period == math.ceil(math.log2(n)) and top.time_varying == (n > 2)
    for t in range(top.period):
        w = top.W(t)
        assert np.all(np.count_nonzero(w, axis=1) == 2)
        assert np.array_equal(top.W(t + top.period), w)
        assert top.in_neighbours(0, t).tolist() == sorted({0, (0 - 2**t) % n})
    if n & (n - 1) == 0:  # power of two: one period averages exactly
        assert top.spectral_gap() == pytest.approx(1.0, abs=1e-9)


def test_exponential_in_degree_and_torus_shape() -> None:
    exp = build("exponential", 16)
    assert exp.in_neighbours(0, 0).tolist() == [0, 8, 12, 14, 15]
    torus = build("torus", 16)  # 4 x 4: four distinct neighbours each
    assert all(torus.graph().in_degree(k) == 4 for k in range(16))
    assert build("torus", 8).graph().in_degree(0) == 3  # 2 x 4: up and down coincide
    assert build("ring", 2).graph().number_of_edges() == 2  # one undirected edge


def test_graph_edges_carry_weights() -> None:
    top = build("hub", 6, hub_weight=0.4)
    g = top.graph()
    assert g[0][3]["weight"] == pytest.approx(top.W(0)[3, 0])  # edge l=0 -> k=3
    assert g.number_of_edges() == np.count_nonzero(top.W(0)) - 6


def test_random_topologies_are_reproducible() -> None:
    for name in ("erdos_renyi", "small_world"):
        a, b, c = build(name, 16, seed=1), build(name, 16, seed=1), build(name, 16, seed=2)
        assert np.array_equal(a.W(0), b.W(0)) and not np.array_equal(a.W(0), c.W(0))


def test_matrices_are_read_only() -> None:
    with pytest.raises(ValueError):
        build("ring", 4).W(0)[0, 0] = 0.0


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    w = build("hub", 7, hub=2, hub_weight=0.3).W(0)
    path = tmp_path / f"W{suffix}"
    np.save(path, w) if suffix == ".npy" else np.savetxt(path, w, delimiter=",", fmt="%.17g")
    top = build("file", 7, path=str(path))
    assert top.name == "file" and top.period == 1
    np.testing.assert_array_equal(top.W(0), w)


def test_file_time_varying(tmp_path: Path) -> None:
    stack = np.stack([build("one_peer_exponential", 8).W(t) for t in range(3)])
    np.save(tmp_path / "W.npy", stack)
    top = build("file", 8, path=str(tmp_path / "W.npy"))
    assert top.period == 3 and top.spectral_gap() == pytest.approx(1.0, abs=1e-9)


def save(tmp_path: Path, w: np.ndarray) -> str:
    np.save(tmp_path / "W.npy", w)
    return str(tmp_path / "W.npy")


def edges(tmp_path: Path, text: str, name: str = "g.txt") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def block_diagonal() -> np.ndarray:
    return np.kron(np.eye(2), np.full((2, 2), 0.5))


BAD = {
    "unknown name": (lambda p: {"name": "moebius"}, r"topology\.name=.*ring, directed_ring"),
    "path not set": (lambda p: {"name": "file"}, r"topology\.path is not set"),
    "missing file": (lambda p: {"name": "file", "path": str(p / "nope.npy")},
                     r"topology\.path=.*no such file"),
    "negative": (lambda p: {"name": "file", "path": save(p, np.array(
        [[1.2, -0.2, 0, 0], [0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5]]).T)},
                 r"topology\.path=.*negative"),
    "not stochastic": (lambda p: {"name": "file", "path": save(p, np.full((4, 4), 0.3))},
                       r"topology\.path=.*row 0 sums to 1\.2"),
    "disconnected": (lambda p: {"name": "file", "path": save(p, block_diagonal())},
                     r"topology\.path=.*not strongly connected"),
    "wrong shape": (lambda p: {"name": "file", "path": save(p, np.full((3, 3), 1 / 3))},
                    r"topology\.path=.*shape \(3, 3\), expected \(4, 4\)"),
    "bad suffix": (lambda p: {"name": "file", "path": str(Path(save(p, np.eye(4))).rename(
        p / "W.mat"))}, r"topology\.path=.*\.npy or \.csv"),
    "mh on directed": (lambda p: {"name": "directed_ring", "weights": "metropolis_hastings"},
                       r"topology\.weights=metropolis_hastings.*directed_ring"),
    "unknown weights": (lambda p: {"name": "ring", "weights": "max"}, r"topology\.weights=max"),
    "er disconnected": (lambda p: {"name": "erdos_renyi", "p": 1e-3},
                        r"topology\.p=0\.001: .*disconnected after 100 tries"),
    "torus rows": (lambda p: {"name": "torus", "rows": 3}, r"topology\.rows=3 does not divide"),
    "matrix with mh": (lambda p: {"name": "file", "path": save(p, np.full((4, 4), 0.25)),
                                  "weights": "metropolis_hastings"},
                       r"topology\.weights=metropolis_hastings: the matrix .* gives the weights"),
    "hub with mh": (lambda p: {"name": "hub", "weights": "metropolis_hastings"},
                    r"topology=hub sets its own weights"),
    "empty npy": (lambda p: {"name": "file", "path": str(Path(save(p, np.eye(4))).with_name(
        "e.npy"))} if (p / "e.npy").write_bytes(b"") == 0 else None,
                  r"topology\.path=.*could not read the matrix"),
    "edge id past nodes": (lambda p: {"name": "file", "path": edges(p, "0 1\n1 4\n")},
                           r"node id 4 is not a node of a 4-node graph"),
    "edge line": (lambda p: {"name": "file", "path": edges(p, "0 1\n1 x\n")},
                  r"line 2 \('1 x'\) is not `src dst \[weight\]`"),
    "edge columns differ": (lambda p: {"name": "file", "path": edges(p, "0 1 2\n1 2\n")},
                            r"line 2 "),
    "no edges": (lambda p: {"name": "file", "path": edges(p, "# nothing\n")}, r"no edges"),
    "mh on directed edges": (lambda p: {"name": "file", "path": edges(p, "0 1\n1 2\n2 3\n3 0\n"),
                                        "directed": True, "weights": "metropolis_hastings"},
                             r"metropolis_hastings needs an undirected edge list"),
    "disconnected edges": (lambda p: {"name": "file", "path": edges(p, "0 1\n2 3\n")},
                           r"not strongly connected"),
    "star centre": (lambda p: {"name": "star", "center": 4}, r"topology\.center=4"),
    "hub weight": (lambda p: {"name": "hub", "hub_weight": 1.0}, r"topology\.hub_weight=1\.0"),
    "p not a number": (lambda p: {"name": "erdos_renyi", "p": "lots"}, r"topology\.p=lots"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_one_line_config_error(tmp_path: Path, case: str) -> None:
    make_cfg, pattern = BAD[case]
    with pytest.raises(ConfigError, match=pattern) as info:
        build_topology(section("topology", make_cfg(tmp_path), nodes=4), 4, 0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_node_count(n: int) -> None:
    with pytest.raises(ConfigError, match="nodes="):
        build("ring", n)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_config_files_build(name: str) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert cfg.name == name
    if name == "file":
        with pytest.raises(ConfigError, match=r"topology\.path is not set"):
            build_topology(section("topology", cfg, nodes=8), 8, 0)
    else:
        assert build_topology(section("topology", cfg, nodes=8), 8, 0).n == 8


# ---- spectral gap without a dense eigendecomposition ---------------------------------------
SPARSE_CASES = [("ring", {}), ("exponential", {}), ("one_peer_exponential", {}), ("torus", {}),
                ("erdos_renyi", {"p": 0.05}), ("small_world", {}), ("star", {}), ("hub", {}),
                ("complete", {}), ("ring", {"weights": "metropolis_hastings"})]


@pytest.mark.parametrize("n", [255, 256])
@pytest.mark.parametrize(("name", "kw"), SPARSE_CASES)
def test_arnoldi_gap_equals_dense(name: str, kw: dict, n: int) -> None:
    top = build(name, n, **kw)
    dense, (sparse, how) = top.spectral_gap("dense"), top.spectral_gap_info("arnoldi")
    assert sparse == pytest.approx(dense, abs=1e-6), how
    assert top.spectral_gap("sparse") == pytest.approx(dense, abs=1e-6)


@pytest.mark.parametrize("n", [255, 256])
@pytest.mark.parametrize("name", ["ring", "directed_ring", "exponential", "one_peer_exponential",
                                  "complete"])
def test_circulant_gap_is_exact(name: str, n: int) -> None:
    top = build(name, n)
    gap, how = top.spectral_gap_info("sparse")
    assert how == "circulant FFT"
    assert gap == pytest.approx(top.spectral_gap("dense"), abs=1e-12)


def test_time_varying_arnoldi_gap_equals_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mats = []
    for _ in range(3):  # random sparse row-stochastic matrices with self-loops
        w = (rng.random((200, 200)) < 0.03) * rng.random((200, 200)) + np.eye(200)
        mats.append(w / w.sum(1, keepdims=True))
    np.save(tmp_path / "w.npy", np.stack(mats))
    top = build_topology(section("topology", {"name": "file", "path": str(tmp_path / "w.npy")}),
                         200, 0)
    assert top.time_varying
    gap, how = top.spectral_gap_info("sparse")
    assert how == "ARPACK eigs" and gap == pytest.approx(top.spectral_gap("dense"), abs=1e-6)


def test_gap_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    top = build("exponential", 64)
    calls = []
    compute = Topology._compute_gap
    monkeypatch.setattr(Topology, "_compute_gap",
                        lambda self, m: calls.append(m) or compute(self, m))
    first = top.spectral_gap()
    assert top.spectral_gap() == first and top.spectral_gap_note == "dense eigvals"
    assert calls == ["dense"]


def test_large_graphs_use_the_sparse_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicesim.graph.topology as topology

    monkeypatch.setattr(topology, "SPARSE_GAP_ABOVE", 8)
    assert build("torus", 36).spectral_gap_note == "ARPACK eigsh"
    assert build("ring", 4).spectral_gap_note == "dense eigvals"
    n = 4096  # the closed form of the ring, from the FFT in milliseconds
    eig2 = (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert build("ring", n).spectral_gap() == pytest.approx(1 - eig2, abs=1e-12)


def test_gap_is_none_with_a_reason_when_arpack_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicesim.graph.topology as topology

    monkeypatch.setattr(topology, "ARPACK_MAXITER", 2)
    top = build("directed_ring", 64)  # eigenvalues clustered in modulus: slow for Arnoldi
    gap, how = top.spectral_gap_info("arnoldi")
    assert gap is None and "ARPACK did not converge" in how
    with pytest.raises(ValueError, match="method"):
        top.spectral_gap("eig")


# ---- torus sizes, edge lists, the node count of a file ---------------------------------------
@pytest.mark.parametrize(("n", "near"), [(7, "nodes=6 or nodes=8"), (13, "nodes=12 or nodes=14")])
def test_prime_torus_is_refused_with_the_nearest_sizes(n: int, near: str) -> None:
    with pytest.raises(ConfigError, match=rf"nodes={n}: {n} is prime.*{near}"):
        build("torus", n)
    assert build("torus", n, rows=1).graph().in_degree(0) == 2  # asked for: the 1×n ring


RING5 = "0 1\n1 2\n2 3\n3 4\n4 0\n"


@pytest.mark.parametrize("weights", ["uniform", "metropolis_hastings"])
def test_undirected_edge_list_equals_the_built_in_ring(tmp_path: Path, weights: str) -> None:
    # either orientation, a repeated edge and a self-loop change nothing
    text = "# a ring\n" + RING5.replace("3 4", "4 3") + "1 0\n2 2\n"
    top = build("file", 5, path=edges(tmp_path, text), weights=weights)
    np.testing.assert_allclose(top.W(0), build("ring", 5, weights=weights).W(0), atol=1e-15)


def test_directed_edge_list_equals_the_directed_ring(tmp_path: Path) -> None:
    # `src dst`: src sends to dst, so i → i+1 is the directed ring (W[k, k−1] > 0)
    path = edges(tmp_path, "src,dst\n" + RING5.replace(" ", ","), name="g.csv")
    top = build("file", 5, path=path, directed=True)
    np.testing.assert_allclose(top.W(0), build("directed_ring", 5).W(0), atol=1e-15)


def test_weighted_edge_list(tmp_path: Path) -> None:
    # W[k, l] = a_kl / (1 + Σ_l a_kl), W[k, k] = 1 / (1 + Σ_l a_kl); undirected: a_kl = a_lk
    top = build("file", 3, path=edges(tmp_path, "0 1 2\n1 2 0.5\n2 0 1\n"))
    a = np.array([[0, 2, 1], [2, 0, 0.5], [1, 0.5, 0]])
    expected = (a + np.eye(3)) / (1 + a.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(top.W(0), expected, atol=1e-15)


def test_file_nodes_reads_the_size(tmp_path: Path) -> None:
    np.save(tmp_path / "W.npy", np.full((6, 6), 1 / 6))
    np.save(tmp_path / "T.npy", np.stack([np.eye(5)] * 3))
    (tmp_path / "e.npy").write_bytes(b"")
    assert file_nodes(FileTopology(path=str(tmp_path / "W.npy"))) == 6
    assert file_nodes(FileTopology(path=str(tmp_path / "T.npy"))) == 5
    assert file_nodes(FileTopology(path=edges(tmp_path, RING5))) == 5
    assert file_nodes(FileTopology(path=str(tmp_path / "e.npy"))) is None  # building says why


def test_nodes_come_from_the_file_unless_given(tmp_path: Path, capsys) -> None:
    from dicesim.config import compose_checked

    path = edges(tmp_path, "".join(f"{k} {(k + 1) % 12}\n" for k in range(12)))
    base = ["topology=file", f"topology.path={path}", "influence.events=4"]
    [cfg] = compose_checked([base])
    assert cfg.nodes == 12
    with pytest.raises(ConfigError, match="node id 11 is not a node of a 8-node graph"):
        from dicesim.run.engine import Simulation

        Simulation(compose_checked([[*base, "nodes=8"]])[0])
