"""The simulation: everything a run needs, built and checked before any process group
exists (so a bad setting stops every rank with the same one-line message), and the parts
the Trainer (dicesim.run.trainer) passes each step through.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dicesim.comm.exchange import Comm, Layout, check_layout
from dicesim.common.errors import ConfigError
from dicesim.common.stopping import Interrupted, Stopped
from dicesim.config import Config, Data, Influence, Optim
from dicesim.graph.topology import Topology, build_topology
from dicesim.influence.events import Event, EventBook, build_events
from dicesim.influence.trackers import SourcePerturbations, Tracker, TrackerContext, build_trackers
from dicesim.model.data import (
    BatchOrder,
    Dataset,
    check_batch_size,
    flip_labels,
    hold_out,
    load_dataset,
    partition,
)
from dicesim.model.models import FlatModel, Probe, build_model
from dicesim.optim.aggregate import Aggregator, build_aggregator
from dicesim.optim.attack import Attack, CraftedUpdates, build_attack
from dicesim.optim.local import LocalOptimizer, build_optimizer
from dicesim.run.trainer import (
    ChunkedLocalStep,
    Gossip,
    LocalStep,
    LoopParts,
    Metrics,
    RunResult,
    Tracking,
    Trainer,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_ESTIMATORS = ("dice_e", "dice_gauss2")


@dataclass
class RunSettings:
    nodes: int
    steps: int
    batch_size: int
    seed: int
    dtype: torch.dtype
    eval_every: int
    init: str  # "same" | "per_node"
    timeout_s: float
    progress: bool


def run_settings(cfg: Config) -> RunSettings:
    return RunSettings(cfg.nodes, cfg.steps, cfg.batch_size, cfg.seed, DTYPES[cfg.dtype],
                       cfg.eval_every, cfg.init, cfg.timeout_s, cfg.progress)


def resolve_device(cfg: Config, local_rank: int) -> tuple[torch.device, str]:
    """(device, backend): gloo on CPU, nccl with one GPU per rank, unless overridden. The
    pairings gloo + cuda and nccl + cpu were refused by the schema (config.check_device)."""
    want_device, backend = cfg.device, cfg.backend
    gpus = torch.cuda.device_count()
    use_cuda = want_device == "cuda" or (want_device == "auto" and gpus > 0 and backend != "gloo")
    if (use_cuda or backend == "nccl") and gpus == 0:
        raise ConfigError(
            f"{'backend=nccl' if backend == 'nccl' else 'device=cuda'} needs a GPU but none is "
            "visible; use backend=gloo device=cpu"
        )
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend=nccl needs device=cuda (or auto); use backend=gloo on CPU")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not use_cuda:
        return torch.device("cpu"), backend
    return torch.device("cuda", gpu_index(local_rank, gpus)), backend


def gpu_index(local_rank: int, gpus: int, visible: str | None = None) -> int:
    """The GPU of the rank with this LOCAL_RANK among the `gpus` it sees: its own index when
    the ranks of a machine share the GPUs (torchrun), 0 when CUDA_VISIBLE_DEVICES names one
    device (srun --gpus-per-task=1: each rank sees only its own GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    own_gpu_only = gpus == 1 and visible is not None and len(
        [d for d in visible.split(",") if d.strip()]) == 1
    if own_gpu_only:
        return 0
    if local_rank >= gpus:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own ({gpus} visible); NCCL needs one GPU "
            f"per rank: use --nproc_per_node={gpus} and more nodes per rank"
        )
    return local_rank


