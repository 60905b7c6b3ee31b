"""The local optimizer: the step a node takes on its own batch (docs/design.md §2, "Stateful
optimizers"), its linearization (what DICE-E propagates) and its adjoint.

A step is a pure function of the node's parameters θ, its optimizer state s (momentum
buffer; Adam's m, v), its batch gradient g = ∇L(θ; B) and the step index t:

    (Δ, s') = O(θ, s, g, t),    θ^{t+½} = θ + Δ

with the same semantics as `torch.optim.SGD` (momentum, dampening, nesterov,
weight_decay), `torch.optim.Adam` and `torch.optim.AdamW`, and η_t from the schedule.
Every function works on a block of rows (one per node), state as a dict of [rows, P]
tensors ({} for plain SGD). The optimizer object holds the state of the real rows of
this rank (`state`); shadows (DICE-GT) and perturbations (DICE-E) carry their own.

Misbehaving nodes tamper with Δ (`Attack.update`: free riders send no step,
scaled_update multiplies it); the tampering is part of the node's step, linear in Δ, and
the state is updated honestly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dicesim.config import Optim

Tamper = Callable[[int, np.ndarray, Tensor], Tensor]  # (t, global nodes, Δ rows) → Δ as sent
State = dict[str, Tensor]  # name → [rows, P]


@dataclass(frozen=True)
class Schedule:
    """η_t for t = 0 … steps − 1 (the index docs/design.md §2 gives η)."""

    lr: float
    name: str = "constant"
    steps: int = 1  # the horizon T of the cosine
    min_lr: float = 0.0  # η at the end of a cosine
    warmup_steps: int = 0  # linear_warmup_cosine: η (t + 1) / warmup for t < warmup
    step_size: int = 1  # step: η γ^⌊t / step_size⌋
    gamma: float = 0.1

    def __call__(self, t: int) -> float:
        if self.name == "constant":
            return self.lr
        if self.name == "step":
            return self.lr * self.gamma ** (t // self.step_size)
        warm = self.warmup_steps if self.name == "linear_warmup_cosine" else 0
        if t < warm:
            return self.lr * (t + 1) / warm
        span = max(1, self.steps - warm)
        progress = min(1.0, (t - warm) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))



class LocalOptimizer:
    """What every optimizer provides; subclasses write `step`, `tangent` and `adjoint`."""

    name = ""
    state_names: tuple[str, ...] = ()
    affine = True  # (Δ, s') affine in (θ, s, g): a difference of two steps is one tangent
    weight_decay = 0.0

    def __init__(self, schedule: Schedule, tamper: Tamper | None = None,
                 gossip_state: bool = False):
        self.schedule = schedule
        self.tamper = tamper
        self.gossip_state = gossip_state and bool(self.state_names)
        self.state: State = {}  # the real rows' state (set by `init_state`)

    @property
    def stateful(self) -> bool:
        return bool(self.state_names)

    @property
    def weight_decay_active(self) -> bool:
        return self.weight_decay != 0

    def lr(self, t: int) -> float:
        return self.schedule(t)

    def init_state(self, theta: Tensor) -> None:
        self.state = self.zero_state(theta)

    def zero_state(self, like: Tensor) -> State:
        """A zero state (or state perturbation) for rows shaped like `like`."""
        return {name: torch.zeros_like(like) for name in self.state_names}

    def sent(self, t: int, nodes: np.ndarray, update: Tensor) -> Tensor:
        return self.tamper(t, nodes, update) if self.tamper is not None else update

    # ---- the pure step and its derivatives -------------------------------------------------
    def step(self, t: int, nodes: np.ndarray, theta: Tensor, state: State, grad: Tensor
             ) -> tuple[Tensor, State]:
        """(Δ as sent, s') of the rows of global `nodes`."""
        raise NotImplementedError

    def tangent(self, t: int, nodes: np.ndarray, theta: Tensor, state: State, grad: Tensor,
                d_theta: Tensor, d_state: State, d_grad: Tensor) -> tuple[Tensor, State]:
        """The Jacobian-vector product of `step` at (θ, s, g): (dΔ, ds') for the tangent
        (dθ, ds, dg). DICE-E passes dg = H dθ (the gradient's own JVP)."""
        raise NotImplementedError

    def adjoint(self, t: int, nodes: np.ndarray, theta: Tensor, state: State, grad: Tensor,
                bar_update: Tensor, bar_state: State) -> tuple[Tensor, Tensor, State]:
        """The vector-Jacobian product of `step` at (θ, s, g): for cotangents (Δ̄, s̄') of
        its outputs, (θ̄ through the explicit θ terms, ḡ, s̄). The cotangent of θ through
        the gradient is H ḡ, which the caller adds (one HVP)."""
        raise NotImplementedError

    # ---- the real rows ---------------------------------------------------------------------
    def rows(self, index: Tensor | slice) -> State:
        return {name: value[index] for name, value in self.state.items()}

    def state_dict(self) -> dict:
        return {"state": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state.get("state", {}))


class SGD(LocalOptimizer):
    """torch.optim.SGD, row-wise:
        g ← g + λ θ                                  (weight_decay λ)
        b ← g at t = 0, else μ b + (1 − τ) g          (momentum μ, dampening τ)
        g ← g + μ b (nesterov) or b
        Δ = −η_t g
    Plain SGD (μ = 0) keeps no state. The step is affine in (θ, b, g)."""

    name = "sgd"

    def __init__(self, schedule: Schedule, tamper: Tamper | None = None, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 gossip_state: bool = False):
        self.momentum, self.dampening = momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay
        self.state_names = ("momentum",) if momentum else ()
        super().__init__(schedule, tamper, gossip_state)

    def _direction(self, t: int, theta: Tensor, state: State, grad: Tensor
                   ) -> tuple[Tensor, State]:
        g = grad + self.weight_decay * theta if self.weight_decay else grad
        if not self.momentum:
            return g, {}
        mu = self.momentum
        b = g if t == 0 else mu * state["momentum"] + (1 - self.dampening) * g  # b'
        return (g + mu * b if self.nesterov else b), {"momentum": b}

    def step(self, t, nodes, theta, state, grad):
        direction, new = self._direction(t, theta, state, grad)
        return self.sent(t, nodes, -self.lr(t) * direction), new  # Δ = −η_t g

    def tangent(self, t, nodes, theta, state, grad, d_theta, d_state, d_grad):
        # the map is affine: its JVP is the same map on the tangents, without the constant
        # terms: dg' = dg + λ dθ, db' = μ db + (1 − τ) dg' (dg' at t = 0), dΔ = −η dg''
        return self.step(t, nodes, d_theta, d_state, d_grad)

    def adjoint(self, t, nodes, theta, state, grad, bar_update, bar_state):
        mu, lr = self.momentum, self.lr(t)
        bar_dir = -lr * self.sent(t, nodes, bar_update)  # tampering is a diagonal scale
        if not self.momentum:
            bar_g = bar_dir
            bar_s: State = {}
        else:
            # direction = g + μ b' (nesterov) or b';  b' = g (t = 0) or μ b + (1 − τ) g
            bar_b = bar_state["momentum"] + (mu * bar_dir if self.nesterov else bar_dir)
            bar_g = (bar_dir if self.nesterov else 0.0) + (
                bar_b if t == 0 else (1 - self.dampening) * bar_b)
            bar_s = {"momentum": torch.zeros_like(bar_b) if t == 0 else mu * bar_b}
        bar_theta = self.weight_decay * bar_g if self.weight_decay else torch.zeros_like(bar_g)
        return bar_theta, bar_g, bar_s


class Adam(LocalOptimizer):
    """torch.optim.Adam / AdamW, row-wise, with c_i = 1 − β_i^{t+1}:
        g ← g + λ θ                    (Adam's weight_decay; AdamW decays θ instead)
        m' = β1 m + (1 − β1) g,   v' = β2 v + (1 − β2) g²
        u  = √v' / √c2 + ε
        Δ  = −η_t m' / (c1 u)  (− η_t λ θ for AdamW)
    Not affine: its tangent is the linearized m/(√v + ε)."""

    name = "adam"
    state_names = ("m", "v")
    affine = False

    def __init__(self, schedule: Schedule, tamper: Tamper | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False, gossip_state: bool = False):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.decoupled = eps, weight_decay, decoupled
        if decoupled:
            self.name = "adamw"
        super().__init__(schedule, tamper, gossip_state)

    def _corrections(self, t: int) -> tuple[float, float]:
        return 1 - self.beta1 ** (t + 1), math.sqrt(1 - self.beta2 ** (t + 1))  # c1, √c2

    def _coupled(self, theta: Tensor, grad: Tensor) -> Tensor:
        return grad + self.weight_decay * theta if self.weight_decay and not self.decoupled \
            else grad

    def _moments(self, t: int, theta: Tensor, state: State, grad: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """g (coupled decay), m', v' and √v' of step t."""
        b1, b2 = self.beta1, self.beta2
        g = self._coupled(theta, grad)
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g * g
        return g, m, v, v.sqrt()

    def step(self, t, nodes, theta, state, grad):
        lr = self.lr(t)
        c1, sqrt_c2 = self._corrections(t)
        _, m, v, root = self._moments(t, theta, state, grad)
        update = -(lr / c1) * m / (root / sqrt_c2 + self.eps)  # −(η/c1) m'/u
        if self.decoupled and self.weight_decay:
            update = update - lr * self.weight_decay * theta
        return self.sent(t, nodes, update), {"m": m, "v": v}

    def _primal(self, t: int, theta: Tensor, state: State, grad: Tensor):
        c1, sqrt_c2 = self._corrections(t)
        g, m, _, root = self._moments(t, theta, state, grad)
        u = root / sqrt_c2 + self.eps
        # d√v/dv = 1/(2√v); where v' = 0 its tangent 2(1 − β2) g dg is 0 too: take 0
        half_inv_root = torch.where(root > 0, 0.5 / root.clamp_min(torch.finfo(root.dtype).tiny),
                                    torch.zeros_like(root))
        return g, m, u, half_inv_root, c1, sqrt_c2

    def tangent(self, t, nodes, theta, state, grad, d_theta, d_state, d_grad):
        b1, b2, lr = self.beta1, self.beta2, self.lr(t)
        g, m, u, half_inv_root, c1, sqrt_c2 = self._primal(t, theta, state, grad)
        dg = self._coupled(d_theta, d_grad)
        dm = b1 * d_state["m"] + (1 - b1) * dg  # dm' = β1 dm + (1 − β1) dg
        dv = b2 * d_state["v"] + 2 * (1 - b2) * g * dg  # dv' = β2 dv + 2(1 − β2) g dg
        du = dv * half_inv_root / sqrt_c2  # du = dv' / (2 √v' √c2)
        d_update = -(lr / c1) * (dm / u - m * du / (u * u))
        if self.decoupled and self.weight_decay:
            d_update = d_update - lr * self.weight_decay * d_theta
        return self.sent(t, nodes, d_update), {"m": dm, "v": dv}

    def adjoint(self, t, nodes, theta, state, grad, bar_update, bar_state):
        b1, b2, lr = self.beta1, self.beta2, self.lr(t)
        g, m, u, half_inv_root, c1, sqrt_c2 = self._primal(t, theta, state, grad)
        bar = self.sent(t, nodes, bar_update)
        bar_m = bar_state["m"] - (lr / c1) * bar / u
        bar_u = (lr / c1) * bar * m / (u * u)
        bar_v = bar_state["v"] + bar_u * half_inv_root / sqrt_c2
        bar_g = (1 - b1) * bar_m + 2 * (1 - b2) * g * bar_v
        bar_theta = torch.zeros_like(bar_g)
        if self.weight_decay:
            bar_theta = (-lr * self.weight_decay * bar if self.decoupled
                         else self.weight_decay * bar_g)
        return bar_theta, bar_g, {"m": b1 * bar_m, "v": b2 * bar_v}


def build_optimizer(s: Optim, steps: int, tamper: Tamper | None = None
                    ) -> LocalOptimizer:
    schedule = Schedule(s.lr, s.schedule, steps, s.min_lr, s.warmup_steps, s.step_size, s.gamma)
    if s.name == "sgd":
        return SGD(schedule, tamper, s.momentum, s.dampening, s.nesterov, s.weight_decay,
                   s.gossip_state)
    return Adam(schedule, tamper, tuple(s.betas), s.eps, s.weight_decay, s.name == "adamw",
                s.gossip_state)
