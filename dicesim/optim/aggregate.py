"""The aggregator: how an honest receiver combines what its in-neighbours send.

Its `weights(W^t)` is W^t *as mixed*; the trainer hands that matrix to every tracker, so
the ground truth and the estimators follow the defended dynamics, not the plain graph.

- none:          θ_k ← Σ_l W[k,l] θ_l  (plain gossip)
- dice:          influence-guided collaborator selection. Each honest receiver k sums the
                 proximal influence of each in-neighbour j (Definition 4, measured by k
                 itself) over the last `window` steps in which k mixed j's parameters; an
                 in-neighbour whose windowed influence is harmful (> threshold: it raised k's
                 probe loss) gets weight 0 and the row is renormalized, so W stays
                 row-stochastic. A dropped in-neighbour is no longer mixed, hence no longer
                 measured: its verdict stands (no re-admission on an empty window).
                 Needs influence.proximal.
- trimmed_mean:  coordinate-wise trimmed mean over self and in-neighbours (robust baseline);
                 drops the `trim` largest and smallest values per coordinate.
- oracle:        the upper bound of any selection rule: honest receivers give every attacked
                 node weight 0 from step 0 (it is told who they are) and renormalize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from dicesim.comm.exchange import Channel, mix
from dicesim.config import DEFENSES as DEFENSES  # re-exported
from dicesim.config import Defense
from dicesim.graph.topology import senders


@dataclass
class Aggregator:
    kind: str = "none"
    window: int = 20
    threshold: float = 0.0
    warmup: int = 10
    trim: int = 1
    honest: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    local: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    dropped: np.ndarray | None = None  # [local k, all j] bool
    _values: np.ndarray | None = None  # [local k, j, window] the last measured influences
    _count: np.ndarray | None = None  # [local k, j] how many were measured so far
    _mixed: np.ndarray | None = None  # [local k, j] W^t[k,j] > 0 of the last weights() call

    def observe(self, t: int, proximal: sparse.csr_array | np.ndarray) -> None:
        """Proximal influence of step t (rows: local receivers, columns: senders), as the
        proximal tracker published it at θ^{t+1}; called before weights() of step t + 1,
        so `_mixed` still says which pairs k mixed at t. Only `dice` reads it (as a dense
        [local, n] block, like its scores)."""
        if self.kind != "dice":
            return
        if sparse.issparse(proximal):
            proximal = proximal.toarray()
        if self._values is None:
            self._values = np.zeros((*proximal.shape, self.window))
            self._count = np.zeros(proximal.shape, dtype=np.int64)
        assert self._count is not None
        measured = self._mixed if self._mixed is not None else np.ones(proximal.shape, bool)
        measured = measured.copy()
        measured[np.arange(len(self.local)), self.local] = False  # k ≠ j
        k, j = np.nonzero(measured)
        self._values[k, j, self._count[k, j] % self.window] = proximal[k, j]
        self._count[k, j] += 1
        if t + 1 < self.warmup:
            return
        score = self._values.sum(axis=2)  # Σ of the last `window` measured values
        honest = np.isin(self.local, self.honest)[:, None]
        self.dropped = (score > self.threshold) & (self._count > 0) & honest

    def weights(self, W: sparse.csr_array) -> sparse.csr_array:
        """W with this rank's rows adjusted (rows of other ranks' nodes left as they are).
        Undefended: W itself, untouched (O(1)). A selection works on this rank's rows as a
        dense [local, n] block, like its scores."""
        if self.kind == "oracle" and self.dropped is None:
            attacked = ~np.isin(np.arange(W.shape[1]), self.honest)
            self.dropped = np.isin(self.local, self.honest)[:, None] & attacked[None, :]
        if self.kind not in ("dice", "oracle") or self.dropped is None or not self.dropped.any():
            if self.kind == "dice":
                self._mixed = W[self.local].toarray() > 0
            return W
        rows = W[self.local].toarray()
        rows[self.dropped] = 0.0
        empty = rows.sum(axis=1) == 0  # every in-neighbour cut and no self-weight: keep θ_k
        rows[np.flatnonzero(empty), self.local[empty]] = 1.0
        rows /= rows.sum(axis=1, keepdims=True)
        self._mixed = rows > 0
        return _replace_rows(W, self.local, rows)

    def combine(self, W: sparse.csr_array, channel: Channel,
                weights: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """θ^{t+1} of this rank's nodes; `weights` = W[local, :] as a tensor, if cached;
        `out`, a block the rows may be written into (the trimmed mean makes its own)."""
        if self.kind != "trimmed_mean":
            return mix(W, self.local, channel, weights, out)
        assert channel.available is not None
        out = []
        for k in self.local:
            nbrs = senders(W, k)
            rows = channel.available[channel.positions(nbrs, channel.available.device)]
            if not np.isin(k, self.honest) or len(nbrs) <= 2 * self.trim:
                out.append(mix(W, np.array([k]), channel)[0])
                continue
            ordered = rows.sort(dim=0).values
            out.append(ordered[self.trim:len(nbrs) - self.trim].mean(0))
        return torch.stack(out)

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dropped": self.dropped, "values": self._values, "count": self._count,
                "mixed": self._mixed}

    def load_state_dict(self, state: dict) -> None:
        self.dropped, self._values = state["dropped"], state["values"]
        self._count, self._mixed = state["count"], state["mixed"]


def _replace_rows(W: sparse.csr_array, nodes: np.ndarray, rows: np.ndarray) -> sparse.csr_array:
    """W with rows `nodes` replaced by the dense `rows` (their zeros not stored)."""
    keep = W.tocoo()
    mask = ~np.isin(keep.row, nodes)  # entries of the other rows
    k, l = np.nonzero(rows)
    return sparse.csr_array((np.concatenate([keep.data[mask], rows[k, l]]),
                             (np.concatenate([keep.row[mask], nodes[k]]),
                              np.concatenate([keep.col[mask], l]))), shape=W.shape)


def build_aggregator(cfg: Defense, attacked: np.ndarray, nodes: int, local: np.ndarray
                     ) -> Aggregator:
    return Aggregator(str(cfg.kind), cfg.window, cfg.threshold, cfg.warmup, cfg.trim,
                      np.setdiff1d(np.arange(nodes), attacked), local)
