"""Gauss–Legendre rules for the influence integral: `dice_mid`, DICE-E evaluated at the
midpoint of each segment (docs/design.md §2), and `dice_gauss2`, the two-point rule (named
`dice_mid2` before; the old name is still accepted, dicesim.config.RENAMED_ESTIMATORS).

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

The midpoint is the one-point Gauss–Legendre rule for ∫₀¹ ∇f(θ − δ + uδ)ᵀδ du (and for
∫₀¹ H(θ − δ + uδ)δ du in the propagation). `dice_gauss2` uses the two nodes
u = ½ ± 1/(2√3) with weights ½ each: exact for cubic f, error O(‖δ‖⁵), at twice the extra
cost (two probe gradients and two HVPs per reached row and hop, the two points batched
into one call each).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dicesim.comm.exchange import Layout
from dicesim.influence.events import EventBook
from dicesim.influence.trackers import PerturbationTracker, TrackerContext, estimating, register
from dicesim.model.models import FlatModel, Probe

# Gauss–Legendre rules on [0, 1] as (u, weight): the point θ − u·δ of the segment
GAUSS_LEGENDRE = {1: ((0.5, 1.0),),
                  2: ((0.5 - 0.5 / math.sqrt(3), 0.5), (0.5 + 0.5 / math.sqrt(3), 0.5))}


class DiceGauss(PerturbationTracker):
    """The `points`-point Gauss–Legendre rule; its column is COLUMNS[points]."""

    COLUMNS = {1: "dice_mid", 2: "dice_gauss2"}

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, probe: Probe,
                 q: np.ndarray, optimizer, curvature: bool, points: int = 1):
        super().__init__(book, layout, q, optimizer)
        self.model, self.probe, self.curvature = model, probe, curvature
        self.rule = GAUSS_LEGENDRE[points]
        self.column = self.COLUMNS[points]

    def _points(self, at: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The rule's points θ_k − u_i v_k, stacked point after point: [points · rows, P]
        (one batched call per rule instead of one per point)."""
        points = [at - u * v for u, _ in self.rule]
        return points[0] if len(points) == 1 else torch.cat(points)

    def _midpoint_dots(self, at: torch.Tensor, rows: torch.Tensor, v: torch.Tensor
                       ) -> torch.Tensor:
        """Σ_i w_i ∇L'_k(θ_k − u_i v_k)ᵀ v_k per row (the midpoint: u = ½, w = 1), with
        θ_k = at (rows of local nodes `rows`)."""
        k = len(self.rule)
        grads, _ = self.model.probe_grads(self._points(at, v), *self.probe.at(rows.repeat(k)))
        dots = (grads.view(k, *v.shape) * v).sum(-1)  # [points, rows]
        return sum(weight * dots[i] for i, (_, weight) in enumerate(self.rule))

    def at_theta(self, step) -> None:
        self.record(step, lambda dhat, rows: self._midpoint_dots(step.theta[rows], rows, dhat))

    def local_step(self, step) -> None:
        opt = self.optimizer

        def linearized_at_midpoint(dhat, d_state, rows, nodes, x, y, w):
            theta, state, real_grad = self.real_rows(step, rows)
            d_update = torch.zeros_like(dhat)
            new_state = opt.zero_state(dhat)
            k = len(self.rule)
            ats = self._points(theta, dhat)  # the midpoint θ_k − δ̂_k/2 (u = ½), or two
            batch = (x, y, w) if k == 1 else [torch.cat([a] * k) for a in (x, y, w)]
            grads = hvs = None
            if not opt.affine:  # the tangent depends on the primal gradient there
                grads = self.model.grads(ats, *batch)[0].view(k, *dhat.shape)
            if self.curvature:
                hvs = self.model.hvps(ats, dhat.repeat(k, 1), *batch).view(k, *dhat.shape)
            for i, (u, weight) in enumerate(self.rule):
                at = ats[i * len(dhat):(i + 1) * len(dhat)]
                at_state = {n: state[n] - u * d_state[n] for n in state}
                grad = real_grad if grads is None else grads[i]
                hv = dhat.new_zeros(dhat.shape) if hvs is None else hvs[i]
                du, ds = opt.tangent(step.t, nodes, at, at_state, grad, dhat, d_state, hv)
                d_update += weight * du
                for n, v in ds.items():
                    new_state[n] += weight * v
            return dhat + d_update, new_state

        self.advance(step, linearized_at_midpoint)
        # s = 0 at θ_j^{t+½} − δ_j/2
        self.start(step, lambda i, delta: self._midpoint_dots(
            step.half[i:i + 1], torch.as_tensor([i], device=delta.device), delta)[0])


def _gauss(points: int):
    def build(ctx: TrackerContext) -> DiceGauss | None:
        if not estimating(ctx, DiceGauss.COLUMNS[points]):
            return None
        assert ctx.book is not None
        return DiceGauss(ctx.book, ctx.layout, ctx.model, ctx.probe, ctx.q, ctx.optimizer,
                         ctx.influence.curvature, points)
    return build


for _points, _name in DiceGauss.COLUMNS.items():
    register(_name)(_gauss(_points))
