"""DICE-GT: the exact counterfactual, carried beside the real run (DESIGN §2).

For each reached local node k the tracker holds δ_k = θ_k − θ̃_k; the shadow parameters
θ̃_k = θ_k − δ_k take the same local step on the same batch:
  δ ← δ + Δ(θ_k) − Δ(θ_k − δ)
and G[e,s,k] = q_k (L'_k(θ_k^{t+s}) − L'_k(θ_k^{t+s} − δ_k)) (hop 0: at θ_j^{t+½}).
"""

from __future__ import annotations

import numpy as np

from dicesim.comm import Layout
from dicesim.events import EventBook, loss_gap
from dicesim.model import FlatModel, Probe
from dicesim.trackers import PerturbationTracker


class GroundTruth(PerturbationTracker):
    column = "dice_gt"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, probe: Probe,
                 q: np.ndarray, optimizer, only: set[int] | None = None):
        super().__init__(book, layout, q, only)
        self.model, self.probe, self.optimizer = model, probe, optimizer

    def at_theta(self, step) -> None:
        self.record(step, lambda delta, rows: loss_gap(self.model, step.theta[rows], delta,
                                                       self.probe.at(rows)))

    def local_step(self, step) -> None:
        def shadow_step(delta, rows, nodes, x, y, w):  # δ + Δ(θ) − Δ(θ − δ)
            g_shadow, _ = self.model.grads(step.theta[rows] - delta, x, y, w)
            return delta + step.update[rows] - self.optimizer.update(step.t, nodes, g_shadow)

        self.advance(step, shadow_step)
        # s = 0: G = q_j (L'_j(θ_j^{t+½}) − L'_j(θ̃_j^{t+½}))
        self.start(step, lambda i, delta: loss_gap(self.model, step.half[i:i + 1], delta,
                                                   self.probe.at(i))[0])
