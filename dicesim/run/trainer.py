"""The step loop: one `Step` record per step, passed through a fixed list of parts.

Step t on every rank, vectorized over its block of nodes (docs/design.md §1, §3):
  1. θ^t known: trackers record (`at_theta`); the aggregator observes what they published
     (proximal influence of step t − 1); metrics every `eval_every` steps.
  2. W^t as mixed = aggregator.weights(W^t of the topology).
  3. local step: (Δ^t, s^{t+½}) = optimizer.step(θ^t, s^t, ∇L(θ^t; B^t), t),
     θ^{t+½} = θ^t + Δ^t; trackers step their rows (`local_step`).
  4. gossip: the parameter rows (and with optim.gossip_state the optimizer state) and every
     tracker's declared rows travel in one buffer per peer rank;
     θ^{t+1} = aggregator.combine(W^t, received); trackers mix theirs. The state stays
     s^{t+1} = s^{t+½} unless it is gossiped too.
  5. end of step: events retire, rows flush, a checkpoint, progress.

The loop (`Trainer.run`) reads in that order; how each stage works is its part's business,
chosen when the run is built (dicesim.run.engine.build_trainer): without trackers the local
step takes the rows peers receive first (the exchange is posted as soon as they are done,
interior rows step while it travels), in cache-sized chunks, writing into blocks it reuses
from step to step; with trackers it takes the whole block at once and keeps its tensors on
the Step, which the trackers read.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import (
    Channel,
    Comm,
    Layout,
    PendingExchange,
    Route,
    index_tensor,
    local_block,
    route,
    send_first,
)
from dicesim.common.errors import ConfigError
from dicesim.common.faults import inject
from dicesim.common.stopping import SIGNALS, Interrupted, Stopped
from dicesim.graph.topology import Topology
from dicesim.influence.events import Event, EventBook, InfluenceRow, ProximalRow
from dicesim.model.models import FlatModel, Probe
from dicesim.optim.aggregate import Aggregator
from dicesim.optim.local import LocalOptimizer, State

if TYPE_CHECKING:
    from scipy import sparse

    from dicesim.influence.trackers import SourcePerturbations, Tracker
    from dicesim.run.checkpoint import Checkpoints
    from dicesim.run.engine import RunParts, RunSettings


class MetricRow(NamedTuple):
    step: int
    node: int
    train_loss: float  # L(θ_k^{t−1}; B_k^{t−1}), the last step's batch (nan at t = T)
    probe_loss: float  # L'_k(θ_k^t)
    probe_acc: float
    consensus_dist: float  # ‖θ_k^t − θ̄^t‖


METRIC_COLUMNS = MetricRow._fields
Batch = tuple[Tensor, Tensor, Tensor]  # x [rows, B, ...], y [rows, B], sample weights w [rows, B]


@dataclass
class Step:
    """What the parts of step t see (rows of this rank's nodes)."""

    t: int
    theta: Tensor  # θ^t
    batch: Batch | None = None  # B^t (None at t = T)
    W: sparse.csr_array | None = None  # W^t as mixed (after the aggregator), CSR
    probe_grad: Tensor | None = None  # ∇L'_k(θ_k^t) of the rows trackers asked for, else 0
    probe_loss: Tensor | None = None
    grad: Tensor | None = None  # ∇L(θ^t; B^t), when the probe pass computed it too
    loss: Tensor | None = None  # L(θ^t; B^t) with it
    state: State = field(default_factory=dict)  # s^t, the optimizer state ({} for SGD)
    update: Tensor | None = None  # Δ^t
    half: Tensor | None = None  # θ^{t+½}
    new_state: State = field(default_factory=dict)  # s^{t+½}, after the local step
    received: Channel | None = None  # θ^{t+½} as exchanged: `available` holds the rows of
    # this rank's nodes and of those received (`available_nodes`), every other node is zero
    started: list[Event] = field(default_factory=list)  # events removing data at t
    sources: dict[int, Tensor] = field(default_factory=dict)  # local event → δ_j^{t+½}
    proximal: np.ndarray | None = None  # [local k, sender j] of step t − 1 (published)


@dataclass
class RunResult:
    metrics: list[MetricRow] = field(default_factory=list)
    influence: list[InfluenceRow] = field(default_factory=list)
    proximal: list[ProximalRow] = field(default_factory=list)
    final_params: Tensor | None = None  # [nodes, P] on rank 0 (gathered)
    test_acc: list[float] = field(default_factory=list)  # per node, at θ^T (EvalPlan's subset)
    consensus_test_acc: float | None = None  # θ̄^T = (1/n) Σ_k θ_k^T on the whole test split
    eval_s: float = 0.0  # wall time of the test evaluation after the step loop
    aggregator: list[dict] = field(default_factory=list)  # per rank (rank 0): final state
    wall_s: float = 0.0
    first_step_at: float = 0.0  # perf_counter when the step loop started
    gossip_s: float = 0.0  # wall time of the step loop in exchange and mixing
    cpu_s: float = 0.0  # CPU time of this process (all threads) in the step loop
    gossip_cpu_s: float = 0.0  # the part of cpu_s spent on exchange and mixing
    start_step: int = 0  # > 0 when resumed from a checkpoint
    attribution: object | None = None  # dicesim.influence.attribution.Attribution (rank 0)

    def state_dict(self) -> dict:
        return {name: [tuple(r) for r in getattr(self, name)]  # plain tuples: weights_only
                for name in ("metrics", "influence", "proximal")}

    def load_state_dict(self, state: dict) -> None:
        self.metrics = [MetricRow(*r) for r in state["metrics"]]
        self.influence = [InfluenceRow(*r) for r in state["influence"]]
        self.proximal = [ProximalRow(*r) for r in state["proximal"]]


def row_index(rows: np.ndarray, device: torch.device) -> Tensor | slice:
    """Index of these local rows: a slice (views, no copies) when they are consecutive."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return index_tensor(rows, device)


def spare_block(pool: list[Tensor], like: Tensor, busy: Tensor | None) -> Tensor:
    """A [rows, P] block from `pool` that is not `busy` (the one being read), else a new
    one kept in the pool (at most two: the block written and the one read)."""
    for block in pool:
        if block is not busy and (block.shape, block.dtype, block.device) == (
                like.shape, like.dtype, like.device):
            return block
    block = torch.empty_like(like)
    pool[:] = [b for b in pool if b is busy][:1] + [block]
    return block


class StepClock:
    """Wall and CPU time of the step loop and of its gossip (exchange + mixing) windows.

    On a shared machine the wall time in the exchange is mostly waiting for peers that
    are not scheduled; the CPU time says what communicating itself costs. Gossip CPU is
    the main thread's CPU inside the windows plus, on a multi-rank run with one torch
    thread, every other thread's CPU (there those are gloo's I/O threads)."""

    def __init__(self, others_are_comm: bool, device: torch.device | None = None):
        self.others_are_comm = others_are_comm  # count threads other than this one as gossip
        # CUDA launches return before the work is done: the clock is read after it is
        self.settle = (torch.cuda.synchronize if device is not None and device.type == "cuda"
                       else lambda: None)
        self.settle()
        self.wall0, self.cpu0, self.main0 = (time.perf_counter(), time.process_time(),
                                             time.thread_time())
        self.gossip_wall = self.gossip_main_cpu = 0.0

    @contextlib.contextmanager
    def gossip(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        yield
        self.gossip_wall += time.perf_counter() - wall
        self.gossip_main_cpu += time.thread_time() - cpu

    def elapsed(self) -> float:
        self.settle()
        return time.perf_counter() - self.wall0

    def stop(self, result: RunResult) -> None:
        result.wall_s = self.elapsed()
        result.first_step_at = self.wall0
        result.cpu_s = time.process_time() - self.cpu0
        others = result.cpu_s - (time.thread_time() - self.main0)
        result.gossip_s = self.gossip_wall
        result.gossip_cpu_s = self.gossip_main_cpu + (others if self.others_are_comm else 0.0)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ---- the parts of the loop, in the order a step meets them -----------------------------------
class Position:
    """θ^t of this rank's nodes and the step t the loop stands at."""

    def __init__(self, theta: Tensor):
        self.step, self.theta = 0, theta

    def state_dict(self) -> dict:
        return {"step": self.step, "theta": self.theta}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.theta = state["theta"].to(self.theta.device)


