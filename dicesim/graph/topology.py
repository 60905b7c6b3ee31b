"""Communication topologies: the mixing matrices W^t of decentralized SGD.

W^t[k, l] is the weight receiver k gives to sender l (θ_k ← Σ_l W^t[k, l] θ_l), so every W^t is
row-stochastic. Static topologies have one matrix; time-varying ones repeat ``matrices`` with
period ``len(matrices)``. Every rank rebuilds the same matrices from (config, n, seed).

W^t is held sparse (scipy CSR: row k lists its senders l, sorted, with W^t[k, l] > 0), so a
graph costs O(edges) memory: the builders emit edges, never an n×n array, and validation runs
on the edges. `W_sparse(t)` is what the engine mixes with; `W(t)` is the dense n×n view that
small-n callers (oracle, experiments, tests) read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from dicesim.common.arrays import spans
from dicesim.common.errors import ConfigError
from dicesim.common.graphfile import file_path, is_edge_list, read_edges
from dicesim.config import TOPOLOGIES as TOPOLOGIES  # re-exported
from dicesim.config import WEIGHT_SCHEMES as WEIGHT_SCHEMES  # re-exported
from dicesim.config import FileTopology
from dicesim.config import Topology as TopologySettings

if TYPE_CHECKING:  # networkx is imported where a graph is built with it (~0.1 s)
    import networkx as nx

ROW_SUM_TOL = 1e-9
ER_TRIES = 100
EIG_TOL = 1e-12
# Above this many nodes the spectral gap comes from sparse methods (an FFT for circulant
# graphs, ARPACK otherwise) instead of a dense O(n³) eigendecomposition.
SPARSE_GAP_ABOVE = 512
GAP_METHODS = ("auto", "dense", "sparse", "arnoldi")
ARPACK_TOL = 1e-12  # relative residual of the Ritz pair
ARPACK_NCV = 40
ARPACK_MAXITER = 300


@dataclass
class Topology:
    """A (possibly time-varying) communication graph given by its mixing matrices."""

    name: str
    n: int
    matrices: list[sparse.csr_array]  # W^t, t = 0 … period − 1 (dense input is converted)
    # spectral gap per method: (value or None, how it was found or why it was not)
    _gaps: dict[str, tuple[float | None, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _dense: dict[int, np.ndarray] = field(  # W(t) views built so far
        default_factory=dict, init=False, repr=False, compare=False)
    _receivers: sparse.csr_array | None = field(  # built by `union_receivers`
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.matrices:
            raise ValueError("Topology needs at least one matrix")
        self.matrices = [_frozen_csr(m) for m in self.matrices]

    @property
    def period(self) -> int:
        return len(self.matrices)

    @property
    def time_varying(self) -> bool:
        return self.period > 1

    def W_sparse(self, t: int) -> sparse.csr_array:
        """W^t as CSR (read-only; the same object for every t of one phase of the period)."""
        return self.matrices[t % self.period]

    def W(self, t: int) -> np.ndarray:
        """W^t as a dense n×n array (read-only, cached): for small n; the engine mixes with
        `W_sparse`."""
        key = t % self.period
        if key not in self._dense:
            a = self.matrices[key].toarray()
            a.setflags(write=False)  # shared by every caller: nobody may edit W in place
            self._dense[key] = a
        return self._dense[key]

    def support(self) -> np.ndarray:
        """[k, l]: W^t[k, l] > 0 for some t of the period (dense bool: for small n)."""
        return np.any(np.stack([self.W(t) for t in range(self.period)]) > 0, axis=0)

    def union_receivers(self) -> sparse.csr_array:
        """Row l: the receivers k with W^t[k, l] > 0 for some t of the period (cached)."""
        if self._receivers is None:
            union = self.matrices[0] > 0
            for m in self.matrices[1:]:
                union = union + (m > 0)  # boolean: an edge of any W^t
            self._receivers = sparse.csr_array(union.T)
        return self._receivers

    def hops_from(self, source: int, limit: int | None = None) -> np.ndarray:
        """Graph distance from `source` to every node: the fewest edges sender → receiver
        in the union graph over the period (breadth first); −1 where a node is farther
        than `limit` hops or unreachable."""
        receivers = self.union_receivers()
        far = np.full(self.n, -1, dtype=np.int64)
        far[source] = 0
        frontier = np.array([source], dtype=np.int64)
        hop = 0
        while frontier.size and (limit is None or hop < limit):
            hop += 1
            lo = receivers.indptr[frontier]
            reached = np.unique(receivers.indices[spans(lo, receivers.indptr[frontier + 1] - lo)])
            frontier = reached[far[reached] < 0]
            far[frontier] = hop
        return far

    def in_neighbours(self, k: int, t: int) -> np.ndarray:
        """Sorted senders l with W^t[k, l] > 0 (k itself included when W^t[k, k] > 0)."""
        return senders(self.W_sparse(t), k)

    def out_neighbours(self, l: int, t: int) -> np.ndarray:
        """Sorted receivers k with W^t[k, l] > 0."""
        return senders(self.W_sparse(t).T.tocsr(), l)

    def spectral_gap(self, method: str = "auto") -> float | None:
        """1 - |λ2| of W (static), or 1 - |λ2(W^{T-1}···W^0)|^(1/T) per step (period T).

        Computed once per topology and method (cached). None where the sparse solver did
        not converge; `spectral_gap_note` then says why. See `spectral_gap_info`."""
        return self.spectral_gap_info(method)[0]

    @property
    def spectral_gap_note(self) -> str:
        """How the (default) spectral gap was found, or why it is None."""
        return self.spectral_gap_info()[1]

    def spectral_gap_info(self, method: str = "auto") -> tuple[float | None, str]:
        """(gap or None, how). method: auto (dense up to SPARSE_GAP_ABOVE nodes, sparse
        above), dense (eigenvalues of the dense product), sparse (an FFT of the first rows
        when every W^t is circulant, else ARPACK), arnoldi (always ARPACK)."""
        if method not in GAP_METHODS:
            raise ValueError(f"spectral gap method {method!r}: choose one of {GAP_METHODS}")
        if method == "auto":
            method = "dense" if self.n <= SPARSE_GAP_ABOVE else "sparse"
        if method not in self._gaps:
            self._gaps[method] = self._compute_gap(method)
        return self._gaps[method]

    def _compute_gap(self, method: str) -> tuple[float | None, str]:
        if self.n == 1:
            return 1.0, "one node"
        if method == "dense":
            prod = np.eye(self.n)
            for w in self.matrices:
                prod = w @ prod  # CSR @ dense: dense
            lam2, how = float(np.sort(np.abs(np.linalg.eigvals(prod)))[-2]), "dense eigvals"
        else:
            lam2, how = _sparse_lam2(self.matrices, circulant=method == "sparse")
            if lam2 is None:
                return None, how
        # eigenvalues are only accurate to ~1e-16, which the 1/T-th root would blow up to ~1e-5
        lam2 = 0.0 if lam2 < EIG_TOL else lam2
        return float(1.0 - lam2 ** (1.0 / self.period)), how

    def graph(self, t: int = 0) -> nx.DiGraph:
        """Directed graph of step t: an edge l -> k with attribute ``weight`` = W^t[k, l]."""
        import networkx as nx

        w = self.W_sparse(t).tocoo()
        g = nx.DiGraph()
        g.add_nodes_from(range(self.n))
        for k, l, v in zip(w.row, w.col, w.data, strict=True):
            if k != l:
                g.add_edge(int(l), int(k), weight=float(v))
        return g


def senders(W: sparse.csr_array, k: int) -> np.ndarray:
    """Sorted l with W[k, l] > 0: row k's stored columns (a Topology stores no zeros; an
    aggregator may zero an entry, so the values are checked)."""
    lo, hi = W.indptr[k], W.indptr[k + 1]
    return W.indices[lo:hi][W.data[lo:hi] > 0]


def _frozen_csr(m) -> sparse.csr_array:
    """A float64 CSR copy of m (dense or sparse) with no stored zeros, sorted columns and
    read-only arrays: a W^t every caller shares."""
    w = sparse.csr_array(m, dtype=np.float64, copy=True)
    w.eliminate_zeros()
    w.sum_duplicates()  # also sorts each row's columns
    for a in (w.data, w.indices, w.indptr):
        a.setflags(write=False)
    return w


def _csr(n: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> sparse.csr_array:
    """The n×n matrix with W[rows[i], cols[i]] = vals[i] (pairs are distinct)."""
    return sparse.csr_array((np.asarray(vals, dtype=np.float64), (rows, cols)), shape=(n, n))


# ---------------------------------------------------------------- spectral gap (sparse)

def _sparse_lam2(mats: list[sparse.csr_array], circulant: bool) -> tuple[float | None, str]:
    """|λ2| of P = W^{T-1}···W^0 without a dense eigendecomposition.

    Circulant W^t (ring, directed_ring, exponential, one_peer_exponential with uniform
    weights) share the Fourier eigenvectors: the eigenvalues of P are the products of
    the FFTs of the first rows, exactly. Otherwise ARPACK finds the largest eigenvalue of
    the deflated operator A = P - 1·1ᵀ/n: P 1 = 1 and every left eigenvector u of P with
    eigenvalue λ ≠ 1 has uᵀ1 = 0, so uᵀA = λuᵀ while A1 = 0 — the spectrum of A is that of
    P with 1 replaced by 0, and its largest modulus is |λ2|. Only matrix-vector products
    with the sparse W^t are used."""
    n = mats[0].shape[0]
    sp = [sparse.csr_matrix(w) for w in mats]  # stored without zeros (Topology)
    if circulant:
        rows = [_circulant_row(w) for w in sp]
        if all(r is not None for r in rows):
            spectrum = np.prod([np.fft.fft(r) for r in rows], axis=0)
            return float(np.abs(spectrum[1:]).max()), "circulant FFT"
    return _arnoldi_lam2(sp, n)


def _circulant_row(w) -> np.ndarray | None:
    """The first row c of w when w[k, l] = c[(l - k) mod n] for every k, l; else None."""
    n = w.shape[0]
    coo = w.tocoo()
    c = np.zeros(n)
    first = coo.row == 0
    c[coo.col[first]] = coo.data[first]
    if coo.nnz != n * np.count_nonzero(c):
        return None
    same = coo.data == c[(coo.col - coo.row) % n]
    return c if bool(np.all(same)) else None


def _arnoldi_lam2(sp: list, n: int) -> tuple[float | None, str]:
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigs, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).reshape(-1)
        mean = x.sum() / n  # (1ᵀx)/n of the input: A x = P x - 1 (1ᵀx)/n
        for w in sp:
            x = w @ x
        return x - mean

    if n < 4:  # ARPACK needs k < n - 1; tiny graphs are cheap to do densely
        dense = np.eye(n)
        for w in sp:
            dense = w @ dense
        return float(np.sort(np.abs(np.linalg.eigvals(dense)))[-2]), "dense eigvals"
    probe = np.random.default_rng(0).standard_normal(n)
    if np.linalg.norm(matvec(probe)) <= EIG_TOL * np.linalg.norm(probe):
        return 0.0, "deflated product is zero (exact averaging)"  # ARPACK cannot start on 0
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    symmetric = len(sp) == 1 and abs(sp[0] - sp[0].T).max() <= 1e-15
    ncv = min(n - 1, ARPACK_NCV)
    try:
        if symmetric:
            vals = eigsh(op, k=1, which="LM", tol=ARPACK_TOL, ncv=ncv, maxiter=ARPACK_MAXITER,
                         v0=probe, return_eigenvectors=False)
        else:
            vals = eigs(op, k=2, which="LM", tol=ARPACK_TOL, ncv=ncv, maxiter=ARPACK_MAXITER,
                        v0=probe, return_eigenvectors=False)
    except ArpackNoConvergence:
        return None, (f"ARPACK did not converge in {ARPACK_MAXITER} restarts (tol "
                      f"{ARPACK_TOL:g}); the gap is too small to resolve this way")
    except ArpackError as err:
        return None, f"ARPACK failed: {err}"
    return float(np.abs(vals).max()), "ARPACK eigsh" if symmetric else "ARPACK eigs"


def build_topology(cfg: TopologySettings, n: int, seed: int) -> Topology:
    """Build the topology described by ``cfg`` (the ``topology`` config group) for n nodes.

    The schema checked the settings; a ConfigError (one line) here is about the graph: a
    W file that is not a connected row-stochastic matrix, a random graph that stays
    disconnected.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"nodes={n!r}: need a whole number of nodes >= 1; set e.g. nodes=8")
    name, n, scheme = str(cfg.name), int(n), str(cfg.weights)
    if name == "file":
        mats, where = _load_file(cfg, n, scheme)
    else:
        mats = ([_csr(1, np.zeros(1, int), np.zeros(1, int), np.ones(1))] if n == 1
                else _BUILDERS[name](cfg, n, seed, scheme))
        where = f"topology={name}"
    _validate(mats, n, where)
    return Topology(name=name, n=n, matrices=mats)


