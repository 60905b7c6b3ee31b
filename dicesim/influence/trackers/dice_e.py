"""DICE-E: the paper's first-order estimator (docs/design.md §2, "Stateful optimizers").

(δ̂, δ̂s) starts as the exact source perturbation (δθ_j^{t+½}, δs_j^{t+½}) (−η ∇L_S and
no state for plain SGD), steps with the Jacobian-vector product of the local step at the
real trajectory, the gradient's own JVP being H_k δ̂ (one HVP per row; 0 with curvature
off):
  (dΔ, δ̂s') = J_O(θ_k^t, s_k^t, g_k^t)·(δ̂, δ̂s, H_k δ̂),   δ̂ ← δ̂ + dΔ
(= (I − η H_k) δ̂ for SGD) and is recorded as E[e,s,k] = q_k ∇L'_k(θ_k^{t+s})ᵀ δ̂_k
(hop 0: q_j ∇L'_j(θ̄_j)ᵀ δ̂_j^{t+½}).

Hop 0 is taken at θ̄_j = θ_j^t + O(θ_j^t, s_j^t, 0, t): where node j would be after step t
with an empty batch — for a whole-batch removal that is the counterfactual θ̃_j^{t+½}, so E
is the expansion at the counterfactual end as the paper's rule is for SGD. For plain SGD
the step of an empty batch is 0 and θ̄_j = θ_j^t, the paper's point exactly; with momentum,
Adam or weight decay the node keeps moving without its batch and θ^t would be the wrong end.

`dice_e_nostate` is the ablation that ignores the optimizer state: δ̂s is dropped (zero at
the source and after every step), so only the θ-path of the optimizer's Jacobian acts.
For plain SGD it equals dice_e.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import Layout
from dicesim.influence.events import EventBook
from dicesim.influence.trackers import PerturbationTracker, TrackerContext, estimating, register
from dicesim.model.models import FlatModel, Probe


class DiceE(PerturbationTracker):
    column = "dice_e"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, probe: Probe,
                 q: np.ndarray, optimizer, curvature: bool, with_state: bool = True):
        super().__init__(book, layout, q, optimizer)
        self.model, self.probe = model, probe
        self.curvature, self.with_state = curvature, with_state
        if not with_state:
            self.column = "dice_e_nostate"

    def _sends_state(self) -> bool:
        return self.with_state and self.optimizer.gossip_state

    def _hop0_grad(self, step, i: int) -> Tensor:
        """∇L'_j(θ̄_j), θ̄_j = θ_j^t + O(θ_j^t, s_j^t, 0, t) (see the module docstring)."""
        opt = self.optimizer
        if not (opt.stateful or opt.weight_decay_active):
            return step.probe_grad[i]  # θ̄_j = θ_j^t
        theta = step.theta[i:i + 1]
        state = {n: v[i:i + 1] for n, v in step.state.items()}
        drift, _ = opt.step(step.t, np.array([self.layout.first + i]), theta, state,
                            torch.zeros_like(theta))
        rows = torch.as_tensor([i], device=theta.device)
        grad, _ = self.model.probe_grads(theta + drift, *self.probe.at(rows))
        return grad[0]

    def probe_rows(self, t: int) -> np.ndarray:
        return self.book.probe_rows(t)  # ∇L'_k(θ_k^t) of the rows it records or starts

    def at_theta(self, step) -> None:
        self.record(step, lambda dhat, rows: (step.probe_grad[rows] * dhat).sum(1))

    def local_step(self, step) -> None:
        def linearized(dhat, d_state, rows, nodes, x, y, w):
            theta, state, grad = self.real_rows(step, rows)
            hv = (self.model.hvps(theta, dhat, x, y, w) if self.curvature
                  else dhat.new_zeros(dhat.shape))  # H_k δ̂ (0: the identity for plain SGD)
            d_update, d_state = self.optimizer.tangent(step.t, nodes, theta, state, grad,
                                                       dhat, d_state, hv)
            if not self.with_state:  # the ablation: δ̂s stays 0
                d_state = self.optimizer.zero_state(dhat)
            return dhat + d_update, d_state  # δ̂ + J_Δ δ̂

        self.advance(step, linearized)
        # s = 0: E = q_j ∇L'_j(θ̄_j)ᵀ δ̂
        self.start(step, lambda i, dhat: (self._hop0_grad(step, i) * dhat[0]).sum())

    def _start_rows(self, step, e):
        d_theta, d_state = super()._start_rows(step, e)
        if not self.with_state:  # the ablation starts without the state's perturbation
            d_state = self.optimizer.zero_state(d_theta)
        return d_theta, d_state


@register("dice_e")
def _dice_e(ctx: TrackerContext) -> DiceE | None:
    if not estimating(ctx, "dice_e"):
        return None
    assert ctx.book is not None
    return DiceE(ctx.book, ctx.layout, ctx.model, ctx.probe, ctx.q, ctx.optimizer,
                 ctx.influence.curvature)


@register("dice_e_nostate")
def _dice_e_nostate(ctx: TrackerContext) -> DiceE | None:
    if not estimating(ctx, "dice_e_nostate"):
        return None
    assert ctx.book is not None
    return DiceE(ctx.book, ctx.layout, ctx.model, ctx.probe, ctx.q, ctx.optimizer,
                 ctx.influence.curvature, with_state=False)
