"""DICE-E: the paper's first-order estimator (DESIGN §2, "Stateful optimizers").

(δ̂, δ̂s) starts as the exact source perturbation (δθ_j^{t+½}, δs_j^{t+½}) (−η ∇L_S and
no state for plain SGD), steps with the Jacobian-vector product of the local step at the
real trajectory, the gradient's own JVP being H_k δ̂ (one HVP per row; 0 with curvature
off):
  (dΔ, δ̂s') = J_O(θ_k^t, s_k^t, g_k^t)·(δ̂, δ̂s, H_k δ̂),   δ̂ ← δ̂ + dΔ
(= (I − η H_k) δ̂ for SGD) and is recorded as E[e,s,k] = q_k ∇L'_k(θ_k^{t+s})ᵀ δ̂_k
(hop 0: q_j ∇L'_j(θ_j^t)ᵀ δ̂_j^{t+½}).

`dice_e_nostate` is the ablation that ignores the optimizer state: δ̂s is dropped (zero at
the source and after every step), so only the θ-path of the optimizer's Jacobian acts.
For plain SGD it equals dice_e.
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
                 optimizer, curvature: bool, with_state: bool = True):
        super().__init__(book, layout, q, optimizer)
        self.model, self.curvature, self.with_state = model, curvature, with_state
        if not with_state:
            self.column = "dice_e_nostate"

    def _sends_state(self) -> bool:
        return self.with_state and self.optimizer.gossip_state

    def probe_rows(self, t: int) -> np.ndarray:
        return self.book.probe_rows(t)  # ∇L'_k(θ_k^t) of the rows it records or starts

    def at_theta(self, step) -> None:
        self.record(step, lambda dhat, rows: (step.probe_grad[rows] * dhat).sum(1))

    def local_step(self, step) -> None:
        def linearized(dhat, d_state, rows, nodes, x, y, w):
            theta, state, grad = self.real_rows(step, rows)
            hv = (self.model.hvps(theta, dhat, x, y, w) if self.curvature
                  else dhat.new_zeros(dhat.shape))  # H_k δ̂
            if not self.with_state:
                d_state = {n: v.new_zeros(v.shape) for n, v in d_state.items()}
            d_update, d_state = self.optimizer.tangent(step.t, nodes, theta, state, grad,
                                                       dhat, d_state, hv)
            if not self.with_state:
                d_state = {n: v.new_zeros(v.shape) for n, v in d_state.items()}
            return dhat + d_update, d_state  # δ̂ + J_Δ δ̂

        if self.curvature or self.optimizer.stateful or self.optimizer.weight_decay_active:
            self.advance(step, linearized)
        # s = 0: E = q_j ∇L'_j(θ_j^t)ᵀ δ̂
        self.start(step, lambda i, dhat: (step.probe_grad[i] * dhat[0]).sum())
        if not self.with_state:
            for e in self.starting(step):
                self.state_rows[e.index] = {n: v.new_zeros(v.shape)
                                            for n, v in self.state_rows[e.index].items()}
