"""`dice_mid`: DICE-E evaluated at the midpoint of each segment (DESIGN §2).

For any smooth f, f(θ) − f(θ − δ) = ∇f(θ − δ/2)ᵀδ + O(‖δ‖³), with no Hessian of f; the
first-order DICE-E takes the gradient at one end instead and errs by ½ δᵀH'δ. So
  hop 0:   q_j ∇L'_j(θ_j^{t+½} − δ_j/2)ᵀ δ_j,   δ_j the event's exact update difference;
  hop s:   q_k ∇L'_k(θ_k^{t+s} − δ̂_k/2)ᵀ δ̂_k;
  local:   δ̂_k ← δ̂_k + J_Δ(θ_k − δ̂_k/2)·δ̂_k  (SGD: δ̂ − η H_k(θ_k − δ̂_k/2; B) δ̂, one HVP)
with its own propagated rows (the paper's δ̂ is stepped at the other end). For a quadratic
loss both rules are exact, so dice_mid = DICE-GT at every hop; in general its error
shrinks like η³ where DICE-E's shrinks like η².
"""

from __future__ import annotations

import numpy as np
import torch

from dicesim.comm import Layout
from dicesim.events import EventBook
from dicesim.model import FlatModel, Probe
from dicesim.trackers import PerturbationTracker


class DiceMid(PerturbationTracker):
    column = "dice_mid"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, probe: Probe,
                 q: np.ndarray, optimizer, curvature: bool):
        super().__init__(book, layout)
        self.model, self.probe, self.q = model, probe, q
        self.optimizer, self.curvature = optimizer, curvature

    def _midpoint_dots(self, at: torch.Tensor, rows: torch.Tensor, v: torch.Tensor
                       ) -> torch.Tensor:
        """∇L'_k(θ_k − v_k/2)ᵀ v_k per row, with θ_k = at (rows of local nodes `rows`)."""
        grads, _ = self.model.probe_grads(at - 0.5 * v, *self.probe.at(rows))
        return (grads * v).sum(1)

    def at_theta(self, step) -> None:
        events, idx = self.recorded(step.t)
        if sum(map(len, idx)) == 0:
            return
        flat = torch.as_tensor(np.concatenate(idx), device=step.theta.device)
        dhat = torch.cat([self.rows[e.index] for e in events])
        self.write(events, idx, self._midpoint_dots(step.theta[flat], flat, dhat), self.q,
                   step.t)

    def local_step(self, step) -> None:
        t = step.t
        events, idx = self.moving(t)
        if self.curvature and events and sum(map(len, idx)):
            flat = np.concatenate(idx)
            ti = torch.as_tensor(flat, device=step.theta.device)
            x, y, w = step.batch
            dhat = torch.cat([self.rows[e.index] for e in events])
            hv = self.model.hvps(step.theta[ti] - 0.5 * dhat, dhat, x[ti], y[ti], w[ti])
            new = dhat + self.optimizer.tangent(t, flat + self.layout.first, hv)
            for e, part in zip(events, new.split([len(i) for i in idx]), strict=True):
                self.rows[e.index] = part
        for e in self.starting(step):
            self.rows[e.index] = self.start_rows(step, e)
            if e.index in step.sources:  # s = 0 at θ_j^{t+½} − δ_j/2
                i = self.layout.local_index(e.source)
                row = torch.as_tensor([i], device=step.theta.device)
                value = self._midpoint_dots(step.half[i:i + 1], row, self.rows[e.index])[0]
                self.book.put(e, 0, e.source, self.column, float(self.q[e.source] * value))
