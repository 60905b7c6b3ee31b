"""The settings: one typed path from the command line to the objects every builder takes.

The dataclasses below are registered with Hydra's ConfigStore (`dicesim_schema`, the first
entry of configs/config.yaml's defaults, and one schema per group option that has keys of
its own, named in that option's YAML defaults), so Hydra composes typed: an unknown key, a
value of the wrong type or a choice that is not one of an Enum's members fails while
composing. `load` turns the composed tree into a `Config` (`OmegaConf.to_object`), whose
`__post_init__` checks ranges and cross-field rules; `variant` (a changed copy) goes
through the same check. Every failure is a ConfigError of one line:
`<dotted key>=<value>: <what is wrong>; <how to fix it>`.

An experiment block (`alignment:`, `retrain:`, … — set only by an experiment= preset) is the
exception: its dataclass and its rules live in the preset's driver module, which registers
them (`register_block`); the root holds the block untyped, and `load` imports the driver by
name and types the block with its schema before anything else, with the same messages.

To add a key: a field (its default, a comment) in its section below (an experiment block's:
in its driver module), with `bounded(…)` for a range or a rule in the section's `check_*`
for a cross-field one; its use; its line in docs/config-schema.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dicesim.common.errors import ConfigError
from dicesim.common.graphfile import infer_nodes

# ---------------------------------------------------------------- choices


def _choices(name: str, *values: str) -> type[StrEnum]:
    return StrEnum(name, {v: v for v in values})  # member names are the values users type


Dtype = _choices("Dtype", "float32", "float64")
Device = _choices("Device", "auto", "cpu", "cuda")
Backend = _choices("Backend", "auto", "gloo", "nccl")
Init = _choices("Init", "same", "per_node")
TopologyName = _choices("TopologyName", "ring", "directed_ring", "torus", "exponential",
                        "one_peer_exponential", "complete", "star", "erdos_renyi",
                        "small_world", "hub", "file")
Weights = _choices("Weights", "uniform", "metropolis_hastings")
DataName = _choices("DataName", "digits", "fashion_mnist", "synthetic", "mnist", "cifar10",
                    "cifar100")
Partition = _choices("Partition", "iid", "dirichlet", "label_skew")
Probe = _choices("Probe", "shared", "per_node")
Task = _choices("Task", "classification", "regression")
ModelName = _choices("ModelName", "logreg", "linear", "mlp", "cnn", "resnet", "vit", "custom")
Norm = _choices("Norm", "group", "none", "batch")  # batch: refused until buffers are supported
CifarLabels = _choices("CifarLabels", "fine", "coarse")
Activation = _choices("Activation", "gelu", "relu", "sigmoid", "tanh")
OptimName = _choices("OptimName", "sgd", "adam", "adamw")
ScheduleName = _choices("ScheduleName", "constant", "cosine", "step", "linear_warmup_cosine")
AttackKind = _choices("AttackKind", "none", "label_flip", "feature_noise", "free_rider",
                      "scaled_update", "alie", "ipm")
DefenseKind = _choices("DefenseKind", "none", "dice", "trimmed_mean", "oracle")

DTYPES, TOPOLOGIES, WEIGHT_SCHEMES = tuple(Dtype), tuple(TopologyName), tuple(Weights)
DATASETS, MODELS, ACTIVATIONS = tuple(DataName), tuple(ModelName), tuple(Activation)
ATTACKS, DEFENSES = tuple(AttackKind), tuple(DefenseKind)
ESTIMATORS = ("dice_e", "dice_mid", "dice_gauss2", "dice_e_nostate")  # influence.estimators
DIRECTED = ("directed_ring", "exponential", "one_peer_exponential")  # no metropolis_hastings
RENAMED_ESTIMATORS = {"dice_mid2": "dice_gauss2"}  # old name → new; accepted until next release
MAX_HOPS = 8
SEED_MAX = 2**32 - 1
EVENT_KEYS = ("node", "step", "samples")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def default_list(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))


def bounded(default: Any, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False,
            open_hi: bool = False) -> Any:
    """A field whose value (unless null) is finite and in [lo, hi] ("(" with open_lo, ")"
    with open_hi); `check_ranges` checks it, naming the key."""
    return field(default=default, metadata={"range": (lo, hi, open_lo, open_hi)})


def check_ranges(section: Any, where: str = "") -> None:
    """Every bounded field of a section and of the sections inside it."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif "range" in f.metadata and value is not None:
            lo, hi, open_lo, open_hi = f.metadata["range"]
            ok = math.isfinite(value) and (value > lo if open_lo else value >= lo) and (
                value < hi if open_hi else value <= hi)
            if not ok:
                example = f.default if f.default is not None else lo
                raise ConfigError(f"{key}={show(value)}: must be {_span(lo, hi, open_lo, open_hi)}"
                                  f"; set e.g. {key}={show(example)}")


def _span(lo: float, hi: float, open_lo: bool, open_hi: bool) -> str:
    if hi == math.inf:
        if lo == -math.inf:
            return "a finite number"
        return f"{'greater than' if open_lo else 'at least'} {show(lo)}, finite"
    return f"in {'(' if open_lo else '['}{show(lo)}, {show(hi)}{')' if open_hi else ']'}"


# ---------------------------------------------------------------- sections

@dataclass
class Topology:
    """configs/topology/*.yaml; options with keys of their own subclass it."""

    name: TopologyName = TopologyName.ring
    weights: Weights = Weights.uniform  # hub and a matrix file: uniform only


@dataclass
class TorusTopology(Topology):
    rows: int | None = bounded(None, 1)  # null: the divisor of nodes closest to sqrt(nodes)


@dataclass
class StarTopology(Topology):
    center: int = 0


@dataclass
class ErdosRenyiTopology(Topology):
    p: float = bounded(0.3, 0, 1, open_lo=True)  # edge probability; redrawn until connected


@dataclass
class SmallWorldTopology(Topology):
    k: int = bounded(4, 2)  # each node starts joined to its k nearest ring neighbours
    beta: float = bounded(0.2, 0, 1)  # rewiring probability


@dataclass
class HubTopology(Topology):
    hub: int = 0
    hub_weight: float = bounded(0.5, 0, 1, open_lo=True, open_hi=True)  # a leaf's to the hub


@dataclass
class FileTopology(Topology):
    path: str | None = None  # W as .npy ([n, n] or [T, n, n]), .csv or sparse .npz
    directed: bool = False  # an edge list's `src dst` lines: true = src sends to dst only


TOPOLOGY_SCHEMAS: dict[str, type[Topology]] = {
    "torus": TorusTopology, "star": StarTopology, "erdos_renyi": ErdosRenyiTopology,
    "small_world": SmallWorldTopology, "hub": HubTopology, "file": FileTopology,
}


@dataclass
class Data:
    """configs/data/*.yaml: the keys every data set has."""

    name: DataName = DataName.digits
    partition: Partition = Partition.iid
    alpha: float = bounded(1.0, 0, open_lo=True)  # Dirichlet concentration
    classes_per_node: int = bounded(2, 1)  # label_skew: the classes each node holds
    probe_size: int = bounded(200, 1)
    max_train: int | None = bounded(None, 1)
    max_test: int | None = bounded(None, 1)
    image: bool = False
    standardize: bool = True
    probe: Probe = Probe.shared
    node_probe_size: int = bounded(16, 1)
    label_noise: list[float] | None = None  # per-node fractions of wrong training labels
    input_scale: float = bounded(1.0, 0, open_lo=True)  # every input (standardized) times this