def configure_device(device: torch.device, allow_tf32: bool) -> None:
    """On CUDA: the current device (NCCL and the object collectives use it) and float32
    matmuls and convolutions in full float32 unless allow_tf32 (TF32 keeps 10 mantissa
    bits: a counterfactual difference of a removed sample drowns in that rounding)."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


# seeds of the evaluation subsets, apart from every other stream drawn from `seed`
TEST_SUBSET_STREAM, PROBE_SUBSET_STREAM = 0x7E57, 0x9B0E


@dataclass(frozen=True)
class EvalPlan:
    """What one per-node evaluation covers (config `eval.budget`, in sample-forwards).

    Every node is evaluated, on the whole split while nodes × samples ≤ budget, else on a
    seeded subset of ⌊budget / nodes⌋ samples shared by every node (`*_ids`, sorted; None:
    all of it). The test split's subset serves the per-node test accuracy at θ^T, the probe
    set's the metrics every `eval_every` steps (for data.probe=per_node: the same positions
    of every Z'_k). The consensus model θ̄^T is evaluated on the whole test split apart
    from this budget (one model, |test| forwards)."""

    budget: int | None
    nodes: int
    test_total: int
    probe_total: int
    test_ids: np.ndarray | None = None
    probe_ids: np.ndarray | None = None

    @property
    def test_samples(self) -> int:
        return self.test_total if self.test_ids is None else len(self.test_ids)

    @property
    def probe_samples(self) -> int:
        return self.probe_total if self.probe_ids is None else len(self.probe_ids)

    def describe(self) -> dict:
        """summary.json's "evaluation" block, less the accuracies."""
        return {"budget": self.budget, "nodes": self.nodes,
                "test_samples": self.test_samples, "test_total": self.test_total,
                "probe_samples": self.probe_samples, "probe_total": self.probe_total}


