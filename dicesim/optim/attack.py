"""Misbehaving nodes: poisoned data or tampered updates, from a given step on.

Crafted updates (`alie`, `ipm`; docs/attacks.md) replace the attacker's Δ by one made from
the honest messages it received. A message is θ_j^{t+½}; the attacker's own must leave in
the same exchange, so it uses the previous step's: at step t − 1 it received θ_j^{t−½} from
each honest in-neighbour j (W^{t−1}_aj ≠ 0, j ∉ attackers, j ≠ a) and reads j's update as
u_j = θ_j^{t−½} − θ_a^{t−1}. With μ, σ their per-coordinate mean and (population) std:
    alie: Δ̃_a^t = μ − z·σ        ipm: Δ̃_a^t = −ε·μ
At t = 0, or with no honest in-neighbour, the attacker sends its own update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import Channel
from dicesim.common.errors import ConfigError
from dicesim.config import ATTACKS as ATTACKS  # re-exported
from dicesim.config import Attack as AttackSettings
from dicesim.graph.topology import senders

CRAFTED = ("alie", "ipm")  # the update sent is made from the honest messages received


@dataclass
class Attack:
    kind: str
    nodes: np.ndarray  # attacked global node ids
    start: int = 0
    end: int | None = None  # attacked at start <= t < end (None: to the end of the run)
    sigma: float = 1.0  # feature_noise: std of the added Gaussian noise
    scale: float = -4.0  # scaled_update: the update is multiplied by this
    z: float = 1.0  # alie: μ − z·σ
    epsilon: float = 0.5  # ipm: −ε·μ

    @property
    def poisons_data(self) -> bool:
        return self.kind in ("label_flip", "feature_noise")

    @property
    def crafts(self) -> bool:
        return self.kind in CRAFTED

    def active(self, t: int) -> bool:
        return self.kind != "none" and self.start <= t and (self.end is None or t < self.end)

    def poison(self, x: Tensor, y: Tensor, ids: np.ndarray, num_classes: int,
               seed: int) -> tuple[Tensor, Tensor]:
        """A poisoned copy of the training set, changed at `ids` (the attacked nodes' data)."""
        x, y = x.clone(), y.clone()
        gen = torch.Generator().manual_seed(seed + 31337)
        ti = torch.as_tensor(ids, dtype=torch.long)
        if self.kind == "label_flip":
            if num_classes < 2:
                raise ConfigError("attack.kind=label_flip needs a classification data set")
            # every label replaced by another class: y → (y + c) mod C with c ∈ [1, C)
            shift = torch.randint(1, num_classes, (len(ids),), generator=gen)
            y[ti] = (y[ti] + shift) % num_classes
        elif self.kind == "feature_noise":
            noise = torch.randn(x[ti].shape, generator=gen, dtype=torch.float32)
            x[ti] = x[ti] + self.sigma * noise.to(x.dtype)
        return x, y

    def update(self, t: int, nodes: np.ndarray, update: Tensor) -> Tensor:
        """Δ as sent: free riders take no step, scaled_update multiplies Δ (linear in Δ)."""
        if not self.active(t) or self.kind not in ("free_rider", "scaled_update"):
            return update
        hit = np.isin(nodes, self.nodes)
        if not hit.any():
            return update
        factor = torch.ones(len(nodes), dtype=update.dtype, device=update.device)
        hit_rows = torch.as_tensor(hit, device=update.device)
        factor[hit_rows] = 0.0 if self.kind == "free_rider" else self.scale
        return update * factor[:, None]


def build_attack(cfg: AttackSettings, nodes: int, seed: int) -> Attack:
    if cfg.kind == "none":
        return Attack("none", np.array([], dtype=np.int64))
    chosen = np.asarray(cfg.nodes, dtype=np.int64)
    if not len(chosen):  # a seeded choice of round(fraction · nodes) nodes
        count = round(cfg.fraction * nodes)
        chosen = np.sort(np.random.default_rng([seed, 4242]).choice(nodes, count, replace=False))
    return Attack(str(cfg.kind), chosen, cfg.start, cfg.end, cfg.sigma, cfg.scale, cfg.z,
                  cfg.epsilon)


class CraftedUpdates:
    """One run's alie / ipm updates of this rank's attackers: `observe` (after step t − 1's
    exchange) makes each one from the honest messages received, `update` sends it at t."""

    def __init__(self, attack: Attack, local_nodes: np.ndarray):
        self.attack = attack
        self.local = np.asarray(local_nodes)
        self.attackers = [(i, int(a)) for i, a in enumerate(self.local) if a in attack.nodes]
        self.crafted: dict[int, Tensor] = {}  # attacker → Δ̃ for the next step

    def observe(self, W, theta: Tensor, received: Channel) -> None:
        """W: the topology's W^{t−1}; theta: θ^{t−1} of the local rows; received: the
        exchange's rows θ^{t−½} (own and received)."""
        assert received.available is not None
        self.crafted = {}
        for row, a in self.attackers:
            honest = np.setdiff1d(senders(W, a), np.append(self.attack.nodes, a))
            if not len(honest):
                continue
            at = received.positions(honest, received.available.device)
            u = received.available[at] - theta[row]  # u_j = θ_j^{t−½} − θ_a^{t−1}
            mean = u.mean(0)
            if self.attack.kind == "alie":
                self.crafted[a] = mean - self.attack.z * u.std(0, correction=0)
            else:
                self.crafted[a] = -self.attack.epsilon * mean

    def update(self, t: int, nodes: np.ndarray, update: Tensor) -> Tensor:
        """Δ as sent: an attacker's crafted update in place of its own."""
        if not self.attack.active(t):
            return update
        hit = [(i, self.crafted[int(k)]) for i, k in enumerate(nodes) if int(k) in self.crafted]
        if not hit:
            return update
        sent = update.clone()
        for i, crafted in hit:
            sent[i] = crafted
        return sent