class Metrics:
    """The metric rows every `eval_every` steps and the training loss of every step; both
    feed the divergence rule (comm.guard), whose reference losses are this part's state."""

    def __init__(self, model: FlatModel, probe: tuple[Tensor, Tensor, bool], layout: Layout,
                 eval_every: int, comm: Comm, result: RunResult):
        self.model, self.probe, self.layout = model, probe, layout
        self.eval_every, self.comm, self.result = eval_every, comm, result
        self.train_loss = torch.full((layout.nodes_per_rank,), math.nan)

    def observe(self, t: int, theta: Tensor, final: bool) -> None:
        if not (final or t % self.eval_every == 0):
            return
        lay = self.layout
        loss, acc = self.model.probe_eval(theta, *self.probe)  # within eval.budget
        self.comm.guard.observe(t, lay.local_nodes, loss, "probe")  # divergence rule
        mean = self.comm.all_sum(theta.sum(0)) / lay.nodes  # θ̄
        dist = (theta - mean).norm(dim=1)  # ‖θ_k − θ̄‖
        # one host copy for every node's values (float32 → float64 is exact)
        probe_loss, probe_acc, consensus = torch.stack(
            [loss.double(), acc.double(), dist.double()]).tolist()
        train = [math.nan] * len(lay.local_nodes) if final else self.train_loss.tolist()
        rows = [MetricRow(t, k, *values) for k, *values in zip(
            lay.local_nodes.tolist(), train, probe_loss, probe_acc, consensus, strict=True)]
        gathered = self.comm.gather_to_root(rows)
        if gathered is not None:
            self.result.metrics += [r for part in gathered for r in part]

    def trained(self, t: int, loss: Tensor) -> None:
        """L(θ^t; B^t) of every local node, once per step to the host."""
        self.train_loss = loss.detach().cpu()
        self.comm.guard.observe(t, self.layout.local_nodes, self.train_loss, "training")

    def state_dict(self) -> dict:
        return {"train_loss": self.train_loss,
                "loss_reference": dict(self.comm.guard.initial)}  # the divergence rule's

    def load_state_dict(self, state: dict) -> None:
        self.train_loss = state["train_loss"]  # on the host (checkpoint.HOST_STATE)
        self.comm.guard.initial = {int(k): float(v) for k, v in state["loss_reference"].items()}


