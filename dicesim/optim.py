"""The local optimizer: the step a node takes on its own batch (DESIGN §1), and its
linearization, which DICE-E propagates perturbations with.

The update Δ = O(θ; B) − θ is what a node adds before gossip. Misbehaving nodes tamper
with it (`Attack.update`: free riders send no step, scaled_update multiplies it); the
tampering is part of the node's step, so the real rows, the shadow rows of the ground
truth and the linearized rows of DICE-E all go through the same map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor

Tamper = Callable[[int, np.ndarray, Tensor], Tensor]  # (t, global nodes, Δ rows) → Δ as sent


class SGD:
    """Δ_k^t = −η ∇L(θ_k^t; B_k^t). Stateless: nothing to checkpoint."""

    name = "sgd"

    def __init__(self, lr: float, tamper: Tamper | None = None):
        self.lr = lr
        self.tamper = tamper

    def update(self, t: int, nodes: np.ndarray, grad: Tensor) -> Tensor:
        """Δ of the rows of `nodes` from their batch gradients ∇L (the one SGD update)."""
        step = -self.lr * grad  # Δ = −η g
        return self.tamper(t, nodes, step) if self.tamper is not None else step

    def tangent(self, t: int, nodes: np.ndarray, hvp: Tensor) -> Tensor:
        """J_Δ(θ)·v from H v: the update is linear in the gradient, so its Jacobian-vector
        product is the same map applied to the Hessian-vector product (−η H v)."""
        return self.update(t, nodes, hvp)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