def eval_subset(total: int, nodes: int, budget: int | None, seed: int,
                stream: int) -> np.ndarray | None:
    """The sorted sample ids each of `nodes` models is evaluated on within `budget`
    sample-forwards; None when every sample fits."""
    if budget is None or nodes * total <= budget:
        return None
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(total, size=budget // nodes, replace=False))


def eval_plan(budget: int | None, nodes: int, test_total: int, probe_total: int,
              seed: int) -> EvalPlan:
    return EvalPlan(budget, nodes, test_total, probe_total,
                    eval_subset(test_total, nodes, budget, seed, TEST_SUBSET_STREAM),
                    eval_subset(probe_total, nodes, budget, seed, PROBE_SUBSET_STREAM))


class Simulation:
    """Builds and checks everything a run needs before any process group exists, so a bad
    setting stops every rank with the same one-line message."""

    def __init__(self, cfg: Config, world: int = 1, rank: int = 0):
        self.cfg = cfg
        self.run = run_settings(cfg)
        s = self.run
        self.optim: Optim = cfg.optim
        check_layout(s.nodes, world)
        self.layout = Layout(s.nodes, world, rank)
        self.topology: Topology = build_topology(cfg.topology, s.nodes, s.seed)
        self.data: Dataset = load_dataset(cfg.data, s.seed)
        self._scale_inputs(cfg.data.input_scale)
        per_node = len(self.data.y_train) // s.nodes
        if s.batch_size > per_node:
            raise ConfigError(
                f"batch_size={s.batch_size} is larger than a node's local data ({per_node} "
                f"samples with {s.nodes} nodes); lower batch_size or use fewer nodes")
        labels = self.data.y_train.numpy() if self.data.num_classes else np.zeros(
            len(self.data.y_train), dtype=np.int64)
        self.assigned_labels = labels  # as the data set labels them (partition.csv)
        self.parts = partition(labels, s.nodes, cfg.data.partition, cfg.data.alpha, s.seed,
                               min_size=s.batch_size,
                               classes_per_node=cfg.data.classes_per_node)
        self.node_probe_ids = self._split_node_probes(cfg.data)
        check_batch_size(self.parts, s.batch_size)
        probe_total = (len(self.data.y_probe) if self.node_probe_ids is None
                       else self.node_probe_ids.shape[1])
        self.evaluation = eval_plan(cfg.eval.budget, s.nodes, len(self.data.y_test),
                                    probe_total, s.seed)
        self._add_label_noise(cfg.data.label_noise)
        self.model: FlatModel = build_model(cfg.model, self.data.input_shape, self.data.num_classes,
                                            self.layout.nodes_per_rank, s.dtype)
        self.attack: Attack = build_attack(cfg.attack, s.nodes, s.seed)
        icfg = cfg.influence
        self.influence = InfluenceSettings(
            hops=icfg.hops, curvature=icfg.curvature, proximal=icfg.proximal,
            flush_every=icfg.flush_every, estimators=tuple(str(e) for e in icfg.estimators))
        self.events: list[Event] = build_events(
            icfg, nodes=s.nodes, steps=s.steps, batch_size=s.batch_size, parts=self.parts,
            seed=s.seed)
        self.influence.ground_truth = self._spot_checks(icfg.ground_truth)
        self.removals = build_events(
            Influence(events=list(cfg.counterfactual.remove), hops=0), nodes=s.nodes,
            steps=s.steps, batch_size=s.batch_size, parts=self.parts, seed=s.seed,
            key="counterfactual.remove")
        self.q = (np.full(s.nodes, 1.0 / s.nodes) if icfg.node_weights is None
                  else np.asarray(icfg.node_weights, dtype=np.float64))
        self.defense_kind = str(cfg.defense.kind)
        from dicesim.influence.attribution import Keeper, attribution_settings

        self.attribution = attribution_settings(cfg.attribution, s.nodes, s.steps)
        # extra trackers (experiments, benchmarks): factories called with the run's parts
        self.extra_trackers: list[Callable[[RunParts], Tracker]] = []
        self.on_parts: list[Callable[[RunParts], None]] = []  # e.g. timing hooks of a bench
        self._check_crafted_attack(cfg)
        if self.attribution.enabled:  # keeps θ every K steps for the reverse pass
            self.extra_trackers.append(lambda parts: Keeper(
                parts.optimizer, self.attribution.keep_every, s.steps))

    def _check_crafted_attack(self, cfg: Config) -> None:
        """alie / ipm keep what the attackers received last step; neither checkpoints nor
        the events' trackers and attribution (JVP, VJP, shadow runs) model that yet. The
        proximal tracker (and so defense=dice) only reads Δ as sent: it runs."""
        if not self.attack.crafts:
            return
        kind = self.attack.kind
        if cfg.checkpoint.every:
            raise ConfigError(f"attack.kind={kind} is not checkpointed yet; set "
                              "checkpoint.every=0")
        if self.events or self.attribution.enabled:
            raise ConfigError(f"attack.kind={kind} does not run with influence events or "
                              "attribution yet; set influence.events=0 and "
                              "attribution.enabled=false (influence.proximal=true runs)")

    def new_aggregator(self) -> Aggregator:
        return build_aggregator(self.cfg.defense, self.attack.nodes, self.run.nodes,
                                self.layout.local_nodes)

    def _split_node_probes(self, dcfg: Data) -> np.ndarray | None:
        """data.probe=per_node: Z'_k = data.node_probe_size samples held out of node k's own
        data (a local validation split) instead of the shared probe set."""
        if dcfg.probe == "shared":
            return None
        m = dcfg.node_probe_size
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

    def _scale_inputs(self, scale: float) -> None:
        """data.input_scale=c multiplies every input (after standardization) by c: η‖x‖²
        grows by c², the knob that decides how far first-order influence is off."""
        if scale != 1:
            d = self.data
            d.x_train, d.x_probe, d.x_test = d.x_train * scale, d.x_probe * scale, d.x_test * scale

    def _add_label_noise(self, given: list[float] | None) -> None:
        """data.label_noise=[p_0, …]: node k's training labels are wrong for a fraction p_k
        of its samples (data of graded quality, e.g. `make contribution`)."""
        if given is None:
            return
        classes = self.data.num_classes
        p = np.asarray(given, dtype=float)
        if classes < 2:
            raise ConfigError("data.label_noise needs a classification data set (e.g. "
                              "data=digits)")
        self.data.y_train = flip_labels(self.data.y_train, self.parts, p, classes, self.run.seed)

    def _spot_checks(self, given: object) -> set[int] | None:
        """influence.ground_truth: true (every event), false (none) or K (K of the events,
        drawn at random: a measured error bar for a long run). The event indices, or None
        for every event."""
        n = len(self.events)
        if isinstance(given, bool):
            return None if given else set()
        if not isinstance(given, int) or not 0 <= given <= max(n, 0):
            raise ConfigError(f"influence.ground_truth={given}: true, false or a number of "
                              f"events to spot-check from 0 to influence.events ({n})")
        if given >= n:
            return None
        rng = np.random.default_rng([self.run.seed, 5381])
        return {int(i) for i in rng.choice(n, size=given, replace=False)}

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
            "defense": self.defense_kind,
        }

    # ---- the parts of one run ------------------------------------------------------------------
    def execute(self, comm: Comm, log: Callable[[str], None] = print,
                checkpoints=None, on_flush: Callable[[RunResult], None] | None = None
                ) -> RunResult:
        trainer = build_trainer(self, comm, log)
        trainer.on_flush = on_flush
        if checkpoints is not None:
            checkpoints.attach(trainer)
        result = trainer.run()
        if self.attribution.enabled:  # the reverse pass: dicesim/influence/attribution.py
            from dicesim.influence.attribution import reverse_pass

            try:
                result.attribution = reverse_pass(self, trainer)
            except Interrupted as stop:
                raise Stopped.after(stop, self.run.steps, result) from None
        return result


