"""How an honest receiver combines what its in-neighbours send.

- none:          θ_k ← Σ_l W[k,l] θ_l  (plain gossip)
- dice:          influence-guided collaborator selection. Each honest receiver k sums the
                 proximal influence of each in-neighbour j (Definition 4, measured by k
                 itself) over a sliding window; an in-neighbour whose windowed influence
                 is harmful (> threshold: it raised k's probe loss) gets weight 0 and the
                 row is renormalized, so W stays row-stochastic. Needs influence.proximal.
- trimmed_mean:  coordinate-wise trimmed mean over self and in-neighbours (robust baseline);
                 drops the `trim` largest and smallest values per coordinate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dicesim.comm import Channel, mix
from dicesim.errors import ConfigError

DEFENSES = ("none", "dice", "trimmed_mean")


@dataclass
class Defense:
    kind: str = "none"
    window: int = 20
    threshold: float = 0.0
    warmup: int = 10
    trim: int = 1
    honest: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    local: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    _recent: deque = field(default_factory=deque)  # per step: [local k, sender j] influence
    dropped: np.ndarray | None = None  # [local k, all j] bool

    def observe(self, t: int, proximal: np.ndarray) -> None:
        """Proximal influence of step t (rows: local receivers, columns: senders)."""
        if self.kind != "dice":
            return
        self._recent.append(proximal)
        if len(self._recent) > self.window:
            self._recent.popleft()
        if t + 1 < self.warmup:
            return
        score = np.sum(self._recent, axis=0)
        honest = np.isin(self.local, self.honest)[:, None]
        self.dropped = (score > self.threshold) & honest

    def weights(self, W: np.ndarray) -> np.ndarray:
        """W with this rank's rows adjusted (rows of other ranks' nodes left as they are)."""
        if self.kind != "dice" or self.dropped is None or not self.dropped.any():
            return W
        W = W.copy()
        rows = W[self.local]
        rows[self.dropped] = 0.0
        rows /= rows.sum(axis=1, keepdims=True)  # self-weight > 0 keeps every row non-empty
        W[self.local] = rows
        return W

    def aggregate(self, W: np.ndarray, channel: Channel) -> Tensor:
        if self.kind != "trimmed_mean":
            return mix(W, self.local, channel)
        assert channel.available is not None
        out = []
        for k in self.local:
            nbrs = np.flatnonzero(W[k] > 0)
            rows = channel.available[torch.as_tensor(nbrs)]
            if not np.isin(k, self.honest) or len(nbrs) <= 2 * self.trim:
                out.append(mix(W, np.array([k]), channel)[0])
                continue
            ordered = rows.sort(dim=0).values
            out.append(ordered[self.trim:len(nbrs) - self.trim].mean(0))
        return torch.stack(out)


def build_defense(cfg: Mapping | None, attacked: np.ndarray, nodes: int, local: np.ndarray,
                  proximal: bool) -> Defense:
    cfg = cfg or {}
    kind = cfg.get("kind", "none")
    if kind not in DEFENSES:
        raise ConfigError(f"defense.kind={kind}: unknown defense; choose one of "
                          f"{', '.join(DEFENSES)}")
    if kind == "dice" and not proximal:
        raise ConfigError("defense.kind=dice scores neighbours by proximal influence; "
                          "set influence.proximal=true")
    d = Defense(kind, int(cfg.get("window", 20)), float(cfg.get("threshold", 0.0)),
                int(cfg.get("warmup", 10)), int(cfg.get("trim", 1)),
                np.setdiff1d(np.arange(nodes), attacked), local)
    if d.window < 1 or d.trim < 0:
        raise ConfigError("defense.window must be >= 1 and defense.trim >= 0")
    return d
