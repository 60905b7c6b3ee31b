"""DICE-E: the paper's first-order estimator (DESIGN §2).

δ̂ starts as the exact source perturbation δ_j^{t+½} (−η ∇L_S for SGD), steps with the
linearized local step δ̂ ← δ̂ + J_Δ(θ_k^t) δ̂ (= (I − η H_k) δ̂ for SGD, one HVP per row;
the identity with curvature off) and is recorded as E[e,s,k] = q_k ∇L'_k(θ_k^{t+s})ᵀ δ̂_k
(hop 0: q_j ∇L'_j(θ_j^t)ᵀ δ̂_j^{t+½}).
"""

from __future__ import annotations

import numpy as np
import torch

from dicesim.comm import Layout
from dicesim.events import EventBook
from dicesim.model import FlatModel
from dicesim.trackers import PerturbationTracker


class DiceE(PerturbationTracker):
    column = "dice_e"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, q: np.ndarray,
                 optimizer, curvature: bool):
        super().__init__(book, layout)
        self.model, self.q, self.optimizer, self.curvature = model, q, optimizer, curvature

    def probe_rows(self, t: int) -> np.ndarray:
        return self.book.probe_rows(t)  # ∇L'_k(θ_k^t) of the rows it records or starts

    def at_theta(self, step) -> None:
        events, idx = self.recorded(step.t)
        if sum(map(len, idx)) == 0:
            return
        flat = torch.as_tensor(np.concatenate(idx), device=step.theta.device)
        dhat = torch.cat([self.rows[e.index] for e in events])
        self.write(events, idx, (step.probe_grad[flat] * dhat).sum(1), self.q, step.t)

    def local_step(self, step) -> None:
        t = step.t
        events, idx = self.moving(t)
        if self.curvature and events and sum(map(len, idx)):
            flat = np.concatenate(idx)
            ti = torch.as_tensor(flat, device=step.theta.device)
            x, y, w = step.batch
            dhat = torch.cat([self.rows[e.index] for e in events])
            hv = self.model.hvps(step.theta[ti], dhat, x[ti], y[ti], w[ti])  # H_k δ̂
            new = dhat + self.optimizer.tangent(t, flat + self.layout.first, hv)
            for e, part in zip(events, new.split([len(i) for i in idx]), strict=True):
                self.rows[e.index] = part
        for e in self.starting(step):
            self.rows[e.index] = self.start_rows(step, e)
            if e.index in step.sources:  # s = 0: E = q_j ∇L'_j(θ_j^t)ᵀ δ̂
                i = self.layout.local_index(e.source)
                value = (step.probe_grad[i] * self.rows[e.index][0]).sum()
                self.book.put(e, 0, e.source, self.column, float(self.q[e.source] * value))