def build_trainer(sim: Simulation, comm: Comm, log: Callable[[str], None] = print) -> Trainer:
    """The run's parts on this rank's device and the loop's parts they call for: without
    trackers a local step in send-first groups of cache-sized chunks, and blocks reused
    from step to step (θ^{t+½}, s^{t+½}, θ^{t+1}, the batch); with trackers the whole block
    at once, every tensor fresh (trackers may keep them)."""
    s, lay = sim.run, sim.layout
    parts = RunParts(sim, comm.device)
    untracked = not parts.trackers
    result = RunResult()
    if untracked:
        local: LocalStep = ChunkedLocalStep(parts.model, parts.optimizer, lay.local_nodes,
                                            parts.model.rows_per_chunk(s.batch_size))
    else:
        local = LocalStep(parts.model, parts.optimizer, lay.local_nodes)
    loop = LoopParts(
        metrics=Metrics(parts.model, parts.metric_probe, lay, s.eval_every, comm, result),
        local=local,
        gossip=Gossip(sim.topology, lay, parts.aggregator, parts.optimizer, comm, s.dtype,
                      reuse=untracked,
                      after_exchange=parts.crafted.observe if parts.crafted else None),
        tracking=Tracking(parts.trackers, parts.book, parts.sources, parts.model, parts.probe,
                          sim.influence.flush_every))
    return Trainer(s, parts, loop, comm, result, log)


@dataclass
class InfluenceSettings:
    hops: int = 1
    curvature: bool = True
    proximal: bool = False
    flush_every: int = 50
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    ground_truth: set[int] | None = None  # events with ground truth; None: every event

    @property
    def any_ground_truth(self) -> bool:
        return self.ground_truth is None or bool(self.ground_truth)


def _gather(source: Tensor, index: Tensor, spare: Tensor | None) -> Tensor:
    """source[index], into `spare` when it has the shape, dtype and device of the result."""
    shape = (*index.shape, *source.shape[1:])
    if spare is None or (spare.shape, spare.dtype, spare.device) != (
            shape, source.dtype, source.device):
        return source[index]
    torch.index_select(source, 0, index.reshape(-1), out=spare.view(-1, *source.shape[1:]))
    return spare


