"""Independent dense references the tests check the distributed engine against.

`dense_run`   — all nodes as one [n, P] matrix, θ ← W^t θ^{t+½}, no ranks, no channels;
                the local step is a real torch.optim.SGD / Adam / AdamW instance per node
                (η_t from torch's own lr schedulers), not dicesim's.
`walk_sum`    — DICE-E for one event as the paper's Theorem 1 writes it: an explicit
                sum over every walk j → k_1 → … → k_s with its product of W entries and
                curvature factors (I − η H), one HVP chain per walk.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import torch
from torch import Tensor

from dicesim.model.data import batch_ids
from dicesim.run.engine import Simulation


def _batch(sim: Simulation, node: int, t: int) -> tuple[Tensor, Tensor, Tensor]:
    s, data = sim.run, sim.data
    ids = torch.as_tensor(batch_ids(sim.parts[node], s.batch_size, t, s.seed, node))
    ydt = s.dtype if sim.model.regression else torch.long
    w = torch.ones(s.batch_size, dtype=s.dtype)
    for e in sim.removals:
        if e.source == node and e.step == t:
            w[torch.as_tensor(e.positions)] = 0.0
    return data.x_train[ids].to(s.dtype), data.y_train[ids].to(ydt), w


def dense_run(sim: Simulation) -> tuple[list[Tensor], Tensor]:
    """Per-step probe losses [n] for t = 0..T and the final parameters [n, P]."""
    s, model = sim.run, sim.model
    ydt = s.dtype if model.regression else torch.long
    xp, yp = sim.data.x_probe.to(s.dtype), sim.data.y_probe.to(ydt)
    trajectory = dense_trajectory(sim)
    return [model.probe_losses(theta, xp, yp) for theta in trajectory], trajectory[-1]


def torch_optimizer(sim: Simulation, param: Tensor) -> torch.optim.Optimizer:
    """One node's optimizer, built from sim.optim with torch's own classes."""
    o = sim.optim
    if o.name == "sgd":
        return torch.optim.SGD([param], lr=o.lr, momentum=o.momentum, dampening=o.dampening,
                               nesterov=o.nesterov, weight_decay=o.weight_decay)
    kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return kind([param], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def torch_schedule(sim: Simulation, opt: torch.optim.Optimizer):
    o, steps = sim.optim, sim.run.steps
    lr = torch.optim.lr_scheduler
    if o.schedule == "constant":
        return lr.ConstantLR(opt, factor=1.0, total_iters=0)
    if o.schedule == "step":
        return lr.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
    if o.schedule == "cosine":
        return lr.CosineAnnealingLR(opt, T_max=steps, eta_min=o.min_lr)
    warm = o.warmup_steps  # linear_warmup_cosine: η (t+1)/W, then a cosine to min_lr
    return lr.SequentialLR(opt, [
        lr.LinearLR(opt, start_factor=1 / warm, end_factor=1.0, total_iters=max(warm - 1, 1)),
        lr.CosineAnnealingLR(opt, T_max=steps - warm, eta_min=o.min_lr)], milestones=[warm])


STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # torch's names of the state


def dense_trajectory(sim: Simulation, halves: list[Tensor] | None = None) -> list[Tensor]:
    """θ^t for t = 0..T, [n, P] each; θ^{t+½} appended to `halves` if given."""
    s, model = sim.run, sim.model
    theta = model.flat_init(s.seed, s.dtype).repeat(s.nodes, 1)
    params = [torch.nn.Parameter(row.clone()) for row in theta]
    optimizers = [torch_optimizer(sim, p) for p in params]
    with warnings.catch_warnings():  # SequentialLR's deprecation notice about epochs
        warnings.simplefilter("ignore")
        schedules = [torch_schedule(sim, opt) for opt in optimizers]
    out = [theta]
    for t in range(s.steps):
        x, y, w = (torch.stack(p) for p in zip(*[_batch(sim, k, t) for k in range(s.nodes)],
                                                 strict=True))
        g, _ = sim.model.grads(theta, x, y, w)
        for k, (p, opt) in enumerate(zip(params, optimizers, strict=True)):
            p.grad = g[k].clone()
            opt.step()  # θ_k^{t+½}
        W = torch.tensor(sim.topology.W(t), dtype=s.dtype)
        half = torch.stack([p.detach().clone() for p in params])
        if halves is not None:
            halves.append(half)
        theta = W @ half  # θ^{t+1} = W^t θ^{t+½}
        if sim.optim.gossip_state:  # the optimizer state mixed like θ
            for key in STATE_KEYS:
                if key in optimizers[0].state[params[0]]:
                    mixed = W @ torch.stack([o.state[p][key] for o, p in
                                             zip(optimizers, params, strict=True)])
                    for k, (o, p) in enumerate(zip(optimizers, params, strict=True)):
                        o.state[p][key] = mixed[k].clone()
        with torch.no_grad():
            for k, p in enumerate(params):
                p.copy_(theta[k])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sched in schedules:
                sched.step()
        out.append(theta)
    return out


def walk_sum(sim: Simulation, trajectory: list[Tensor], source: int, step: int,
             positions: np.ndarray, hops: int, curvature: bool = True) -> np.ndarray:
    """E[s, k] for s = 0..hops by enumerating walks (cost grows as degree^s).

    Walk j = k_0 → k_1 → … → k_s contributes
      q_k ∇L'_k(θ_k^{t+s})ᵀ W^{t+s−1}[k_s,k_{s−1}] (I − η H_{k_{s−1}}^{t+s−1}) ⋯
                               W^{t}[k_1,k_0] · (−η ∇L_S(θ_j^t)),
    with the gradient at θ_j^t for s = 0 and no curvature factor at the source."""
    s, model = sim.run, sim.model
    n = s.nodes
    ydt = s.dtype if model.regression else torch.long
    xp, yp = sim.data.x_probe.to(s.dtype), sim.data.y_probe.to(ydt)
    x, y, w = _batch(sim, source, step)
    w_s = torch.zeros_like(w)
    w_s[torch.as_tensor(positions)] = w[torch.as_tensor(positions)]
    g_s, _ = model.grads(trajectory[step][source][None], x[None], y[None], w_s[None])
    v0 = -sim.optim.lr * g_s[0]  # δ̂_j^{t+½}
    out = np.zeros((hops + 1, n))
    pg0, _ = model.probe_grads(trajectory[step][source][None], xp, yp)
    out[0, source] = sim.q[source] * float(pg0[0] @ v0)
    for length in range(1, hops + 1):
        pg, _ = model.probe_grads(trajectory[step + length], xp, yp)
        for walk in itertools.product(range(n), repeat=length):
            path = (source, *walk)
            weight = 1.0
            for i in range(length):
                weight *= sim.topology.W(step + i)[path[i + 1], path[i]]
            if weight == 0.0:
                continue
            v = v0
            for i in range(length):
                if i > 0 and curvature:  # (I − η H_{k_i}) at step t+i, node k_i's own batch
                    k, tau = path[i], step + i
                    xk, yk, wk = _batch(sim, k, tau)
                    hv = model.hvps(trajectory[tau][k][None], v[None], xk[None], yk[None],
                                    wk[None])
                    v = v - sim.optim.lr * hv[0]
            end = path[-1]
            out[length, end] += sim.q[end] * weight * float(pg[end] @ v)
    return out