@dataclass
class DigitsData(Data):
    test_size: float = bounded(0.2, 0, 1, open_lo=True, open_hi=True)  # held out for test


@dataclass
class FileData(Data):
    """fashion_mnist, mnist, cifar10, cifar100: read from files under root (official test
    split)."""

    root: str | None = None


@dataclass
class Cifar100Data(FileData):
    labels: CifarLabels = CifarLabels.fine  # fine: 100 classes; coarse: 20 superclasses


@dataclass
class SyntheticData(Data):
    name: DataName = DataName.synthetic
    task: Task = Task.classification
    n_samples: int = bounded(2000, 2)
    n_features: int = bounded(20, 1)
    n_classes: int = 4
    noise: float = bounded(0.1, 0)
    test_size: float = bounded(0.2, 0, 1, open_lo=True, open_hi=True)


DATA_SCHEMAS: dict[str, type[Data]] = {
    "digits": DigitsData, "synthetic": SyntheticData, "fashion_mnist": FileData,
    "mnist": FileData, "cifar10": FileData, "cifar100": Cifar100Data,
}


@dataclass
class Model:
    """One schema for all models: presets set hidden and activation whatever the model."""

    name: ModelName = ModelName.mlp
    hidden: list[int] = default_list(64)  # mlp layer widths
    activation: Activation = Activation.tanh
    channels: list[int] = default_list(8, 16)  # cnn


@dataclass
class ResNetModel(Model):
    """A CIFAR-style residual network: a 3×3 stem, three stages of (depth − 2) / 6 basic
    blocks at widths width, 2·width, 4·width (the 2nd and 3rd halve the image), pool, linear."""

    name: ModelName = ModelName.resnet
    depth: int = bounded(8, 8)  # 6n + 2: 8, 14, 20, 32, …
    width: int = bounded(4, 1)  # the first stage's channels
    norm: Norm = Norm.group
    groups: int = bounded(2, 1)  # norm=group: GroupNorm groups (divide width)


@dataclass
class VitModel(Model):
    """A small vision transformer: patch embedding, depth pre-LayerNorm blocks, mean pool."""

    name: ModelName = ModelName.vit
    patch: int = bounded(4, 1)  # square patches of patch × patch pixels
    dim: int = bounded(16, 1)  # token width
    depth: int = bounded(1, 1)  # transformer blocks
    heads: int = bounded(2, 1)  # divides dim
    mlp_dim: int = bounded(32, 1)


@dataclass
class CustomModel(Model):
    """Any torch.nn.Module: `_target_` is its dotted import path; `kwargs` (or `+model.<key>`
    on the command line) are passed to its constructor."""

    name: ModelName = ModelName.custom
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


MODEL_SCHEMAS: dict[str, type[Model]] = {
    "resnet": ResNetModel, "vit": VitModel, "custom": CustomModel,
}


@dataclass
class Optim:
    """The local optimizer (dicesim/optim/local.py builds it from these)."""

    name: OptimName = OptimName.sgd
    lr: float = bounded(0.05, 0, open_lo=True)  # η (the schedule's peak)
    momentum: float = bounded(0.0, 0, 1)  # sgd: μ
    dampening: float = bounded(0.0, 0, 1)  # sgd: τ
    nesterov: bool = False
    weight_decay: float = bounded(0.0, 0)  # λ (AdamW: decoupled)
    betas: list[float] = default_list(0.9, 0.999)  # adam, adamw: (β1, β2)
    eps: float = bounded(1e-8, 0, open_lo=True)
    gossip_state: bool = False  # also mix the optimizer state (DSGDm mixes θ only)
    schedule: ScheduleName = ScheduleName.constant
    min_lr: float = bounded(0.0, 0)  # cosine: η at the last step
    warmup_steps: int = bounded(0, 0)  # linear_warmup_cosine
    step_size: int = bounded(1, 1)  # step: η γ^⌊t / step_size⌋
    gamma: float = bounded(0.1, 0, 1, open_lo=True)


@dataclass
class Influence:
    events: Any = 0  # N sampled events, or a list of {node, step, samples}
    removal: str | int = "batch"  # batch | single | k
    step_range: list[int] | None = None  # [lo, hi]
    hops: int = bounded(1, 0, MAX_HOPS)
    ground_truth: Any = True  # true | false | K (spot-check K events)
    estimators: list[str] = default_list("dice_e", "dice_gauss2")
    curvature: bool = True
    proximal: bool = False
    node_weights: list[float] | None = None  # q_k; null = uniform 1/n
    flush_every: int = bounded(50, 1)


@dataclass
class Attack:
    kind: AttackKind = AttackKind.none
    nodes: list[int] = default_list()  # attacked nodes; empty = a seeded choice of fraction * nodes
    fraction: float = bounded(0.25, 0, 1)
    start: int = 0
    end: int | None = None  # the first step no longer attacked; null: attacked to the end
    sigma: float = bounded(1.0, 0)
    scale: float = bounded(-4.0)
    z: float = bounded(1.0, 0)  # alie: the update sent is μ − z·σ of the honest ones received
    epsilon: float = bounded(0.5, 0, open_lo=True)  # ipm: the update sent is −ε·μ


@dataclass
class Defense:
    kind: DefenseKind = DefenseKind.none
    window: int = bounded(20, 1)
    threshold: float = bounded(0.0)
    warmup: int = bounded(10, 0)
    trim: int = bounded(1, 0)


@dataclass
class Counterfactual:
    remove: list[Any] = default_list()  # [{node, step, samples}, ...]


@dataclass
class Checkpoint:
    every: int = bounded(0, 0)  # steps between checkpoints; 0 = off
    keep: int = bounded(2, 1)  # most recent checkpoints kept


@dataclass
class Eval:
    """How much one per-node evaluation may cost (engine.EvalPlan, docs/configuration.md)."""

    budget: int | None = 1_000_000  # sample-forwards (nodes × samples); null: all of them


@dataclass
class Attribution:
    """Full-horizon attribution (dicesim/influence/attribution.py): one reverse pass after
    training."""

    enabled: bool = False
    target: Any = "network"  # network | per_node | a list of node ids
    keep_every: int | None = None  # θ kept every K steps; null: ⌈√steps⌉
    samples: bool = True  # per-sample scores (samples.csv)
    plot_node: int | None = None  # the node whose influence over time is plotted; null: auto


# ---------------------------------------------------------------- experiment blocks

def block() -> Any:
    """A root field only an experiment= preset sets (`alignment:`, `retrain:`): its schema
    and rules live in the preset's driver module (dicesim/experiments/<driver>.py), which
    calls `register_block` when imported. `load` imports that module on demand and types the
    composed block with its schema; the root keeps the field untyped so that this module
    imports no driver."""
    return field(default=None, metadata={"block": True})


@dataclass(frozen=True)
class BlockSchema:
    cls: type  # the block's dataclass
    check: Callable[[Any], None] | None  # its cross-field rules, given the whole Config


_REGISTERED: dict[str, BlockSchema] = {}


def register_block(name: str, cls: type, check: Callable[[Any], None] | None = None) -> None:
    _REGISTERED[name] = BlockSchema(cls, check)


