"""Full-horizon attribution: every batch's and every sample's first-order influence on the
final target, by one reverse (adjoint) pass of gossip after training (docs/design.md "Full horizon
(reverse pass)"; derivations in docs/attribution.md).

Target F = Σ_k q_k L'_k(θ_k^T) (`attribution.target=network`), or one target per node
F_k = q_k L'_k(θ_k^T) (`per_node`, or a list of node ids), all carried as m stacked
adjoints. With λ the cotangent of θ and μ that of the optimizer state s:

    λ_k^T = q_k ∇L'_k(θ_k^T),  μ^T = 0
    λ^{t+½} = (W^t)ᵀ λ^{t+1}          receivers send adjoint rows back to their senders:
                                       the forward routes, transposed, over the same p2p layer
    μ^{t+½} = (W^t)ᵀ μ^{t+1} with optim.gossip_state, else μ^{t+1}
    (θ̄, ḡ, s̄) = VJP of (Δ, s') = O(θ^t, s^t, g^t) at (λ^{t+½}, μ^{t+½})   (optimizer.adjoint)
    λ^t = λ^{t+½} + θ̄ + H(θ^t; B^t) ḡ,  μ^t = s̄                        (one HVP)

Removing S from B_j^t changes F by λ_j^{t+½}·δ_j^{t+½} + μ_j^{t+½}·δs_j^{t+½} to first order
(with − without). The gradient is linear in the sample weights, so for an affine optimizer
(SGD, momentum, Nesterov, weight decay) that is ḡ_j·∇L_S(θ_j^t) exactly: the batch's value
is ḡ_j·g_j^t and sample i's is (w_i/|B|) ∇ℓ_i(θ_j^t)·ḡ_j, a forward-mode tangent of the
per-sample losses taken in the same pass as the HVP. For Adam the batch value uses the exact
update difference O(g) − O(0); per-sample values stay the linearization ḡ·∇ℓ_i w_i/|B|.

Trajectory: a `Keeper` tracker keeps θ^t and s^t every K = `attribution.keep_every` steps
during training (and θ^T); the reverse pass recomputes each segment of K steps forward from
its kept state (the same gossip, exactly the real run's numbers), then sweeps it backwards.
Memory per node: (T/K + 1)(1 + |s|) kept rows + K(2 + |s|) rows of one segment.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import Channel, local_block, mix, route
from dicesim.common.stopping import PhaseChecks
from dicesim.config import Attribution as AttributionConfig
from dicesim.config import attribution_targets
from dicesim.influence.trackers import Tracker
from dicesim.optim.local import State


@dataclass(frozen=True)
class AttributionSettings:
    enabled: bool = False
    targets: tuple[int, ...] | None = None  # None: the network target
    keep_every: int = 1
    samples: bool = True
    plot_node: int | None = None

    @property
    def target_names(self) -> list[str]:
        return ["network"] if self.targets is None else [str(k) for k in self.targets]


def default_keep_every(steps: int) -> int:
    """⌈√T⌉: minimizes T/K + K, the rows a node holds."""
    return max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1


def attribution_settings(a: AttributionConfig, nodes: int, steps: int) -> AttributionSettings:
    """The attribution section with its defaults resolved (the schema checked it)."""
    targets = attribution_targets(a.target, nodes)
    keep = default_keep_every(steps) if a.keep_every is None else a.keep_every
    return AttributionSettings(a.enabled, None if targets is None else tuple(targets), keep,
                               a.samples, a.plot_node)


# ---- during training: keep the trajectory every K steps -------------------------------------
class Keeper(Tracker):
    """Keeps (θ^t, s^t) of this rank's rows at t = 0, K, 2K, … and θ^T. Part of every
    checkpoint (its state_dict), so a resumed run still has the whole trajectory."""

    def __init__(self, optimizer, keep_every: int, steps: int):
        self.optimizer, self.keep_every, self.steps = optimizer, keep_every, steps
        self.kept: dict[int, tuple[Tensor, State]] = {}

    def at_theta(self, step) -> None:
        t = step.t
        if t % self.keep_every == 0 or t == self.steps:
            state = {} if t == self.steps else {  # s^t (the Step's state is set later)
                n: v.detach().clone() for n, v in self.optimizer.state.items()}
            self.kept[t] = (step.theta.detach().clone(), state)

    def numel(self) -> int:
        return sum(th.numel() + sum(v.numel() for v in s.values())
                   for th, s in self.kept.values())

    def state_dict(self) -> dict:
        return {"kept": {int(t): {"theta": th, "state": dict(s)}
                         for t, (th, s) in self.kept.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.kept = {int(t): (v["theta"], dict(v["state"]))
                     for t, v in state.get("kept", {}).items()}


@dataclass
class Attribution:
    """What the reverse pass gives rank 0 (every node's rows gathered)."""

    settings: AttributionSettings
    batch: np.ndarray  # [T, m, n]: removing B_j^t → target i
    samples: np.ndarray | None  # [T, n, B]: removing sample at that position → Σ_i target i
    sample_ids: np.ndarray | None  # [T, n, B]: its training sample id
    weights: np.ndarray | None  # [T, n, B]: its weight in the real run (0: removed)
    wall_s: float = 0.0
    train_wall_s: float = 0.0
    memory_bytes: int = 0  # peak bytes held by the pass, every rank together
    trajectory_bytes: int = 0  # the part of it the Keeper held during training

    @property
    def node_totals(self) -> np.ndarray:
        """[m, n]: Σ_t of every node's batches on each target (first order)."""
        return self.batch.sum(0)

    def sample_totals(self, steps: tuple[int, int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, node, count, value): Σ over every occurrence of each training sample, or
        over its occurrences at steps [lo, hi) only (ids and nodes: every sample's)."""
        assert self.samples is not None and self.sample_ids is not None
        T, n, B = self.samples.shape
        ids = self.sample_ids.reshape(-1)
        node = np.broadcast_to(np.arange(n)[None, :, None], (T, n, B)).reshape(-1)
        inside = np.ones(T) if steps is None else (
            (np.arange(T) >= steps[0]) & (np.arange(T) < steps[1])).astype(float)
        inside = np.broadcast_to(inside[:, None, None], (T, n, B)).reshape(-1)
        used = (self.weights.reshape(-1) > 0) * inside
        uniq, inverse = np.unique(ids, return_inverse=True)
        value = np.bincount(inverse, weights=self.samples.reshape(-1) * inside,
                            minlength=len(uniq))
        count = np.bincount(inverse, weights=used, minlength=len(uniq))
        owner = np.zeros(len(uniq), dtype=np.int64)
        owner[inverse] = node
        return uniq, owner, count.astype(np.int64), value

    def sample_value(self, node: int, step: int, positions: np.ndarray) -> float:
        """First-order effect on Σ targets of removing these positions of B_node^step."""
        assert self.samples is not None
        return float(self.samples[step, node, positions].sum())


# ---- after training: the reverse pass -------------------------------------------------------
class ReversePass:
    def __init__(self, sim, trainer, keeper: Keeper):
        self.trainer, self.keeper = trainer, keeper
        self.sim, self.comm, self.parts = sim, trainer.comm, trainer.parts
        self.settings: AttributionSettings = self.sim.attribution
        lay = self.sim.layout
        self.local, self.n_loc, self.all_nodes = lay.local_nodes, lay.nodes_per_rank, \
            np.arange(lay.nodes)
        # per (step of the topology's period, transposed): W^t or (W^t)ᵀ, its route between
        # ranks and its local rows over the held columns as a torch sparse block (as the
        # trainer caches them)
        self.mixing: dict[tuple[int, bool], tuple[object, object, Tensor]] = {}
        self.peak = 0
        # one check point per recomputed step and per reverse step, the same on every rank
        self.check = PhaseChecks("attribution", 2 * self.sim.run.steps)

    def _mixing(self, t: int, transposed: bool, like: Tensor) -> tuple[object, object, Tensor]:
        """W^t (sparse) or its transpose — the adjoint's receivers are the forward senders —
        with its route and local block, built once per step of the period."""
        key = (t % self.sim.topology.period, transposed)
        if key not in self.mixing:
            W = self.sim.topology.W_sparse(t)
            W = W.T.tocsr() if transposed else W
            path = route(W, self.sim.layout)
            self.mixing[key] = (W, path, local_block(W, path, self.sim.layout, like.dtype,
                                                     like.device))
        return self.mixing[key]

    def _gossip(self, t: int, rows: list[Tensor], transposed: bool) -> list[Tensor]:
        """Σ_l W^t[k,l] v_l (forward), or Σ_k W^t[k,l] v_k (transposed: the adjoint)."""
        W, path, block = self._mixing(t, transposed, rows[0])
        channels = [Channel(self.all_nodes, r) for r in rows]
        self.comm.post(self.sim.layout, channels, path).wait()
        return [mix(W, self.local, ch, block) for ch in channels]

    def _segment(self, a: int, b: int) -> list[dict]:
        """Steps a … b−1 recomputed from the state kept at a: θ^t, s^t, g^t, B^t (and the
        step's outputs for a non-affine optimizer)."""
        p, opt = self.parts, self.parts.optimizer
        theta, state = self.keeper.kept[a]
        state = dict(state)
        mixed = opt.state_names if opt.gossip_state else ()
        out = []
        for t in range(a, b):
            self.check()
            x, y, w = p.batch(t)
            g, _ = p.model.grads(theta, x, y, w)
            update, new = opt.step(t, self.local, theta, state, g)
            rec = {"theta": theta, "state": state, "grad": g, "batch": (x, y, w),
                   "ids": p.order.ids(t, self.local)}
            if not opt.affine:
                rec["update"], rec["new_state"] = update, new
            out.append(rec)
            if t + 1 < b:
                mixed_rows = self._gossip(t, [theta + update] + [new[n] for n in mixed], False)
                theta = mixed_rows[0]
                state = dict(zip(mixed, mixed_rows[1:], strict=True)) if mixed else new
        return out

    def run(self) -> Attribution | None:
        start = time.perf_counter()
        sim, p, cfg = self.sim, self.parts, self.settings
        model, opt = p.model, p.optimizer
        T, B, n_loc, K = sim.run.steps, sim.run.batch_size, self.n_loc, cfg.keep_every
        lay = sim.layout
        theta_T = self.keeper.kept[T][0]
        P, dev, dtype = theta_T.shape[1], theta_T.device, theta_T.dtype
        targets = cfg.targets
        m = 1 if targets is None else len(targets)
        pg, _ = model.probe_grads(theta_T, *p.probe.at(torch.arange(n_loc, device=dev)))
        q = torch.as_tensor(sim.q[self.local], dtype=dtype, device=dev)
        lam = theta_T.new_zeros(m, n_loc, P)  # λ^T of each target
        if targets is None:
            lam[0] = q[:, None] * pg
        else:
            for i, k in enumerate(targets):
                if lay.is_local(k):
                    j = lay.local_index(k)
                    lam[i, j] = q[j] * pg[j]
        mu = {n: theta_T.new_zeros(m, n_loc, P) for n in opt.state_names}
        batch = np.zeros((T, m, n_loc))
        samples = np.zeros((T, n_loc, B)) if cfg.samples else None
        ids = np.zeros((T, n_loc, B), dtype=np.int64) if cfg.samples else None
        weights = np.zeros((T, n_loc, B)) if cfg.samples else None
        nodes = np.tile(self.local, m)
        curvature = model.hvps_and_slopes

        def flat(v: Tensor) -> Tensor:  # [m, rows, ...] → [m·rows, ...]
            return v.reshape(m * n_loc, *v.shape[2:])

        def rep(v: Tensor) -> Tensor:  # [rows, ...] → [m·rows, ...], target-major
            return v.repeat(m, *([1] * (v.dim() - 1)))

        def back(t: int, v: Tensor) -> Tensor:  # (W^t)ᵀ over the stacked targets
            rows = v.permute(1, 0, 2).reshape(n_loc, m * P)
            return self._gossip(t, [rows], True)[0].view(n_loc, m, P).permute(1, 0, 2)

        kept_numel = self.keeper.numel()
        starts = sorted(t for t in self.keeper.kept if t < T)
        assert starts and starts[0] == 0, "the Keeper holds no θ^0"
        for a in reversed(starts):
            b = min(a + K, T)
            seg = self._segment(a, b)
            seg_numel = sum(r["theta"].numel() + r["grad"].numel()
                            + sum(v.numel() for v in r["state"].values()) for r in seg)
            adj_numel = (1 + len(mu)) * lam.numel()
            self.peak = max(self.peak, kept_numel + seg_numel + 2 * adj_numel)
            for t in reversed(range(a, b)):
                self.check()
                r = seg[t - a]
                theta, state, g = r["theta"], r["state"], r["grad"]
                x, y, w = r["batch"]
                lam_half = back(t, lam)  # λ^{t+½}
                mu_half = ({n: back(t, v) for n, v in mu.items()} if opt.gossip_state
                           else mu)  # μ^{t+½}
                th_r, g_r = rep(theta), rep(g)
                st_r = {n: rep(v) for n, v in state.items()}
                bar_theta, bar_g, bar_s = opt.adjoint(
                    t, nodes, th_r, st_r, g_r, flat(lam_half),
                    {n: flat(v) for n, v in mu_half.items()})
                hv, slopes = curvature(th_r, bar_g, rep(x), rep(y), rep(w))
                if opt.affine:  # λ·δ + μ·δs = ḡ·∇L_B: the exact update difference
                    value = (bar_g * g_r).sum(1)
                else:  # Adam: the exact difference O(g) − O(0) of the whole batch
                    zero_update, zero_state = opt.step(t, self.local, theta, state,
                                                       torch.zeros_like(g))
                    value = (flat(lam_half) * rep(r["update"] - zero_update)).sum(1)
                    for n in opt.state_names:
                        value = value + (flat(mu_half[n])
                                         * rep(r["new_state"][n] - zero_state[n])).sum(1)
                batch[t] = value.view(m, n_loc).cpu().numpy()
                if samples is not None:
                    per = (slopes * rep(w) / B).view(m, n_loc, B).sum(0)
                    samples[t] = per.cpu().numpy()
                    ids[t] = r["ids"]
                    weights[t] = w.cpu().numpy()
                lam = (flat(lam_half) + bar_theta + hv).view(m, n_loc, P)  # λ^t
                mu = {n: v.view(m, n_loc, P) for n, v in bar_s.items()}  # μ^t
            del seg
        self.check.end()
        wall = time.perf_counter() - start
        itemsize = torch.finfo(dtype).bits // 8
        gathered = self.comm.gather_to_root((batch, samples, ids, weights,
                                             self.peak * itemsize, kept_numel * itemsize))
        if gathered is None:
            return None
        out = Attribution(
            cfg, np.concatenate([g[0] for g in gathered], axis=2),
            None if samples is None else np.concatenate([g[1] for g in gathered], axis=1),
            None if samples is None else np.concatenate([g[2] for g in gathered], axis=1),
            None if samples is None else np.concatenate([g[3] for g in gathered], axis=1),
            wall_s=wall, train_wall_s=self.trainer.result.wall_s,
            memory_bytes=int(sum(g[4] for g in gathered)),
            trajectory_bytes=int(sum(g[5] for g in gathered)))
        return out


def reverse_pass(sim, trainer) -> Attribution | None:
    """Run the reverse pass of the Simulation `sim` after `trainer.run()` (every rank);
    rank 0 gets the result."""
    keeper = next(tr for tr in trainer.parts.trackers if isinstance(tr, Keeper))
    return ReversePass(sim, trainer, keeper).run()


# ---- outputs --------------------------------------------------------------------------------
