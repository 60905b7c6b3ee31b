"""The configuration schema and its one validation boundary.

Hydra composes `configs/` (the presets users type: `topology=ring`, `experiment=alignment`)
as before; `load(cfg)` then merges the composed tree onto the typed schema below
(`OmegaConf.structured`, so an unknown key or a value of the wrong type is refused),
refuses booleans given as anything but true/false, and `validate` checks ranges and
cross-field rules. Every failure is a `ConfigError` whose message is one line:
`<dotted key>=<value>: <what is wrong>; <how to fix it>`.

To add a key: add a field (with the same default as its YAML file) to the dataclass of
its group below, a range check to `validate` if types cannot express it, and the key to
the group's YAML file so that `key=value` overrides work without a `+`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import operator
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dicesim.errors import ConfigError

# ---------------------------------------------------------------- choices

DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
INITS = ("same", "per_node")
TOPOLOGIES = ("ring", "directed_ring", "torus", "exponential", "one_peer_exponential",
              "complete", "star", "erdos_renyi", "small_world", "hub", "file")
WEIGHT_SCHEMES = ("uniform", "metropolis_hastings")
DIRECTED = ("directed_ring", "exponential", "one_peer_exponential")  # no metropolis_hastings
DATASETS = ("digits", "fashion_mnist", "synthetic", "mnist", "cifar10")
PARTITIONS = ("iid", "dirichlet")
PROBES = ("shared", "per_node")
TASKS = ("classification", "regression")
MODELS = ("logreg", "linear", "mlp", "cnn")
ACTIVATIONS = ("gelu", "relu", "sigmoid", "tanh")
OPTIMIZERS = ("sgd", "adam", "adamw")  # optim.name (dicesim/optim.py)
SCHEDULES = ("constant", "cosine", "step", "linear_warmup_cosine")  # optim.schedule
ATTACKS = ("none", "label_flip", "feature_noise", "free_rider", "scaled_update")
DEFENSES = ("none", "dice", "trimmed_mean", "oracle")
SWEEPS = ("core", "full", "optimizers")
ESTIMATORS = ("dice_e", "dice_mid", "dice_gauss2", "dice_e_nostate")  # influence.estimators
RENAMED_ESTIMATORS = {"dice_mid2": "dice_gauss2"}  # old name → new; accepted until next release
MAX_HOPS = 8
SEED_MAX = 2**32 - 1
EVENT_KEYS = ("node", "step", "samples")
CASE_KEYS = ("topology", "lr", "hops", "removal", "check", "curvature", "batch_size", "nodes",
             "data", "events", "steps", "dtype", "label", "optim")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _list(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))


# ---------------------------------------------------------------- groups

@dataclass
class Topology:
    """configs/topology/*.yaml; options with keys of their own subclass it."""

    name: str = "ring"
    weights: str = "uniform"  # uniform | metropolis_hastings (hub and a matrix file: uniform only)


@dataclass
class TorusTopology(Topology):
    rows: int | None = None  # null: the divisor of nodes closest to sqrt(nodes)


@dataclass
class StarTopology(Topology):
    center: int = 0


@dataclass
class ErdosRenyiTopology(Topology):
    p: float = 0.3


@dataclass
class SmallWorldTopology(Topology):
    k: int = 4
    beta: float = 0.2


@dataclass
class HubTopology(Topology):
    hub: int = 0
    hub_weight: float = 0.5


@dataclass
class FileTopology(Topology):
    path: str | None = None  # W as .npy ([n, n] or [T, n, n]) or .csv, or an edge list (.txt)
    directed: bool = False  # an edge list's `src dst` lines: true = src sends to dst only


TOPOLOGY_SCHEMAS: dict[str, type[Topology]] = {
    "torus": TorusTopology, "star": StarTopology, "erdos_renyi": ErdosRenyiTopology,
    "small_world": SmallWorldTopology, "hub": HubTopology, "file": FileTopology,
}


@dataclass
class Data:
    """configs/data/*.yaml: the keys every data set has."""

    name: str = "digits"
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 1.0  # Dirichlet concentration
    probe_size: int = 200
    max_train: int | None = None
    max_test: int | None = None
    image: bool = False
    standardize: bool = True
    probe: str = "shared"  # shared | per_node
    node_probe_size: int = 16
    label_noise: list[float] | None = None  # per-node fractions of wrong training labels
    input_scale: float = 1.0  # every input (after standardization) times this


@dataclass
class DigitsData(Data):
    test_size: float = 0.2  # fraction held out for test accuracy


@dataclass
class FileData(Data):
    """fashion_mnist, mnist, cifar10: read from files under root (official test split)."""

    root: str | None = None


@dataclass
class SyntheticData(Data):
    name: str = "synthetic"
    task: str = "classification"  # classification | regression
    n_samples: int = 2000
    n_features: int = 20
    n_classes: int = 4
    noise: float = 0.1
    test_size: float = 0.2


DATA_SCHEMAS: dict[str, type[Data]] = {
    "digits": DigitsData, "synthetic": SyntheticData, "fashion_mnist": FileData,
    "mnist": FileData, "cifar10": FileData,
}


@dataclass
class Model:
    """configs/model/*.yaml. One schema for all models: experiment presets set
    model.hidden and model.activation whatever model is chosen (unused keys are ignored)."""

    name: str = "mlp"
    hidden: list[int] = _list(64)  # mlp layer widths
    activation: str = "tanh"
    channels: list[int] = _list(8, 16)  # cnn


@dataclass
class Optim:
    """configs/optim/*.yaml; the ranges are checked by dicesim.optim.optim_settings."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05  # η (the schedule's peak)
    momentum: float = 0.0  # sgd: μ
    dampening: float = 0.0  # sgd: τ
    nesterov: bool = False
    weight_decay: float = 0.0  # λ (AdamW: decoupled)
    betas: list[float] = _list(0.9, 0.999)  # adam, adamw
    eps: float = 1e-8
    gossip_state: bool = False  # also mix the optimizer state (DSGDm mixes θ only)
    schedule: str = "constant"  # constant | cosine | step | linear_warmup_cosine
    min_lr: float = 0.0  # cosine: η at the last step
    warmup_steps: int = 0  # linear_warmup_cosine
    step_size: int = 1  # step: η γ^⌊t / step_size⌋
    gamma: float = 0.1


@dataclass
class Influence:
    events: Any = 0  # N sampled events, or a list of {node, step, samples}
    removal: str | int = "batch"  # batch | single | k
    step_range: list[int] | None = None  # [lo, hi]
    hops: int = 1
    ground_truth: Any = True  # true | false | K (spot-check K events)
    estimators: list[str] = _list("dice_e", "dice_gauss2")
    curvature: bool = True
    proximal: bool = False
    node_weights: list[float] | None = None  # q_k; null = uniform 1/n
    flush_every: int = 50


@dataclass
class Attack:
    kind: str = "none"
    nodes: list[int] = _list()  # attacked nodes; empty = a seeded choice of fraction * nodes
    fraction: float = 0.25
    start: int = 0
    sigma: float = 1.0
    scale: float = -4.0


@dataclass
class Defense:
    kind: str = "none"
    window: int = 20
    threshold: float = 0.0
    warmup: int = 10
    trim: int = 1


@dataclass
class Counterfactual:
    remove: list[Any] = _list()  # [{node, step, samples}, ...]


@dataclass
class Checkpoint:
    every: int = 0  # steps between checkpoints; 0 = off
    keep: int = 2  # most recent checkpoints kept


@dataclass
class Eval:
    """How much one per-node evaluation may cost (engine.EvalPlan, docs/configuration.md)."""

    budget: int | None = 1_000_000  # sample-forwards (nodes × samples); null: all of them


@dataclass
class Attribution:
    """Full-horizon attribution (dicesim/attribution.py): one reverse pass after training."""

    enabled: bool = False
    target: Any = "network"  # network | per_node | a list of node ids
    keep_every: int | None = None  # θ kept every K steps; null: ⌈√steps⌉
    samples: bool = True  # per-sample scores (samples.csv)
    plot_node: int | None = None  # the node whose influence over time is plotted; null: auto


# ---------------------------------------------------------------- experiment blocks

@dataclass
class AlignmentFull:
    topologies: list[str] = _list("ring", "exponential", "torus", "hub", "one_peer_exponential")
    lrs: list[float] = _list(0.1, 0.01)
    batch_sizes: list[int] = _list(16, 32)
    nodes: list[int] = _list(16, 32)
    curvature: list[bool] = _list(True, False)
    removal: str | int = "batch"
    hops: int = 3
    events: int = 100
    steps: int = 60


@dataclass
class AlignmentPrecision:
    enabled: bool = True
    topology: str = "ring"
    lr: float = 0.05
    hops: int = 8
    removal: str | int = "single"
    events: int = 200


@dataclass
class Alignment:
    sweep: str = "core"  # core | full | optimizers
    min_spearman: float = 0.99
    core: list[Any] = _list()  # [{topology, lr, hops, removal, check, ...}]
    hard: list[Any] = _list()  # the same keys plus data: a data config name
    optimizers: list[Any] = _list()  # the same keys plus optim: {momentum: 0.9, ...}
    hard_data: dict[str, Any] = field(default_factory=dict)  # data overrides of hard cases
    mid_min_spearman: list[Any] = _list()  # [{lr, min}]: dice_mid targets of hard cases
    full: AlignmentFull = field(default_factory=AlignmentFull)
    precision: AlignmentPrecision = field(default_factory=AlignmentPrecision)


@dataclass
class Cascade:
    topologies: list[str] = _list("ring", "torus", "exponential", "one_peer_exponential", "hub")
    draw: list[str] = _list("ring", "torus", "exponential", "hub")
    leaf: int | None = None
    hub_first_step: int = 0
    hub_stride: int = 2


@dataclass
class Contribution:
    node_counts: list[int] = _list(8, 16)
    noise_max: float = 0.6
    noise: list[float] | None = None
    hops: int = 2
    curvature: bool = True
    min_spearman: float = 0.8


@dataclass
class Retrain:
    batches: int = 100
    samples: int = 100


@dataclass
class Cleansing:
    noisy_nodes: int = 4  # nodes whose labels are partly flipped
    flip: float = 0.3  # fraction of a noisy node's labels flipped
    remove: list[float] = _list(0.01, 0.02, 0.05, 0.10)  # fractions k of samples removed
    hops: int = 2  # r of the r-hop DICE-E baseline per sample
    baseline_events: int = 2000  # single-sample DICE-E events of that baseline (sampled)
    min_auc: float = 0.95


@dataclass
class Anomaly:
    attacks: list[str] = _list("label_flip", "feature_noise", "free_rider", "scaled_update")
    topologies: list[str] = _list("ring", "exponential")
    window: int | None = None
    per_weight: bool = True
    example: list[str] = _list("label_flip", "ring")


@dataclass
class Collaborators:
    topologies: list[str] = _list("ring", "exponential")


# present only when an experiment= preset (or the command line) sets them
EXPERIMENT_BLOCKS: dict[str, type] = {
    "alignment": Alignment, "cascade": Cascade, "contribution": Contribution,
    "anomaly": Anomaly, "collaborators": Collaborators, "cleansing": Cleansing,
    "retrain": Retrain,
}
# the experiment= preset of a block whose name is not the preset's
BLOCK_PRESETS: dict[str, str] = {"retrain": "attribution"}


# ---------------------------------------------------------------- the root

@dataclass
class Config:
    name: str = "run"
    nodes: int = 16
    steps: int = 200
    batch_size: int = 32
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    backend: str = "auto"
    timeout_s: float = 60.0
    eval_every: int = 10
    init: str = "same"
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
    data: Data = field(default_factory=DigitsData)
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    influence: Influence = field(default_factory=Influence)
    attack: Attack = field(default_factory=Attack)
    defense: Defense = field(default_factory=Defense)


def schema_for(raw: Mapping) -> DictConfig:
    """The typed schema of one composed config: the root, with the topology and data
    schemas of the options it names and the experiment blocks it has."""
    root = OmegaConf.structured(Config)
    topo = _get(raw, "topology.name")
    data = _get(raw, "data.name")
    with open_dict(root):
        root.topology = TOPOLOGY_SCHEMAS.get(topo, Topology)() if isinstance(topo, str) \
            else Topology()
        root.data = DATA_SCHEMAS.get(data, Data)() if isinstance(data, str) else Data()
        for block, cls in EXPERIMENT_BLOCKS.items():
            if isinstance(raw, Mapping) and block in raw:
                root[block] = cls()
    return root


# ---------------------------------------------------------------- loading

def load(cfg: Mapping) -> DictConfig:
    """The composed config merged onto its schema and validated (struct mode: no new keys).
    Raises ConfigError with one line on any bad setting."""
    try:
        for key, choices in (("topology.name", TOPOLOGIES), ("data.name", DATASETS)):
            name = _get(cfg, key)
            if isinstance(name, str):  # picks the group's schema; other types: the merge
                _choice(key, name, choices)
        schema = schema_for(cfg)
        _strict_bools(schema, cfg, "")
        try:
            typed = OmegaConf.merge(schema, cfg)
        except OmegaConfBaseException as err:
            raise ConfigError(_explain(err, schema, cfg)) from None
        typed.influence.estimators = renamed_estimators(typed.influence.estimators)
        OmegaConf.set_struct(typed, True)
        validate(typed)
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        raise ConfigError(_one_line(err)) from None
    return typed


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


def _one_line(err: Exception) -> str:
    text = str(err)
    key = getattr(err, "full_key", None)
    first = text.split("\n")[0].strip()
    return f"{key}: {first}" if key else " ".join(text.split())


def _get(cfg: Any, dotted: str) -> Any:
    """cfg at a dotted path with [i] list indices; None where it does not exist."""
    value = cfg
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(value, Sequence) or isinstance(value, str) or i >= len(value):
                return None
            value = value[i]
        elif isinstance(value, Mapping):
            value = value.get(part)
        else:
            return None
    return value


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


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type without Optional, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), optional
    return tp, False


def describe(tp: Any) -> str:
    """What a field of type tp must be, in words."""
    tp, optional = _unwrap(tp)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             Any: "a value"}
    origin = typing.get_origin(tp)
    if tp in words:
        text = words[tp]
    elif origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        plural = {int: "integers", float: "numbers", bool: "true/false values",
                  str: "names"}.get(item, "values")
        text = f"a list of {plural}"
    elif origin in (Union, types.UnionType):
        text = " or ".join(describe(a) for a in typing.get_args(tp))
    elif dataclasses.is_dataclass(tp):
        text = "a group of keys"
    else:
        text = f"a {getattr(tp, '__name__', tp)}"
    return text + (" or null" if optional else "")


def _field_type(schema: DictConfig, dotted: str) -> tuple[Any, Any]:
    """(type hint, default) of the schema field at a dotted path ([i]: a list's item)."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    node: Any = schema
    tp: Any = Config
    default: Any = None
    for part in parts:
        if part.startswith("["):
            inner, _ = _unwrap(tp)
            tp = (typing.get_args(inner) or (Any,))[0]
            default = None
            node = None
            continue
        cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            return Any, None
        hints = typing.get_type_hints(cls)
        try:
            child = node.get(part)  # the schema's default (a DictConfig for a group)
        except OmegaConfBaseException:  # e.g. out_dir's ${now:...} outside Hydra
            return hints.get(part, Any), None
        if isinstance(child, DictConfig):  # a group: its own (option's) dataclass
            tp = OmegaConf.get_type(child)
        elif part in hints:
            tp = hints[part]
        else:
            return Any, None
        node = child
        default = list(node) if isinstance(node, ListConfig) else (
            None if isinstance(node, DictConfig) else node)
    return tp, default


def _explain(err: OmegaConfBaseException, schema: DictConfig, raw: Mapping) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) and key:
        return unknown_key(key, schema)
    tp, default = _field_type(schema, key)
    value = _get(raw, key)
    example = f", e.g. {key}={show(default)}" if default is not None else ""
    if key:
        return f"{key}={show(value)}: must be {describe(tp)}{example}"
    return _one_line(err)


def closest(word: str, valid: Sequence[str]) -> list[str]:
    """The valid word nearest to a typo: difflib's best match, or one with the same letters
    (`rl` for `lr`)."""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    return close or [v for v in valid if sorted(v) == sorted(word)][:1]


def unknown_key(dotted: str, schema: DictConfig) -> str:
    """`nodse: unknown key; did you mean nodes?` (the closest valid key at that level)."""
    parent, _, leaf = dotted.rpartition(".")
    leaf = re.sub(r"\[\d+\]$", "", leaf)
    node = OmegaConf.select(schema, parent) if parent else schema
    if parent and node is None and parent.split(".")[0] in EXPERIMENT_BLOCKS:
        block = parent.split(".")[0]
        preset = BLOCK_PRESETS.get(block, block)
        return (f"{dotted}: {block}.* belongs to experiment={preset}; add experiment={preset} "
                "or drop the key")
    valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    if not parent:
        valid += list(EXPERIMENT_BLOCKS)
    where = f" in {parent}" if parent else ""
    close = closest(leaf, valid)
    if close:
        fix = f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    else:
        fix = f"valid keys{where}: {', '.join(sorted(set(valid)))}"
    return f"{dotted}: unknown key{where}; {fix}"


def _strict_bools(schema: DictConfig, raw: Any, path: str) -> None:
    """OmegaConf would turn yes/no/on/off/1/0 into booleans: a bool key takes only
    true or false. A group given a plain value is refused here too (the merge's own
    message does not name the key)."""
    if not isinstance(raw, Mapping):
        return
    cls = OmegaConf.get_type(schema)
    if cls is None or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for key in list(raw.keys()):
        dotted = f"{path}{key}"
        child = schema.get(key) if key in schema else None
        if isinstance(child, DictConfig):  # a group (experiment blocks have no hint)
            if not isinstance(raw[key], Mapping):
                names = [str(k) for k in child.keys()]
                if not names:  # an open mapping (e.g. alignment.hard_data)
                    raise ConfigError(f"{dotted}={show(raw[key])}: must be a mapping of keys "
                                      f"to values, e.g. {dotted}={{max_test: 2000}}")
                raise ConfigError(f"{dotted}={show(raw[key])}: must be a group of keys "
                                  f"({', '.join(names)}); set one with {dotted}.{names[0]}=...")
            _strict_bools(child, raw[key], dotted + ".")
            continue
        if key not in hints:
            continue
        value = raw[key]
        tp, optional = _unwrap(hints[key])
        if tp is bool:
            if not (isinstance(value, bool) or (value is None and optional)):
                raise ConfigError(f"{dotted}={show(value)}: must be true or false")
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (bool,):
            if isinstance(value, Sequence) and not isinstance(value, str):
                for i, item in enumerate(value):
                    if not isinstance(item, bool):
                        raise ConfigError(f"{dotted}[{i}]={show(item)}: must be true or false")


# ---------------------------------------------------------------- ranges and cross-field rules

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str)


def _choice(key: str, value: Any, choices: Sequence[str], hint: str = "") -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        guess = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}={show(value)}: unknown{guess}; choose one of "
                          f"{', '.join(choices)}{hint}")


def _at_least(key: str, value: Any, low: float, example: Any) -> None:
    if not value >= low or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}={show(value)}: must be at least {show(low)}; "
                          f"set e.g. {key}={show(example)}")


def _positive(key: str, value: float, example: Any) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={show(value)}: must be a positive finite number; "
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
            if not _is_int(item[k]):
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
        ok = samples in ("all", None) or (_is_int(samples) and samples >= 1) or (
            _is_list(samples) and all(_is_int(v) and v >= 0 for v in samples) and len(samples))
        if not ok:
            raise ConfigError(f"{where}.samples={show(samples)}: must be all, a number k >= 1 "
                              "or a list of training sample ids")


def _topology_names(key: str, names: Sequence[str]) -> None:
    for name in names:
        _choice(key, name, TOPOLOGIES)


def validate(cfg: DictConfig) -> None:
    """Ranges and cross-field rules that types cannot express; ConfigError (one line)."""
    c = cfg
    if c.divergence_factor is not None and not c.divergence_factor > 1:
        raise ConfigError(f"divergence_factor={show(c.divergence_factor)}: a number > 1 (a "
                          "loss above it times the node's first training loss stops the run), "
                          "or null for off")
    if not c.name or "/" in c.name:
        raise ConfigError(f"name={show(c.name)}: must be a non-empty name without '/'; "
                          "set e.g. name=run")
    _at_least("nodes", c.nodes, 1, 16)
    _at_least("steps", c.steps, 1, 200)
    _at_least("batch_size", c.batch_size, 1, 32)
    _within("seed", c.seed, 0, SEED_MAX, 0)
    _choice("dtype", c.dtype, DTYPES)
    _choice("device", c.device, DEVICES)
    _choice("backend", c.backend, BACKENDS)
    _positive("timeout_s", c.timeout_s, 60)
    _at_least("eval_every", c.eval_every, 1, 10)
    _choice("init", c.init, INITS, " (one initial θ for all nodes, or one per node)")
    if c.driver is not None:
        if not MODULE_NAME.fullmatch(c.driver):
            raise ConfigError(f"driver={c.driver}: must be the plain name of a module in "
                              "dicesim/experiments (letters, digits, _), e.g. driver=alignment")
        if importlib.util.find_spec(f"dicesim.experiments.{c.driver}") is None:
            raise ConfigError(f"driver={c.driver}: no such experiment driver in "
                              "dicesim/experiments; use an experiment= preset")
    if not str(OmegaConf.to_container(c, resolve=False)["out_dir"]).strip():
        raise ConfigError("out_dir: must be a directory path; leave it out for "
                          "outputs/<name>/<date_time>")
    if c.resume is not None:
        if not c.resume.strip():
            raise ConfigError("resume: must be a run directory or auto")
        if c.resume != "auto" and not Path(c.resume).expanduser().is_dir():
            raise ConfigError(f"resume={c.resume}: no such directory; give the directory of "
                              "an earlier run or resume=auto")
    _at_least("checkpoint.every", c.checkpoint.every, 0, 0)
    _at_least("checkpoint.keep", c.checkpoint.keep, 1, 2)
    if c.eval.budget is not None:  # one sample per node at least
        _at_least("eval.budget", c.eval.budget, c.nodes, 1_000_000)
    n, steps = c.nodes, c.steps
    _validate_topology(c.topology, n)
    _validate_data(c.data)
    _validate_model(c.model)
    _validate_model_data(c.model, c.data)
    from dicesim.optimsettings import optim_settings  # the optimizer's checks, shared

    optim_settings(c.optim, steps)
    _validate_influence(c.influence, n, steps, c.batch_size)
    _validate_attack(c.attack, n, steps)
    _validate_defense(c.defense, c.influence.proximal)
    if not _is_list(c.counterfactual.remove):
        raise ConfigError(f"counterfactual.remove={show(c.counterfactual.remove)}: must be a "
                          "list, e.g. counterfactual.remove=[{node: 2, step: 5, samples: all}]")
    _events("counterfactual.remove", c.counterfactual.remove, n, steps, 0)
    _validate_attribution(c.attribution, n, steps, c.defense.kind)
    for block, check in (("alignment", _validate_alignment), ("cascade", _validate_cascade),
                         ("contribution", _validate_contribution),
                         ("anomaly", _validate_anomaly),
                         ("collaborators", _validate_collaborators),
                         ("cleansing", _validate_cleansing),
                         ("retrain", _validate_retrain)):
        if block in c and c[block] is not None:
            check(c[block])
    if "alignment" in c and c.alignment is not None:
        _validate_optimizer_cases(c.alignment.optimizers, c.optim, steps)


def _validate_optimizer_cases(cases: Sequence[Any], base: DictConfig, steps: int) -> None:
    """Each alignment.optimizers case's optimizer: the run's optim with the case's keys."""
    from dicesim.optimsettings import optim_settings

    for i, case in enumerate(cases):
        merged = {**OmegaConf.to_container(base, resolve=True),
                  **OmegaConf.to_container(case.get("optim") or OmegaConf.create({}),
                                          resolve=True), "lr": case.lr}
        try:
            optim_settings(merged, int(case.get("steps", steps)))
        except ConfigError as err:
            raise ConfigError(f"alignment.optimizers[{i}].{err}") from None


def attribution_targets(target: Any, nodes: int) -> list[int] | None:
    """attribution.target as node ids (None: the network target); ConfigError if bad."""
    if target == "network":
        return None
    if target == "per_node":
        return list(range(nodes))
    if _is_list(target) and target and all(_is_int(v) for v in target):
        _node_ids("attribution.target", target, nodes)
        if len(set(target)) < len(target):
            raise ConfigError(f"attribution.target={show(list(target))}: node ids repeat; "
                              "list each target node once")
        return [int(v) for v in target]
    raise ConfigError(f"attribution.target={show(target)}: choose network, per_node or a "
                      "list of target node ids, e.g. attribution.target=[0,3]")


def _validate_attribution(a: DictConfig, nodes: int, steps: int, defense: str) -> None:
    attribution_targets(a.target, nodes)
    if a.keep_every is not None:
        _within("attribution.keep_every", a.keep_every, 1, steps, max(1, math.isqrt(steps)))
    if a.plot_node is not None:
        _node_ids("attribution.plot_node", [a.plot_node], nodes)
    if a.enabled and defense != "none":
        raise ConfigError(f"attribution.enabled=true needs defense.kind=none (got {defense}): "
                          "the reverse pass transposes the plain gossip W^t")


def _validate_topology(t: DictConfig, nodes: int) -> None:
    _choice("topology.name", t.name, TOPOLOGIES, " (e.g. topology=ring)")
    _choice("topology.weights", t.weights, WEIGHT_SCHEMES)
    if t.weights == "metropolis_hastings" and t.name in DIRECTED:
        raise ConfigError(f"topology.weights=metropolis_hastings needs an undirected graph but "
                          f"{t.name} is directed; use topology.weights=uniform")
    if t.name == "torus" and t.rows is not None:
        _at_least("topology.rows", t.rows, 1, 4)
        if nodes % t.rows:
            raise ConfigError(f"topology.rows={t.rows} does not divide nodes={nodes}; pick a "
                              "divisor of nodes or leave topology.rows=null")
    if t.name == "star":
        _within("topology.center", t.center, 0, nodes - 1, 0)
    if t.name == "erdos_renyi":
        _within("topology.p", t.p, 0, 1, 0.3, open_low=True)
    if t.name == "small_world":
        _at_least("topology.k", t.k, 2, 4)
        if nodes > 2 and t.k >= nodes:
            raise ConfigError(f"topology.k={t.k}: small_world needs 2 <= k < nodes={nodes}; "
                              f"set topology.k between 2 and {nodes - 1}")
        _within("topology.beta", t.beta, 0, 1, 0.2)
    if t.name == "hub":
        _within("topology.hub", t.hub, 0, nodes - 1, 0)
        _within("topology.hub_weight", t.hub_weight, 0, 1, 0.5, open_low=True, open_high=True)
    if t.name == "file" and (t.path is None or not t.path.strip()):
        raise ConfigError("topology.path is not set; pass topology.path=/path/to/W.npy "
                          "(or a .csv file)")


def _validate_data(d: DictConfig) -> None:
    _choice("data.name", d.name, DATASETS, " (e.g. data=digits)")
    _choice("data.partition", d.partition, PARTITIONS)
    _positive("data.alpha", d.alpha, 1.0)
    _at_least("data.probe_size", d.probe_size, 1, 200)
    for key in ("max_train", "max_test"):
        if d[key] is not None:
            _at_least(f"data.{key}", d[key], 1, 1000)
    _choice("data.probe", d.probe, PROBES)
    _positive("data.input_scale", d.input_scale, 1.0)
    if d.label_noise is not None and any(not 0 <= p <= 1 for p in d.label_noise):
        raise ConfigError(f"data.label_noise={show(list(d.label_noise))}: fractions in [0, 1], "
                          "one per node")
    _at_least("data.node_probe_size", d.node_probe_size, 1, 16)
    if "test_size" in d:
        _within("data.test_size", d.test_size, 0, 1, 0.2, open_low=True, open_high=True)
    if d.name == "synthetic":
        _choice("data.task", d.task, TASKS)
        _at_least("data.n_samples", d.n_samples, 2, 2000)
        _at_least("data.n_features", d.n_features, 1, 20)
        if d.task == "classification":
            _at_least("data.n_classes", d.n_classes, 2, 4)
        _at_least("data.noise", d.noise, 0, 0.1)


def _validate_model(m: DictConfig) -> None:
    _choice("model.name", m.name, MODELS, " (e.g. model=mlp)")
    _choice("model.activation", m.activation, ACTIVATIONS)
    if m.name == "mlp" and not list(m.hidden):
        raise ConfigError("model.hidden=[]: an mlp needs one or more layer widths, e.g. "
                          "model.hidden=[64]")
    for key in ("hidden", "channels"):
        widths = list(m[key])
        if any(w < 1 for w in widths):
            raise ConfigError(f"model.{key}={show(widths)}: layer widths must be positive "
                              f"integers, e.g. model.{key}=[64]")


def _validate_model_data(m: DictConfig, d: DictConfig) -> None:
    """The pairings the names alone decide (the shapes are checked when the data loads)."""
    regression = d.name == "synthetic" and d.task == "regression"
    if m.name == "linear" and not regression:
        raise ConfigError("model.name=linear is linear regression and needs a regression data "
                          "set; use data=synthetic_regression, or model=logreg for "
                          "classification")
    if m.name == "logreg" and regression:
        raise ConfigError("model.name=logreg needs a classification data set; use model=linear")
    if regression and d.partition == "dirichlet":
        raise ConfigError("data.partition=dirichlet needs class labels; use data.partition=iid "
                          "with regression data")
    if d.image and d.name == "synthetic":
        raise ConfigError("data.image=true needs an image dataset; data.name=synthetic is flat")
    if m.name == "cnn" and not d.image:
        raise ConfigError("model.name=cnn needs image inputs [C,H,W]; set data.image=true")


def _validate_influence(i: DictConfig, nodes: int, steps: int, batch_size: int) -> None:
    _within("influence.hops", i.hops, 0, MAX_HOPS, 1)
    gt = i.ground_truth
    if not (isinstance(gt, bool) or (_is_int(gt) and gt >= 0)):
        raise ConfigError(f"influence.ground_truth={show(gt)}: true, false or a number K of "
                          "events to spot-check, e.g. influence.ground_truth=20")
    names = list(i.estimators)
    bad = [n for n in names if n not in ESTIMATORS]
    if bad or not names or len(set(names)) < len(names):
        close = closest(str(bad[0]), ESTIMATORS) if bad else []
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"influence.estimators={show(names)}: {hint}a list of distinct "
                          f"estimators from {', '.join(ESTIMATORS)}, e.g. [dice_e, dice_gauss2]")
    _at_least("influence.flush_every", i.flush_every, 1, 50)
    removal = i.removal
    if not (removal in ("batch", "single") or (_is_int(removal) and 1 <= removal <= batch_size)):
        raise ConfigError(f"influence.removal={show(removal)}: choose batch, single or a number "
                          f"of samples from 1 to batch_size={batch_size}")
    events = i.events
    if _is_int(events):
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
        top = steps - i.hops
        if not 0 <= lo <= hi <= top:
            raise ConfigError(f"influence.step_range={show(r)}: needs 0 <= lo <= hi <= "
                              f"steps - hops = {top}")
    if i.node_weights is not None:
        q = list(i.node_weights)
        if len(q) != nodes or any(not (v >= 0 and math.isfinite(v)) for v in q):
            raise ConfigError(f"influence.node_weights={show(q)}: needs {nodes} non-negative "
                              "numbers (one per node), or null for uniform 1/n")


def _validate_attack(a: DictConfig, nodes: int, steps: int) -> None:
    _choice("attack.kind", a.kind, ATTACKS, " (e.g. attack=label_flip)")
    _node_ids("attack.nodes", list(a.nodes), nodes)
    if len(set(a.nodes)) != len(a.nodes):
        raise ConfigError(f"attack.nodes={show(list(a.nodes))}: lists a node twice")
    _within("attack.fraction", a.fraction, 0, 1, 0.25)
    if a.kind != "none":
        _within("attack.start", a.start, 0, steps - 1, 0)
    else:
        _at_least("attack.start", a.start, 0, 0)
    if not math.isfinite(a.sigma) or a.sigma < 0:
        raise ConfigError(f"attack.sigma={show(a.sigma)}: must be a finite number >= 0; "
                          "set e.g. attack.sigma=1.0")
    if not math.isfinite(a.scale):
        raise ConfigError(f"attack.scale={show(a.scale)}: must be a finite number; "
                          "set e.g. attack.scale=-4.0")


def _validate_defense(d: DictConfig, proximal: bool) -> None:
    _choice("defense.kind", d.kind, DEFENSES, " (e.g. defense=dice)")
    if d.kind == "dice" and not proximal:
        raise ConfigError("defense.kind=dice scores neighbours by proximal influence; "
                          "set influence.proximal=true")
    _at_least("defense.window", d.window, 1, 20)
    _at_least("defense.warmup", d.warmup, 0, 10)
    _at_least("defense.trim", d.trim, 0, 1)
    if not math.isfinite(d.threshold):
        raise ConfigError(f"defense.threshold={show(d.threshold)}: must be a finite number; "
                          "set e.g. defense.threshold=0.0")


def _validate_case_removal(key: str, removal: Any) -> None:
    if not (removal in ("batch", "single") or (_is_int(removal) and removal >= 1)):
        raise ConfigError(f"{key}={show(removal)}: choose batch, single or a number of samples")


def _validate_alignment(a: DictConfig) -> None:
    _choice("alignment.sweep", a.sweep, SWEEPS)
    _within("alignment.min_spearman", a.min_spearman, -1, 1, 0.99)
    for i, entry in enumerate(a.mid_min_spearman):
        ok = isinstance(entry, Mapping) and set(entry) == {"lr", "min"} and _is_num(
            entry["lr"]) and _is_num(entry["min"]) and -1 <= entry["min"] <= 1
        if not ok:
            raise ConfigError(f"alignment.mid_min_spearman[{i}]={show(entry)}: an entry is "
                              "{lr: 0.2, min: 0.99}")
    for key in a.hard_data:
        if key not in Data.__dataclass_fields__ and key not in ("test_size", "root"):
            raise ConfigError(f"alignment.hard_data.{key}: not a data key")
    cases = [(f"alignment.core[{i}]", c) for i, c in enumerate(a.core)]
    cases += [(f"alignment.hard[{i}]", c) for i, c in enumerate(a.hard)]
    cases += [(f"alignment.optimizers[{i}]", c) for i, c in enumerate(a.optimizers)]
    for where, case in cases:
        if isinstance(case, Mapping) and "optim" in case:
            given = case["optim"]
            if not isinstance(given, Mapping) or any(k not in Optim.__dataclass_fields__
                                                     or k == "lr" for k in given):
                raise ConfigError(f"{where}.optim={show(given)}: optimizer keys other than lr "
                                  "(the case's lr), e.g. {name: sgd, momentum: 0.9}")
        if isinstance(case, Mapping) and "data" in case:
            _choice(f"{where}.data", case["data"], DATASETS)
        if not isinstance(case, Mapping):
            raise ConfigError(f"{where}={show(case)}: a case is {{topology, lr, hops, ...}}")
        for k in case:
            if k not in CASE_KEYS:
                close = closest(str(k), CASE_KEYS)
                fix = f"did you mean {close[0]}?" if close else f"keys: {', '.join(CASE_KEYS)}"
                raise ConfigError(f"{where}.{k}: unknown key; {fix}")
        for k in ("topology", "lr", "hops"):
            if k not in case:
                raise ConfigError(f"{where}: {k} is missing")
        _choice(f"{where}.topology", case["topology"], TOPOLOGIES)
        if not _is_num(case["lr"]) or not case["lr"] > 0:
            raise ConfigError(f"{where}.lr={show(case['lr'])}: must be a positive number")
        for k in ("hops", "batch_size", "nodes", "events", "steps"):
            if k in case and not _is_int(case[k]):
                raise ConfigError(f"{where}.{k}={show(case[k])}: must be an integer")
        if not 0 <= case["hops"] <= MAX_HOPS:
            raise ConfigError(f"{where}.hops={case['hops']}: must be from 0 to {MAX_HOPS}")
        for k in ("check", "curvature"):
            if k in case and not isinstance(case[k], bool):
                raise ConfigError(f"{where}.{k}={show(case[k])}: must be true or false")
        if "dtype" in case:
            _choice(f"{where}.dtype", case["dtype"], DTYPES)
        if "removal" in case:
            _validate_case_removal(f"{where}.removal", case["removal"])
    f = a.full
    _topology_names("alignment.full.topologies", f.topologies)
    for key in ("lrs",):
        if any(not (v > 0) for v in f[key]):
            raise ConfigError(f"alignment.full.{key}={show(list(f[key]))}: must be positive")
    for key in ("batch_sizes", "nodes"):
        if any(v < 1 for v in f[key]):
            raise ConfigError(f"alignment.full.{key}={show(list(f[key]))}: must be >= 1")
    _validate_case_removal("alignment.full.removal", f.removal)
    _within("alignment.full.hops", f.hops, 0, MAX_HOPS, 3)
    _at_least("alignment.full.events", f.events, 0, 100)
    _at_least("alignment.full.steps", f.steps, 1, 60)
    p = a.precision
    _choice("alignment.precision.topology", p.topology, TOPOLOGIES)
    _positive("alignment.precision.lr", p.lr, 0.05)
    _within("alignment.precision.hops", p.hops, 0, MAX_HOPS, 8)
    _validate_case_removal("alignment.precision.removal", p.removal)
    _at_least("alignment.precision.events", p.events, 0, 200)


def _validate_cascade(c: DictConfig) -> None:
    _topology_names("cascade.topologies", c.topologies)
    _topology_names("cascade.draw", c.draw)
    if c.leaf is not None:
        _at_least("cascade.leaf", c.leaf, 0, 0)
    _at_least("cascade.hub_first_step", c.hub_first_step, 0, 0)
    _at_least("cascade.hub_stride", c.hub_stride, 1, 2)


def _validate_contribution(c: DictConfig) -> None:
    if not c.node_counts or any(v < 2 for v in c.node_counts):
        raise ConfigError(f"contribution.node_counts={show(list(c.node_counts))}: needs one or "
                          "more node counts >= 2, e.g. contribution.node_counts=[8,16]")
    _within("contribution.noise_max", c.noise_max, 0, 1, 0.6)
    if c.noise is not None and any(not 0 <= v <= 1 for v in c.noise):
        raise ConfigError(f"contribution.noise={show(list(c.noise))}: fractions in [0, 1], "
                          "one per node, or null")
    _within("contribution.hops", c.hops, 0, MAX_HOPS, 2)
    _within("contribution.min_spearman", c.min_spearman, -1, 1, 0.8)


def _validate_retrain(c: DictConfig) -> None:
    _at_least("retrain.batches", c.batches, 0, 100)
    _at_least("retrain.samples", c.samples, 0, 100)


def _validate_cleansing(c: DictConfig) -> None:
    _at_least("cleansing.noisy_nodes", c.noisy_nodes, 1, 4)
    _within("cleansing.flip", c.flip, 0, 1, 0.3, open_low=True)
    if not c.remove or any(not 0 < k < 1 for k in c.remove):
        raise ConfigError(f"cleansing.remove={show(list(c.remove))}: fractions in (0, 1) of "
                          "the training samples, e.g. cleansing.remove=[0.01,0.05]")
    _within("cleansing.hops", c.hops, 0, MAX_HOPS, 2)
    _at_least("cleansing.baseline_events", c.baseline_events, 0, 2000)
    _within("cleansing.min_auc", c.min_auc, 0, 1, 0.95)


def _validate_anomaly(a: DictConfig) -> None:
    attacks = [x for x in ATTACKS if x != "none"]
    for name in a.attacks:
        if name not in attacks:
            raise ConfigError(f"anomaly.attacks: {name} is not an attack; choose from "
                              f"{', '.join(attacks)}")
    _topology_names("anomaly.topologies", a.topologies)
    if a.window is not None:
        _at_least("anomaly.window", a.window, 1, 20)
    ex = list(a.example)
    if len(ex) != 2 or ex[0] not in attacks or ex[1] not in TOPOLOGIES:
        raise ConfigError(f"anomaly.example={show(ex)}: must be [attack, topology], "
                          "e.g. anomaly.example=[label_flip, ring]")


def _validate_collaborators(c: DictConfig) -> None:
    _topology_names("collaborators.topologies", c.topologies)


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


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
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
    """The override lists of every job of a `-m` sweep, as Hydra's basic sweeper forms
    them: comma lists, choice(), range() and glob() (config groups) become one job each,
    the product over keys; a key given twice keeps its last value."""
    from hydra.core.override_parser.types import Glob

    per_key: dict[str, list[str]] = {}
    for o in _parse(overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            per_key[key] = [f"{key}={o.get_value_element_as_str()}"]
            continue
        value = o.value()
        if isinstance(value, Glob):
            group = o.key_or_group
            if group not in GROUPS:
                raise ConfigError(f"{o.input_line}: glob() sweeps only config groups "
                                  f"({', '.join(GROUPS)})")
            items = value.filter(group_options(group))
        elif o.is_discrete_sweep():
            items = list(o.sweep_string_iterator())
        else:
            raise ConfigError(f"{o.input_line}: an interval sweep cannot be enumerated; "
                              "give a list (a,b,c), choice() or range()")
        per_key[key] = [f"{key}={v}" for v in items]
    points: list[list[str]] = [[]]
    for values in per_key.values():
        points = [p + [v] for p in points for v in values]
    return points


def _missing_key_error(err: Exception, overrides: Sequence[str], compose: Any) -> str | None:
    """Hydra's `Could not override 'nodse'` as `nodse: unknown key; did you mean nodes?`."""
    m = re.search(r"Could not override '([^']+)'", str(err))
    if not m:
        return None
    key = m.group(1)
    groups = [o for o in overrides if o.lstrip("+~").partition("=")[0].split("/")[0]
              in (*GROUPS, "hydra") and "=" in o]
    try:
        base = compose(groups)
    except Exception:
        return None
    value = next((o.partition("=")[2] for o in overrides
                  if o.lstrip("+~").partition("=")[0] == key), None)
    schema = schema_for(base)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    if isinstance(node, DictConfig) and leaf in node:
        shown = f"{key}={value}" if value is not None else key
        return (f"{shown}: a valid key, but the chosen presets do not set it; "
                f"add it with +{shown}")
    line = unknown_key(key, schema)
    return line.replace(f"{key}: ", f"{key}={value}: ", 1) if value is not None else line


def compose_checked(points: Sequence[Sequence[str]]) -> list[DictConfig]:
    """Compose each override list with Hydra, exactly as `python -m dicesim` would, and
    `load` it: the typed, validated configs, or a one-line ConfigError."""
    return _compose_points(points)


def _compose_points(points: Sequence[Sequence[str]]) -> list[DictConfig]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dicesim.topology import infer_nodes

    out = []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        def compose(overrides: Sequence[str]) -> DictConfig:
            return hydra_compose("config", overrides=list(overrides))

        for overrides in points:
            for o in overrides:
                check_group_choice(o)
            _parse(overrides)
            try:
                cfg = compose(overrides)
            except Exception as err:  # Hydra's override and composition errors
                line = _missing_key_error(err, overrides, compose)
                raise ConfigError(line or _hydra_line(err)) from None
            keep_named_groups(cfg, overrides)
            infer_nodes(cfg, overrides)  # topology=file without nodes=: the file's size
            out.append(load(cfg))
    return out


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