@functools.cache
def _block_homes() -> dict[str, tuple[str, str]]:
    """Each block → (the experiment= preset that sets it, that preset's `driver:`)."""
    names = [f.name for f in dataclasses.fields(Config) if f.metadata.get("block")]
    homes = {}
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        preset = OmegaConf.load(path)
        homes.update({name: (path.stem, str(preset.driver)) for name in names if name in preset})
    missing = set(names) - homes.keys()
    assert not missing, f"no experiment= preset sets {', '.join(sorted(missing))}"
    return homes


def block_schema(name: str) -> BlockSchema:
    """The registered schema of a block, importing its driver module on first use (by name:
    a lower layer does not import an upper one statically)."""
    if name not in _REGISTERED:
        importlib.import_module(f"dicesim.experiments.{_block_homes()[name][1]}")
    return _REGISTERED[name]


def block_names() -> list[str]:
    return list(_block_homes())


def block_preset(name: str) -> str:
    """The experiment= preset that sets a block."""
    return _block_homes()[name][0]


def check_blocks(c: Config) -> None:
    for name in _block_homes():
        value = getattr(c, name)
        if value is None:
            continue
        schema = block_schema(name)
        if not isinstance(value, schema.cls):
            raise ConfigError(f"{name}={show(as_dict(value))}: must be "
                              f"{describe(schema.cls)}")
        if schema.check is not None:
            schema.check(c)


def _type_blocks(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Each block the composed config has, merged into its driver's schema: typed and
    closed as Hydra types the other sections while composing (an unknown key, a wrong type,
    an Enum's non-member fail here, as one line)."""
    for name in _block_homes():
        node = cfg._get_node(name)
        if node is None or node._is_none():
            continue
        keys = [_key_of(o) for o in overrides if o.startswith("+")]
        if any(k.split(".")[0] == name for k in keys) and _chosen_experiment(overrides) != (
                _block_homes()[name][0]):  # `+retrain.batches=3` without its preset
            raise ConfigError(_belongs(next(k for k in keys if k.split(".")[0] == name)))
        cls = block_schema(name).cls
        if OmegaConf.get_type(node) is cls:
            continue
        if not isinstance(node, DictConfig):
            value = next((o.partition("=")[2] for o in reversed(overrides)
                          if _key_of(o) == name), show(node._value()))
            raise ConfigError(f"{name}={value}: must be {describe(_field_type(name))}")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls), node)
        except OmegaConfBaseException as err:
            if not err.full_key:  # a value in place of a group: OmegaConf's merge names none
                err.full_key = _replaced_group(cls, node)
            raise ConfigError(_explain(err, overrides, cfg, prefix=f"{name}.")) from None
        cfg[name] = typed


def _replaced_group(cls: type, node: DictConfig, where: str = "") -> str:
    """The dotted key where `node` holds a value that is not a group in place of one of the
    schema's groups ("" if none)."""
    hints = typing.get_type_hints(cls)
    for key in node:
        tp, child = hints.get(str(key)), node._get_node(key)
        if dataclasses.is_dataclass(tp):
            if not isinstance(child, DictConfig):
                return f"{where}{key}"
            if found := _replaced_group(tp, child, f"{where}{key}."):
                return found
    return ""


# ---------------------------------------------------------------- the root

@dataclass
class Config:
    name: str = "run"
    nodes: int = bounded(16, 1)
    steps: int = bounded(200, 1)
    batch_size: int = bounded(32, 1)
    seed: int = bounded(0, 0, SEED_MAX)
    dtype: Dtype = Dtype.float32
    device: Device = Device.auto
    backend: Backend = Backend.auto
    allow_tf32: bool = False  # TF32 float32 matmuls/convolutions on CUDA (Ampere and later)
    timeout_s: float = bounded(60.0, 0, open_lo=True)
    eval_every: int = bounded(10, 1)
    init: Init = Init.same
    progress: bool = True
    dry_run: bool = False
    driver: str | None = None
    plots: bool = True
    save_params: bool = False
    out_dir: str = "outputs/${name}/${now:%Y-%m-%d_%H-%M-%S}"
    overwrite: bool = False
    abort_on_nonfinite: bool = True
    divergence_factor: float | None = 1.0e3  # null: only NaN/inf count as diverged
    resume: str | None = None  # a run directory, or auto
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    eval: Eval = field(default_factory=Eval)
    attribution: Attribution = field(default_factory=Attribution)
    counterfactual: Counterfactual = field(default_factory=Counterfactual)
    topology: Topology = field(default_factory=Topology)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    influence: Influence = field(default_factory=Influence)
    attack: Attack = field(default_factory=Attack)
    defense: Defense = field(default_factory=Defense)
    # experiment blocks: null unless an experiment= preset sets them (see `block`)
    alignment: Any = block()
    cascade: Any = block()
    contribution: Any = block()
    anomaly: Any = block()
    collaborators: Any = block()
    cleansing: Any = block()
    retrain: Any = block()

    def __post_init__(self) -> None:
        validate(self)