class Tracking:
    """The influence side of a step: the event book, DICE's source perturbations and the
    trackers (dicesim.influence.trackers), each called at its point of the step. With no trackers
    every call does nothing."""

    def __init__(self, trackers: list[Tracker], book: EventBook | None,
                 sources: SourcePerturbations | None, model: FlatModel, probe: Probe,
                 flush_every: int):
        self.trackers, self.book, self.sources = trackers, book, sources
        self.model, self.probe, self.flush_every = model, probe, flush_every
        self.spans: list[tuple[int, int]] = []  # each tracker's channels in the exchange

    def at_theta(self, step: Step) -> None:
        if not self.trackers:
            return
        self._probe_grads(step)
        for tr in self.trackers:
            tr.at_theta(step)

    def local_step(self, step: Step) -> None:
        if self.book is not None:
            assert self.sources is not None
            step.started = self.book.start(step.t)
            step.sources = self.sources(step)
        for tr in self.trackers:
            tr.local_step(step)

    def channels(self, step: Step) -> list[Channel]:
        out: list[Channel] = []
        self.spans = []
        for tr in self.trackers:
            mine = tr.channels(step)
            self.spans.append((len(out), len(out) + len(mine)))
            out += mine
        return out

    def after_gossip(self, step: Step, received: list[Channel]) -> None:
        for tr, (a, b) in zip(self.trackers, self.spans, strict=True):
            tr.after_gossip(step, received[a:b])

    def retire(self, t: int) -> None:
        if self.book is not None:
            self.book.retire(t)

    def flush_due(self, t: int) -> bool:
        return bool(self.trackers) and t % self.flush_every == 0

    def take(self) -> tuple[list[InfluenceRow], list[ProximalRow]]:
        rows = self.book.take_rows() if self.book is not None else []
        return rows, [r for tr in self.trackers for r in tr.take_proximal()]

    def _probe_grads(self, step: Step) -> None:
        """∇L'_k(θ_k^t), L'_k(θ_k^t) of the rows some tracker reads (zero elsewhere); when
        every row is read on a training step, one pass gives the batch gradient too."""
        theta, t = step.theta, step.t
        n_loc, dev = len(theta), theta.device
        rows = np.unique(np.concatenate([tr.probe_rows(t) for tr in self.trackers]))
        if len(rows) == n_loc and step.batch is not None:
            x, y, w = step.batch
            step.grad, step.loss, step.probe_grad, step.probe_loss = (
                self.model.grads_and_probe_grads(theta, x, y, w,
                                                 *self.probe.at(torch.arange(n_loc, device=dev))))
            return
        step.probe_grad = theta.new_zeros(theta.shape)
        step.probe_loss = theta.new_zeros(n_loc)
        if len(rows):
            r = torch.as_tensor(rows, dtype=torch.long, device=dev)
            step.probe_grad[r], step.probe_loss[r] = self.model.probe_grads(
                theta[r], *self.probe.at(r))

    def state_dict(self) -> dict:
        return {"book": self.book.state_dict() if self.book is not None else None,
                "trackers": [tr.state_dict() for tr in self.trackers]}

    def load_state_dict(self, state: dict) -> None:
        if self.book is not None:
            self.book.load_state_dict(state["book"])
        for tr, s in zip(self.trackers, state["trackers"], strict=True):
            tr.load_state_dict(s)


