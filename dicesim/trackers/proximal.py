"""Proximal influence (the paper's Definition 4), every step, of every batch on every
out-neighbour: q_k W^{t−1}[k,j] ∇L'_k(θ_k^t)ᵀ Δ_j^{t−1}, k ≠ j, from the updates Δ_j that
k received at t − 1. Published on the Step (`step.proximal`) for the aggregator."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dicesim.comm import Channel, Layout
from dicesim.events import ProximalRow
from dicesim.trackers import Tracker


class Proximal(Tracker):
    def __init__(self, layout: Layout, q: np.ndarray):
        self.layout = layout
        self.q = q
        self.received: Tensor | None = None  # Δ_j^{t−1} of every sender (zero rows elsewhere)
        self.W: np.ndarray | None = None  # W^{t−1}[local, :] as mixed (dense rows)
        self.rows: list[ProximalRow] = []

    def probe_rows(self, t: int) -> np.ndarray:
        return np.arange(self.layout.nodes_per_rank) if t > 0 else np.array([], dtype=np.int64)

    def at_theta(self, step) -> None:
        if step.t == 0:
            return
        assert self.received is not None and self.W is not None
        local = self.layout.local_nodes
        dots = step.probe_grad @ self.received.T  # [local k, sender j]
        weights = torch.as_tensor(self.W * self.q[local, None], dtype=dots.dtype,
                                  device=dots.device)
        values = (dots * weights).cpu().numpy()
        values[np.arange(len(local)), local] = 0.0  # k ≠ j
        step.proximal = values
        for i, k in enumerate(local):
            for j in np.flatnonzero(self.W[i] > 0):
                if j != k:
                    self.rows.append(ProximalRow(step.t - 1, int(j), int(k),
                                                 float(values[i, j])))

    def channels(self, step) -> list[Channel]:
        return [Channel(np.arange(self.layout.nodes), step.update)]

    def after_gossip(self, step, received: list[Channel]) -> None:
        self.received, self.W = received[0].available, step.W[self.layout.local_nodes].toarray()

    def take_proximal(self) -> list[ProximalRow]:
        rows, self.rows = self.rows, []
        return rows

    def state_dict(self) -> dict:
        return {"received": self.received, "W": self.W, "rows": [tuple(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.received, self.W = state["received"], state["W"]
        self.rows = [ProximalRow(*r) for r in state["rows"]]