def register() -> None:
    """The schemas in Hydra's ConfigStore: the root (configs/config.yaml's first default)
    and, under schema/<group>/<option>, each option with keys of its own."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="dicesim_schema", node=Config)
    for group, schemas in (("topology", TOPOLOGY_SCHEMAS), ("data", DATA_SCHEMAS),
                           ("model", MODEL_SCHEMAS)):
        for option, cls in schemas.items():
            store.store(group=f"schema/{group}", name=option, node=cls)


# ---------------------------------------------------------------- loading

def load(composed: DictConfig, overrides: Sequence[str] = (), quiet: bool = False) -> Config:
    """The typed, checked settings of a config Hydra composed against the registered schema
    (`overrides`: the command line's, to tell a preset's value from the user's); the values
    a named group kept over the preset's are said unless quiet."""
    settings, kept = load_noting(composed, overrides, quiet)
    if kept and not quiet and os.environ.get("RANK", "0") == "0":
        print(f"dicesim: kept {'; '.join(kept)}", flush=True)
    return settings


def load_noting(composed: DictConfig, overrides: Sequence[str] = (), quiet: bool = False
                ) -> tuple[Config, list[str]]:
    """`load`, returning the kept-value notes (`keep_named_groups`) instead of printing them."""
    try:
        _type_blocks(composed, overrides)
        kept = keep_named_groups(composed, overrides)
        infer_nodes(composed, overrides)  # topology=file without nodes=: the file's size
        _strict_bools(composed, overrides)
        for o in overrides:  # Hydra lets `+key=v` add a key the schema does not have
            parent, _, leaf = _key_of(o).rpartition(".")
            node = OmegaConf.select(composed, parent) if parent else composed
            cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
            if o.startswith("+") and dataclasses.is_dataclass(cls) and leaf not in {
                    f.name for f in dataclasses.fields(cls)}:
                if cls is not CustomModel:
                    raise ConfigError(unknown_key(_key_of(o), composed))
                with open_dict(node):  # `+model.width=16`: a constructor argument
                    node.kwargs[leaf] = node.pop(leaf)
        _fit_preset_events(composed, overrides, quiet)
        composed.influence.estimators = renamed_estimators(composed.influence.estimators)
        return OmegaConf.to_object(composed), kept
    except OmegaConfBaseException as err:  # an interpolation that does not resolve or fit
        raise ConfigError(_explain(err, overrides)) from None


def _fit_preset_events(cfg: DictConfig, overrides: Sequence[str], quiet: bool) -> None:
    """A preset's number of sampled events the user did not set shrinks to what the run
    holds (an event at step t needs t + hops <= steps and t < steps); an explicit count
    that does not fit stays an error."""
    events, hops, steps, nodes = (cfg.influence.events, cfg.influence.hops, cfg.steps,
                                  cfg.nodes)
    if any(_key_of(o) in ("influence.events", "influence") for o in overrides) or not (
            is_int(events) and events > 0 and is_int(hops) and is_int(steps)
            and is_int(nodes) and steps >= 1 and nodes >= 1 and 0 <= hops <= MAX_HOPS):
        return
    if cfg.influence.removal not in ("batch", "single") and not is_int(cfg.influence.removal):
        return
    starts = max(0, min(steps - hops, steps - 1) + 1)  # steps 0 … min(T - r, T - 1)
    universe = nodes * starts * (cfg.batch_size if cfg.influence.removal == "single" else 1)
    if cfg.influence.step_range is None and events > universe:
        cfg.influence.events = universe
        if not quiet and os.environ.get("RANK", "0") == "0":
            print(f"dicesim: influence.events: the preset's {events} events do not fit "
                  f"{steps} steps with {hops} hops; using {universe}", flush=True)


def _key_of(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _strict_bools(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """OmegaConf turns yes/no/on/off/1/0 into booleans: a bool key set on the command line
    takes only true or false."""
    from omegaconf.nodes import BooleanNode

    for o in overrides:
        key, sep, raw = o.lstrip("+~").partition("=")
        if not sep or "," in raw:
            continue
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(cfg, parent) if parent else cfg
            child = node._get_node(leaf) if isinstance(node, DictConfig) else None
        except OmegaConfBaseException:
            continue
        if isinstance(child, BooleanNode) and raw.lower() not in ("true", "false", "null"):
            raise ConfigError(f"{key}={raw}: must be true or false")
        if isinstance(child, ListConfig) and child._metadata.element_type is bool:
            items = raw.strip("[]").split(",")
            for i, item in enumerate(items):
                if item.strip().lower() not in ("true", "false", ""):
                    raise ConfigError(f"{key}[{i}]={item.strip()}: must be true or false")


SECTIONS: dict[str, type] = {"model": Model, "optim": Optim, "influence": Influence,
                             "attack": Attack, "defense": Defense, "attribution": Attribution}


def section(group: str, values: Mapping, nodes: int | None = None) -> Any:
    """One typed, checked section from plain values (tests, benchmarks): the schema's types
    and defaults apply, and the section's own rules (`nodes` for those that need it)."""
    schemas = {"topology": TOPOLOGY_SCHEMAS, "data": DATA_SCHEMAS,
               "model": MODEL_SCHEMAS}.get(group)
    if schemas is not None:
        base = {"topology": Topology, "data": Data, "model": Model}[group]
        cls = schemas.get(str(values.get("name", "")), base)
    else:
        cls = SECTIONS[group]
    plain = {k: v for k, v in dict(values).items() if k != "defaults"}
    try:
        out = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), plain))
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, (), {group: plain}, prefix=f"{group}.")) from None
    check_ranges(out, f"{group}.")
    if group == "topology" and nodes is not None:
        check_topology(out, nodes)
    if group == "data":
        check_data(out, nodes)
    return out


def with_changes(cfg: Config, **dotted: Any) -> Config:
    """A checked copy of cfg with some settings changed; keys are dotted paths with '__' for
    '.', and a mapping for a whole section (`topology={"name": "hub"}`) is that section's
    (option's) schema with those values."""
    plain = as_dict(cfg)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = plain
        for part in parents:
            node = node[part]
        node[leaf] = value.copy() if isinstance(value, dict) else value
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema_for(plain), plain))
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, ())) from None


def variant(cfg: Config, **dotted: Any) -> Config:
    """A copy of an experiment's cfg for one of its runs: no driver, no progress bar, no
    experiment blocks (the driver reads them from its own cfg)."""
    blocks = {block: None for block in _block_homes()}
    return with_changes(cfg, driver=None, progress=False, **blocks, **dotted)


def as_dict(cfg: Any) -> Any:
    """Settings as plain dicts, lists and strings (config.yaml, checkpoints, summaries)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: as_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, StrEnum):
        return str(cfg)
    if isinstance(cfg, Mapping):
        return {k: as_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple | ListConfig):
        return [as_dict(v) for v in cfg]
    return cfg


def schema_for(raw: Any) -> DictConfig:
    """The schema of a composed or plain config: the root with the schemas of the topology
    and data options it names and the experiment blocks it has."""
    root = OmegaConf.structured(Config)
    topo, data = _get(raw, "topology.name"), _get(raw, "data.name")
    root.topology = OmegaConf.structured(TOPOLOGY_SCHEMAS.get(str(topo), Topology))
    root.data = OmegaConf.structured(DATA_SCHEMAS.get(str(data), Data))
    root.model = OmegaConf.structured(MODEL_SCHEMAS.get(str(_get(raw, "model.name")), Model))
    for block in _block_homes():
        if _get(raw, block) is not None:
            root[block] = OmegaConf.structured(block_schema(block).cls)
    return root


_ANNOUNCED_RENAMES: set[str] = set()


def renamed_estimators(names: Any) -> Any:
    """influence.estimators with old names (RENAMED_ESTIMATORS) replaced by the new ones;
    the first use of an old name in a process is said once on stderr (rank 0)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        return names  # not a list: the checks refuse it
    out = []
    for name in names:
        new = RENAMED_ESTIMATORS.get(name) if isinstance(name, str) else None
        if new is not None and name not in _ANNOUNCED_RENAMES:
            _ANNOUNCED_RENAMES.add(name)
            if os.environ.get("RANK", "0") == "0":
                print(f"dicesim: influence.estimators: {name} is now {new} (the old name is "
                      "accepted until the next release)", file=sys.stderr, flush=True)
        out.append(new or name)
    return out


def _get(cfg: Any, dotted: str) -> Any:
    """cfg at a dotted path; None where it does not exist."""
    value = cfg
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


# ---------------------------------------------------------------- one-line messages

