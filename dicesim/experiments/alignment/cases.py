"""The `alignment:` config block, its checks, and the cases it lists.

Every case, whatever set it belongs to, is read by one parser (`parse_case`) from one
mapping of CASE_KEYS: the listed sets (`core`, `hard`, `optimizers`) are such mappings
already, the `full` grid and the `precision` twin are turned into them (`case_entries`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dicesim.common.errors import ConfigError
from dicesim.config import (
    DATA_SCHEMAS,
    DATASETS,
    DTYPES,
    MAX_HOPS,
    TOPOLOGIES,
    Config,
    Optim,
    TopologyName,
    bounded,
    check_choice,
    check_optim,
    check_removal,
    closest,
    default_list,
    is_int,
    is_num,
    register_block,
    show,
)


class Sweep(StrEnum):
    core = "core"
    full = "full"
    optimizers = "optimizers"


@dataclass
class AlignmentFull:
    topologies: list[TopologyName] = default_list("ring", "exponential", "torus", "hub",
                                                  "one_peer_exponential")
    lrs: list[float] = default_list(0.1, 0.01)
    batch_sizes: list[int] = default_list(16, 32)
    nodes: list[int] = default_list(16, 32)
    curvature: list[bool] = default_list(True, False)
    removal: str | int = "batch"
    hops: int = bounded(3, 0, MAX_HOPS)
    events: int = bounded(100, 0)
    steps: int = bounded(60, 1)


@dataclass
class AlignmentPrecision:
    enabled: bool = True
    topology: TopologyName = TopologyName.ring
    lr: float = bounded(0.05, 0, open_lo=True)
    hops: int = bounded(8, 0, MAX_HOPS)
    removal: str | int = "single"
    events: int = bounded(200, 0)


@dataclass
class Alignment:
    """The `alignment:` block of configs/experiment/alignment.yaml."""

    sweep: Sweep = Sweep.core
    min_spearman: float = bounded(0.99, -1, 1)
    core: list[Any] = default_list()  # [{topology, lr, hops, removal, check, ...}]
    hard: list[Any] = default_list()  # the same keys plus data: a data config name
    optimizers: list[Any] = default_list()  # the same keys plus optim: {momentum: 0.9, ...}
    hard_data: dict[str, Any] = field(default_factory=dict)  # data overrides of hard cases
    mid_min_spearman: list[Any] = default_list()  # [{lr, min}]: dice_mid targets of hard cases
    full: AlignmentFull = field(default_factory=AlignmentFull)
    precision: AlignmentPrecision = field(default_factory=AlignmentPrecision)


CASE_KEYS = ("topology", "lr", "hops", "removal", "check", "curvature", "batch_size", "nodes",
             "data", "events", "steps", "dtype", "label", "optim")
LISTED_SETS = ("core", "hard", "optimizers")  # the sets the block lists case by case


# ---- checks ----------------------------------------------------------------------------------
def check_alignment(c: Config) -> None:
    a = c.alignment
    for i, entry in enumerate(a.mid_min_spearman):
        if not (isinstance(entry, Mapping) and set(entry) == {"lr", "min"} and is_num(
                entry["lr"]) and is_num(entry["min"]) and -1 <= entry["min"] <= 1):
            raise ConfigError(f"alignment.mid_min_spearman[{i}]={show(entry)}: an entry is "
                              "{lr: 0.2, min: 0.99}")
    data_keys = {f.name for cls in DATA_SCHEMAS.values() for f in dataclasses.fields(cls)}
    for key in a.hard_data:
        if key not in data_keys:
            raise ConfigError(f"alignment.hard_data.{key}: not a data key")
    for kind in LISTED_SETS:
        for i, case in enumerate(getattr(a, kind)):
            check_case(f"alignment.{kind}[{i}]", case)
            if "optim" in case:
                check_case_optim(c, f"alignment.{kind}[{i}]", case)
    check_full(a.full)
    check_removal("alignment.precision.removal", a.precision.removal)


def check_full(f: AlignmentFull) -> None:
    if any(not v > 0 for v in f.lrs):
        raise ConfigError(f"alignment.full.lrs={show(f.lrs)}: must be positive")
    for key in ("batch_sizes", "nodes"):
        if any(v < 1 for v in getattr(f, key)):
            raise ConfigError(f"alignment.full.{key}={show(getattr(f, key))}: must be >= 1")
    check_removal("alignment.full.removal", f.removal)


def check_case_optim(c: Config, where: str, case: Mapping) -> None:
    try:
        check_optim(case_optim(c.optim, case), int(case.get("steps", c.steps)), f"{where}.optim")
    except (OmegaConfBaseException, TypeError):
        raise ConfigError(f"{where}.optim={show(case['optim'])}: optimizer keys other "
                          "than lr (the case's lr), e.g. {name: sgd, momentum: 0.9}") from None


def case_optim(base: Optim, case: Mapping) -> Optim:
    """An alignment case's optimizer: the run's with the case's keys and lr."""
    given = case["optim"]
    if not isinstance(given, Mapping) or "lr" in given:
        raise TypeError
    merged = OmegaConf.merge(OmegaConf.structured(base), dict(given), {"lr": case["lr"]})
    return OmegaConf.to_object(merged)


