"""What is analysed: events (node j's batch at step t, minus S), how far each reaches, and
the typed influence rows every estimator writes into.

An event e = (j, t, S) removes S from B_j^t (docs/design.md §2). R_s is the set of nodes the
perturbation reaches after s gossip rounds: R_0 = {j}, R_{s+1} = out-neighbours of R_s
under W^{t+s}, self-loops included. The `EventBook` is the one schedule every tracker
follows: which events start, which are at which hop, which rows of this rank they touch,
and when an event is finished (all its hops recorded, its rows ready to leave the rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import Layout
from dicesim.common.errors import ConfigError
from dicesim.config import (
    ESTIMATORS,  # noqa: F401 - estimator columns, re-exported
    RENAMED_ESTIMATORS,
    Influence,
)
from dicesim.config import MAX_HOPS as MAX_HOPS  # re-exported
from dicesim.graph.topology import Topology
from dicesim.model.data import batch_ids


class InfluenceRow(NamedTuple):
    """One (event, hop, node) of influence.csv; one column per estimator."""

    event: int
    source: int  # j
    step: int  # t
    n_removed: int  # |S|
    hop: int  # s
    node: int  # k
    dice_e: float | None  # E[e,s,k], the paper's estimator (None: switched off)
    dice_gt: float | None  # G[e,s,k] (None: not requested for this event)
    dice_mid: float | None = None  # the midpoint estimator (None: switched off)
    dice_e_nostate: float | None = None  # DICE-E ignoring the optimizer state (ablation)
    dice_gauss2: float | None = None  # the two-point Gauss–Legendre rule
    distance: int | None = None  # shortest-path hops j → k in the (union) communication graph


class ProximalRow(NamedTuple):
    """Proximal influence of `sender`'s batch at `step` on out-neighbour `receiver`."""

    step: int
    sender: int
    receiver: int
    value: float


INFLUENCE_COLUMNS = InfluenceRow._fields
PROXIMAL_COLUMNS = ProximalRow._fields


@dataclass
class Event:
    index: int
    source: int  # j
    step: int  # t
    positions: np.ndarray  # positions in B_j^t that are removed (S)
    sample_ids: np.ndarray  # their global training ids
    reach: list[np.ndarray] = field(default_factory=list)  # R_0 … R_r (global, sorted)

    @property
    def n_removed(self) -> int:
        return len(self.positions)

    def hop(self, t: int) -> int:
        return t - self.step


def reach_sets(topology: Topology, source: int, step: int, hops: int,
               cumulative: bool = False) -> list[np.ndarray]:
    """R_0 = {j}, R_{s+1} = receivers k of R_s under W^{t+s} (W[k, l] > 0 for some l in R_s):
    W ≥ 0, so (W 1_{R_s})_k > 0 exactly there. O(edges) per hop. `cumulative`: R_{s+1} also
    keeps R_s (a stateful optimizer's nodes stay perturbed through their state after θ's
    perturbation has moved on)."""
    sets = [np.array([source])]
    for s in range(hops):
        inside = np.zeros(topology.n)
        inside[sets[-1]] = 1.0
        reached = topology.W_sparse(step + s) @ inside > 0
        if cumulative:
            reached[sets[-1]] = True
        sets.append(np.flatnonzero(reached))
    return sets


def build_events(cfg: Influence, *, nodes: int, steps: int, batch_size: int,
                 parts: list[np.ndarray], seed: int, key: str = "influence.events"
                 ) -> list[Event]:
    """Events from `influence.events`: an int N (N sampled events) or a list of
    {node, step, samples} with samples = all | [global ids] | k (k random samples). The
    schema checked the spec against the run; what needs the batches is checked here."""
    hops, spec = cfg.hops, cfg.events
    rng = np.random.default_rng([seed, 7919])
    raw: list[tuple[int, int, object]] = []
    if isinstance(spec, int):
        last = min(steps - hops, steps - 1)  # an event at t needs t + r <= T and t < T
        lo, hi = cfg.step_range or (0, last)
        removal = cfg.removal
        samples = "all" if removal == "batch" else 1 if removal == "single" else int(removal)
        raw = sample_events(rng, spec, nodes, lo, hi, batch_size, samples, key)
    else:
        raw = [(item["node"], item["step"], item.get("samples", "all")) for item in spec]
    events = []
    for index, (node, step, samples) in enumerate(raw):
        where = f"{key}[{index}] (node={node}, step={step})"
        ids = batch_ids(parts[node], batch_size, step, seed, node)
        if isinstance(samples, Position):
            pos = np.array([samples.index])
        elif samples == "all" or samples is None:
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


class Position(NamedTuple):
    """One sampled position in a batch (single-sample events drawn without replacement)."""

    index: int