def show(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def _field_type(dotted: str, raw: Any = None) -> Any:
    """The schema's type hint at a dotted path (Any where there is none)."""
    cls: Any = Config
    tp: Any = Config
    for part in dotted.split("."):
        if part == "topology" and cls is Config:
            tp = TOPOLOGY_SCHEMAS.get(str(_get(raw, "topology.name")), Topology)
        elif part == "data" and cls is Config:
            tp = DATA_SCHEMAS.get(str(_get(raw, "data.name")), Data)
        elif part == "model" and cls is Config:
            tp = MODEL_SCHEMAS.get(str(_get(raw, "model.name")), Model)
        elif part in _block_homes() and cls is Config:
            tp = block_schema(part).cls | None
        else:
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            tp = hints.get(part, Any)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        cls = args[0] if union and len(args) == 1 else tp
    return tp


def describe(tp: Any) -> str:
    """What a field of type tp must be, in words."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = typing.get_args(tp) if union else ()
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)]
    if union:
        tp = inner[0] if len(inner) == 1 else None
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp is None:
        text = " or ".join(describe(a) for a in inner)
    elif tp in words:
        text = words[tp]
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        plural = {int: "integers", float: "numbers", bool: "true/false values"}
        names = "names" if item is str or _is_enum(item) else "values"
        text = f"a list of {plural.get(item, names)}"
    elif typing.get_origin(tp) is dict:
        text = "a mapping of keys to values"
    elif dataclasses.is_dataclass(tp):
        names = [f.name for f in dataclasses.fields(tp)]
        text = f"a group of keys ({', '.join(names)})"
    else:
        text = "a value"
    return text + (" or null" if optional else "")


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, StrEnum)


def _explain(err: Exception, overrides: Sequence[str], raw: Any = None, prefix: str = "") -> str:
    """An OmegaConf error (while composing or loading) as the one-line message."""
    key = getattr(err, "full_key", None) or ""
    key = prefix + re.sub(r"\[\d+\]$", "", key) if key else ""
    if err.__class__.__name__ in ("ConfigKeyError", "ConfigAttributeError") and key:
        return unknown_key(key, raw)
    value = next((o.partition("=")[2] for o in reversed(overrides) if _key_of(o) == key), None)
    if value is None and _get(raw, key) is not None:
        value = show(_get(raw, key))
    shown = f"{key}={value}" if value is not None else key
    tp = _field_type(key, raw) if key else Any
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if _is_enum(inner[0]):
        choices = [str(m) for m in inner[0]]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        guess = f" (did you mean {close[0]}?)" if close else ""
        return f"{shown}: unknown{guess}; choose one of {', '.join(choices)}"
    if key and tp is not Any:
        return f"{shown}: must be {describe(tp)}"
    first = " ".join(str(err).split("\n")[0].split())
    return f"{key}: {first}" if key else first


def closest(word: str, valid: Sequence[str]) -> list[str]:
    """The valid word nearest to a typo: difflib's best match, or one with the same letters
    (`rl` for `lr`)."""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    return close or [v for v in valid if sorted(v) == sorted(word)][:1]


def _belongs(dotted: str) -> str:
    """A key of an experiment block given without the preset that sets the block."""
    top = dotted.split(".")[0]
    preset = _block_homes()[top][0]
    return (f"{dotted}: {top}.* belongs to experiment={preset}; add experiment={preset} "
            "or drop the key")


def unknown_key(dotted: str, raw: Any = None) -> str:
    """`nodse: unknown key; did you mean nodes?` (the closest valid key at that level)."""
    parent, _, leaf = dotted.rpartition(".")
    top = dotted.split(".")[0]
    if parent and top in _block_homes() and _get(raw, top) is None:
        return _belongs(dotted)
    tp = _field_type(parent, raw) if parent else Config
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    cls = inner[0]
    valid = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    where = f" in {parent}" if parent else ""
    close = closest(leaf, valid)
    if close:
        fix = f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    else:
        fix = f"valid keys{where}: {', '.join(sorted(set(valid)))}"
    return f"{dotted}: unknown key{where}; {fix}"


# ---------------------------------------------------------------- ranges and cross-field rules

def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str)


def check_choice(key: str, value: Any, choices: Sequence[str], hint: str = "") -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        guess = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}={show(value)}: unknown{guess}; choose one of "
                          f"{', '.join(choices)}{hint}")


def _at_least(key: str, value: Any, low: float, example: Any) -> None:
    if not value >= low or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}={show(value)}: must be at least {show(low)}; "
                          f"set e.g. {key}={show(example)}")


def _within(key: str, value: float, low: float, high: float, example: Any,
            open_low: bool = False, open_high: bool = False) -> None:
    ok = (value > low if open_low else value >= low) and (
        value < high if open_high else value <= high)
    if not ok:
        span = f"{'(' if open_low else '['}{show(low)}, {show(high)}{')' if open_high else ']'}"
        raise ConfigError(f"{key}={show(value)}: must be in {span}; set e.g. "
                          f"{key}={show(example)}")


def _node_ids(key: str, ids: Sequence[Any], nodes: int) -> None:
    bad = [v for v in ids if not 0 <= v < nodes]
    if bad:
        raise ConfigError(f"{key}={show(list(ids))}: {show(bad)} outside the graph "
                          f"(nodes 0..{nodes - 1}); pick node ids below nodes={nodes}")


def _events(key: str, items: Sequence[Any], nodes: int, steps: int, hops: int) -> None:
    """A list of {node, step, samples: all | k | [ids]}."""
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}={show(item)}: an event is {{node, step, samples}}, "
                              f"e.g. {key}=[{{node: 3, step: 10, samples: all}}]")
        for k in item:
            if k not in EVENT_KEYS:
                close = closest(str(k), EVENT_KEYS)
                fix = f"did you mean {close[0]}?" if close else "an event has node, step, samples"
                raise ConfigError(f"{where}.{k}: unknown key; {fix}")
        for k in ("node", "step"):
            if k not in item:
                raise ConfigError(f"{where}={show(item)}: {k} is missing; an event needs node "
                                  "and step, e.g. {node: 3, step: 10, samples: all}")
            if not is_int(item[k]):
                raise ConfigError(f"{where}.{k}={show(item[k])}: must be an integer")
        node, step = item["node"], item["step"]
        if not 0 <= node < nodes:
            raise ConfigError(f"{where}.node={node}: node {node} is outside the graph "
                              f"(0..{nodes - 1})")
        if not 0 <= step < steps:
            raise ConfigError(f"{where}.step={step}: step {step} is outside the run "
                              f"(0..{steps - 1})")
        if step + hops > steps:
            raise ConfigError(f"{where}.step={step}: influence.hops={hops} reaches step "
                              f"{step + hops}, past the last step {steps}; lower influence.hops "
                              "or pick an earlier step")
        samples = item.get("samples", "all")
        ok = samples in ("all", None) or (is_int(samples) and samples >= 1) or (
            _is_list(samples) and all(is_int(v) and v >= 0 for v in samples) and len(samples))
        if not ok:
            raise ConfigError(f"{where}.samples={show(samples)}: must be all, a number k >= 1 "
                              "or a list of training sample ids")


def check_device(device: str, backend: str) -> None:
    """gloo carries CPU tensors, NCCL CUDA tensors: the other pairings are refused."""
    if device == "cuda" and backend == "gloo":
        raise ConfigError("device=cuda with backend=gloo: gloo does not carry the exchange's "
                          "CUDA tensors; use backend=nccl (or auto) on GPUs, or device=cpu "
                          "backend=gloo for the CPU path")
    if device == "cpu" and backend == "nccl":
        raise ConfigError("device=cpu with backend=nccl: NCCL carries CUDA tensors only; use "
                          "backend=gloo (or auto) on CPU, or device=cuda")


def validate(c: Config) -> None:
    """Ranges and cross-field rules that types cannot express; ConfigError (one line)."""
    if c.divergence_factor is not None and not c.divergence_factor > 1:
        raise ConfigError(f"divergence_factor={show(c.divergence_factor)}: a number > 1 (a "
                          "loss above it times the node's first training loss stops the run), "
                          "or null for off")
    check_ranges(c)
    check_device(str(c.device), str(c.backend))
    if not c.name or "/" in c.name:
        raise ConfigError(f"name={show(c.name)}: must be a non-empty name without '/'; "
                          "set e.g. name=run")
    if c.driver is not None:
        if not MODULE_NAME.fullmatch(c.driver):
            raise ConfigError(f"driver={c.driver}: must be the plain name of a module in "
                              "dicesim/experiments (letters, digits, _), e.g. driver=alignment")
        if importlib.util.find_spec(f"dicesim.experiments.{c.driver}") is None:
            raise ConfigError(f"driver={c.driver}: no such experiment driver in "
                              "dicesim/experiments; use an experiment= preset")
    if not c.out_dir.strip():
        raise ConfigError("out_dir: must be a directory path; leave it out for "
                          "outputs/<name>/<date_time>")
    if c.resume is not None:
        if not c.resume.strip():
            raise ConfigError("resume: must be a run directory or auto")
        if c.resume != "auto" and not Path(c.resume).expanduser().is_dir():
            raise ConfigError(f"resume={c.resume}: no such directory; give the directory of "
                              "an earlier run or resume=auto")
    if c.eval.budget is not None:  # one sample per node at least
        _at_least("eval.budget", c.eval.budget, c.nodes, 1_000_000)
    n, steps = c.nodes, c.steps
    check_topology(c.topology, n)
    check_data(c.data, n)
    check_model(c.model, c.data)
    check_optim(c.optim, steps)
    check_influence(c.influence, n, steps, c.batch_size)
    check_attack(c.attack, n, steps)
    check_defense(c.defense, c.influence.proximal)
    _events("counterfactual.remove", c.counterfactual.remove, n, steps, 0)
    check_attribution(c.attribution, n, steps, c.defense.kind)
    check_batch_norm(c)
    check_blocks(c)


def check_batch_norm(c: Config) -> None:
    """model.norm=batch: DICE-GT (shadow runs) is exact through the weighted batch statistics;
    the estimators that linearize the step do not yet differentiate through them."""
    if not (isinstance(c.model, ResNetModel) and c.model.norm == "batch"):
        return
    i = c.influence
    uses = ([f"influence.estimators={show(list(i.estimators))}"] if i.estimators and i.events
            else []) + (["influence.proximal=true"] if i.proximal else []) + (
        ["attribution.enabled=true"] if c.attribution.enabled else [])
    if uses:
        raise ConfigError(f"model.norm=batch: {uses[0]} is not yet supported with BatchNorm "
                          "(its linearized step leaves out the batch statistics); only the "
                          "exact DICE-GT is: set influence.estimators=[] and keep "
                          "influence.ground_truth, or use model.norm=group")


def attribution_targets(target: Any, nodes: int) -> list[int] | None:
    """attribution.target as node ids (None: the network target); ConfigError if bad."""
    if target == "network":
        return None
    if target == "per_node":
        return list(range(nodes))
    if _is_list(target) and target and all(is_int(v) for v in target):
        _node_ids("attribution.target", target, nodes)
        if len(set(target)) < len(target):
            raise ConfigError(f"attribution.target={show(list(target))}: node ids repeat; "
                              "list each target node once")
        return [int(v) for v in target]
    raise ConfigError(f"attribution.target={show(target)}: choose network, per_node or a "
                      "list of target node ids, e.g. attribution.target=[0,3]")


def check_attribution(a: Attribution, nodes: int, steps: int, defense: str) -> None:
    attribution_targets(a.target, nodes)
    if a.keep_every is not None:
        _within("attribution.keep_every", a.keep_every, 1, steps, max(1, math.isqrt(steps)))
    if a.plot_node is not None:
        _node_ids("attribution.plot_node", [a.plot_node], nodes)
    if a.enabled and defense != "none":
        raise ConfigError(f"attribution.enabled=true needs defense.kind=none (got {defense}): "
                          "the reverse pass transposes the plain gossip W^t")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def check_topology(t: Topology, nodes: int) -> None:
    if t.weights == "metropolis_hastings" and t.name in DIRECTED:
        raise ConfigError(f"topology.weights=metropolis_hastings needs an undirected graph but "
                          f"{t.name} is directed; use topology.weights=uniform")
    if t.weights != "uniform" and t.name == "hub":
        raise ConfigError(f"topology.weights={t.weights}: topology=hub sets its own weights "
                          "(topology.hub_weight); leave topology.weights=uniform")
    if isinstance(t, TorusTopology) and t.rows is not None:
        if nodes % t.rows:
            raise ConfigError(f"topology.rows={t.rows} does not divide nodes={nodes}; pick a "
                              "divisor of nodes or leave topology.rows=null")
    elif isinstance(t, TorusTopology) and nodes >= 4 and _is_prime(nodes):
        # the only rows × cols grid is 1 × n, a ring: say so instead of building it
        below = next(m for m in range(nodes - 1, 1, -1) if not _is_prime(m))
        above = next(m for m in range(nodes + 1, 2 * nodes + 2) if not _is_prime(m))
        raise ConfigError(f"topology=torus nodes={nodes}: {nodes} is prime, so the only grid is "
                          f"1×{nodes}, a ring; use nodes={below} or nodes={above}, "
                          "topology=ring, or topology.rows=1 to accept the ring")
    if isinstance(t, StarTopology):
        _within("topology.center", t.center, 0, nodes - 1, 0)
    if isinstance(t, SmallWorldTopology):
        if nodes > 1 and t.k >= nodes:
            fix = f"set topology.k between 2 and {nodes - 1}" if nodes > 2 else "use 3+ nodes"
            raise ConfigError(f"topology.k={t.k}: small_world needs 2 <= k < nodes={nodes}; "
                              f"{fix}")
    if isinstance(t, HubTopology):
        _within("topology.hub", t.hub, 0, nodes - 1, 0)
    if isinstance(t, FileTopology) and (t.path is None or not t.path.strip()):
        raise ConfigError("topology.path is not set; pass topology.path=/path/to/W.npy "
                          "(or a .csv file)")


def check_data(d: Data, nodes: int | None) -> None:
    if d.label_noise is not None and (any(not 0 <= p <= 1 for p in d.label_noise)
                                      or nodes is not None and len(d.label_noise) != nodes):
        raise ConfigError(f"data.label_noise={show(d.label_noise)}: needs {nodes} fractions "
                          "in [0, 1], one per node")
    regression = isinstance(d, SyntheticData) and d.task == "regression"
    if isinstance(d, SyntheticData) and not regression:
        _at_least("data.n_classes", d.n_classes, 2, 4)
    if regression and d.partition in ("dirichlet", "label_skew"):
        raise ConfigError(f"data.partition={d.partition} needs class labels; use "
                          "data.partition=iid with regression data")
    if (isinstance(d, SyntheticData) and not regression and d.partition == "label_skew"
            and d.classes_per_node > d.n_classes):
        raise ConfigError(f"data.classes_per_node={d.classes_per_node}: the data has "
                          f"{d.n_classes} classes; set data.classes_per_node <= {d.n_classes}")
    if d.image and d.name == "synthetic":
        raise ConfigError("data.image=true needs an image dataset; data.name=synthetic is flat")


def check_model(m: Model, d: Data) -> None:
    """The model's widths and the pairings with the data its name alone decides (the shapes
    are checked when the data loads)."""
    regression = isinstance(d, SyntheticData) and d.task == "regression"
    if m.name == "mlp" and not m.hidden:
        raise ConfigError("model.hidden=[]: an mlp needs one or more layer widths, e.g. "
                          "model.hidden=[64]")
    for key in ("hidden", "channels"):
        if any(w < 1 for w in getattr(m, key)):
            raise ConfigError(f"model.{key}={show(getattr(m, key))}: layer widths must be "
                              f"positive integers, e.g. model.{key}=[64]")
    if m.name == "linear" and not regression:
        raise ConfigError("model.name=linear is linear regression and needs a regression data "
                          "set; use data=synthetic_regression, or model=logreg for "
                          "classification")
    if m.name == "logreg" and regression:
        raise ConfigError("model.name=logreg needs a classification data set; use model=linear")
    if m.name == "cnn" and not d.image:
        raise ConfigError("model.name=cnn needs image inputs [C,H,W]; set data.image=true")
    schema = MODEL_SCHEMAS.get(str(m.name), Model)
    if type(m) is not schema:  # `model.name=resnet` without the option's keys
        raise ConfigError(f"model.name={m.name}: choose this model with model={m.name} (the "
                          "option brings its own keys)")
    if m.name in ("resnet", "vit") and not d.image:
        raise ConfigError(f"model.name={m.name} needs image inputs [C,H,W]; set data.image=true")
    if isinstance(m, ResNetModel):
        check_resnet(m)
    if isinstance(m, VitModel) and m.dim % m.heads:
        raise ConfigError(f"model.heads={m.heads}: must divide model.dim={m.dim}; set e.g. "
                          f"model.heads={math.gcd(m.dim, m.heads)}")
    if isinstance(m, CustomModel) and not (m._target_ or "").strip():
        raise ConfigError("model._target_ is not set; pass the module's import path, e.g. "
                          "model._target_=mypkg.nets.SmallNet (docs/models.md)")


def check_resnet(m: ResNetModel) -> None:
    if (m.depth - 2) % 6:
        below = m.depth - (m.depth - 2) % 6
        raise ConfigError(f"model.depth={m.depth}: a CIFAR-style ResNet has depth 6n + 2 "
                          f"(8, 14, 20, 32, …); set e.g. model.depth={max(8, below)}")
    if m.norm == "group" and m.width % m.groups:
        raise ConfigError(f"model.groups={m.groups}: must divide model.width={m.width} "
                          f"(GroupNorm); set e.g. model.groups={math.gcd(m.width, m.groups)}")


def check_optim(o: Optim, steps: int, where: str = "optim") -> None:
    check_ranges(o, f"{where}.")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"{where}.betas={show(list(o.betas))}: two numbers in [0, 1), "
                          "e.g. [0.9, 0.999]")
    if o.nesterov and (o.momentum <= 0 or o.dampening != 0):
        raise ConfigError(f"{where}.nesterov=true needs {where}.momentum > 0 and "
                          f"{where}.dampening=0 (as torch.optim.SGD)")
    if o.name != "sgd" and (o.momentum or o.nesterov or o.dampening):
        raise ConfigError(f"{where}.momentum/nesterov/dampening are SGD's; {where}.name="
                          f"{o.name} uses {where}.betas")
    if o.schedule == "linear_warmup_cosine" and not 0 < o.warmup_steps < steps:
        raise ConfigError(f"{where}.warmup_steps={o.warmup_steps}: linear_warmup_cosine needs "
                          f"0 < warmup_steps < steps ({steps})")
    if o.schedule in ("cosine", "linear_warmup_cosine") and o.min_lr > o.lr:
        raise ConfigError(f"{where}.min_lr={show(o.min_lr)}: must not exceed "
                          f"{where}.lr={show(o.lr)}")
    if o.gossip_state and not (o.momentum or o.name != "sgd"):
        raise ConfigError(f"{where}.gossip_state=true mixes the optimizer state, but plain "
                          f"SGD ({where}.momentum=0) has none")


def check_removal(key: str, removal: Any, batch_size: int | None = None) -> None:
    top = batch_size if batch_size is not None else math.inf
    if not (removal in ("batch", "single") or (is_int(removal) and 1 <= removal <= top)):
        limit = f" from 1 to batch_size={batch_size}" if batch_size is not None else ""
        raise ConfigError(f"{key}={show(removal)}: choose batch, single or a number of "
                          f"samples{limit}")


def check_influence(i: Influence, nodes: int, steps: int, batch_size: int) -> None:
    gt = i.ground_truth
    if not (isinstance(gt, bool) or (is_int(gt) and gt >= 0)):
        raise ConfigError(f"influence.ground_truth={show(gt)}: true, false or a number K of "
                          "events to spot-check, e.g. influence.ground_truth=20")
    names = list(i.estimators)
    bad = [n for n in names if n not in ESTIMATORS]
    if bad or len(set(names)) < len(names):  # [] : DICE-GT alone
        close = closest(str(bad[0]), ESTIMATORS) if bad else []
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"influence.estimators={show(names)}: {hint}a list of distinct "
                          f"estimators from {', '.join(ESTIMATORS)}, e.g. [dice_e, dice_gauss2] "
                          "([] for DICE-GT alone)")
    check_removal("influence.removal", i.removal, batch_size)
    events = i.events
    if is_int(events):
        if events < 0:
            raise ConfigError(f"influence.events={events}: must be >= 0 (a number of events to "
                              "sample) or a list of {node, step, samples}")
        if events and i.hops > steps:
            raise ConfigError(f"influence.hops={i.hops} reaches past the last step "
                              f"(steps={steps}); lower influence.hops or raise steps")
    elif _is_list(events):
        _events("influence.events", events, nodes, steps, i.hops)
    else:
        raise ConfigError(f"influence.events={show(events)}: give a number of events to sample "
                          "or a list of {node, step, samples}, e.g. influence.events=40")
    if i.step_range is not None:
        r = list(i.step_range)
        if len(r) != 2:
            raise ConfigError(f"influence.step_range={show(r)}: must be a pair [lo, hi], "
                              "e.g. influence.step_range=[0, 50], or null")
        lo, hi = r
        top = min(steps - i.hops, steps - 1)
        if not 0 <= lo <= hi <= top:
            raise ConfigError(f"influence.step_range={show(r)}: needs 0 <= lo <= hi <= "
                              f"steps - hops = {top}")
    if i.node_weights is not None:
        q = list(i.node_weights)
        if len(q) != nodes or any(not (v >= 0 and math.isfinite(v)) for v in q):
            raise ConfigError(f"influence.node_weights={show(q)}: needs {nodes} non-negative "
                              "numbers (one per node), or null for uniform 1/n")


def check_attack(a: Attack, nodes: int, steps: int) -> None:
    _node_ids("attack.nodes", list(a.nodes), nodes)
    if len(set(a.nodes)) != len(a.nodes):
        raise ConfigError(f"attack.nodes={show(list(a.nodes))}: lists a node twice")
    if a.end is not None:
        _within("attack.end", a.end, a.start + 1, steps, steps)
    if a.kind != "none":
        _within("attack.start", a.start, 0, steps - 1, 0)
        if not a.nodes and not 1 <= round(a.fraction * nodes) <= nodes:
            raise ConfigError(f"attack.fraction={show(a.fraction)}: attacks "
                              f"{round(a.fraction * nodes)} of {nodes} nodes; give "
                              "attack.nodes=[...] or a fraction that picks at least one node")
    else:
        _at_least("attack.start", a.start, 0, 0)


def check_defense(d: Defense, proximal: bool) -> None:
    if d.kind == "dice" and not proximal:
        raise ConfigError("defense.kind=dice scores neighbours by proximal influence; "
                          "set influence.proximal=true")


# ---------------------------------------------------------------- composing from overrides

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("topology", "data", "model", "optim", "influence", "attack", "defense", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choice(override: str) -> None:
    """`topology=foo`: ConfigError naming the valid options."""
    key, sep, value = override.lstrip("+~").partition("=")
    if not sep or key not in GROUPS or "," in value:
        return
    if not (CONFIG_DIR / key / f"{value}.yaml").is_file():
        choices = group_options(key)
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        guess = f" (did you mean {key}={close[0]}?)" if close else ""
        raise ConfigError(f"{key}={value}: unknown {key}{guess}; choose one of "
                          f"{', '.join(choices)}")


def keep_named_groups(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """A config group named on the command line (`optim=adam`) keeps its own values: the
    experiment preset is composed after the groups (configs/config.yaml), so its values
    (`optim.lr: 0.05`) would otherwise win over the option the user chose. Every key the
    option's file sets is put back to the file's value in the composed `cfg`, unless the
    command line sets that key itself (`optim.lr=…`). Returns one note per value put back
    (`optim.lr=0.001 over experiment=demo's 0.05`)."""
    chosen: dict[str, str] = {}
    keys: list[str] = []
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep:
            continue
        if key in GROUPS:
            chosen[key] = value
        else:
            keys.append(key)
    preset = chosen.pop("experiment", None) or _default_choice("experiment")
    notes = []
    for group, option in chosen.items():
        path = CONFIG_DIR / group / f"{option}.yaml"
        if not path.is_file() or not isinstance(cfg.get(group), DictConfig):
            continue
        own = OmegaConf.load(path)
        own.pop("defaults", None)  # the option's schema, not a value
        for dotted in _leaves(own):
            full = f"{group}.{dotted}"
            if any(k == full or k.startswith(f"{full}.") or full.startswith(f"{k}.")
                   for k in keys):
                continue  # the user's own value for this key
            composed = OmegaConf.select(cfg, full, throw_on_resolution_failure=False)
            value = OmegaConf.select(own, dotted)
            if composed == value:
                continue
            OmegaConf.update(cfg, full, OmegaConf.to_container(value)
                             if isinstance(value, DictConfig | ListConfig) else value,
                             merge=False)
            notes.append(f"{full}={show(value)} of {group}={option} over "
                         f"experiment={preset}'s {show(composed)}")
    return notes


def _chosen_experiment(overrides: Sequence[str]) -> str | None:
    """The experiment= preset of a command line (the last one named, else the default)."""
    named = [o.partition("=")[2] for o in overrides if _key_of(o) == "experiment"]
    return named[-1] if named else _default_choice("experiment")


def _default_choice(group: str) -> str | None:
    """The option configs/config.yaml's defaults list picks for `group`."""
    for entry in OmegaConf.load(CONFIG_DIR / "config.yaml").defaults:
        if isinstance(entry, DictConfig) and group in entry:
            return str(entry[group])
    return None