# ---------------------------------------------------------------- builders (n >= 2)

def _ring(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    k = np.arange(n)
    return [_undirected(np.stack([k, (k + 1) % n], axis=1), n, scheme)]


def _torus(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    rows = cfg.rows or min(divisors, key=lambda d: (abs(d - n**0.5), d))
    cols = n // rows
    r, c = np.divmod(np.arange(n), cols)
    down, right = ((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols
    k = np.arange(n)  # a dimension of size 1 wraps onto itself: _undirected drops k–k
    return [_undirected(np.concatenate([np.stack([k, down], 1), np.stack([k, right], 1)]),
                        n, scheme)]


def _complete(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    return [_undirected(np.stack(np.triu_indices(n, 1), axis=1), n, scheme)]


def _star(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    center = cfg.center
    leaves = np.array([k for k in range(n) if k != center], dtype=np.int64)
    return [_undirected(np.stack([np.full_like(leaves, center), leaves], axis=1), n, scheme)]


def _erdos_renyi(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    p = cfg.p
    import networkx as nx

    for s in range(seed, seed + ER_TRIES):
        g = nx.gnp_random_graph(n, p, seed=s)
        if nx.is_connected(g):
            return [_undirected(_edges(g), n, scheme)]
    raise ConfigError(f"topology.p={p}: erdos_renyi graph with {n} nodes stayed disconnected "
                      f"after {ER_TRIES} tries; raise topology.p")


def _small_world(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    k, beta = cfg.k, cfg.beta
    import networkx as nx

    try:
        g = nx.connected_watts_strogatz_graph(n, k, beta, tries=ER_TRIES, seed=seed)
    except nx.NetworkXError as e:
        raise ConfigError(f"topology.k={k}, topology.beta={beta}: small_world graph with {n} "
                          f"nodes failed ({e}); raise topology.k or lower topology.beta") from e
    return [_undirected(_edges(g), n, scheme)]


def _directed_ring(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    return [_directed(n, [1])]


def _exponential(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    return [_directed(n, [2**i for i in range((n - 1).bit_length())])]  # 2^0 .. 2^⌊log2(n−1)⌋


def _one_peer_exponential(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    period = (n - 1).bit_length()  # ceil(log2 n)
    return [_directed(n, [2**t]) for t in range(period)]


def _hub(cfg: Any, n: int, seed: int, scheme: str) -> list[sparse.csr_array]:
    hub, hub_weight = cfg.hub, cfg.hub_weight
    leaves = [k for k in range(n) if k != hub]
    ring = {k: set() for k in leaves}  # the leaves' cycle, in leaf order
    if len(leaves) > 1:
        for a, b in zip(leaves, leaves[1:] + leaves[:1], strict=True):
            if a != b:
                ring[a].add(b)
                ring[b].add(a)
    rows, cols, vals = [hub] * n, list(range(n)), [1.0 / n] * n  # the hub averages everyone
    for k in leaves:
        own = [k, *ring[k]]
        rows += [k] * (len(own) + 1)
        cols += [*own, hub]
        vals += [(1.0 - hub_weight) / len(own)] * len(own) + [hub_weight]
    return [_csr(n, np.array(rows), np.array(cols), np.array(vals))]


_BUILDERS: dict[str, Callable[[Any, int, int, str], list[sparse.csr_array]]] = {
    "ring": _ring, "directed_ring": _directed_ring, "torus": _torus,
    "exponential": _exponential, "one_peer_exponential": _one_peer_exponential,
    "complete": _complete, "star": _star, "erdos_renyi": _erdos_renyi,
    "small_world": _small_world, "hub": _hub,
}


def _edges(g: nx.Graph) -> np.ndarray:
    return np.array(list(g.edges()), dtype=np.int64).reshape(-1, 2)


def _undirected(edges: np.ndarray, n: int, scheme: str) -> sparse.csr_array:
    """Weights on an undirected graph over nodes 0..n-1 given as edges [E, 2] (either
    orientation, repeats and self-loops ignored), uniform or Metropolis-Hastings:
    uniform W[k, l] = 1/(deg_k + 1) over self and neighbours; Metropolis-Hastings
    W[k, l] = 1/(1 + max(deg_k, deg_l)), W[k, k] = 1 − Σ_{l≠k} W[k, l]."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    edges = edges[edges[:, 0] != edges[:, 1]]
    edges = np.unique(np.sort(edges, axis=1), axis=0)  # each undirected edge once
    k = np.concatenate([edges[:, 0], edges[:, 1]])  # receiver
    l = np.concatenate([edges[:, 1], edges[:, 0]])  # sender
    deg = np.bincount(k, minlength=n)
    if scheme == "uniform":
        w, own = 1.0 / (deg[k] + 1), 1.0 / (deg + 1)
    else:
        w = 1.0 / (1 + np.maximum(deg[k], deg[l]))
        order = np.lexsort((l, k))  # Σ_l in the order of l, as a row of W sums
        off = np.zeros(n)
        np.add.at(off, k[order], w[order])
        own = 1.0 - off
    self_loops = np.arange(n)
    return _csr(n, np.concatenate([k, self_loops]), np.concatenate([l, self_loops]),
                np.concatenate([w, own]))


def _directed(n: int, hops: Iterable[int]) -> sparse.csr_array:
    """Uniform weights over self and the in-neighbours (k − h) mod n, h in hops, of each
    receiver k: W[k, l] = 1/|{k} ∪ {k − h}|."""
    k = np.arange(n)[:, None]
    cols = (k - np.array([0, *hops])[None, :]) % n
    keys = np.unique(k * n + cols)  # (k, l) pairs, each once, sorted
    rows, cols = np.divmod(keys, n)
    return _csr(n, rows, cols, 1.0 / np.bincount(rows, minlength=n)[rows])


# ---------------------------------------------------------------- file topology

def _load_file(cfg: FileTopology, n: int, scheme: str) -> tuple[list[sparse.csr_array], str]:
    """Load W from .npy ([n, n], or [T, n, n] for a time-varying one), .csv ([n, n]) or a
    scipy.sparse .npz ([n, n], `scipy.sparse.save_npz`: a large graph without n×n); or build
    it from an edge list (:func:`_from_edge_list`)."""
    path, where = file_path(cfg)
    if is_edge_list(path):
        return [_from_edge_list(cfg, path, where, n, scheme)], where
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv", ".npz"):
        raise ConfigError(f"{where}: unsupported file type {suffix!r}; save W as .npy or .csv "
                          "(or a sparse W with scipy.sparse.save_npz as .npz), or give an edge "
                          "list as .txt")
    if scheme != "uniform":
        raise ConfigError(f"topology.weights={scheme}: the matrix in {path.name} gives the "
                          "weights itself; leave topology.weights=uniform, or give the graph "
                          "as an edge list (.txt) to have weights computed")
    try:
        if suffix == ".npz":
            a = sparse.csr_array(sparse.load_npz(path), dtype=np.float64)
        elif suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            a = np.loadtxt(path, delimiter=",", ndmin=2)
        if suffix != ".npz":
            a = np.asarray(a, dtype=np.float64)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty .npy
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: could not read the matrix ({msg}); "
                          "save W with numpy.save or as comma-separated rows") from e
    if a.ndim == 3 and a.shape[1:] == (n, n) and a.shape[0] >= 1:  # dense [T, n, n]
        return [sparse.csr_array(m) for m in a], where
    if a.shape != (n, n):
        hint = (" (an edge list in a .csv needs the header src,dst[,weight])"
                if a.ndim == 2 and a.shape[1] in (2, 3) and suffix == ".csv" else "")
        raise ConfigError(f"{where}: matrix has shape {a.shape}, expected ({n}, {n}) for "
                          f"nodes={n}; provide an n x n matrix or set nodes to match{hint}")
    return [sparse.csr_array(a)], where


def _from_edge_list(cfg: FileTopology, path: Path, where: str, n: int,
                    scheme: str) -> sparse.csr_array:
    """W from an edge list. `topology.directed=false`: each line is an undirected edge;
    true: src sends to dst (W[dst, src] > 0). topology.weights=uniform gives receiver k
    W[k, l] = a_kl / (1 + Σ_l a_kl) and W[k, k] = 1 / (1 + Σ_l a_kl), a_kl the line's weight
    (1 without a weight column: 1/(deg_k + 1), as the built-in graphs); metropolis_hastings
    needs an undirected list without weights."""
    directed = cfg.directed
    edges, a = read_edges(path, where)
    if edges.size == 0:
        raise ConfigError(f"{where}: the edge list has no edges; write one `src dst` line per "
                          "edge")
    if edges.max() >= n:
        raise ConfigError(f"{where}: node id {int(edges.max())} is not a node of a {n}-node "
                          f"graph (ids 0..{n - 1}); set nodes={int(edges.max()) + 1} or leave "
                          "nodes unset to take it from the file")
    if a is not None and not (np.all(np.isfinite(a)) and np.all(a > 0)):
        raise ConfigError(f"{where}: edge weights must be finite and > 0")
    if scheme == "metropolis_hastings":
        if directed or a is not None:
            why = "a directed list" if directed else "a list with a weight column"
            raise ConfigError(f"topology.weights=metropolis_hastings needs an undirected edge "
                              f"list without weights, not {why}; use topology.weights=uniform")
        return _undirected(edges, n, scheme)
    keep = edges[:, 0] != edges[:, 1]  # self-loops: every node keeps a self-weight anyway
    edges, a = edges[keep], (np.ones(int(keep.sum())) if a is None else a[keep])
    senders, receivers = edges[:, 0], edges[:, 1]
    if not directed:
        senders, receivers = (np.concatenate([senders, receivers]),
                              np.concatenate([receivers, senders]))
        a = np.concatenate([a, a])
    key = receivers * n + senders
    unique, first = np.unique(key, return_index=True)
    if unique.size < key.size:  # the same edge twice: one link, its weight the first given
        receivers, senders, a = receivers[first], senders[first], a[first]
    total = 1.0 + np.bincount(receivers, weights=a, minlength=n)  # 1 + Σ_l a_kl
    own = np.arange(n)
    return _csr(n, np.concatenate([receivers, own]), np.concatenate([senders, own]),
                np.concatenate([a / total[receivers], 1.0 / total]))


# ---------------------------------------------------------------- validation

def _validate(mats: list[sparse.csr_array], n: int, where: str) -> None:
    """Check shape, finiteness, non-negativity, row sums and strong connectivity, on the
    stored entries only (O(edges))."""
    for t, w in enumerate(mats):
        at = f" (step {t})" if len(mats) > 1 else ""
        if w.shape != (n, n):
            raise ConfigError(f"{where}: matrix{at} has shape {w.shape}, expected ({n}, {n}); "
                              "provide an n x n matrix")
        if not np.all(np.isfinite(w.data)):
            raise ConfigError(f"{where}: matrix{at} contains NaN or inf; all weights must be "
                              "finite")
        if np.any(w.data < 0):
            coo = w.tocoo()
            i = np.flatnonzero(coo.data < 0)[0]
            raise ConfigError(f"{where}: W[{coo.row[i]},{coo.col[i]}]={coo.data[i]:g}{at} is "
                              "negative; mixing weights must be >= 0")
        sums = w.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOL)
        if bad.size:
            k = bad[0]
            raise ConfigError(f"{where}: row {k}{at} sums to {sums[k]:.12g}, not 1 "
                              f"(tolerance {ROW_SUM_TOL:g}); W must be row-stochastic, normalise "
                              "each row to sum to 1")
    union = sum((w > 0).astype(np.int8) for w in mats).tocsr()  # [k, l]: l sends to k
    if _reaches_all(union.T.tocsr()) and _reaches_all(union):
        return
    from scipy.sparse.csgraph import connected_components  # only to describe the failure

    count, labels = connected_components(union, directed=True, connection="strong")
    if count > 1:
        over = " (union over one period)" if len(mats) > 1 else ""
        other = int(np.flatnonzero(labels != labels[0])[0])
        raise ConfigError(f"{where}: the communication graph{over} is not strongly connected "
                          f"({count} components; nodes 0 and {other} cannot reach each other "
                          "both ways); add edges so every node reaches every other")


def _reaches_all(nbrs: sparse.csr_array) -> bool:
    """Whether node 0 reaches every node along edges u -> v for v in row u of `nbrs`
    (breadth first; each row is read once). With the receivers' rows (W's own pattern)
    instead of the senders' (its transpose): whether every node reaches 0."""
    n = nbrs.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = np.zeros(1, dtype=np.int64)
    while frontier.size:
        lo = nbrs.indptr[frontier]
        at = spans(lo, nbrs.indptr[frontier + 1] - lo)  # the frontier's rows, concatenated
        reached = np.unique(nbrs.indices[at])
        frontier = reached[~seen[reached]]
        seen[frontier] = True
    return bool(seen.all())


