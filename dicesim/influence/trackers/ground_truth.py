"""DICE-GT: the exact counterfactual, carried beside the real run (docs/design.md §2).

For each reached local node k the tracker holds δ_k = θ_k − θ̃_k and, with a stateful
optimizer, δs_k = s_k − s̃_k; the shadow (θ̃_k, s̃_k) = (θ_k − δ_k, s_k − δs_k) takes the
same local step O on the same batch:
  (Δ̃, s̃') = O(θ̃, s̃, ∇L(θ̃; B), t),   δ ← δ + Δ − Δ̃,   δs ← s' − s̃'
and G[e,s,k] = q_k (L'_k(θ_k^{t+s}) − L'_k(θ_k^{t+s} − δ_k)) (hop 0: at θ_j^{t+½}).
"""

from __future__ import annotations

import numpy as np

from dicesim.comm.exchange import Layout
from dicesim.influence.events import EventBook, loss_gap
from dicesim.influence.trackers import PerturbationTracker, TrackerContext, register
from dicesim.model.models import FlatModel, Probe


class GroundTruth(PerturbationTracker):
    column = "dice_gt"

    def __init__(self, book: EventBook, layout: Layout, model: FlatModel, probe: Probe,
                 q: np.ndarray, optimizer, only: set[int] | None = None):
        super().__init__(book, layout, q, optimizer, only)
        self.model, self.probe = model, probe

    def at_theta(self, step) -> None:
        self.record(step, lambda delta, rows: loss_gap(self.model, step.theta[rows], delta,
                                                       self.probe.at(rows)))

    def local_step(self, step) -> None:
        def shadow_step(delta, d_state, rows, nodes, x, y, w):
            theta = step.theta[rows]
            shadow = theta - delta  # θ̃
            shadow_state = {n: step.state[n][rows] - d for n, d in d_state.items()}  # s̃
            g_shadow, _ = self.model.grads(shadow, x, y, w)
            update, new_state = self.optimizer.step(step.t, nodes, shadow, shadow_state,
                                                    g_shadow)
            update = self.model.with_running_stats(update, shadow, x, w)
            return (delta + step.update[rows] - update,  # δ + Δ − Δ̃
                    {n: step.new_state[n][rows] - v for n, v in new_state.items()})  # s' − s̃'

        self.advance(step, shadow_step)
        # s = 0: G = q_j (L'_j(θ_j^{t+½}) − L'_j(θ̃_j^{t+½}))
        self.start(step, lambda i, delta: loss_gap(self.model, step.half[i:i + 1], delta,
                                                   self.probe.at(i))[0])


@register("dice_gt")
def _ground_truth(ctx: TrackerContext) -> GroundTruth | None:
    """The exact influence of the events influence.ground_truth picks."""
    if ctx.book is None or not ctx.influence.any_ground_truth:
        return None
    return GroundTruth(ctx.book, ctx.layout, ctx.model, ctx.probe, ctx.q, ctx.optimizer,
                       ctx.influence.ground_truth)
