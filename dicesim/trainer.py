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
Without trackers, the rows that peers mix are stepped first and their exchange posted;
interior rows step while it travels.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from dicesim.comm import Channel, Comm, Route, index_tensor, route, send_first, sparse_tensor
from dicesim.events import Event, InfluenceRow, ProximalRow
from dicesim.faults import inject
from dicesim.optim import State
from dicesim.stopping import SIGNALS, Interrupted, Stopped

if TYPE_CHECKING:
    from scipy import sparse


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
    received: Tensor | None = None  # θ^{t+½} of every node received (zero rows elsewhere)
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
    attribution: object | None = None  # dicesim.attribution.Attribution (rank 0)

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


class Blocks:
    """[rows, P] blocks the untracked step writes every step, reused from step to step
    instead of allocated: a block past the allocator's reuse limit (32 MB) is mapped
    afresh each time and its pages faulted in and zeroed (at 16,384 nodes × 4,810
    parameters, 315 MB a block and about 8 µs a node-step). Only blocks the loop made
    come back (`give`): θ^0, a resumed θ and the initial optimizer state stay untouched."""

    def __init__(self) -> None:
        self.free: dict[str, list[Tensor]] = {}

    def take(self, kind: str, like: Tensor) -> Tensor:
        spares = self.free.get(kind, [])
        while spares:
            block = spares.pop()
            if (block.shape, block.dtype, block.device) == (like.shape, like.dtype, like.device):
                return block
        return torch.empty_like(like)

    def give(self, kind: str, block: Tensor) -> None:
        self.free.setdefault(kind, []).append(block)


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