class Gossip:
    """W^t as the aggregator mixes it; the exchange of θ^{t+½} (with optim.gossip_state,
    s^{t+½}) and of the trackers' rows; θ^{t+1} = aggregator.combine(W^t, received).
    Routes, W^t[local, held] (the columns of the rows this rank holds after the exchange,
    remapped to its compact block) and the send-first order are built once per step of the
    topology's period (an aggregator only re-weights W, its edges stay). With `reuse`,
    θ^{t+1} is written into a block of its own, reused two steps later."""

    def __init__(self, topology: Topology, layout: Layout, aggregator: Aggregator,
                 optimizer: LocalOptimizer, comm: Comm, dtype: torch.dtype, reuse: bool,
                 after_exchange: Callable[[sparse.csr_array, Tensor, Channel], None] | None
                 = None):
        self.topology, self.layout, self.aggregator = topology, layout, aggregator
        # sees (W^t of the topology, θ^t, the rows received): crafted attacks (optim/attack.py)
        self.after_exchange = after_exchange
        self.optimizer, self.comm, self.dtype, self.reuse = optimizer, comm, dtype, reuse
        self.all_nodes = np.arange(layout.nodes)
        self.mixed_state = optimizer.state_names if optimizer.gossip_state else ()
        self.cached: dict[int, tuple[Route, Tensor, list[np.ndarray]]] = {}
        self.base_W: sparse.csr_array | None = None
        self.channels: list[Channel] = []
        self.pending: PendingExchange | None = None
        self.blocks: list[Tensor] = []  # θ^{t+1}, θ^t (with reuse)

    def _period_key(self, t: int) -> int:
        key = t % self.topology.period
        if key not in self.cached:
            W, lay = self.topology.W_sparse(t), self.layout
            way = route(W, lay)
            self.cached[key] = (way, local_block(W, way, lay, self.dtype, self.comm.device),
                                send_first(way, lay))
        return key

    def observe(self, step: Step) -> None:
        """The proximal influence of step t − 1 that a tracker published at θ^t."""
        if step.proximal is not None:
            self.aggregator.observe(step.t - 1, step.proximal)

    def weights(self, step: Step) -> None:
        self.base_W = self.topology.W_sparse(step.t)
        step.W = self.aggregator.weights(self.base_W)

    def order(self, t: int) -> list[np.ndarray]:
        """The local rows in the order to step them: those peers receive first."""
        return self.cached[self._period_key(t)][2]

    def post(self, step: Step, extra: list[Channel]) -> None:
        """Start the exchange; only the rows the route sends need their values yet."""
        assert step.half is not None
        self.channels = [Channel(self.all_nodes, step.half)] + [
            Channel(self.all_nodes, step.new_state[n]) for n in self.mixed_state] + extra
        way = self.cached[self._period_key(step.t)][0]
        self.pending = self.comm.post(self.layout, self.channels, way)

    def finish(self, step: Step) -> tuple[Tensor, list[Channel]]:
        """(θ^{t+1}, the `extra` channels received); s^{t+1} goes to the optimizer: mixed
        like θ, or each node's own s^{t+½}."""
        assert self.pending is not None
        self.pending.wait()
        cached = self.cached[self._period_key(step.t)][1] if step.W is self.base_W else None
        out = spare_block(self.blocks, step.theta, step.theta) if self.reuse else None
        theta_next = self.aggregator.combine(step.W, self.channels[0], cached, out)
        mixed = len(self.mixed_state)
        self.optimizer.state = ({n: self.aggregator.combine(step.W, ch, cached) for n, ch in
                                 zip(self.mixed_state, self.channels[1:1 + mixed], strict=True)}
                                if mixed else step.new_state)
        step.received = self.channels[0]
        if self.after_exchange is not None:
            assert self.base_W is not None
            self.after_exchange(self.base_W, step.theta, self.channels[0])
        extra = self.channels[1 + mixed:]
        self.channels, self.pending = [], None  # step t's rows: freed before step t + 1's
        return theta_next, extra

    def release(self) -> None:
        self.blocks.clear()


