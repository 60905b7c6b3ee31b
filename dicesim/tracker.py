"""The influence tracker: DICE-GT and DICE-E per (event, hop, node), inside the run.

Notation (DESIGN §2). An event e = (j, t, S) removes S from node j's batch at step t.
R_s is the set of nodes the perturbation reaches after s gossip rounds
(R_0 = {j}, R_{s+1} = out-neighbours of R_s under W^{t+s}, self-loops included).
For each reached local node k the tracker holds two rows:

  δ_k  = θ_k − θ̃_k, the exact difference to the counterfactual run (for DICE-GT);
         the shadow parameters are θ̃_k = θ_k − δ_k, stepped with the same batch;
  δ̂_k, the linearized perturbation (for DICE-E), stepped by (I − η H_k) δ̂_k.

Both are gossiped through the same per-peer messages as the parameters. A node
outside R_s has δ = δ̂ = 0, so only reached rows travel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dicesim.comm import Channel, Layout, mix
from dicesim.data import batch_ids
from dicesim.errors import ConfigError
from dicesim.model import FlatModel, Probe
from dicesim.topology import Topology

MAX_HOPS = 8
INFLUENCE_COLUMNS = ("event", "source", "step", "n_removed", "hop", "node", "dice_e", "dice_gt")
PROXIMAL_COLUMNS = ("step", "sender", "receiver", "value")


@dataclass
class InfluenceSettings:
    hops: int = 1
    ground_truth: bool = True
    curvature: bool = True
    proximal: bool = False
    flush_every: int = 50


@dataclass
class Event:
    index: int
    source: int  # j
    step: int  # t
    positions: np.ndarray  # positions in B_j^t that are removed (S)
    sample_ids: np.ndarray  # their global training ids
    reach: list[np.ndarray] = field(default_factory=list)  # R_0 … R_r (global, sorted)
    delta: Tensor | None = None  # δ rows of local nodes in R_s
    dhat: Tensor | None = None  # δ̂ rows of local nodes in R_s
    rows: list[tuple] = field(default_factory=list)  # this rank's rows, until it finishes

    @property
    def n_removed(self) -> int:
        return len(self.positions)


def loss_gap(model: FlatModel, theta: Tensor, delta: Tensor,
             probe: tuple[Tensor, Tensor, bool]) -> Tensor:
    """L'(θ) − L'(θ − δ) per row, evaluated in float64 whatever the run's dtype.

    In float32 the two losses (~1) carry rounding errors of ~1e-7 each, as large as the
    gap of a single sample's removal a few hops away; δ itself is carried to full
    relative precision, so only this evaluation needs the wider type."""
    x, y, per_row = probe
    wide = torch.float64
    x, y = x.to(wide), (y.to(wide) if y.is_floating_point() else y)
    theta, delta = theta.to(wide), delta.to(wide)
    return (model.probe_losses(theta, x, y, per_row)
            - model.probe_losses(theta - delta, x, y, per_row))


def reach_sets(topology: Topology, source: int, step: int, hops: int) -> list[np.ndarray]:
    sets = [np.array([source])]
    for s in range(hops):
        W = topology.W(step + s)
        sets.append(np.flatnonzero((W[:, sets[-1]] > 0).any(axis=1)))
    return sets


def build_events(cfg: Mapping, *, nodes: int, steps: int, batch_size: int,
                 parts: list[np.ndarray], seed: int, key: str = "influence.events"
                 ) -> list[Event]:
    """Events from `influence.events`: an int N (N sampled events) or a list of
    {node, step, samples} with samples = all | [global ids] | k (k random samples)."""
    hops = cfg.get("hops", 1)
    if not isinstance(hops, int) or not 0 <= hops <= MAX_HOPS:
        raise ConfigError(f"influence.hops={hops}: must be an integer from 0 to {MAX_HOPS}")
    spec = cfg.get("events", 0)
    rng = np.random.default_rng([seed, 7919])
    raw: list[tuple[int, int, object]] = []
    if isinstance(spec, bool) or not isinstance(spec, int | Sequence) or isinstance(spec, str):
        raise ConfigError(f"{key}={spec}: give a number of events to sample or a list of "
                          "{node, step, samples}")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"{key}={spec}: must be >= 0 or a list of events")
        if spec and hops > steps:
            raise ConfigError(f"influence.hops={hops} reaches past the last step (steps={steps});"
                              " lower influence.hops or raise steps")
        lo, hi = cfg.get("step_range", None) or (0, steps - hops)
        if spec and not 0 <= lo <= hi <= steps - hops:
            raise ConfigError(f"influence.step_range=[{lo}, {hi}]: needs 0 <= lo <= hi <= "
                              f"steps - hops = {steps - hops}")
        removal = cfg.get("removal", "batch")
        if removal not in ("batch", "single") and not (
                isinstance(removal, int) and 1 <= removal <= batch_size):
            raise ConfigError(f"influence.removal={removal}: choose batch, single or a number "
                              f"of samples from 1 to batch_size={batch_size}")
        samples = "all" if removal == "batch" else 1 if removal == "single" else int(removal)
        for _ in range(int(spec)):
            raw.append((int(rng.integers(nodes)), int(rng.integers(lo, hi + 1)), samples))
        raw.sort(key=lambda e: (e[1], e[0]))
    else:
        for i, item in enumerate(spec):
            if not isinstance(item, Mapping) or not {"node", "step"} <= set(item):
                raise ConfigError(f"{key}[{i}]={item}: an event needs node and step, e.g. "
                                  "{node: 3, step: 10, samples: all}")
            node, step, samples = item["node"], item["step"], item.get("samples", "all")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (node, step)):
                raise ConfigError(f"{key}[{i}]: node and step must be integers")
            ok = samples in ("all", None) or (isinstance(samples, int) and samples > 0) or (
                isinstance(samples, Sequence) and not isinstance(samples, str)
                and all(isinstance(v, int) for v in samples))
            if not ok:
                raise ConfigError(f"{key}[{i}]: samples={samples} must be all, a number k or "
                                  "a list of training sample ids")
            raw.append((node, step, samples))
    events = []
    for index, (node, step, samples) in enumerate(raw):
        where = f"{key}[{index}] (node={node}, step={step})"
        if not 0 <= node < nodes:
            raise ConfigError(f"{where}: node {node} is outside the graph (0..{nodes - 1})")
        if not 0 <= step < steps:
            raise ConfigError(f"{where}: step {step} is outside the run (0..{steps - 1})")
        if step + hops > steps:
            raise ConfigError(
                f"{where}: influence.hops={hops} reaches step {step + hops}, past the last "
                f"step {steps}; lower influence.hops or pick an earlier step"
            )
        ids = batch_ids(parts[node], batch_size, step, seed, node)
        if samples == "all" or samples is None:
            pos = np.arange(len(ids))
        elif isinstance(samples, int | np.integer):
            if not 1 <= samples <= len(ids):
                raise ConfigError(f"{where}: samples={samples} must be in 1..{len(ids)}")
            pos = np.sort(np.random.default_rng([seed, index, 104729]).choice(
                len(ids), size=int(samples), replace=False))
        else:
            wanted = np.asarray(list(samples), dtype=np.int64)
            missing = np.setdiff1d(wanted, ids)
            if len(missing):
                raise ConfigError(
                    f"{where}: sample ids {missing.tolist()} are not in that batch; "
                    f"its ids are {sorted(ids.tolist())}"
                )
            pos = np.flatnonzero(np.isin(ids, wanted))
        events.append(Event(index, node, step, pos, ids[pos]))
    return events


class InfluenceTracker:
    """One per rank; holds the rows of its own nodes and emits finished rows."""

    def __init__(self, settings: InfluenceSettings, events: list[Event], layout: Layout,
                 topology: Topology, model: FlatModel, q: np.ndarray, lr: float,
                 update_of: Callable[[int, np.ndarray, Tensor], Tensor]):
        self.s = settings
        self.layout = layout
        self.topology = topology
        self.model = model
        self.q = q
        self.lr = lr
        self.update_of = update_of  # (t, global nodes, −η·∇ rows) → update rows Δ (attacks)
        self.W_of: Callable[[int], np.ndarray] = topology.W  # the W^t this rank's rows mix with
        self.last_proximal: np.ndarray | None = None  # [local k, sender j] of the last step
        for e in events:
            e.reach = reach_sets(topology, e.source, e.step, settings.hops)
        self.pending = sorted(events, key=lambda e: (e.step, e.index))
        self.active: list[Event] = []
        self.rows: list[tuple] = []  # finished influence rows not yet flushed
        self.proximal_rows: list[tuple] = []
        self._received_updates: Tensor | None = None  # proximal: W[k,j]·Δ_j per local k, sender j

    # ---- helpers ---------------------------------------------------------------------------
    def _local(self, nodes: np.ndarray) -> np.ndarray:
        return nodes[self.layout.owner(nodes) == self.layout.rank]

    def _hop(self, e: Event, t: int) -> int:
        return t - e.step

    def probe_rows(self, t: int) -> np.ndarray:
        """Local row indices whose ∇L'_k(θ_k^t) the tracker uses at t: reached nodes of
        events being recorded, sources of events starting, every node for proximal."""
        base = self.layout.first
        if self.s.proximal and t > 0:
            return np.arange(self.layout.nodes_per_rank)
        rows = [self._local(e.reach[self._hop(e, t)]) - base
                for e in self.active if 1 <= self._hop(e, t) <= self.s.hops]
        rows += [np.array([e.source - base]) for e in self.pending
                 if e.step == t and self.layout.is_local(e.source)]
        return np.unique(np.concatenate(rows)) if rows else np.array([], dtype=np.int64)

    # ---- at θ^t: record hop s = t − t_e ≥ 1 -------------------------------------------------
    def record(self, t: int, theta: Tensor, probe_grad: Tensor, probe_loss: Tensor,
               probe: Probe) -> None:
        """E[e,s,k] = q_k ∇L'_k(θ_k^t)ᵀ δ̂_k^t
        G[e,s,k] = q_k (L'_k(θ_k^t) − L'_k(θ_k^t − δ_k^t))"""
        if self.s.proximal and t > 0:
            self._record_proximal(t, probe_grad)
        due = [e for e in self.active if self._hop(e, t) >= 1]
        base = self.layout.first
        idx = [self._local(e.reach[self._hop(e, t)]) - base for e in due]
        if sum(map(len, idx)) == 0:
            self._retire(t)
            return
        flat_idx = torch.as_tensor(np.concatenate(idx), device=theta.device)
        dhat = torch.cat([e.dhat for e in due])
        e_terms = (probe_grad[flat_idx] * dhat).sum(1)
        if self.s.ground_truth:
            delta = torch.cat([e.delta for e in due])
            g_terms = loss_gap(self.model, theta[flat_idx], delta, probe.at(flat_idx))
        offset = 0
        for e, local in zip(due, idx, strict=True):
            s = self._hop(e, t)
            for i, k in enumerate(local + base):
                qk = self.q[k]
                gt = float(qk * g_terms[offset + i]) if self.s.ground_truth else None
                e.rows.append((e.index, e.source, e.step, e.n_removed, s, int(k),
                               float(qk * e_terms[offset + i]), gt))
            offset += len(local)
        self._retire(t)

    def _retire(self, t: int) -> None:
        for e in self.active:
            if self._hop(e, t) >= self.s.hops:
                self._finish(e)
        self.active = [e for e in self.active if self._hop(e, t) < self.s.hops]

    def _record_proximal(self, t: int, probe_grad: Tensor) -> None:
        """Proximal influence of j's batch at t−1 on out-neighbour k ≠ j (Definition 4):
        q_k W^{t−1}[k,j] ∇L'_k(θ_k^t)ᵀ Δ_j^{t−1}, from what k received at t−1."""
        assert self._received_updates is not None
        W = self.W_of(t - 1)
        local = self.layout.local_nodes
        dots = probe_grad @ self._received_updates.T  # [local k, sender j]
        weights = torch.as_tensor(W[local] * self.q[local, None], dtype=dots.dtype,
                                  device=dots.device)
        values = (dots * weights).cpu().numpy()
        values[np.arange(len(local)), local] = 0.0  # k ≠ j
        self.last_proximal = values
        for i, k in enumerate(local):
            for j in np.flatnonzero(W[k] > 0):
                if j != k:
                    self.proximal_rows.append((t - 1, int(j), int(k), float(values[i, j])))

    # ---- the local step at t ---------------------------------------------------------------
    def local_step(self, t: int, theta: Tensor, update: Tensor, probe_grad: Tensor | None,
                   batch: tuple[Tensor, Tensor, Tensor], probe: Probe) -> None:
        x, y, w = batch
        self._propagate(t, theta, update, x, y, w)
        while self.pending and self.pending[0].step == t:
            self._start(self.pending.pop(0), theta, update, probe_grad, x, y, w, probe)

    def _start(self, e: Event, theta: Tensor, update: Tensor, probe_grad: Tensor | None,
               x: Tensor, y: Tensor, w: Tensor, probe: Probe) -> None:
        if not self.layout.is_local(e.source):
            e.dhat = theta.new_zeros(0, self.model.P)  # its rows arrive by gossip
            e.delta = theta.new_zeros(0, self.model.P) if self.s.ground_truth else None
            if self.s.hops > 0:
                self.active.append(e)  # other ranks' rows of it arrive by gossip
            return
        i = self.layout.local_index(e.source)
        # Source: δ̂^{t+½} = O(θ;B) − O(θ;B∖S). For SGD that is −η ∇L_S(θ_j^t) exactly, the
        # gradient being linear in the sample weights; δ^{t+½} is the same difference.
        w_removed = torch.zeros_like(w[i])
        pos = torch.as_tensor(e.positions, device=w.device)
        w_removed[pos] = w[i][pos]
        g_removed, _ = self.model.grads(theta[i:i + 1], x[i:i + 1], y[i:i + 1], w_removed[None])
        source = self.update_of(e.step, np.array([e.source]), -self.lr * g_removed)
        e.dhat = source.clone()
        e.delta = source.clone() if self.s.ground_truth else None
        # s = 0: E = q_j ∇L'_j(θ_j^t)ᵀ δ̂ ; G = q_j (L'_j(θ_j^{t+½}) − L'_j(θ̃_j^{t+½}))
        assert probe_grad is not None
        qj = self.q[e.source]
        dice_e = float(qj * (probe_grad[i] * source[0]).sum())
        gt = None
        if self.s.ground_truth:
            half = theta[i:i + 1] + update[i:i + 1]
            gt = float(qj * loss_gap(self.model, half, source, probe.at(i))[0])
        e.rows.append((e.index, e.source, e.step, e.n_removed, 0, e.source, dice_e, gt))
        if self.s.hops > 0:
            self.active.append(e)
        else:
            self._finish(e)

    def _finish(self, e: Event) -> None:
        """An event's rows leave the tracker only once all its hops are recorded."""
        self.rows += e.rows
        e.rows, e.delta, e.dhat = [], None, None

    def _propagate(self, t: int, theta: Tensor, update: Tensor, x: Tensor, y: Tensor,
                   w: Tensor) -> None:
        """Local step of every reached row of events at hop 1 ≤ s < r:
        δ ← δ + Δ(θ_k) − Δ(θ_k − δ)  (shadow stepped on the same batch, exact);
        δ̂ ← δ̂ − η H_k(θ_k^t) δ̂        (one HVP per row; identity without curvature)."""
        moving = [e for e in self.active if 1 <= self._hop(e, t) < self.s.hops]
        if not moving:
            return
        base = self.layout.first
        locals_ = [self._local(e.reach[self._hop(e, t)]) - base for e in moving]
        idx = np.concatenate(locals_)
        if len(idx) == 0:
            return
        ti = torch.as_tensor(idx, device=theta.device)
        th, xb, yb, wb = theta[ti], x[ti], y[ti], w[ti]
        sizes = [len(part) for part in locals_]
        if self.s.ground_truth:
            delta = torch.cat([e.delta for e in moving])
            g_shadow, _ = self.model.grads(th - delta, xb, yb, wb)
            new_delta = delta + update[ti] - self.update_of(t, idx + base, -self.lr * g_shadow)
            for e, part in zip(moving, new_delta.split(sizes), strict=True):
                e.delta = part
        if self.s.curvature:
            dhat = torch.cat([e.dhat for e in moving])
            hv = self.model.hvps(th, dhat, xb, yb, wb)
            new_dhat = dhat + self.update_of(t, idx + base, -self.lr * hv)
            for e, part in zip(moving, new_dhat.split(sizes), strict=True):
                e.dhat = part

    # ---- gossip ----------------------------------------------------------------------------
    def channels(self, t: int, update: Tensor) -> list[Channel]:
        """Rows to send at t: per moving event its [δ | δ̂] rows on R_s; for proximal
        influence every node's update Δ_j^t."""
        out = []
        for e in self._gossiping(t):
            parts = ([e.delta] if self.s.ground_truth else []) + [e.dhat]
            out.append(Channel(e.reach[self._hop(e, t)], torch.cat(parts, dim=1)))
        if self.s.proximal:
            out.append(Channel(np.arange(self.layout.nodes), update))
        return out

    def _gossiping(self, t: int) -> list[Event]:
        return [e for e in self.active if 0 <= self._hop(e, t) < self.s.hops]

    def after_gossip(self, t: int, channels: list[Channel]) -> None:
        """δ^{τ+1}_k = Σ_l W^τ[k,l] δ^{τ+½}_l and the same for δ̂, for k in R_{s+1}."""
        W = self.W_of(t)
        P = self.model.P
        for e, ch in zip(self._gossiping(t), channels, strict=False):
            out = self._local(e.reach[self._hop(e, t) + 1])
            mixed = mix(W, out, ch)
            if self.s.ground_truth:
                e.delta, e.dhat = mixed[:, :P], mixed[:, P:]
            else:
                e.dhat = mixed
        if self.s.proximal:
            self._received_updates = channels[-1].available

    def take_rows(self) -> tuple[list[tuple], list[tuple]]:
        rows, prox = self.rows, self.proximal_rows
        self.rows, self.proximal_rows = [], []
        return rows, prox