class RunParts:
    """One run's data on the device, its initial θ, and its parts: local optimizer,
    aggregator, event book and trackers (fresh state for every run)."""

    def __init__(self, sim: Simulation, device: torch.device):
        s, lay, data = sim.run, sim.layout, sim.data
        self.sim, self.model, self.device = sim, sim.model, device
        local = lay.local_nodes
        ydt = s.dtype if self.model.regression else torch.long
        self.x_train = data.x_train.to(device, s.dtype)
        self.y_train = data.y_train.to(device, ydt)
        self.x_bad = self.y_bad = None
        attack = sim.attack
        if attack.poisons_data:
            ids = np.concatenate([sim.parts[k] for k in attack.nodes])
            xb, yb = attack.poison(data.x_train, data.y_train, ids, data.num_classes, s.seed)
            self.x_bad, self.y_bad = xb.to(device, s.dtype), yb.to(device, ydt)
        if sim.node_probe_ids is None:
            self.probe = Probe(data.x_probe.to(device, s.dtype), data.y_probe.to(device, ydt))
        else:  # Z'_k of each local node, stacked: [local nodes, m, ...]
            ids = torch.as_tensor(sim.node_probe_ids[local])
            self.probe = Probe(data.x_train[ids].to(device, s.dtype),
                               data.y_train[ids].to(device, ydt), per_node=True)
        self.test = (data.x_test.to(device, s.dtype), data.y_test.to(device, ydt))
        plan = sim.evaluation
        self.node_test = self.test  # what each node's test accuracy is measured on
        if plan.test_ids is not None:
            ids = torch.as_tensor(plan.test_ids, device=device)
            self.node_test = (self.test[0][ids], self.test[1][ids])
        # the probe samples of the metrics every eval_every steps: x, y, per node
        self.metric_probe = (self.probe.x, self.probe.y, self.probe.per_node)
        if plan.probe_ids is not None:
            ids = torch.as_tensor(plan.probe_ids, device=device)
            cut = (slice(None), ids) if self.probe.per_node else (ids,)
            self.metric_probe = (self.probe.x[cut], self.probe.y[cut], self.probe.per_node)
        self.order = BatchOrder(sim.parts, s.batch_size, s.seed)  # every node's batches
        row_of = {int(k): i for i, k in enumerate(local)}
        self.removals: dict[int, list[tuple[int, list[int]]]] = {}  # t → (local row, positions)
        for e in sim.removals:
            if e.source in row_of:
                self.removals.setdefault(e.step, []).append((row_of[e.source], e.positions))
        self.reused: tuple[Tensor, Tensor] | None = None  # x, y of the last batch, to reuse
        self.attacked = np.isin(local, attack.nodes)
        # θ^0: the same initial parameters on every node, or one seed per node
        if s.init == "same":
            self.theta0 = self.model.flat_init(s.seed, s.dtype).to(device).repeat(len(local), 1)
        else:
            self.theta0 = torch.stack([self.model.flat_init(s.seed * 100003 + int(k), s.dtype)
                                       for k in local]).to(device)

        self.crafted = CraftedUpdates(attack, local) if attack.crafts else None
        tamper = self.crafted.update if self.crafted is not None else attack.update
        self.optimizer: LocalOptimizer = build_optimizer(sim.optim, s.steps, tamper)
        self.optimizer.init_state(self.theta0)
        self.aggregator = sim.new_aggregator()
        inf = sim.influence
        # with optimizer state a node stays perturbed after θ's perturbation moved on
        self.book = (EventBook(sim.events, inf.hops, lay, sim.topology,
                               cumulative=self.optimizer.stateful) if sim.events else None)
        self.trackers: list[Tracker] = build_trackers(TrackerContext(
            self.book, lay, self.model, self.probe, sim.q, self.optimizer, inf))
        self.sources = (SourcePerturbations(lay, self.model, self.optimizer)
                        if self.book is not None else None)
        self.trackers += [make(self) for make in sim.extra_trackers]
        # without trackers nothing holds a batch past its step: each is written into the
        # last one's blocks (a large run's x block is otherwise mapped, faulted in and
        # zeroed afresh every step)
        self.reuse_batches = not self.trackers
        for hook in sim.on_parts:
            hook(self)

    def batch(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """B_k^t of every local node as x [n_loc, B, ...], y, and sample weights w (a
        counterfactual removal zeroes a sample's weight; poisoned nodes read poisoned data).
        With `reuse_batches`, x and y are written into the blocks of the last batch (w,
        [rows, B], is small)."""
        sim = self.sim
        s, local = sim.run, sim.layout.local_nodes
        ids = self.order.ids(t, local)  # = batch_ids(parts[k], B, t, seed, k) per node k
        ti = torch.as_tensor(ids, device=self.device)
        spare = self.reused if self.reuse_batches else None
        x = _gather(self.x_train, ti, spare and spare[0])
        y = _gather(self.y_train, ti, spare and spare[1])
        if self.x_bad is not None and sim.attack.active(t) and self.attacked.any():
            hit = torch.as_tensor(self.attacked, device=x.device)
            x[hit], y[hit] = self.x_bad[ti[hit]], self.y_bad[ti[hit]]
        w = torch.ones(len(local), s.batch_size, dtype=s.dtype, device=x.device)
        for i, positions in self.removals.get(t, ()):
            w[i, torch.as_tensor(positions, device=x.device)] = 0.0
        if self.reuse_batches:
            self.reused = (x, y)
        return x, y, w

    def release(self) -> None:
        self.reused = None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
