"""`dice_mid`: DICE-E evaluated at the midpoint of each segment (DESIGN §2).

For any smooth f, f(θ) − f(θ − δ) = ∇f(θ − δ/2)ᵀδ + O(‖δ‖³), with no Hessian of f; the
first-order DICE-E takes the gradient at one end instead and errs by ½ δᵀH'δ. So
  hop 0:   q_j ∇L'_j(θ_j^{t+½} − δ_j/2)ᵀ δ_j,   δ_j the event's exact update difference;
  hop s:   q_k ∇L'_k(θ_k^{t+s} − δ̂_k/2)ᵀ δ̂_k;
  local:   (δ̂, δ̂s) ← the local step's JVP at the midpoint (θ_k − δ̂_k/2, s_k − δ̂s_k/2)
           (SGD: δ̂ − η H_k(θ_k − δ̂_k/2; B) δ̂, one HVP)
with its own propagated rows (the paper's δ̂ is stepped at the other end). For a quadratic
loss and an affine optimizer (SGD with momentum, Nesterov, weight decay) both rules are
exact, so dice_mid = DICE-GT at every hop; in general its error shrinks like η³ where
DICE-E's shrinks like η².
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
        super().__init__(book, layout, q, optimizer)
        self.model, self.probe, self.curvature = model, probe, curvature

    def _midpoint_dots(self, at: torch.Tensor, rows: torch.Tensor, v: torch.Tensor
                       ) -> torch.Tensor:
        """∇L'_k(θ_k − v_k/2)ᵀ v_k per row, with θ_k = at (rows of local nodes `rows`)."""
        grads, _ = self.model.probe_grads(at - 0.5 * v, *self.probe.at(rows))
        return (grads * v).sum(1)

    def at_theta(self, step) -> None:
        self.record(step, lambda dhat, rows: self._midpoint_dots(step.theta[rows], rows, dhat))

    def local_step(self, step) -> None:
        opt = self.optimizer

        def linearized_at_midpoint(dhat, d_state, rows, nodes, x, y, w):
            theta, state, grad = self.real_rows(step, rows)
            mid = theta - 0.5 * dhat  # θ_k − δ̂_k/2
            mid_state = {n: state[n] - 0.5 * d_state[n] for n in state}
            if not opt.affine:  # the tangent depends on the primal gradient there
                grad, _ = self.model.grads(mid, x, y, w)
            hv = (self.model.hvps(mid, dhat, x, y, w) if self.curvature
                  else dhat.new_zeros(dhat.shape))
            d_update, d_state = opt.tangent(step.t, nodes, mid, mid_state, grad, dhat,
                                            d_state, hv)
            return dhat + d_update, d_state

        if self.curvature or opt.stateful or opt.weight_decay_active:
            self.advance(step, linearized_at_midpoint)
        # s = 0 at θ_j^{t+½} − δ_j/2
        self.start(step, lambda i, delta: self._midpoint_dots(
            step.half[i:i + 1], torch.as_tensor([i], device=delta.device), delta)[0])
