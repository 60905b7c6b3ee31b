"""Misbehaving nodes: poisoned data or tampered updates, from a given step on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dicesim.common.errors import ConfigError
from dicesim.config import ATTACKS as ATTACKS  # re-exported
from dicesim.config import Attack as AttackSettings


@dataclass
class Attack:
    kind: str
    nodes: np.ndarray  # attacked global node ids
    start: int = 0
    end: int | None = None  # attacked at start <= t < end (None: to the end of the run)
    sigma: float = 1.0  # feature_noise: std of the added Gaussian noise
    scale: float = -4.0  # scaled_update: the update is multiplied by this

    @property
    def poisons_data(self) -> bool:
        return self.kind in ("label_flip", "feature_noise")

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
    return Attack(str(cfg.kind), chosen, cfg.start, cfg.end, cfg.sigma, cfg.scale)
