"""Trackers: parts that follow the run step by step and measure influence.

The trainer calls every tracker in list order at four points of step t, each time with
the same `Step` record (dicesim.run.trainer):

  at_theta(step)        θ^t is known (and ∇L'_k(θ_k^t) of the rows from `probe_rows(t)`)
  local_step(step)      the update Δ^t and θ^{t+½} are known
  channels(step)        the rows this tracker sends with the parameters at t
  after_gossip(step, received)  W^t as mixed and the tracker's own channels, exchanged

A tracker sees only the Step and what it declared; no tracker reads another's state.
Influence values go into the shared EventBook (one column per estimator), proximal rows
into the tracker's own list; both leave the rank through `take_rows`.

Trackers come from a registry: each module of TRACKER_MODULES registers its factories
(`@register(name)`, name → factory(TrackerContext) giving a tracker, or None when the
run's settings do not ask for it); `build_trackers` calls them in registration order.
Adding a tracker is its module plus its name in TRACKER_MODULES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import Channel, Layout, mix
from dicesim.influence.events import Event, EventBook, ProximalRow
from dicesim.optim.local import LocalOptimizer, State

if TYPE_CHECKING:
    from dicesim.model.models import FlatModel, Probe
    from dicesim.run.engine import InfluenceSettings

NO_ROWS = np.array([], dtype=np.int64)


class Tracker:
    """The do-nothing part every tracker extends."""

    def probe_rows(self, t: int) -> np.ndarray:
        return NO_ROWS

    def at_theta(self, step) -> None:
        pass

    def local_step(self, step) -> None:
        pass

    def channels(self, step) -> list[Channel]:
        return []

    def after_gossip(self, step, received: list[Channel]) -> None:
        pass

    def take_proximal(self) -> list[ProximalRow]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PerturbationTracker(Tracker):
    """Carries one perturbation row per reached local node of every active event and
    gossips it like the parameters: v^{τ+1}_k = Σ_l W^τ[k,l] v_l^{τ+½}, k in R_{s+1}.
    With a stateful optimizer each row also has a perturbation of the node's optimizer
    state (`state_rows`, one [rows, P] tensor per state name): it stays with its node
    (R_s is then cumulative, a node keeps it after θ's perturbation has moved on) or,
    with optim.gossip_state, is mixed like θ.
    Subclasses say how the row starts (hop 0), steps (1 ≤ s < r) and is recorded."""

    column = ""

    def __init__(self, book: EventBook, layout: Layout, q: np.ndarray, optimizer,
                 only: set[int] | None = None):
        self.book = book
        self.layout = layout
        self.q = q  # node weights q_k
        self.optimizer = optimizer
        self.only = only  # the events this tracker follows (None: every event)
        self.rows: dict[int, Tensor] = {}  # event index → δθ rows [local nodes of R_s, P]
        self.state_rows: dict[int, State] = {}  # event index → δs rows, same nodes

    def _mine(self, events: list[Event]) -> list[Event]:
        return events if self.only is None else [e for e in events if e.index in self.only]

    def starting(self, step) -> list[Event]:
        return self._mine(step.started)

    def _sends_state(self) -> bool:
        return self.optimizer.gossip_state

    def channels(self, step) -> list[Channel]:
        out = []
        for e in self.gossiping(step.t):
            nodes = e.reach[e.hop(step.t)]
            out.append(Channel(nodes, self.rows[e.index]))
            if self._sends_state():
                out += [Channel(nodes, self.state_rows[e.index][name])
                        for name in self.optimizer.state_names]
        return out

    def gossiping(self, t: int) -> list[Event]:
        return self._mine(self.book.at_hops(t, 0, self.book.hops - 1))

    def after_gossip(self, step, received: list[Channel]) -> None:
        names = self.optimizer.state_names
        per_event = 1 + (len(names) if self._sends_state() else 0)
        events = self.gossiping(step.t)
        assert len(received) == per_event * len(events)
        for i, e in enumerate(events):
            s = e.hop(step.t)
            out = e.reach[s + 1]
            out = out[self.layout.owner(out) == self.layout.rank]
            chans = received[i * per_event:(i + 1) * per_event]
            self.rows[e.index] = mix(step.W, out, chans[0])
            if not names:
                continue
            if self._sends_state():
                self.state_rows[e.index] = {n: mix(step.W, out, ch)
                                            for n, ch in zip(names, chans[1:], strict=True)}
            else:  # δs stays with its node; nodes new to R_{s+1} start with none
                before = self.book.local_rows(e, s) + self.layout.first
                where = torch.as_tensor(np.searchsorted(out, before), dtype=torch.long,
                                        device=self.rows[e.index].device)
                carried = {}
                for n, old in self.state_rows[e.index].items():
                    new = old.new_zeros(len(out), old.shape[1])
                    new[where] = old
                    carried[n] = new
                self.state_rows[e.index] = carried
        self._drop_finished(step.t)

    def _drop_finished(self, t: int) -> None:
        """Rows are needed until the last hop is recorded, at θ^{t_e + r}."""
        for i in [i for i in self.rows if self.book.by_index[i].step + self.book.hops <= t]:
            del self.rows[i]
            self.state_rows.pop(i, None)

    def _start_rows(self, step, e: Event) -> tuple[Tensor, State]:
        """The exact source perturbation (δθ_j^{t+½}, δs_j^{t+½}) of a local event, or no
        rows if the source lives on another rank (its rows arrive by gossip)."""
        source = step.sources.get(e.index)
        if source is None:
            empty = step.theta.new_zeros(0, step.theta.shape[1])
            return empty, self.optimizer.zero_state(empty)
        d_theta, d_state = source
        return d_theta.clone(), {n: v.clone() for n, v in d_state.items()}

    def moving(self, t: int) -> tuple[list[Event], list[np.ndarray]]:
        """Events at hops 1 ≤ s < r and their local rows: those step with the node."""
        events = self._mine(self.book.at_hops(t, 1, self.book.hops - 1))
        return events, [self.book.local_rows(e, e.hop(t)) for e in events]

    def recorded(self, t: int) -> tuple[list[Event], list[np.ndarray]]:
        """Events at hops 1 ≤ s ≤ r and their local rows: recorded at θ^t."""
        events = self._mine(self.book.at_hops(t, 1, self.book.hops))
        return events, [self.book.local_rows(e, e.hop(t)) for e in events]

    # ---- the three things every perturbation tracker does, with its own rule --------------
    def record(self, step, value: Callable[[Tensor, Tensor], Tensor]) -> None:
        """At θ^t: value(v, rows) per reached local row (v its perturbation rows, rows the
        local row indices), times q_k, into the book at hop t − t_e."""
        events, idx = self.recorded(step.t)
        if sum(map(len, idx)) == 0:
            return
        rows = torch.as_tensor(np.concatenate(idx), device=step.theta.device)
        values = value(torch.cat([self.rows[e.index] for e in events]), rows)
        offset, base = 0, self.layout.first
        for e, local in zip(events, idx, strict=True):
            for i, k in enumerate(local + base):
                self.book.put(e, e.hop(step.t), int(k), self.column,
                              float(self.q[k] * values[offset + i]))
            offset += len(local)

    def advance(self, step, rule: Callable[..., tuple[Tensor, State]]) -> None:
        """Local step of the rows of events at hops 1 ≤ s < r:
        (v, vs) ← rule(v, vs, rows, global nodes, x, y, w) on each row's node's own batch
        (vs: the state perturbation rows, {} for a stateless optimizer)."""
        events, idx = self.moving(step.t)
        if not events or sum(map(len, idx)) == 0:
            return
        flat = np.concatenate(idx)
        rows = torch.as_tensor(flat, device=step.theta.device)
        x, y, w = step.batch
        v = torch.cat([self.rows[e.index] for e in events])
        vs = {n: torch.cat([self.state_rows[e.index][n] for e in events])
              for n in self.optimizer.state_names}
        new, new_state = rule(v, vs, rows, flat + self.layout.first, x[rows], y[rows], w[rows])
        sizes = [len(i) for i in idx]
        split_state = {n: t.split(sizes) for n, t in new_state.items()}
        for i, (e, part) in enumerate(zip(events, new.split(sizes), strict=True)):
            self.rows[e.index] = part
            self.state_rows[e.index] = {n: split_state[n][i] for n in split_state}

    def start(self, step, value: Callable[[int, Tensor], Tensor]) -> None:
        """Events removing data at t: rows from δ_j^{t+½}; on the source's rank the hop-0
        term value(local row of j, δ_j) times q_j into the book."""
        for e in self.starting(step):
            self.rows[e.index], self.state_rows[e.index] = self._start_rows(step, e)
            if e.index in step.sources:
                i = self.layout.local_index(e.source)
                self.book.put(e, 0, e.source, self.column,
                              float(self.q[e.source] * value(i, self.rows[e.index])))

    def real_rows(self, step, rows: Tensor) -> tuple[Tensor, State, Tensor]:
        """θ^t, s^t and ∇L(θ^t; B^t) of the real run at local rows."""
        return (step.theta[rows], {n: v[rows] for n, v in step.state.items()},
                step.grad[rows])

    def state_dict(self) -> dict:
        return {"rows": dict(self.rows),
                "state_rows": {i: dict(v) for i, v in self.state_rows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.rows = {int(i): v for i, v in state["rows"].items()}
        self.state_rows = {int(i): dict(v) for i, v in state.get("state_rows", {}).items()}


# ---- building: the registry -----------------------------------------------------------------
@dataclass
class TrackerContext:
    """What a tracker is built from: one run's parts on this rank and its settings."""

    book: EventBook | None  # None: the run has no events
    layout: Layout
    model: FlatModel
    probe: Probe
    q: np.ndarray  # node weights q_k
    optimizer: LocalOptimizer
    influence: InfluenceSettings


TrackerFactory = Callable[[TrackerContext], Tracker | None]
TRACKERS: dict[str, TrackerFactory] = {}  # name → factory, in registration order
# the modules that register trackers, imported (in this order) when trackers are built
TRACKER_MODULES = ("ground_truth", "dice_e", "dice_gauss", "proximal")


def register(name: str) -> Callable[[TrackerFactory], TrackerFactory]:
    def add(factory: TrackerFactory) -> TrackerFactory:
        if name in TRACKERS:
            raise ValueError(f"tracker {name!r} is registered twice")
        TRACKERS[name] = factory
        return factory
    return add


def registered() -> dict[str, TrackerFactory]:
    for module in TRACKER_MODULES:
        importlib.import_module(f"dicesim.influence.trackers.{module}")
    return TRACKERS


def build_trackers(ctx: TrackerContext) -> list[Tracker]:
    """The trackers this run's settings ask for, in registration order."""
    made = (factory(ctx) for factory in registered().values())
    return [tracker for tracker in made if tracker is not None]


def estimating(ctx: TrackerContext, name: str) -> bool:
    """Whether influence.estimators asks for `name` (and there are events to follow)."""
    return ctx.book is not None and name in ctx.influence.estimators


# ---- DICE's source perturbations ------------------------------------------------------------
class SourcePerturbations:
    """(δθ_j^{t+½}, δs_j^{t+½}) = O(θ_j^t, s_j^t; B) − O(θ_j^t, s_j^t; B ∖ S) of every event
    starting at t on this rank (`step.started`), by event index. The gradient is linear in
    the sample weights, so for an affine optimizer (SGD, momentum, weight decay) this is
    the step's tangent along the removed samples' gradient ∇L_S alone (−η ∇L_S for SGD),
    exactly; otherwise (Adam, or BatchNorm, whose batch statistics make the gradient
    nonlinear in the weights) the difference of the two steps, the second on the batch
    without S, running statistics included."""

    def __init__(self, layout: Layout, model: FlatModel, optimizer: LocalOptimizer):
        self.layout, self.model, self.optimizer = layout, model, optimizer

    def __call__(self, step) -> dict[int, tuple[Tensor, State]]:
        return {e.index: self._one(step, e) for e in step.started
                if self.layout.is_local(e.source)}

    def _one(self, step, e: Event) -> tuple[Tensor, State]:
        opt = self.optimizer
        x, y, w = step.batch
        i = self.layout.local_index(e.source)
        nodes = np.array([e.source])
        keep = torch.ones_like(w[i])
        keep[torch.as_tensor(e.positions, device=w.device)] = 0.0
        theta = step.theta[i:i + 1]
        state = {n: v[i:i + 1] for n, v in step.state.items()}
        if opt.affine and not self.model.has_running_stats:
            g_removed, _ = self.model.grads(theta, x[i:i + 1], y[i:i + 1],
                                            (w[i] * (1 - keep))[None])
            return opt.tangent(e.step, nodes, theta, state, step.grad[i:i + 1],
                               torch.zeros_like(theta), opt.zero_state(theta), g_removed)
        g_without, _ = self.model.grads(theta, x[i:i + 1], y[i:i + 1], (w[i] * keep)[None])
        update, new = opt.step(e.step, nodes, theta, state, g_without)
        update = self.model.with_running_stats(update, theta, x[i:i + 1], (w[i] * keep)[None])
        return (step.update[i:i + 1] - update,
                {n: step.new_state[n][i:i + 1] - new[n] for n in new})