class LocalStep:
    """(Δ^t, s^{t+½}) = optimizer.step(θ^t, s^t, ∇L(θ^t; B^t), t), θ^{t+½} = θ^t + Δ^t of the
    whole block at once; ∇L, Δ^t and s^{t+½} stay on the Step, where trackers read them.
    `ready()` is called when θ^{t+½} is complete."""

    def __init__(self, model: FlatModel, optimizer: LocalOptimizer, local_nodes: np.ndarray):
        self.model, self.optimizer, self.local = model, optimizer, local_nodes

    def run(self, step: Step, order: list[np.ndarray], ready: Callable[[], None]) -> None:
        assert step.batch is not None
        if step.grad is None:  # (the trackers' probe pass may have computed it)
            step.grad, step.loss = self.model.grads(step.theta, *step.batch)
        step.update, step.new_state = self.optimizer.step(step.t, self.local, step.theta,
                                                          step.state, step.grad)
        step.update = self.model.with_running_stats(step.update, step.theta, step.batch[0],
                                                    step.batch[2])
        step.half = step.theta + step.update
        ready()

    def release(self) -> None:
        pass


class ChunkedLocalStep(LocalStep):
    """The same step, group after group of rows in the gossip's send-first order (`ready()`
    after the first: the exchange starts while the others step), each group in chunks of
    `chunk` rows whose ∇L, Δ and θ^{t+½} stay in the caches. θ^{t+½} and s^{t+½} are
    written into blocks reused from step to step (a block past glibc's mmap threshold is
    otherwise mapped, faulted in and zeroed afresh each step); ∇L and Δ are not kept."""

    def __init__(self, model: FlatModel, optimizer: LocalOptimizer, local_nodes: np.ndarray,
                 chunk: int):
        super().__init__(model, optimizer, local_nodes)
        self.chunk = chunk
        self.half: list[Tensor] = []
        self.state: dict[str, list[Tensor]] = {n: [] for n in optimizer.state_names}

    def run(self, step: Step, order: list[np.ndarray], ready: Callable[[], None]) -> None:
        theta = step.theta
        step.half = spare_block(self.half, theta, None)
        # s^{t+½} never into the block that holds s^t
        step.new_state = {n: spare_block(pool, theta, step.state.get(n))
                          for n, pool in self.state.items()}
        step.loss = theta.new_empty(len(theta))
        for i, group in enumerate(order):
            for a in range(0, len(group), self.chunk):
                self._rows(step, group[a:a + self.chunk])
            if i == 0:
                ready()

    def _rows(self, step: Step, rows: np.ndarray) -> None:
        assert step.batch is not None and step.half is not None and step.loss is not None
        r = row_index(rows, step.theta.device)
        x, y, w = step.batch
        theta = step.theta[r]
        g, step.loss[r] = self.model.grads(theta, x[r], y[r], w[r])
        update, new = self.optimizer.step(step.t, self.local[rows], theta,
                                          self.optimizer.rows(r), g)  # Δ_k^t, s_k^{t+½}
        update = self.model.with_running_stats(update, theta, x[r], w[r])
        for n, v in new.items():
            step.new_state[n][r] = v
        step.half[r] = theta + update  # θ^{t+½}

    def release(self) -> None:
        self.half.clear()
        for pool in self.state.values():
            pool.clear()


@dataclass
class LoopParts:
    """What `build_trainer` chose for this run (dicesim.run.engine)."""

    metrics: Metrics
    local: LocalStep
    gossip: Gossip
    tracking: Tracking