def check_case(where: str, case: Any) -> None:
    """One alignment case: {topology, lr, hops, ...} (the driver fills the rest)."""
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
    check_choice(f"{where}.topology", case["topology"], TOPOLOGIES)
    if "data" in case:
        check_choice(f"{where}.data", case["data"], DATASETS)
    if not is_num(case["lr"]) or not case["lr"] > 0:
        raise ConfigError(f"{where}.lr={show(case['lr'])}: must be a positive number")
    for k in ("hops", "batch_size", "nodes", "events", "steps"):
        if k in case and not is_int(case[k]):
            raise ConfigError(f"{where}.{k}={show(case[k])}: must be an integer")
    if not 0 <= case["hops"] <= MAX_HOPS:
        raise ConfigError(f"{where}.hops={case['hops']}: must be from 0 to {MAX_HOPS}")
    for k in ("check", "curvature"):
        if k in case and not isinstance(case[k], bool):
            raise ConfigError(f"{where}.{k}={show(case[k])}: must be true or false")
    if "dtype" in case:
        check_choice(f"{where}.dtype", case["dtype"], DTYPES)
    if "removal" in case:
        check_removal(f"{where}.removal", case["removal"])


register_block("alignment", Alignment, check_alignment)


# ---- the cases -------------------------------------------------------------------------------
@dataclass
class Case:
    """One simulation: a topology, learning rate, batch size, node count, removal kind
    (batch | single | k samples), r hops and the curvature switch of DICE-E."""

    label: str
    topology: str
    lr: float
    batch_size: int
    nodes: int
    removal: str | int
    hops: int
    curvature: bool
    events: int
    steps: int
    dtype: str = "float32"
    check: bool = False  # a target: Spearman ≥ min_spearman in every view
    set: str = "core"  # core | hard | sweep | precision | optimizers
    data: str = ""  # a data config name; "" = the run's data
    optim: dict | None = None  # optimizer keys over the run's optim (optimizer cases)


def removal_tag(removal: str | int) -> str:
    return str(removal) if isinstance(removal, str) else f"{removal}samples"


def case_entries(cfg: Config, kind: str) -> list[Mapping]:
    """The entries of one set as mappings of CASE_KEYS: the listed sets as written; `sweep`,
    every combination of the lists under `alignment.full`; `precision`, the same
    single-sample case in float32 and float64 (events and batches are identical)."""
    a = cfg.alignment
    if kind in LISTED_SETS:
        return [dict(item) for item in getattr(a, kind)]
    if kind == "sweep":
        f = a.full
        return [{"topology": topo, "lr": lr, "batch_size": batch, "nodes": nodes,
                 "curvature": curv, "removal": f.removal, "hops": f.hops, "events": f.events,
                 "steps": f.steps} for topo, lr, batch, nodes, curv in itertools.product(
                     f.topologies, f.lrs, f.batch_sizes, f.nodes, f.curvature)]
    assert kind == "precision", kind
    p = a.precision
    return [{"topology": p.topology, "lr": p.lr, "hops": p.hops, "removal": p.removal,
             "events": p.events, "dtype": dtype}
            for dtype in ("float32", "float64")] if p.enabled else []


def parse_case(cfg: Config, entry: Mapping, kind: str) -> Case:
    """One case of set `kind` from its entry; keys it leaves out come from the run's config
    (steps at least hops + 1, so every event can reach its last hop)."""
    hops = int(entry["hops"])
    case = Case(
        label="", topology=str(entry["topology"]), lr=float(entry["lr"]),
        batch_size=int(entry.get("batch_size", cfg.batch_size)),
        nodes=int(entry.get("nodes", cfg.nodes)), removal=entry.get("removal", "batch"),
        hops=hops, curvature=bool(entry.get("curvature", True)),
        events=int(entry.get("events", cfg.influence.events)),
        steps=max(int(entry.get("steps", cfg.steps)), hops + 1),
        dtype=str(entry.get("dtype", cfg.dtype)), check=bool(entry.get("check", False)),
        set=kind, data=str(entry.get("data", "")),
        optim=dict(entry.get("optim") or {}) if "optim" in entry or kind == "optimizers"
        else None)
    case.label = case_label(cfg, case, entry.get("label"))
    return case


def case_label(cfg: Config, case: Case, given: str | None) -> str:
    """The case's name in the outputs, e.g. `ring/lr0.05/r3/batch`: a core case's `given`
    label replaces it; a hard case is prefixed by its data (or `given`), an optimizer case
    by the optimizer's name (or `given`), the precision twins by `precision/` (their dtype
    after it); a sweep case adds the grid's batch size and node count."""
    tag = removal_tag(case.removal)
    base = f"{case.topology}/lr{case.lr:g}/r{case.hops}/{tag}"
    if case.set == "sweep":
        return (f"{case.topology}/lr{case.lr:g}/b{case.batch_size}/n{case.nodes}/r{case.hops}/"
                f"{tag}/{'curvature' if case.curvature else 'no-curvature'}")
    if case.set == "hard":
        return f"{given or case.data or cfg.data.name}/{base}"
    if case.set == "optimizers":
        return f"{given or (case.optim or {}).get('name', 'sgd')}/{base}"
    if case.set == "precision":
        return f"precision/{base}/{case.dtype}"
    return given or base + ("" if case.curvature else "/no-curvature")


def cases_of(cfg: Config, kind: str) -> list[Case]:
    """Every case of one set: core | hard | optimizers | sweep | precision."""
    return [parse_case(cfg, entry, kind) for entry in case_entries(cfg, kind)]
