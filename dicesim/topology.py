"""Communication topologies: the mixing matrices W^t of decentralized SGD.

W^t[k, l] is the weight receiver k gives to sender l (θ_k ← Σ_l W^t[k, l] θ_l), so every W^t is
row-stochastic. Static topologies have one matrix; time-varying ones repeat ``matrices`` with
period ``len(matrices)``. Every rank rebuilds the same matrices from (config, n, seed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from dicesim.errors import ConfigError

TOPOLOGIES = ("ring", "directed_ring", "torus", "exponential", "one_peer_exponential",
              "complete", "star", "erdos_renyi", "small_world", "hub", "file")
WEIGHT_SCHEMES = ("uniform", "metropolis_hastings")
# Topologies whose edges are directed: metropolis_hastings weights are undefined for them.
DIRECTED = ("directed_ring", "exponential", "one_peer_exponential")
# Topologies that define their own weights and ignore topology.weights.
OWN_WEIGHTS = ("hub", "file")
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
    matrices: list[np.ndarray]
    # spectral gap per method: (value or None, how it was found or why it was not)
    _gaps: dict[str, tuple[float | None, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.matrices:
            raise ValueError("Topology needs at least one matrix")
        mats = []
        for m in self.matrices:
            a = np.array(m, dtype=np.float64)
            a.setflags(write=False)  # shared by every caller: nobody may edit W in place
            mats.append(a)
        self.matrices = mats

    @property
    def period(self) -> int:
        return len(self.matrices)

    @property
    def time_varying(self) -> bool:
        return self.period > 1

    def W(self, t: int) -> np.ndarray:
        """The mixing matrix used at step t (read-only)."""
        return self.matrices[t % self.period]

    def in_neighbours(self, k: int, t: int) -> np.ndarray:
        """Sorted senders l with W^t[k, l] > 0 (k itself included when W^t[k, k] > 0)."""
        return np.flatnonzero(self.W(t)[k] > 0)

    def out_neighbours(self, l: int, t: int) -> np.ndarray:
        """Sorted receivers k with W^t[k, l] > 0."""
        return np.flatnonzero(self.W(t)[:, l] > 0)

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
                prod = w @ prod
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
        w = self.W(t)
        g = nx.DiGraph()
        g.add_nodes_from(range(self.n))
        for k, l in zip(*np.nonzero(w > 0), strict=True):
            if k != l:
                g.add_edge(int(l), int(k), weight=float(w[k, l]))
        return g


# ---------------------------------------------------------------- spectral gap (sparse)

def _sparse_lam2(mats: list[np.ndarray], circulant: bool) -> tuple[float | None, str]:
    """|λ2| of P = W^{T-1}···W^0 without a dense eigendecomposition.

    Circulant W^t (ring, directed_ring, exponential, one_peer_exponential with uniform
    weights) share the Fourier eigenvectors: the eigenvalues of P are the products of
    the FFTs of the first rows, exactly. Otherwise ARPACK finds the largest eigenvalue of
    the deflated operator A = P - 1·1ᵀ/n: P 1 = 1 and every left eigenvector u of P with
    eigenvalue λ ≠ 1 has uᵀ1 = 0, so uᵀA = λuᵀ while A1 = 0 — the spectrum of A is that of
    P with 1 replaced by 0, and its largest modulus is |λ2|. Only matrix-vector products
    with the sparse W^t are used."""
    from scipy import sparse

    n = mats[0].shape[0]
    sp = [sparse.csr_matrix(w) for w in mats]
    for w in sp:
        w.eliminate_zeros()
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


def build_topology(cfg: Mapping, n: int, seed: int) -> Topology:
    """Build the topology described by ``cfg`` (the ``topology`` config group) for n nodes.

    Raises ConfigError (one line: the setting, what is wrong, how to fix it) on bad input.
    """
    name = cfg.get("name")
    if name is None:
        raise ConfigError(f"topology.name is not set; choose one of {', '.join(TOPOLOGIES)}")
    if name not in TOPOLOGIES:
        raise ConfigError(f"topology.name={name!r} is unknown; choose one of "
                          f"{', '.join(TOPOLOGIES)} (e.g. topology=ring)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"nodes={n!r}: need a whole number of nodes >= 1; set e.g. nodes=8")
    n = int(n)
    scheme = _opt(cfg, "weights", "uniform")
    if name not in OWN_WEIGHTS:
        if scheme not in WEIGHT_SCHEMES:
            raise ConfigError(f"topology.weights={scheme!r} is unknown; choose one of "
                              f"{', '.join(WEIGHT_SCHEMES)}")
        if scheme == "metropolis_hastings" and name in DIRECTED:
            raise ConfigError(f"topology.weights=metropolis_hastings needs an undirected graph but "
                              f"{name} is directed; use topology.weights=uniform")

    if name == "file":
        mats, where = _load_file(cfg, n)
    else:
        mats = [np.ones((1, 1))] if n == 1 else _BUILDERS[name](cfg, n, seed, scheme)
        where = f"topology={name}"
    _validate(mats, n, where)
    return Topology(name=name, n=n, matrices=mats)


# ---------------------------------------------------------------- builders (n >= 2)

def _ring(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    return [_undirected(nx.cycle_graph(n), n, scheme)]


def _torus(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    rows = _int(cfg, "rows", min(divisors, key=lambda d: (abs(d - n**0.5), d)))
    if rows < 1 or n % rows:
        raise ConfigError(f"topology.rows={rows} does not divide nodes={n}; pick one of "
                          f"{', '.join(map(str, divisors))} or leave topology.rows=null")
    cols = n // rows
    g = nx.Graph()
    for r in range(rows):
        for c in range(cols):
            for nr, nc in ((r + 1) % rows, c), (r, (c + 1) % cols):
                if (nr, nc) != (r, c):  # a dimension of size 1 wraps onto itself
                    g.add_edge(r * cols + c, nr * cols + nc)
    return [_undirected(g, n, scheme)]


def _complete(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    return [_undirected(nx.complete_graph(n), n, scheme)]


def _star(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    center = _node(cfg, "center", n)
    return [_undirected(nx.Graph((center, k) for k in range(n) if k != center), n, scheme)]


def _erdos_renyi(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    p = _float(cfg, "p", 0.3)
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"topology.p={p}: the erdos_renyi edge probability must be in (0, 1]; "
                          "set e.g. topology.p=0.3")
    for s in range(seed, seed + ER_TRIES):
        g = nx.gnp_random_graph(n, p, seed=s)
        if nx.is_connected(g):
            return [_undirected(g, n, scheme)]
    raise ConfigError(f"topology.p={p}: erdos_renyi graph with {n} nodes stayed disconnected "
                      f"after {ER_TRIES} tries; raise topology.p")


def _small_world(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    k, beta = _int(cfg, "k", 4), _float(cfg, "beta", 0.2)
    if not 2 <= k < n:
        fix = f"set topology.k between 2 and {n - 1}" if n > 2 else "use at least 3 nodes"
        raise ConfigError(f"topology.k={k}: small_world needs 2 <= k < nodes={n}; {fix}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"topology.beta={beta}: the small_world rewiring probability must be "
                          "in [0, 1]; set e.g. topology.beta=0.2")
    try:
        g = nx.connected_watts_strogatz_graph(n, k, beta, tries=ER_TRIES, seed=seed)
    except nx.NetworkXError as e:
        raise ConfigError(f"topology.k={k}, topology.beta={beta}: small_world graph with {n} "
                          f"nodes failed ({e}); raise topology.k or lower topology.beta") from e
    return [_undirected(g, n, scheme)]


def _directed_ring(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    return [_directed(n, lambda k: [(k - 1) % n])]


def _exponential(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    hops = [2**i for i in range((n - 1).bit_length())]  # 2^0 .. 2^floor(log2(n-1))
    return [_directed(n, lambda k: [(k - h) % n for h in hops])]


def _one_peer_exponential(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    period = (n - 1).bit_length()  # ceil(log2 n)
    return [_directed(n, lambda k, h=2**t: [(k - h) % n]) for t in range(period)]


def _hub(cfg: Mapping, n: int, seed: int, scheme: str) -> list[np.ndarray]:
    hub = _node(cfg, "hub", n)
    hub_weight = _float(cfg, "hub_weight", 0.5)
    if not 0.0 < hub_weight < 1.0:
        raise ConfigError(f"topology.hub_weight={hub_weight} must be in (0, 1) so that leaves "
                          "hear the hub and keep a self-weight; set e.g. topology.hub_weight=0.5")
    leaves = [k for k in range(n) if k != hub]
    ring = nx.cycle_graph(leaves) if len(leaves) > 1 else nx.Graph()
    w = np.zeros((n, n))
    w[hub] = 1.0 / n
    for k in leaves:
        own = [k, *ring.neighbors(k)] if k in ring else [k]
        w[k, own] = (1.0 - hub_weight) / len(own)
        w[k, hub] = hub_weight
    return [w]


_BUILDERS: dict[str, Callable[[Mapping, int, int, str], list[np.ndarray]]] = {
    "ring": _ring, "directed_ring": _directed_ring, "torus": _torus,
    "exponential": _exponential, "one_peer_exponential": _one_peer_exponential,
    "complete": _complete, "star": _star, "erdos_renyi": _erdos_renyi,
    "small_world": _small_world, "hub": _hub,
}


def _undirected(g: nx.Graph, n: int, scheme: str) -> np.ndarray:
    """Weights on an undirected graph over nodes 0..n-1 (uniform or Metropolis-Hastings)."""
    g = nx.Graph(g)
    g.add_nodes_from(range(n))
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    deg = dict(g.degree())
    w = np.zeros((n, n))
    for k in range(n):
        nbrs = sorted(g.neighbors(k))
        if scheme == "uniform":
            w[k, [k, *nbrs]] = 1.0 / (len(nbrs) + 1)
        else:
            for l in nbrs:
                w[k, l] = 1.0 / (1 + max(deg[k], deg[l]))
            w[k, k] = 1.0 - w[k].sum()
    return w


def _directed(n: int, senders: Callable[[int], Iterable[int]]) -> np.ndarray:
    """Uniform weights over self and the in-neighbours senders(k) of each receiver k."""
    w = np.zeros((n, n))
    for k in range(n):
        group = sorted({k, *senders(k)})
        w[k, group] = 1.0 / len(group)
    return w


# ---------------------------------------------------------------- file topology

def _load_file(cfg: Mapping, n: int) -> tuple[list[np.ndarray], str]:
    """Load W from .npy ([n, n], or [T, n, n] for a time-varying one) or .csv ([n, n])."""
    raw = cfg.get("path")
    if raw is None or str(raw) in ("", "???"):
        raise ConfigError("topology.path is not set; pass topology.path=/path/to/W.npy "
                          "(or a .csv file)")
    path = Path(str(raw)).expanduser()
    where = f"topology.path={path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; pass the path of an existing .npy or .csv")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise ConfigError(f"{where}: unsupported file type {suffix!r}; save W as .npy or .csv")
    try:
        if suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            a = np.loadtxt(path, delimiter=",", ndmin=2)
        a = np.asarray(a, dtype=np.float64)
    except (ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: could not read the matrix ({msg}); "
                          "save W with numpy.save or as comma-separated rows") from e
    if a.ndim == 3 and a.shape[1:] == (n, n) and a.shape[0] >= 1:
        return list(a), where
    if a.shape != (n, n):
        raise ConfigError(f"{where}: matrix has shape {a.shape}, expected ({n}, {n}) for "
                          f"nodes={n}; provide an n x n matrix or set nodes to match")
    return [a], where


# ---------------------------------------------------------------- validation

def _validate(mats: list[np.ndarray], n: int, where: str) -> None:
    """Check shape, finiteness, non-negativity, row sums and strong connectivity."""
    for t, w in enumerate(mats):
        at = f" (step {t})" if len(mats) > 1 else ""
        if w.shape != (n, n):
            raise ConfigError(f"{where}: matrix{at} has shape {w.shape}, expected ({n}, {n}); "
                              "provide an n x n matrix")
        if not np.all(np.isfinite(w)):
            raise ConfigError(f"{where}: matrix{at} contains NaN or inf; all weights must be "
                              "finite")
        if np.any(w < 0):
            k, l = np.argwhere(w < 0)[0]
            raise ConfigError(f"{where}: W[{k},{l}]={w[k, l]:g}{at} is negative; mixing weights "
                              "must be >= 0")
        bad = np.flatnonzero(np.abs(w.sum(axis=1) - 1.0) > ROW_SUM_TOL)
        if bad.size:
            k = bad[0]
            raise ConfigError(f"{where}: row {k}{at} sums to {w[k].sum():.12g}, not 1 "
                              f"(tolerance {ROW_SUM_TOL:g}); W must be row-stochastic, normalise "
                              "each row to sum to 1")
    union = np.any(np.stack(mats) > 0, axis=0)
    if _reaches_all(union) and _reaches_all(union.T):
        return
    from scipy.sparse.csgraph import connected_components  # only to describe the failure

    count, labels = connected_components(union, directed=True, connection="strong")
    if count > 1:
        over = " (union over one period)" if len(mats) > 1 else ""
        other = int(np.flatnonzero(labels != labels[0])[0])
        raise ConfigError(f"{where}: the communication graph{over} is not strongly connected "
                          f"({count} components; nodes 0 and {other} cannot reach each other "
                          "both ways); add edges so every node reaches every other")


def _reaches_all(adjacency: np.ndarray) -> bool:
    """Whether node 0 reaches every node along edges k -> l where adjacency[l, k] (breadth
    first; each node's row is read once). With the transpose: whether every node reaches 0."""
    n = len(adjacency)
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = np.zeros(1, dtype=np.int64)
    while frontier.size:
        reached = adjacency[:, frontier].any(axis=1) & ~seen
        frontier = np.flatnonzero(reached)
        seen[frontier] = True
    return bool(seen.all())


# ---------------------------------------------------------------- config helpers

def _opt(cfg: Mapping, key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _int(cfg: Mapping, key: str, default: int) -> int:
    value = _opt(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"topology.{key}={value!r} must be an integer; set e.g. "
                          f"topology.{key}={default}")
    return int(value)


def _float(cfg: Mapping, key: str, default: float) -> float:
    value = _opt(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ConfigError(f"topology.{key}={value!r} must be a number; set e.g. "
                          f"topology.{key}={default}")
    return float(value)


def _node(cfg: Mapping, key: str, n: int) -> int:
    k = _int(cfg, key, 0)
    if not 0 <= k < n:
        raise ConfigError(f"topology.{key}={k} is not a node of a {n}-node graph; "
                          f"pick a node between 0 and {n - 1}")
    return k