def _leaves(node: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys of `node`'s values that are not mappings (lists are values)."""
    out = []
    for key, value in node.items_ex(resolve=False):
        dotted = f"{prefix}{key}"
        out += _leaves(value, f"{dotted}.") if isinstance(value, DictConfig) else [dotted]
    return out


def _parse(overrides: Sequence[str], loader: Any = None) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=loader)
    parsed = []
    for o in overrides:
        try:
            parsed += parser.parse_overrides([o])
        except Exception as err:  # OverrideParseException: the grammar's own message
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            why = lines[0] if lines else type(err).__name__
            raise ConfigError(f"{o}: {why}; see Hydra's override syntax "
                              "(https://hydra.cc/docs/advanced/override_grammar/basic)"
                              ) from None
    return parsed


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of every job of a `-m` sweep, expanded by Hydra's basic sweeper
    itself. Expanded here, not only by Hydra's multirun, because every point is composed
    and checked before the first job starts: Hydra validates a batch's composition only,
    and only as the jobs come."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra

    for o in overrides:
        group = _key_of(o)
        if "glob(" in o and group not in GROUPS:
            raise ConfigError(f"{o}: glob() sweeps only config groups ({', '.join(GROUPS)})")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        parsed = _parse(overrides, GlobalHydra.instance().config_loader())
        try:
            return BasicSweeper.split_arguments(parsed, None)[0]
        except Exception as err:  # an interval cannot be enumerated
            raise ConfigError(f"{' '.join(overrides)}: {_hydra_line(err)}; give a list "
                              "(a,b,c), choice() or range()") from None


