"""DICE-E: the paper's first-order estimator (DESIGN §2).

δ̂ starts as the exact source perturbation δ_j^{t+½} (−η ∇L_S for SGD), steps with the
linearized local step δ̂ ← δ̂ + J_Δ(θ_k^t) δ̂ (= (I − η H_k) δ̂ for SGD, one HVP per row;
the identity with curvature off) and is recorded as E[e,s,k] = q_k ∇L'_k(θ_k^{t+s})ᵀ δ̂_k
(hop 0: q_j ∇L'_j(θ_j^t)ᵀ δ̂_j^{t+½}).
"""

from __future__ import annotations

import numpy as np

from dicesim.comm import Layout
from dicesim.events import EventBook
from dicesim.model import FlatModel
from dicesim.trackers import PerturbationTracker


class DiceE(PerturbationTracker):
    column = "dice_e"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, q: np.ndarray,
                 optimizer, curvature: bool):
        super().__init__(book, layout, q)
        self.model, self.optimizer, self.curvature = model, optimizer, curvature

    def probe_rows(self, t: int) -> np.ndarray:
        return self.book.probe_rows(t)  # ∇L'_k(θ_k^t) of the rows it records or starts

    def at_theta(self, step) -> None:
        self.record(step, lambda dhat, rows: (step.probe_grad[rows] * dhat).sum(1))

    def local_step(self, step) -> None:
        def linearized(dhat, rows, nodes, x, y, w):  # δ̂ + J_Δ(θ_k) δ̂, J_Δ δ̂ from H_k δ̂
            hv = self.model.hvps(step.theta[rows], dhat, x, y, w)
            return dhat + self.optimizer.tangent(step.t, nodes, hv)

        if self.curvature:
            self.advance(step, linearized)
        # s = 0: E = q_j ∇L'_j(θ_j^t)ᵀ δ̂
        self.start(step, lambda i, dhat: (step.probe_grad[i] * dhat[0]).sum())
