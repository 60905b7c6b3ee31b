"""ATC decentralized SGD over ranks (DESIGN §1, §3).

Step t on every rank, vectorized over its block of nodes:
  local step  θ_k^{t+½} = θ_k^t + Δ_k^t,  Δ_k^t = −η ∇L(θ_k^t; B_k^t)
  gossip      θ_k^{t+1} = Σ_l W^t[k,l] θ_l^{t+½}   (one buffer per peer rank)
The influence tracker rides along: it records at θ^t, steps its rows with the
same batches and sends them in the same buffers. Without it, the rows that peers
mix are stepped first and their exchange posted; interior rows step while it travels.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dicesim.attack import Attack, build_attack
from dicesim.comm import Channel, Comm, Layout, Route, check_layout, route, send_first
from dicesim.data import (
    Dataset,
    batch_ids_block,  # scale: replaces batch_ids in _batch
    check_batch_size,
    hold_out,
    load_dataset,
    partition,
)
from dicesim.defense import Defense, build_defense
from dicesim.errors import ConfigError
from dicesim.model import FlatModel, Probe, build_model
from dicesim.topology import Topology, build_topology
from dicesim.tracker import Event, InfluenceSettings, InfluenceTracker, build_events

DTYPES = {"float32": torch.float32, "float64": torch.float64}
METRIC_COLUMNS = ("step", "node", "train_loss", "probe_loss", "probe_acc", "consensus_dist")


@dataclass
class RunSettings:
    nodes: int
    steps: int
    batch_size: int
    seed: int
    lr: float
    dtype: torch.dtype
    eval_every: int
    init: str  # "same" | "per_node"
    timeout_s: float
    progress: bool


def number(cfg: Mapping, key: str, kind: type = float, default: object = None,
           minimum: float | None = None) -> int | float:
    """cfg[key] (a dotted key) as int or float, or a ConfigError naming it."""
    value: object = cfg
    for part in key.split("."):
        value = value.get(part, default) if isinstance(value, Mapping) else default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise ConfigError(f"{key}={value}: must be {'an integer' if kind is int else 'a number'}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value}: must be at least {minimum}")
    return kind(value)


def run_settings(cfg: Mapping) -> RunSettings:
    def positive_int(key: str) -> int:
        return number(cfg, key, int, minimum=1)

    dtype = cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype}: choose float32 or float64")
    if cfg["optim"].get("name", "sgd") != "sgd":
        raise ConfigError(f"optim.name={cfg['optim']['name']}: only sgd is implemented")
    lr = number(cfg, "optim.lr")
    if not lr > 0:
        raise ConfigError(f"optim.lr={lr}: must be positive")
    init = cfg.get("init", "same")
    if init not in ("same", "per_node"):
        raise ConfigError(f"init={init}: choose same (one initial θ for all nodes) or per_node")
    timeout = number(cfg, "timeout_s", default=60)
    if timeout <= 0:
        raise ConfigError(f"timeout_s={timeout}: must be positive")
    return RunSettings(
        nodes=positive_int("nodes"), steps=positive_int("steps"),
        batch_size=positive_int("batch_size"), seed=number(cfg, "seed", int, 0), lr=lr,
        dtype=DTYPES[dtype], eval_every=positive_int("eval_every"), init=init,
        timeout_s=timeout, progress=bool(cfg.get("progress", True)),
    )


def resolve_device(cfg: Mapping, local_rank: int) -> tuple[torch.device, str]:
    """(device, backend): gloo on CPU, nccl with one GPU per rank, unless overridden."""
    want_device = cfg.get("device", "auto")
    backend = cfg.get("backend", "auto")
    gpus = torch.cuda.device_count()
    if want_device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={want_device}: choose auto, cpu or cuda")
    if backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"backend={backend}: choose auto, gloo or nccl")
    use_cuda = want_device == "cuda" or (want_device == "auto" and gpus > 0 and backend != "gloo")
    if (use_cuda or backend == "nccl") and gpus == 0:
        raise ConfigError(
            f"{'backend=nccl' if backend == 'nccl' else 'device=cuda'} needs a GPU but none is "
            "visible; use backend=gloo device=cpu"
        )
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend=nccl needs device=cuda (or auto); use backend=gloo on CPU")
    if use_cuda and local_rank >= gpus:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own ({gpus} visible); NCCL needs one GPU "
            f"per rank: use --nproc_per_node={gpus} and more nodes per rank"
        )
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return device, backend


@dataclass
class StepView:
    """What observers see after the exchange of step t (rows of this rank's nodes)."""

    t: int
    W: np.ndarray  # W^t as this rank's nodes mixed with it
    local: np.ndarray
    theta: Tensor  # θ^t
    update: Tensor  # Δ^t
    received: Tensor  # θ^{t+½} of every node this rank received (zero rows elsewhere)
    received_updates: Tensor | None  # Δ^t of every node received (with influence.proximal)
    proximal: np.ndarray | None  # [local k, sender j] proximal influence of step t−1


@dataclass
class RunResult:
    metrics: list[tuple] = field(default_factory=list)
    influence: list[tuple] = field(default_factory=list)
    proximal: list[tuple] = field(default_factory=list)
    final_params: Tensor | None = None  # [nodes, P] on rank 0 (gathered)
    test_acc: list[float] = field(default_factory=list)  # per node, at θ^T
    wall_s: float = 0.0
    gossip_s: float = 0.0  # wall time of the step loop in exchange and mixing
    cpu_s: float = 0.0  # CPU time of this process (all threads) in the step loop
    gossip_cpu_s: float = 0.0  # the part of cpu_s spent on exchange and mixing


class StepClock:
    """Wall and CPU time of the step loop and of its gossip (exchange + mixing) windows.

    On a shared machine the wall time in the exchange is mostly waiting for peers that
    are not scheduled; the CPU time says what communicating itself costs. Gossip CPU is
    the main thread's CPU inside the windows plus, on a multi-rank run with one torch
    thread, every other thread's CPU (there those are gloo's I/O threads)."""

    def __init__(self, others_are_comm: bool):
        self.others_are_comm = others_are_comm  # count threads other than this one as gossip
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
        return time.perf_counter() - self.wall0

    def stop(self, result: RunResult) -> None:
        result.wall_s = self.elapsed()
        result.cpu_s = time.process_time() - self.cpu0
        others = result.cpu_s - (time.thread_time() - self.main0)
        result.gossip_s = self.gossip_wall
        result.gossip_cpu_s = self.gossip_main_cpu + (others if self.others_are_comm else 0.0)


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from returning each freed tensor buffer to the OS.

    By default buffers over ~1 MiB are mmap'ed on allocation and unmapped when freed,
    so every step of a [rows, P] update page-faults its memory in again; on the 2-core
    VM this doubled a 16-node step. A fixed 32 MiB mmap threshold and a 256 MiB trim
    threshold keep those buffers in the heap for reuse. False where libc is not glibc."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError, TypeError):
        return False


class Simulation:
    """Builds and checks everything a run needs before any process group exists, so a bad
    setting stops every rank with the same one-line message."""

    def __init__(self, cfg: Mapping, world: int = 1, rank: int = 0):
        keep_freed_memory()
        self.cfg = cfg
        self.run = run_settings(cfg)
        s = self.run
        check_layout(s.nodes, world)
        self.layout = Layout(s.nodes, world, rank)
        self.topology: Topology = build_topology(cfg["topology"], s.nodes, s.seed)
        self.data: Dataset = load_dataset(cfg["data"], s.seed)
        per_node = len(self.data.y_train) // s.nodes
        if s.batch_size > per_node:
            raise ConfigError(
                f"batch_size={s.batch_size} is larger than a node's local data ({per_node} "
                f"samples with {s.nodes} nodes); lower batch_size or use fewer nodes")
        labels = self.data.y_train.numpy() if self.data.num_classes else np.zeros(
            len(self.data.y_train), dtype=np.int64)
        dcfg = cfg["data"]
        self.parts = partition(labels, s.nodes, dcfg.get("partition", "iid"),
                               float(dcfg.get("alpha", 1.0)), s.seed, min_size=s.batch_size)
        self.node_probe_ids = self._split_node_probes(cfg["data"])
        check_batch_size(self.parts, s.batch_size)
        self.model: FlatModel = build_model(cfg["model"], self.data.input_shape,
                                            self.data.num_classes)
        self.attack: Attack = build_attack(cfg.get("attack"), s.nodes, s.steps, s.seed)
        icfg = cfg.get("influence") or {}
        self.influence = InfluenceSettings(
            hops=number(cfg, "influence.hops", int, 1),
            ground_truth=bool(icfg.get("ground_truth", True)),
            curvature=bool(icfg.get("curvature", True)), proximal=bool(icfg.get("proximal", False)),
            flush_every=number(cfg, "influence.flush_every", int, 50, minimum=1),
        )
        self.events: list[Event] = build_events(
            icfg, nodes=s.nodes, steps=s.steps, batch_size=s.batch_size, parts=self.parts,
            seed=s.seed)
        removals = (cfg.get("counterfactual") or {}).get("remove") or []
        self.removals = build_events({"events": list(removals), "hops": 0}, nodes=s.nodes,
                                     steps=s.steps, batch_size=s.batch_size, parts=self.parts,
                                     seed=s.seed, key="counterfactual.remove")
        self.q = self._node_weights(icfg.get("node_weights"))
        self.defense: Defense = build_defense(cfg.get("defense"), self.attack.nodes, s.nodes,
                                              self.layout.local_nodes, self.influence.proximal)
        self.observers: list[Callable[[StepView], None]] = []
        self.on_flush: Callable[[RunResult], None] | None = None

    def _split_node_probes(self, dcfg: Mapping) -> np.ndarray | None:
        """data.probe=per_node: Z'_k = data.node_probe_size samples held out of node k's own
        data (a local validation split) instead of the shared probe set."""
        mode = dcfg.get("probe", "shared")
        if mode not in ("shared", "per_node"):
            raise ConfigError(f"data.probe={mode}: choose shared or per_node")
        if mode == "shared":
            return None
        m = number(dcfg, "node_probe_size", int, 16, minimum=1)
        smallest = min(len(p) for p in self.parts)
        if m + self.run.batch_size > smallest:
            raise ConfigError(
                f"data.node_probe_size={m}: with batch_size={self.run.batch_size} it needs "
                f"{m + self.run.batch_size} samples per node, the smallest node has {smallest}")
        probes = []
        for k, ids in enumerate(self.parts):
            self.parts[k], probe_ids = hold_out(ids, m, self.run.seed, k)
            probes.append(probe_ids)
        return np.stack(probes)

    def _node_weights(self, given: object) -> np.ndarray:
        n = self.run.nodes
        if given is None:
            return np.full(n, 1.0 / n)
        q = np.asarray(list(given), dtype=np.float64)
        if q.shape != (n,) or (q < 0).any():
            raise ConfigError(f"influence.node_weights: needs {n} non-negative numbers")
        return q

    @property
    def tracking(self) -> bool:
        return bool(self.events) or self.influence.proximal

    def describe(self) -> dict:
        s, lay = self.run, self.layout
        return {
            "nodes": s.nodes, "ranks": lay.world, "nodes_per_rank": lay.nodes_per_rank,
            "steps": s.steps, "params_per_node": self.model.P, "topology": self.topology.name,
            "spectral_gap": self.topology.spectral_gap(), "data": self.data.name,
            "train_samples": len(self.data.y_train), "events": len(self.events),
            "hops": self.influence.hops, "attack": self.attack.kind,
            "defense": self.defense.kind,
        }

    # ---- the run ---------------------------------------------------------------------------
    def execute(self, comm: Comm, log: Callable[[str], None] = print) -> RunResult:
        s, lay, dev = self.run, self.layout, comm.device
        model, data = self.model, self.data
        local = lay.local_nodes
        n_loc = len(local)
        ydt = s.dtype if model.regression else torch.long
        x_train = data.x_train.to(dev, s.dtype)
        y_train = data.y_train.to(dev, ydt)
        x_bad = y_bad = None
        if self.attack.poisons_data:
            ids = np.concatenate([self.parts[k] for k in self.attack.nodes])
            xb, yb = self.attack.poison(data.x_train, data.y_train, ids, data.num_classes, s.seed)
            x_bad, y_bad = xb.to(dev, s.dtype), yb.to(dev, ydt)
        if self.node_probe_ids is None:
            probe = Probe(data.x_probe.to(dev, s.dtype), data.y_probe.to(dev, ydt))
        else:  # Z'_k of each local node, stacked: [local nodes, m, ...]
            ids = torch.as_tensor(self.node_probe_ids[local])
            probe = Probe(data.x_train[ids].to(dev, s.dtype), data.y_train[ids].to(dev, ydt),
                          per_node=True)
        test = (data.x_test.to(dev, s.dtype), data.y_test.to(dev, ydt))
        removals = {(e.source, e.step): e.positions for e in self.removals}
        attacked = np.isin(local, self.attack.nodes)

        # θ^0: the same initial parameters on every node, or one seed per node
        if s.init == "same":
            theta = model.flat_init(s.seed, s.dtype).to(dev).repeat(n_loc, 1)
        else:
            theta = torch.stack([model.flat_init(s.seed * 100003 + int(k), s.dtype)
                                 for k in local]).to(dev)

        effective: dict[int, np.ndarray] = {}  # W^t as mixed here, after the defense

        def W_of(t: int) -> np.ndarray:
            return effective[t] if t in effective else self.topology.W(t)

        tracker = None
        if self.tracking:
            tracker = InfluenceTracker(self.influence, self.events, lay, self.topology, model,
                                       self.q, s.lr, self.attack.update)
            tracker.W_of = W_of
        result = RunResult()
        all_nodes = np.arange(s.nodes)
        self._warm_up(theta, x_train, y_train, probe, tracker is not None)
        routes: dict[int, Route] = {}  # per step of the topology's period
        mixing: dict[int, Tensor] = {}  # W^t[local, :] as a tensor, while no defense alters it
        groups: dict[int, list[np.ndarray]] = {}  # local rows in the order they are stepped
        every = max(1, s.steps // 10)
        train_loss = torch.full((n_loc,), float("nan"))
        clock = StepClock(comm.world > 1 and torch.get_num_threads() == 1)

        for t in range(s.steps + 1):
            final = t == s.steps
            evaluate = final or t % s.eval_every == 0
            if not final:
                inject_fault(comm.rank, t)
                x, y, w = self._batch(t, x_train, y_train, x_bad, y_bad, attacked, removals)
            grad = probe_grad = probe_loss = None
            if tracker is not None:
                # ∇L'_k(θ_k^t), L'_k(θ_k^t) for the rows the tracker reads (zero elsewhere)
                rows = tracker.probe_rows(t)
                if len(rows) == n_loc and not final:  # every row: one pass for both gradients
                    grad, loss, probe_grad, probe_loss = model.grads_and_probe_grads(
                        theta, x, y, w, *probe.at(torch.arange(n_loc, device=dev)))
                else:
                    probe_grad = theta.new_zeros(theta.shape)
                    probe_loss = theta.new_zeros(n_loc)
                    if len(rows):
                        r = torch.as_tensor(rows, dtype=torch.long, device=dev)
                        probe_grad[r], probe_loss[r] = model.probe_grads(theta[r], *probe.at(r))
                tracker.record(t, theta, probe_grad, probe_loss, probe)
                if tracker.last_proximal is not None:
                    self.defense.observe(t - 1, tracker.last_proximal)
            if evaluate:
                self._metrics(t, theta, train_loss, probe, comm, result, final)
            if final:
                break

            key = t % self.topology.period
            base_W = self.topology.W(t)
            if key not in routes:  # routes follow the topology; a defense only re-weights
                routes[key] = route(base_W, lay)
                mixing[key] = torch.as_tensor(base_W[local], dtype=s.dtype, device=dev)
                groups[key] = send_first(routes[key], lay)
            W = effective[t] = self.defense.weights(base_W)
            effective.pop(t - 2, None)
            if tracker is None and len(groups[key]) > 1:
                # the rows peers receive first; the interior ones while those travel
                update, half = torch.empty_like(theta), torch.empty_like(theta)
                loss = theta.new_empty(n_loc)
                channels = [Channel(all_nodes, half)]
                for i, rows in enumerate(groups[key]):
                    r = torch.as_tensor(rows, device=dev)
                    g, loss[r] = model.grads(theta[r], x[r], y[r], w[r])
                    update[r] = self.attack.update(t, local[rows], -s.lr * g)  # Δ_k^t
                    half[r] = theta[r] + update[r]  # θ^{t+½}
                    if i == 0:
                        with clock.gossip():
                            pending = comm.post(lay, channels, routes[key])
            else:
                if grad is None:
                    grad, loss = model.grads(theta, x, y, w)
                update = self.attack.update(t, local, -s.lr * grad)  # Δ_k^t
                if tracker is not None:
                    tracker.local_step(t, theta, update, probe_grad, (x, y, w), probe)
                half = theta + update  # θ^{t+½}
                channels = [Channel(all_nodes, half)]
                if tracker is not None:
                    channels += tracker.channels(t, update)
                with clock.gossip():
                    pending = comm.post(lay, channels, routes[key])
            train_loss = loss.detach().cpu()

            with clock.gossip():
                pending.wait()
                cached = mixing[key] if W is base_W else None
                theta_next = self.defense.aggregate(W, channels[0], cached)  # θ^{t+1}
            if self.observers:
                view = StepView(t, W, local, theta, update, channels[0].available,
                                channels[-1].available if self.influence.proximal else None,
                                tracker.last_proximal if tracker is not None else None)
                for observe in self.observers:
                    observe(view)
            theta = theta_next
            if tracker is not None:
                tracker.after_gossip(t, channels[1:])
                if (t + 1) % self.influence.flush_every == 0:
                    self._flush(tracker, comm, result)
            if s.progress and comm.rank == 0 and ((t + 1) % every == 0 or t == 0):
                rate = (t + 1) * s.nodes / clock.elapsed()
                log(f"step {t + 1:>5}/{s.steps}  train_loss {float(train_loss.mean()):.4f}  "
                    f"{rate:,.0f} node-steps/s")
        clock.stop(result)
        if tracker is not None:
            self._flush(tracker, comm, result)
        acc = self._test_accuracy(theta, test)
        gathered = comm.gather_to_root((theta.cpu(), acc))
        if comm.rank == 0:
            result.final_params = torch.cat([g[0] for g in gathered])
            result.test_acc = [a for g in gathered for a in g[1]]
        return result

    def _batch(self, t: int, x_train: Tensor, y_train: Tensor, x_bad: Tensor | None,
               y_bad: Tensor | None, attacked: np.ndarray,
               removals: dict[tuple[int, int], np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        """B_k^t of every local node as x [n_loc, B, ...], y, and sample weights w (a
        counterfactual removal zeroes a sample's weight; poisoned nodes read poisoned data)."""
        s, local = self.run, self.layout.local_nodes
        ids = batch_ids_block(self.parts, local, s.batch_size, t, s.seed)  # scale: vectorized
        ti = torch.as_tensor(ids, device=x_train.device)
        x, y = x_train[ti], y_train[ti]
        if x_bad is not None and self.attack.active(t) and attacked.any():
            hit = torch.as_tensor(attacked, device=x.device)
            x[hit], y[hit] = x_bad[ti[hit]], y_bad[ti[hit]]
        w = torch.ones(len(local), s.batch_size, dtype=s.dtype, device=x.device)
        for i, k in enumerate(local):
            if (k, t) in removals:
                w[i, torch.as_tensor(removals[(k, t)], device=x.device)] = 0.0
        return x, y, w

    def _warm_up(self, theta: Tensor, x: Tensor, y: Tensor, probe: Probe, hvp: bool) -> None:
        """torch.func's first calls cost about a second (tracing, dispatch caches); make
        them before the clock starts so wall_s and node-steps/s measure the steady state.
        The training gradient is taken at the step's own shapes, so its buffers and the
        thread pool exist before the first step too."""
        B, rows = self.run.batch_size, len(theta)
        xb, yb = x[None, :B], y[None, :B]
        w = torch.ones(1, B, dtype=theta.dtype, device=theta.device)
        self.model.grads(theta, xb.expand(rows, *xb.shape[1:]), yb.expand(rows, B),
                         w.expand(rows, B))
        self.model.probe_eval(theta[:1], *probe.at(torch.arange(1)))
        if hvp:
            self.model.probe_grads(theta[:1], *probe.at(torch.arange(1)))
            self.model.hvps(theta[:1], theta[:1], xb, yb, w)

    def _metrics(self, t: int, theta: Tensor, train_loss: Tensor, probe: Probe,
                 comm: Comm, result: RunResult, final: bool) -> None:
        loss, acc = self.model.probe_eval(theta, probe.x, probe.y, probe.per_node)
        mean = comm.all_sum(theta.sum(0)) / self.run.nodes  # θ̄
        dist = (theta - mean).norm(dim=1)
        rows = [(t, int(k), float(train_loss[i]) if not final else math.nan, float(loss[i]),
                 float(acc[i]), float(dist[i])) for i, k in enumerate(self.layout.local_nodes)]
        gathered = comm.gather_to_root(rows)
        if comm.rank == 0:
            result.metrics += [r for part in gathered for r in part]

    def _flush(self, tracker: InfluenceTracker, comm: Comm, result: RunResult) -> None:
        gathered = comm.gather_to_root(tracker.take_rows())
        if comm.rank == 0:
            for rows, prox in gathered:
                result.influence += rows
                result.proximal += prox
            if self.on_flush is not None:
                self.on_flush(result)

    def _test_accuracy(self, theta: Tensor, test: tuple[Tensor, Tensor]) -> list[float]:
        _, acc = self.model.probe_eval(theta, *test)
        return [float(a) for a in acc]


def inject_fault(rank: int, t: int) -> None:
    """Test hook: DICESIM_FAULT=hang:RANK:STEP or die:RANK:STEP makes that rank stop
    answering (or exit) at that step, to check that its peers give up cleanly."""
    spec = os.environ.get("DICESIM_FAULT")
    if not spec:
        return
    kind, fault_rank, step = spec.split(":")
    if int(fault_rank) == rank and int(step) == t:
        if kind == "die":
            os._exit(1)
        time.sleep(10**6)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