def compose(overrides: Sequence[str] = (), quiet: bool = False) -> Config:
    """The typed settings of a command line's overrides, composed with Hydra exactly as
    `python -m dicesim` would (tests, benchmarks and the CLI's checks use this)."""
    return compose_points([overrides], quiet=quiet)[0]


def compose_checked(points: Sequence[Sequence[str]]) -> list[Config]:
    """The CLI's up-front check: quiet (the job itself says what load changed)."""
    return compose_points(points, quiet=True)


def compose_points(points: Sequence[Sequence[str]], quiet: bool = False) -> list[Config]:
    """Compose each override list with Hydra, exactly as `python -m dicesim` would, and
    `load` it: the typed, checked settings, or a one-line ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    out = []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for overrides in points:
            for o in overrides:
                check_group_choice(o)
            _parse(overrides)
            try:
                cfg = hydra_compose("config", overrides=list(overrides))
            except Exception as err:  # Hydra's override and composition errors
                groups = tuple(o for o in overrides if _key_of(o) in GROUPS)
                raise ConfigError(_compose_error(err, overrides, _presets_alone(groups))
                                  ) from None
            out.append(load(cfg, overrides, quiet))
    return out


@functools.lru_cache(maxsize=16)
def _presets_alone(groups: tuple[str, ...]) -> DictConfig | None:
    """The config of a command line's group choices alone: the presets chosen decide the
    schema an erroneous key is looked up in (composed inside compose_points' Hydra context;
    read only)."""
    from hydra import compose as hydra_compose

    try:
        return hydra_compose("config", overrides=list(groups))
    except Exception:
        return None


def _compose_error(err: Exception, overrides: Sequence[str], base: Any) -> str:
    """Hydra's composition error as the one-line message (`base`: the config of the
    command line's presets alone)."""
    raw = base if base is not None else {}
    m = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", str(err))
    cause = err.__cause__ or err.__context__
    key = m.group(1) if m else getattr(cause, "full_key", None)
    if m and key:
        value = next((o.partition("=")[2] for o in reversed(overrides) if _key_of(o) == key), None)
        line = unknown_key(key, raw)
        return line.replace(f"{key}: ", f"{key}={value}: ", 1) if value is not None else line
    if isinstance(cause, OmegaConfBaseException):
        return _explain(cause, overrides, raw)
    return _hydra_line(err)


def _hydra_line(err: Exception) -> str:
    """Hydra's message on one line, without OmegaConf's full_key/object_type trailer."""
    lines = []
    for line in str(err).splitlines():
        line = line.strip()
        if re.match(r"(full_key|object_type|reference_type)\s*[:=]", line):
            break
        if line:
            lines.append(line)
    return " ".join(lines) or type(err).__name__


register()