def sample_events(rng: np.random.Generator, count: int, nodes: int, lo: int, hi: int,
                  batch_size: int, samples: object, key: str) -> list[tuple[int, int, object]]:
    """`count` distinct events, drawn without replacement: distinct (node, step) pairs for
    batch and k-sample removals (no two events share a sample), distinct (node, step,
    position) for single samples. Sorted by (step, node, position)."""
    if count == 0:
        return []
    steps = hi - lo + 1
    pairs = nodes * steps
    single = samples == 1
    universe = pairs * batch_size if single else pairs
    if count > universe:
        what = (f"{universe} (node, step, sample) triples" if single else
                f"{universe} (node, step) pairs")
        raise ConfigError(f"{key}={count}: only {what} exist with {nodes} nodes and steps "
                          f"{lo}..{hi}; ask for at most {universe} events")
    drawn = np.sort(rng.choice(universe, size=count, replace=False))
    pair, position = (drawn // batch_size, drawn % batch_size) if single else (drawn, None)
    step, node = lo + pair // nodes, pair % nodes
    return [(int(node[i]), int(step[i]),
             Position(int(position[i])) if single else samples) for i in range(count)]


class EventBook:
    """The schedule of events on one rank and the table their rows are written into.

    Trackers read the schedule (which events start at t, which are at which hop, the
    local rows they reach) and write their column of each (event, hop, node) with
    `put`. The trainer calls `retire(t)` once every tracker is done with θ^t; an event's
    rows leave the rank (`take_rows`) only once all its hops are written."""

    def __init__(self, events: list[Event], hops: int, layout: Layout, topology: Topology,
                 cumulative: bool = False):
        self.hops = hops
        self.layout = layout
        self.topology = topology
        for e in events:
            e.reach = reach_sets(topology, e.source, e.step, hops, cumulative)
        self.events = sorted(events, key=lambda e: (e.step, e.index))
        self.by_index = {e.index: e for e in self.events}
        self.started = 0  # events[:started] have started
        self.active: list[Event] = []  # started, hops still to record
        self.cells: dict[int, dict[tuple[int, int], dict[str, float]]] = {}  # e → (s, k) → cols
        self.finished: list[InfluenceRow] = []

    # ---- the schedule ------------------------------------------------------------------------
    def starting(self, t: int) -> list[Event]:
        out = []
        i = self.started
        while i < len(self.events) and self.events[i].step == t:
            out.append(self.events[i])
            i += 1
        return out

    def at_hops(self, t: int, lo: int, hi: int) -> list[Event]:
        """Active events whose hop at t is in [lo, hi]."""
        return [e for e in self.active if lo <= e.hop(t) <= hi]

    def local_rows(self, e: Event, s: int) -> np.ndarray:
        """Local row indices of this rank's nodes in R_s."""
        nodes = e.reach[s]
        return nodes[self.layout.owner(nodes) == self.layout.rank] - self.layout.first

    def probe_rows(self, t: int) -> np.ndarray:
        """Local rows whose ∇L'_k(θ_k^t) the estimators read at t: reached nodes of events
        at hops 1..r and sources of events starting at t."""
        rows = [self.local_rows(e, e.hop(t)) for e in self.at_hops(t, 1, self.hops)]
        rows += [self.local_rows(e, 0) for e in self.starting(t)]
        return np.unique(np.concatenate(rows)) if rows else np.array([], dtype=np.int64)

    def start(self, t: int) -> list[Event]:
        """Mark the events of step t started; returns them."""
        new = self.starting(t)
        self.started += len(new)
        for e in new:
            self.cells[e.index] = {}
            if self.hops > 0:
                self.active.append(e)
        return new

    # ---- the table ---------------------------------------------------------------------------
    def put(self, e: Event, s: int, node: int, column: str, value: float) -> None:
        self.cells[e.index].setdefault((s, node), {})[column] = value

    def retire(self, t: int) -> None:
        """At the end of step t: events whose last hop (θ^{t_e + r}) is written finish."""
        done = [i for i in self.cells if self.by_index[i].step + self.hops <= t]
        for i in sorted(done):
            e = self.by_index[i]
            far = self.topology.hops_from(e.source, self.hops)
            for (s, k), cols in sorted(self.cells.pop(i).items()):
                self.finished.append(InfluenceRow(
                    e.index, e.source, e.step, e.n_removed, s, k,
                    cols.get("dice_e"), cols.get("dice_gt"), cols.get("dice_mid"),
                    cols.get("dice_e_nostate"), cols.get("dice_gauss2"), int(far[k])))
        self.active = [e for e in self.active if e.step + self.hops > t]

    def take_rows(self) -> list[InfluenceRow]:
        rows, self.finished = self.finished, []
        return rows

    # ---- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"started": self.started, "active": [e.index for e in self.active],
                "cells": {i: [(s, k, sorted(c.items())) for (s, k), c in cells.items()]
                          for i, cells in self.cells.items()},
                "finished": [tuple(r) for r in self.finished]}

    def load_state_dict(self, state: dict) -> None:
        self.started = int(state["started"])
        self.active = [self.by_index[i] for i in state["active"]]
        self.cells = {int(i): {(s, k): {RENAMED_ESTIMATORS.get(n, n): v for n, v in c}
                               for s, k, c in cells}
                      for i, cells in state["cells"].items()}
        self.finished = [InfluenceRow(*r) for r in state["finished"]]


def loss_gap(model, theta: Tensor, delta: Tensor, probe: tuple[Tensor, Tensor, bool]) -> Tensor:
    """L'(θ) − L'(θ − δ) per row, evaluated in float64 whatever the run's dtype.

    In float32 the two losses (~1) carry rounding errors of ~1e-7 each, as large as the
    gap of a single sample's removal a few hops away; δ itself is carried to full
    relative precision, so only this evaluation needs the wider type."""
    x, y, per_row = probe
    wide = torch.float64
    x, y = x.to(wide), (y.to(wide) if y.is_floating_point() else y)
    theta, delta = theta.to(wide), delta.to(wide)
    if per_row:  # each row its own probe set: both points read it
        x, y = torch.cat([x, x]), torch.cat([y, y])
    both = model.probe_losses(torch.cat([theta, theta - delta]), x, y, per_row)  # one call
    return both[:len(theta)] - both[len(theta):]