class Trainer:
    """Runs a built run's parts over this rank's nodes; see the module docstring."""

    def __init__(self, settings: RunSettings, parts: RunParts, loop: LoopParts, comm: Comm,
                 result: RunResult, log: Callable[[str], None] = print):
        self.settings, self.parts, self.comm, self.log = settings, parts, comm, log
        self.metrics, self.local, self.gossip, self.tracking = (
            loop.metrics, loop.local, loop.gossip, loop.tracking)
        self.result = result
        self.position = Position(parts.theta0)
        self.checkpoints: Checkpoints | None = None  # set by Checkpoints.attach
        self.on_flush: Callable[[RunResult], None] | None = None
        self.clock = StepClock(False)

    @property
    def theta(self) -> Tensor:
        return self.position.theta

    # ---- checkpoint: every stateful part's state ---------------------------------------------
    def stateful(self) -> dict[str, Stateful]:
        p = self.parts
        parts: dict[str, Stateful] = {
            "position": self.position, "metrics": self.metrics, "optimizer": p.optimizer,
            "aggregator": p.aggregator, "tracking": self.tracking}
        if self.comm.rank == 0:  # the rows gathered so far
            parts["result"] = self.result
        return parts

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.stateful().items()}

    def load_state_dict(self, state: dict) -> None:
        parts = self.stateful()
        if "position" not in state and {"step", "theta", "book"} <= set(state):
            state = from_flat_layout(state)
        if set(state) != set(parts):
            raise ConfigError(f"resume: the checkpoint holds {', '.join(sorted(state))}, this "
                              f"dicesim saves {', '.join(sorted(parts))} (a checkpoint of an "
                              "older version); start a new run")
        for name, part in parts.items():
            part.load_state_dict(state[name])
        start = self.position.step
        # a checkpoint written when a signal stopped the run at step t holds the metrics
        # of t, which the resumed loop computes again
        self.result.metrics = [r for r in self.result.metrics if r.step < start]
        self.result.start_step = start

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        warm_up(self.parts, self.settings.batch_size, hvp=bool(self.tracking.trackers))
        self.clock = StepClock(self.comm.world > 1 and torch.get_num_threads() == 1,
                               self.comm.device)
        for t in range(self.position.step, self.settings.steps + 1):
            step = self._observe(t)
            if step is None:  # t = T: θ^T observed
                break
            self.local.run(step, self.gossip.order(t), lambda step=step: self._send(step))
            assert step.loss is not None
            self.metrics.trained(t, step.loss)
            with self.clock.gossip():
                theta_next, received = self.gossip.finish(step)
            self.tracking.after_gossip(step, received)
            self._end_step(t, theta_next)
        return self._finish()

    def _observe(self, t: int) -> Step | None:
        """θ^t: metrics, the stop check, B^t, the trackers' probe pass; W^t. None at t = T."""
        final = t == self.settings.steps
        self.metrics.observe(t, self.theta, final)
        if self.comm.stop_here():  # a signal or a diverged loss: every rank stops at t
            self._stop(t)
        step = Step(t, self.theta)
        if not final:
            inject(self.comm.rank, t, "step")
            step.batch = self.parts.batch(t)
        self.tracking.at_theta(step)
        self.gossip.observe(step)
        if final:
            self.tracking.retire(t)
            return None
        self.gossip.weights(step)
        step.state = self.parts.optimizer.state
        return step

    def _send(self, step: Step) -> None:
        """θ^{t+½} of the rows peers receive is known: the trackers step and the exchange
        starts."""
        self.tracking.local_step(step)
        extra = self.tracking.channels(step)
        with self.clock.gossip():
            self.gossip.post(step, extra)

    def _end_step(self, t: int, theta_next: Tensor) -> None:
        self.position.theta, self.position.step = theta_next, t + 1
        self.tracking.retire(t)
        s = self.settings
        if self.checkpoints is not None and self.checkpoints.due(t + 1) and t + 1 < s.steps:
            self._flush()
            try:
                self.checkpoints.save(self, t + 1)
            except Interrupted as stop:  # one process: the previous checkpoint is kept
                self.clock.stop(self.result)
                raise Stopped.after(stop, t + 1, self.result) from None
        elif self.tracking.flush_due(t + 1):
            self._flush()
        if s.progress and self.comm.rank == 0 and ((t + 1) % max(1, s.steps // 10) == 0
                                                   or t == 0):
            rate = (t + 1 - self.result.start_step) * s.nodes / self.clock.elapsed()
            self.log(f"step {t + 1:>5}/{s.steps}  train_loss "
                     f"{float(self.metrics.train_loss.mean()):.4f}  {rate:,.0f} node-steps/s")

    def _finish(self) -> RunResult:
        """θ^T: the test pass (each node on the evaluation plan's subset, θ̄^T on the whole
        test split), the final parameters gathered to rank 0."""
        result, p, theta = self.result, self.parts, self.theta
        self.clock.stop(result)
        for part in (self.local, self.gossip, p):  # spare blocks go back before the test pass
            part.release()
        if self.tracking.trackers:
            self._flush()
        eval_at = time.perf_counter()
        try:
            acc = accuracy_per_row(p.model, theta, p.node_test)
            gathered = self.comm.gather_to_root((theta.cpu(), acc, p.aggregator.state_dict()))
            if gathered is not None:
                result.final_params = torch.cat([g[0] for g in gathered])
                result.test_acc = [a for g in gathered for a in g[1]]
                result.aggregator = [g[2] for g in gathered]
                theta_bar = result.final_params.mean(0, keepdim=True).to(theta.device)  # θ̄^T
                result.consensus_test_acc = accuracy_per_row(p.model, theta_bar, p.test,
                                                             together=False)[0]
            SIGNALS.check_together("evaluation")  # a signal during rank 0's consensus pass
        except Interrupted as stop:
            raise Stopped.after(stop, self.settings.steps, result) from None
        result.eval_s = time.perf_counter() - eval_at
        return result

    def _stop(self, t: int) -> None:
        """Every rank stops at step t, before any part has worked on it: the finished rows
        are flushed and, after a signal, a checkpoint holds the state at the start of t
        (resume continues exactly); then Stopped is raised (dicesim.common.stopping)."""
        self.clock.stop(self.result)
        if self.tracking.trackers:
            self._flush()
        reason, _ = self.comm.guard.agreed
        if reason == "signal":
            SIGNALS.answered = True  # this stop answers it: the checkpoint below is written
        if reason == "signal" and self.checkpoints is not None and t > self.result.start_step:
            self.checkpoints.save(self, t)
        self.comm.stop(t, self.result)

    def _flush(self) -> None:
        gathered = self.comm.gather_to_root(self.tracking.take())
        if gathered is not None:
            for rows, prox in gathered:
                self.result.influence += rows
                self.result.proximal += prox
            if self.on_flush is not None:
                self.on_flush(self.result)


def warm_up(parts: RunParts, batch_size: int, hvp: bool) -> None:
    """torch.func's first calls cost about a second (tracing, dispatch caches); make them
    before the clock starts so wall_s and node-steps/s measure the steady state. The
    training gradient is taken at the step's own shapes, so its buffers and the thread
    pool exist before the first step too."""
    theta, probe, model = parts.theta0, parts.probe, parts.model
    B, rows = batch_size, len(theta)
    xb, yb = parts.x_train[None, :B], parts.y_train[None, :B]
    w = torch.ones(1, B, dtype=theta.dtype, device=theta.device)
    model.grads(theta, xb.expand(rows, *xb.shape[1:]), yb.expand(rows, B), w.expand(rows, B))
    model.probe_eval(theta[:1], *probe.at(torch.arange(1)))
    if hvp:
        model.probe_grads(theta[:1], *probe.at(torch.arange(1)))
        model.hvps(theta[:1], theta[:1], xb, yb, w)


def from_flat_layout(state: dict) -> dict:
    """A checkpoint of the former layout (the trainer's fields at the top) as one entry per
    stateful part: the same values, so such a run resumes exactly."""
    out = {"position": {"step": state["step"], "theta": state["theta"]},
           "metrics": {"train_loss": state["train_loss"],
                       "loss_reference": state["loss_reference"]},
           "optimizer": state["optimizer"], "aggregator": state["aggregator"],
           "tracking": {"book": state["book"], "trackers": state["trackers"]}}
    if state.get("result") is not None:  # rank 0's rows gathered so far
        out["result"] = state["result"]
    return out


def accuracy_per_row(model: FlatModel, theta: Tensor, test: tuple[Tensor, Tensor],
                     together: bool = True) -> list[float]:
    """Per-row accuracy on `test` (RunParts.node_test: the evaluation plan's subset);
    `together`: every rank makes this pass (False: rank 0 alone)."""
    _, acc = model.probe_eval(theta, *test, interruptible=True, together=together)
    return acc.double().tolist()  # one copy to the host, each value exact