class Trainer:
    """Runs a built Simulation's parts over this rank's nodes; see the module docstring."""

    def __init__(self, sim, comm: Comm, log: Callable[[str], None] = print):
        self.sim, self.comm, self.log = sim, comm, log
        self.parts = sim.parts_for(comm.device)
        self.result = RunResult()
        self.train_loss = torch.full((sim.layout.nodes_per_rank,), float("nan"))
        self.start = 0  # the first step to run (a resumed run starts later)
        self.theta = self.parts.theta0
        self.checkpoints = None  # set by the caller: dicesim.checkpoint.Checkpoints
        self.on_flush: Callable[[RunResult], None] | None = None

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        p = self.parts
        return {"step": self.start, "theta": self.theta, "train_loss": self.train_loss,
                "loss_reference": dict(self.comm.guard.initial),  # the divergence rule's
                "optimizer": p.optimizer.state_dict(), "aggregator": p.aggregator.state_dict(),
                "book": p.book.state_dict() if p.book is not None else None,
                "trackers": [tr.state_dict() for tr in p.trackers],
                "result": self.result.state_dict() if self.comm.rank == 0 else None}

    def load_state_dict(self, state: dict) -> None:
        p = self.parts
        self.start = int(state["step"])
        # every tensor is on comm.device already (checkpoint.on_device) but the last training
        # losses, kept on the host where the divergence rule and the metrics read them
        self.theta = state["theta"]
        self.train_loss = state["train_loss"]
        self.comm.guard.initial = {int(k): float(v) for k, v in state["loss_reference"].items()}
        p.optimizer.load_state_dict(state["optimizer"])
        p.aggregator.load_state_dict(state["aggregator"])
        if p.book is not None:
            p.book.load_state_dict(state["book"])
        for tr, s in zip(p.trackers, state["trackers"], strict=True):
            tr.load_state_dict(s)
        if state["result"] is not None:
            self.result.load_state_dict(state["result"])
            # a checkpoint written when a signal stopped the run at step t holds the
            # metrics of t, which the resumed loop computes again
            self.result.metrics = [r for r in self.result.metrics if r.step < self.start]
        self.result.start_step = self.start

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        sim, comm, p = self.sim, self.comm, self.parts
        s, lay, dev = sim.run, sim.layout, comm.device
        model, optimizer, aggregator, trackers, book = (p.model, p.optimizer, p.aggregator,
                                                        p.trackers, p.book)
        local, n_loc = lay.local_nodes, lay.nodes_per_rank
        all_nodes = np.arange(s.nodes)
        result = self.result
        sim.warm_up(p, bool(trackers))
        routes: dict[int, Route] = {}  # per step of the topology's period
        mixing: dict[int, Tensor] = {}  # W^t[local, :] (sparse), while no aggregator alters it
        groups: dict[int, list[np.ndarray]] = {}  # local rows in the order they are stepped
        every = max(1, s.steps // 10)
        clock = StepClock(comm.world > 1 and torch.get_num_threads() == 1, dev)
        chunk = model.rows_per_chunk(s.batch_size)  # rows a cache-sized local step takes
        theta = self.theta
        blocks = Blocks()  # the untracked step's θ^{t+½}, s^{t+½} and θ^{t+1}, reused
        made_theta = made_state = False  # θ^t / s^t came from `blocks` (may go back)

        for t in range(self.start, s.steps + 1):
            final = t == s.steps
            step = Step(t, theta)
            if final or t % s.eval_every == 0:
                self._metrics(t, theta, final)
            if comm.stop_here():  # a signal or a diverged loss: every rank stops at t
                self._stop(t, clock)
            if not final:
                inject(comm.rank, t, "step")
                step.batch = p.batch(t, reuse=not trackers)  # trackers may keep batches
            if trackers:
                self._probe_grads(step)
                for tr in trackers:
                    tr.at_theta(step)
                if step.proximal is not None:
                    aggregator.observe(t - 1, step.proximal)
            if final:
                if book is not None:
                    book.retire(t)
                break

            key = t % sim.topology.period
            base_W = sim.topology.W_sparse(t)
            if key not in routes:  # routes follow the topology; an aggregator only re-weights
                routes[key] = route(base_W, lay)
                mixing[key] = sparse_tensor(base_W[local], s.dtype, dev)
                groups[key] = send_first(routes[key], lay)
            step.W = aggregator.weights(base_W)
            x, y, w = step.batch
            step.state = optimizer.state
            mixed_state = optimizer.state_names if optimizer.gossip_state else ()
            fast = not trackers and (len(groups[key]) > 1 or n_loc > chunk)
            if fast:
                # the rows peers receive first; the interior ones while those travel. Each
                # group in chunks of rows: ∇L, Δ and θ^{t+½} of a chunk stay in the caches
                half = blocks.take("half", theta)
                step.new_state = {n: blocks.take(n, theta) for n in optimizer.state_names}
                loss = theta.new_empty(n_loc)
                channels = [Channel(all_nodes, half)] + [
                    Channel(all_nodes, step.new_state[n]) for n in mixed_state]
                for i, group in enumerate(groups[key]):
                    for rows in (group[a:a + chunk] for a in range(0, len(group), chunk)):
                        r = row_index(rows, dev)
                        g, loss[r] = model.grads(theta[r], x[r], y[r], w[r])
                        update, new = optimizer.step(t, local[rows], theta[r],
                                                     optimizer.rows(r), g)  # Δ_k^t, s_k^{t+½}
                        for n, v in new.items():
                            step.new_state[n][r] = v
                        half[r] = theta[r] + update  # θ^{t+½}
                    if i == 0:
                        with clock.gossip():
                            pending = comm.post(lay, channels, routes[key])
                step.half = half  # (step.update, Δ^t, is read by trackers only)
            else:
                grad, loss = step.grad, step.loss
                if grad is None:
                    grad, loss = model.grads(theta, x, y, w)
                    step.grad, step.loss = grad, loss
                # Δ_k^t, s_k^{t+½}
                step.update, step.new_state = optimizer.step(t, local, theta, step.state, grad)
                step.half = theta + step.update  # θ^{t+½}
                if book is not None:
                    step.started = book.start(t)
                    step.sources = p.sources(step)
                for tr in trackers:
                    tr.local_step(step)
                channels = [Channel(all_nodes, step.half)] + [
                    Channel(all_nodes, step.new_state[n]) for n in mixed_state]
                spans = []
                for tr in trackers:
                    mine = tr.channels(step)
                    spans.append((len(channels), len(channels) + len(mine)))
                    channels += mine
                with clock.gossip():
                    pending = comm.post(lay, channels, routes[key])
            self.train_loss = loss.detach().cpu()
            comm.guard.observe(t, local, self.train_loss, "training")  # divergence rule

            grad = g = update = None  # ∇L(θ^t; B^t) is spent: freed before θ^{t+1} is made
            with clock.gossip():
                pending.wait()
                cached = mixing[key] if step.W is base_W else None
                theta_next = aggregator.combine(  # θ^{t+1}
                    step.W, channels[0], cached, blocks.take("theta", theta) if fast else None)
                # s^{t+1}: mixed like θ, or each node's own s^{t+½}
                state_before = optimizer.state
                optimizer.state = ({n: aggregator.combine(step.W, ch, cached) for n, ch in
                                    zip(mixed_state, channels[1:1 + len(mixed_state)],
                                        strict=True)} if mixed_state else step.new_state)
            if fast:  # nothing holds these any more: the next step writes into them
                blocks.give("half", step.half)
                if made_theta:
                    blocks.give("theta", theta)
                if made_state:
                    for n, block in state_before.items():
                        blocks.give(n, block)
                for n, block in step.new_state.items():  # mixed: s^{t+½} is spent too
                    if n in mixed_state:
                        blocks.give(n, block)
            made_theta, made_state = fast, fast and not mixed_state
            state_before = None
            step.received = channels[0].available
            for tr, (a, b) in zip(trackers, spans if trackers else [], strict=True):
                tr.after_gossip(step, channels[a:b])
            theta = self.theta = theta_next
            step = channels = pending = None  # step t's rows: freed before step t + 1's
            self.start = t + 1
            if book is not None:
                book.retire(t)
            flush = trackers and (t + 1) % sim.influence.flush_every == 0
            if self.checkpoints is not None and self.checkpoints.due(t + 1) and t + 1 < s.steps:
                self._flush()
                try:
                    self.checkpoints.save(self, t + 1)
                except Interrupted as stop:  # one process: the previous checkpoint is kept
                    clock.stop(result)
                    raise Stopped.after(stop, t + 1, result) from None
            elif flush:
                self._flush()
            if s.progress and comm.rank == 0 and ((t + 1) % every == 0 or t == 0):
                rate = (t + 1 - result.start_step) * s.nodes / clock.elapsed()
                self.log(f"step {t + 1:>5}/{s.steps}  train_loss "
                         f"{float(self.train_loss.mean()):.4f}  {rate:,.0f} node-steps/s")
        clock.stop(result)
        blocks.free.clear()  # the spare blocks go back to the system before the test pass
        p.reused = None
        if trackers:
            self._flush()
        eval_at = time.perf_counter()
        try:
            acc = sim.test_accuracy(model, theta, p.node_test)
            gathered = comm.gather_to_root((theta.cpu(), acc, aggregator.state_dict()))
            if comm.rank == 0:
                result.final_params = torch.cat([g[0] for g in gathered])
                result.test_acc = [a for g in gathered for a in g[1]]
                result.aggregator = [g[2] for g in gathered]
                theta_bar = result.final_params.mean(0, keepdim=True).to(theta.device)  # θ̄^T
                result.consensus_test_acc = sim.test_accuracy(model, theta_bar, p.test,
                                                              together=False)[0]
            SIGNALS.check_together("evaluation")  # a signal during rank 0's consensus pass
        except Interrupted as stop:
            raise Stopped.after(stop, s.steps, result) from None
        result.eval_s = time.perf_counter() - eval_at
        return result

    def _stop(self, t: int, clock: StepClock) -> None:
        """Every rank stops at step t, before any part has worked on it: the finished rows
        are flushed and, after a signal, a checkpoint holds the state at the start of t
        (resume continues exactly); then Stopped is raised (dicesim.stopping)."""
        clock.stop(self.result)
        if self.parts.trackers:
            self._flush()
        reason, _ = self.comm.guard.agreed
        if reason == "signal":
            SIGNALS.answered = True  # this stop answers it: the checkpoint below is written
        if reason == "signal" and self.checkpoints is not None and t > self.result.start_step:
            self.checkpoints.save(self, t)
        self.comm.stop(t, self.result)

    def _probe_grads(self, step: Step) -> None:
        """∇L'_k(θ_k^t), L'_k(θ_k^t) of the rows some tracker reads (zero elsewhere); when
        every row is read on a training step, one pass gives the batch gradient too."""
        p, theta, t = self.parts, step.theta, step.t
        n_loc, dev = len(theta), theta.device
        rows = np.unique(np.concatenate([tr.probe_rows(t) for tr in p.trackers]))
        if len(rows) == n_loc and step.batch is not None:
            x, y, w = step.batch
            step.grad, step.loss, step.probe_grad, step.probe_loss = (
                p.model.grads_and_probe_grads(theta, x, y, w,
                                              *p.probe.at(torch.arange(n_loc, device=dev))))
            return
        step.probe_grad = theta.new_zeros(theta.shape)
        step.probe_loss = theta.new_zeros(n_loc)
        if len(rows):
            r = torch.as_tensor(rows, dtype=torch.long, device=dev)
            step.probe_grad[r], step.probe_loss[r] = p.model.probe_grads(theta[r], *p.probe.at(r))

    def _metrics(self, t: int, theta: Tensor, final: bool) -> None:
        sim, comm, p = self.sim, self.comm, self.parts
        loss, acc = p.model.probe_eval(theta, *p.metric_probe)  # within eval.budget
        comm.guard.observe(t, sim.layout.local_nodes, loss, "probe")  # divergence rule
        mean = comm.all_sum(theta.sum(0)) / sim.run.nodes  # θ̄
        dist = (theta - mean).norm(dim=1)
        tl = self.train_loss.tolist()
        # one copy to the host for every row (a float() per value would wait for the device
        # 3 × rows times); float64 holds each value exactly
        probe_loss, probe_acc, dists = torch.stack([loss.double(), acc.double(),
                                                    dist.double()]).tolist()
        rows = [MetricRow(t, int(k), tl[i] if not final else math.nan, probe_loss[i],
                          probe_acc[i], dists[i])
                for i, k in enumerate(sim.layout.local_nodes)]
        gathered = comm.gather_to_root(rows)
        if comm.rank == 0:
            self.result.metrics += [r for part in gathered for r in part]

    def _flush(self) -> None:
        p = self.parts
        rows = p.book.take_rows() if p.book is not None else []
        prox = [r for tr in p.trackers for r in tr.take_proximal()]
        gathered = self.comm.gather_to_root((rows, prox))
        if self.comm.rank == 0:
            for rows, prox in gathered:
                self.result.influence += rows
                self.result.proximal += prox
            if self.on_flush is not None:
                self.on_flush(self.result)
