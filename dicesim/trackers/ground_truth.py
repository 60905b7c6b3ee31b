"""DICE-GT: the exact counterfactual, carried beside the real run (DESIGN §2).

For each reached local node k the tracker holds δ_k = θ_k − θ̃_k; the shadow parameters
θ̃_k = θ_k − δ_k take the same local step on the same batch:
  δ ← δ + Δ(θ_k) − Δ(θ_k − δ)
and G[e,s,k] = q_k (L'_k(θ_k^{t+s}) − L'_k(θ_k^{t+s} − δ_k)) (hop 0: at θ_j^{t+½}).
"""

from __future__ import annotations

import numpy as np
import torch

from dicesim.comm import Layout
from dicesim.events import EventBook, loss_gap
from dicesim.model import FlatModel, Probe
from dicesim.trackers import PerturbationTracker


class GroundTruth(PerturbationTracker):
    column = "dice_gt"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, probe: Probe,
                 q: np.ndarray, optimizer, only: set[int] | None = None):
        super().__init__(book, layout, only)
        self.model, self.probe, self.q, self.optimizer = model, probe, q, optimizer

    def at_theta(self, step) -> None:
        events, idx = self.recorded(step.t)
        if sum(map(len, idx)) == 0:
            return
        flat = torch.as_tensor(np.concatenate(idx), device=step.theta.device)
        delta = torch.cat([self.rows[e.index] for e in events])
        gaps = loss_gap(self.model, step.theta[flat], delta, self.probe.at(flat))
        self.write(events, idx, gaps, self.q, step.t)

    def local_step(self, step) -> None:
        t = step.t
        events, idx = self.moving(t)
        if events and sum(map(len, idx)):
            flat = np.concatenate(idx)
            ti = torch.as_tensor(flat, device=step.theta.device)
            x, y, w = step.batch
            delta = torch.cat([self.rows[e.index] for e in events])
            g_shadow, _ = self.model.grads(step.theta[ti] - delta, x[ti], y[ti], w[ti])
            shadow_update = self.optimizer.update(t, flat + self.layout.first, g_shadow)
            new = delta + step.update[ti] - shadow_update  # δ + Δ(θ) − Δ(θ − δ)
            for e, part in zip(events, new.split([len(i) for i in idx]), strict=True):
                self.rows[e.index] = part
        for e in self.starting(step):
            self.rows[e.index] = self.start_rows(step, e)
            if e.index in step.sources:  # s = 0: G = q_j (L'_j(θ_j^{t+½}) − L'_j(θ̃_j^{t+½}))
                i = self.layout.local_index(e.source)
                gap = loss_gap(self.model, step.half[i:i + 1], self.rows[e.index],
                               self.probe.at(i))
                self.book.put(e, 0, e.source, self.column, float(self.q[e.source] * gap[0]))
