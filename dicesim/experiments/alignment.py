"""`make alignment`: how well DICE-E tracks the exact DICE-GT.

Every case is one single-run simulation with `influence.events` sampled events
e = (j, t, S) followed for r hops with ground truth. For each case the alignment of
E[e,s,k] against G[e,s,k] is reported

- per hop s over the (event, node) entries of that hop (`hop_<s>`),
- for the one-hop view (the DICE paper's Definition 2): E[e,0,j] + Σ_{k≠j} E[e,1,k] per event,
- over every entry (`all`),

as Pearson, Spearman, sign agreement and rel_err = Σ|E − G| / Σ|G| (report.alignment).

Both estimators are reported: `dice_e` (the paper's first-order DICE-E) and `dice_mid` (its
midpoint rule; the hard cases add `dice_gauss2`, the two-point rule), with the second-order
share ρ = Σ|dice_mid − dice_e| / Σ|dice_mid|, the quantity a plain run reports without ground
truth (there against its accurate column, dice_gauss2 by default), so its calibration
against the true rel_err shows.

`alignment.sweep=core` (default) runs the target cases and the `hard` set
(Fashion-MNIST at lr 0.2 and 0.5, where first-order DICE-E degrades; skipped with a note
when the Debian package dataset-fashion-mnist is absent); `alignment.sweep=full` adds the
grid (topologies × learning rates × batch sizes × node counts × curvature on/off).
`alignment.precision` reruns one single-sample case in float64 and compares the two ground
truths entry by entry (how precise float32 DICE-GT is).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
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
    as_dict,
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
from dicesim.experiments import group_option, runner, variant
from dicesim.experiments.runner import Table, Task, slug
from dicesim.influence.events import INFLUENCE_COLUMNS, InfluenceRow
from dicesim.report.summary import (
    alignment,
    alignment_blocks,
    footer,
    second_order_share,
    write_csv,
)
from dicesim.run.provenance import provenance_lines
from dicesim.run.session import Session


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
    cases = [(f"alignment.{kind}[{i}]", case) for kind in ("core", "hard", "optimizers")
             for i, case in enumerate(getattr(a, kind))]
    for where, case in cases:
        check_case(where, case)
        if "optim" in case:
            try:
                check_optim(_case_optim(c.optim, case), int(case.get("steps", c.steps)),
                            f"{where}.optim")
            except (OmegaConfBaseException, TypeError):
                raise ConfigError(f"{where}.optim={show(case['optim'])}: optimizer keys other "
                                  "than lr (the case's lr), e.g. {name: sgd, momentum: 0.9}"
                                  ) from None
    f = a.full
    if any(not v > 0 for v in f.lrs):
        raise ConfigError(f"alignment.full.lrs={show(f.lrs)}: must be positive")
    for key in ("batch_sizes", "nodes"):
        if any(v < 1 for v in getattr(f, key)):
            raise ConfigError(f"alignment.full.{key}={show(getattr(f, key))}: must be >= 1")
    check_removal("alignment.full.removal", f.removal)
    check_removal("alignment.precision.removal", a.precision.removal)


def _case_optim(base: Optim, case: Mapping) -> Optim:
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

TABLE_COLUMNS = ("set", "label", "data", "topology", "lr", "batch_size", "nodes", "removal",
                 "hops", "curvature", "dtype", "estimator", "view", "n", "pearson", "spearman",
                 "sign_agreement", "rel_err", "second_order_share")
SCATTER_ROWS_PER_PAGE = 16


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


# ---- the cases -------------------------------------------------------------------------------
def _removal_tag(removal: str | int) -> str:
    return str(removal) if isinstance(removal, str) else f"{removal}samples"


def core_cases(cfg: Config) -> list[Case]:
    """The target cases listed under `alignment.core` (defaults from the run's config)."""
    out = []
    for item in cfg.alignment.core:
        c = dict(item)
        topo, lr, hops = c["topology"], float(c["lr"]), int(c["hops"])
        removal = c.get("removal", "batch")
        curvature = bool(c.get("curvature", True))
        label = c.get("label") or (f"{topo}/lr{lr:g}/r{hops}/{_removal_tag(removal)}"
                                   f"{'' if curvature else '/no-curvature'}")
        out.append(Case(label, topo, lr, int(c.get("batch_size", cfg.batch_size)),
                        int(c.get("nodes", cfg.nodes)), removal, hops, curvature,
                        int(c.get("events", cfg.influence.events)),
                        max(int(c.get("steps", cfg.steps)), hops + 1),
                        str(c.get("dtype", cfg.dtype)), bool(c.get("check", False)), "core"))
    return out


def hard_cases(cfg: Config) -> list[Case]:
    """The `alignment.hard` list: settings where η‖x‖² is large. Cases on a data set whose
    files are missing are left out (the caller says which)."""
    out = []
    for item in cfg.alignment.hard:
        c = dict(item)
        topo, lr, hops = c["topology"], float(c["lr"]), int(c["hops"])
        removal, data = c.get("removal", "batch"), str(c.get("data", ""))
        label = f"{data or cfg.data.name}/{topo}/lr{lr:g}/r{hops}/{_removal_tag(removal)}"
        out.append(Case(label, topo, lr, int(c.get("batch_size", cfg.batch_size)),
                        int(c.get("nodes", cfg.nodes)), removal, hops, True,
                        int(c.get("events", cfg.influence.events)),
                        max(int(c.get("steps", cfg.steps)), hops + 1), str(cfg.dtype), False,
                        "hard", data))
    return out


def optimizer_cases(cfg: Config) -> list[Case]:
    """`alignment.optimizers`: DICE through stateful local optimizers; each case also runs
    the ablation that drops the optimizer state's perturbation (dice_e_nostate)."""
    out = []
    for item in cfg.alignment.optimizers:
        c = dict(item)
        topo, lr, hops = c["topology"], float(c["lr"]), int(c["hops"])
        removal, optim = c.get("removal", "batch"), dict(c.get("optim") or {})
        name = c.get("label") or optim.get("name", "sgd")
        out.append(Case(f"{name}/{topo}/lr{lr:g}/r{hops}/{_removal_tag(removal)}", topo, lr,
                        int(c.get("batch_size", cfg.batch_size)), int(c.get("nodes", cfg.nodes)),
                        removal, hops, bool(c.get("curvature", True)),
                        int(c.get("events", cfg.influence.events)),
                        max(int(c.get("steps", cfg.steps)), hops + 1), str(cfg.dtype),
                        bool(c.get("check", False)), "optimizers", optim=optim))
    return out


def sweep_cases(cfg: Config) -> list[Case]:
    """The sweep grid: every combination of the lists under `alignment.full`."""
    f = cfg.alignment.full
    hops = int(f.hops)
    out = []
    for topo, lr, batch, nodes, curv in itertools.product(
            f.topologies, f.lrs, f.batch_sizes, f.nodes, f.curvature):
        label = (f"{topo}/lr{float(lr):g}/b{batch}/n{nodes}/r{hops}/{_removal_tag(f.removal)}"
                 f"/{'curvature' if curv else 'no-curvature'}")
        out.append(Case(label, str(topo), float(lr), int(batch), int(nodes), f.removal, hops,
                        bool(curv), int(f.events), max(int(f.steps), hops + 1), str(cfg.dtype),
                        False, "sweep"))
    return out


def precision_cases(cfg: Config) -> list[Case]:
    """The same single-sample case in float32 and float64 (events and batches are identical)."""
    p = cfg.alignment.precision
    if not p.enabled:
        return []
    hops = int(p.hops)
    return [Case(f"precision/{p.topology}/lr{float(p.lr):g}/r{hops}/{_removal_tag(p.removal)}/"
                 f"{dtype}", str(p.topology), float(p.lr), int(cfg.batch_size), int(cfg.nodes),
                 p.removal, hops, True, int(p.events), max(int(cfg.steps), hops + 1), dtype,
                 False, "precision") for dtype in ("float32", "float64")]


# ---- running ---------------------------------------------------------------------------------
def topology_options(cfg: Config, name: str) -> dict:
    """configs/topology/<name>.yaml, or the run's topology.* (command line included) when the
    run's topology is `name`."""
    if cfg.topology.name == name:
        return as_dict(cfg.topology)
    return group_option("topology", name)


def case_config(cfg: Config, case: Case) -> Config:
    extra: dict = {}
    if case.data and case.data != cfg.data.name:
        extra["data"] = {**group_option("data", case.data), **dict(cfg.alignment.hard_data)}
    estimators = ["dice_e", "dice_mid"]
    if case.set == "hard":
        estimators.append("dice_gauss2")
    if case.optim:
        extra["optim"] = {**as_dict(cfg.optim), **case.optim}
        estimators.append("dice_e_nostate")
    return variant(cfg, **extra, topology=topology_options(cfg, case.topology), optim__lr=case.lr,
                   batch_size=case.batch_size, nodes=case.nodes, steps=case.steps,
                   dtype=case.dtype, eval_every=case.steps, influence__events=case.events,
                   influence__removal=case.removal, influence__hops=case.hops,
                   influence__curvature=case.curvature, influence__ground_truth=True,
                   influence__estimators=estimators,
                   influence__step_range=None, counterfactual__remove=[])


def run_case(session: Session, cfg: Config, case: Case) -> tuple[list[tuple], float]:
    """Influence rows (event, source, step, n_removed, hop, node, dice_e, dice_gt) on rank 0."""
    sim = session.build(case_config(cfg, case))
    result = session.simulate(sim)
    return result.influence, result.wall_s


def _ordered(blocks: dict) -> dict:
    """hop_<s> in numeric order (hop_10 after hop_9), between one_hop and all."""
    hops = sorted((k for k in blocks if k.startswith("hop_")), key=lambda k: int(k[4:]))
    return {"one_hop": blocks["one_hop"], **{k: blocks[k] for k in hops}, "all": blocks["all"]}


def ordered_blocks(rows: list[InfluenceRow], estimator: str = "dice_e") -> dict[str, dict]:
    return _ordered(alignment_blocks(rows, estimator))


def worst(blocks: Mapping[str, dict], metric: str = "spearman") -> tuple[float, str]:
    """The smallest value of `metric` over the views, and where it occurs."""
    found = [(b[metric], view) for view, b in blocks.items() if b[metric] is not None]
    return min(found) if found else (math.nan, "–")


# ---- precision of float32 ground truth -------------------------------------------------------
def precision_report(rows32: list[tuple], rows64: list[tuple]) -> dict:
    """Entry-by-entry comparison of one case run in float32 and in float64, per hop s:
    gt_noise = Σ|G32 − G64| / Σ|G64| (how far float32 DICE-GT is from float64's),
    e_noise  = Σ|E32 − E64| / Σ|E64|, and the estimator's own error rel_err in both
    dtypes. gt_noise ≪ rel_err means float32 ground truth is precise enough to judge E."""
    key = {(r.event, r.hop, r.node): r for r in rows64}
    by_hop: dict[int, list[tuple]] = defaultdict(list)
    for r in rows32:
        other = key.get((r.event, r.hop, r.node))
        if other is not None:
            by_hop[r.hop].append((r.dice_e, r.dice_gt, other.dice_e, other.dice_gt))
    out = {}
    for hop in sorted(by_hop):
        e32, g32, e64, g64 = np.array(by_hop[hop]).T
        out[f"hop_{hop}"] = {
            "n": len(e32),
            "gt_noise": float(np.abs(g32 - g64).sum() / np.abs(g64).sum()),
            "e_noise": float(np.abs(e32 - e64).sum() / np.abs(e64).sum()),
            "rel_err_float32": alignment(e32, g32)["rel_err"],
            "rel_err_float64": alignment(e64, g64)["rel_err"],
            "sign_agreement_float32": alignment(e32, g32)["sign_agreement"],
            "sign_agreement_float64": alignment(e64, g64)["sign_agreement"],
            "spearman_float32": alignment(e32, g32)["spearman"],
            "spearman_float64": alignment(e64, g64)["spearman"],
            "median_abs_gt": float(np.median(np.abs(g64))),
        }
    return out


# ---- targets ---------------------------------------------------------------------------------
def targets(cases: list[dict], min_spearman: float,
            mid_targets: Iterable[Mapping] = ()) -> dict:
    """Issue 3: every checked case reaches Spearman ≥ min_spearman in every view; the
    no-curvature twins of checked cases are reported beside them (the Hessian's gap)."""
    checked = {}
    for c in cases:
        if c["check"]:
            value, where = worst(c["alignment"])
            checked[c["label"]] = {"min_spearman": value, "at": where,
                                   "pass": bool(value >= min_spearman)}
    gaps = {}
    for c in cases:
        if c["set"] != "core" or c["curvature"]:
            continue
        twin = next((o for o in cases if o["set"] == "core" and o["curvature"]
                     and all(o[k] == c[k] for k in ("topology", "lr", "batch_size", "nodes",
                                                   "removal", "hops"))), None)
        if twin is None:
            continue
        hops = range(1, c["hops"] + 1)
        gaps[c["label"]] = {
            "with_curvature": twin["label"],
            "spearman_by_hop": {"curvature": [twin["alignment"][f"hop_{s}"]["spearman"]
                                              for s in hops],
                                "no_curvature": [c["alignment"][f"hop_{s}"]["spearman"]
                                                 for s in hops]},
            "rel_err_by_hop": {"curvature": [twin["alignment"][f"hop_{s}"]["rel_err"]
                                             for s in hops],
                               "no_curvature": [c["alignment"][f"hop_{s}"]["rel_err"]
                                                for s in hops]},
        }
        last = c["alignment"][f"hop_{c['hops']}"]
        first = c["alignment"]["hop_1"]
        gaps[c["label"]]["falls_off_with_distance"] = bool(
            last["spearman"] < first["spearman"] and last["rel_err"] > first["rel_err"])
    midpoint = midpoint_targets(cases, mid_targets)
    return {"min_spearman": min_spearman, "checked": checked,
            "all_pass": all(v["pass"] for v in checked.values())
            and all(v["pass"] for v in midpoint.values()),
            "curvature_gap": gaps, "midpoint": midpoint}


def midpoint_targets(cases: list[dict], limits: Iterable[Mapping]) -> dict:
    """dice_mid: in the hard cases Spearman ≥ the `min` of the entry of `limits` with the
    largest lr not above the case's, in every view; in the core cases with curvature (the
    defaults; the no-curvature ablation drops the Hessian both rules need) never worse than
    dice_e (Spearman within 1e-6, rel_err no larger) in any view."""
    out = {}
    for c in cases:
        mid, e = c.get("alignment_mid"), c["alignment"]
        if not mid:
            continue
        if c["set"] == "hard":
            fitting = [e for e in limits if float(e["lr"]) <= c["lr"] + 1e-12]
            if not fitting:
                continue
            bar = float(max(fitting, key=lambda e: float(e["lr"]))["min"])
            value, where = worst(mid)
            out[c["label"]] = {"kind": f"Spearman(dice_mid, GT) >= {bar}", "value": value,
                               "at": where, "pass": bool(value >= bar)}
            if c.get("alignment_gauss2"):
                value, where = worst(c["alignment_gauss2"])
                out[c["label"] + " (dice_gauss2)"] = {
                    "kind": f"Spearman(dice_gauss2, GT) >= {bar}", "value": value, "at": where,
                    "pass": bool(value >= bar)}
        elif c["set"] == "core" and c["curvature"]:
            worse = [view for view in e if mid[view]["spearman"] is not None
                     and e[view]["spearman"] is not None
                     and (mid[view]["spearman"] < e[view]["spearman"] - 1e-6
                          or mid[view]["rel_err"] > e[view]["rel_err"])]
            out[c["label"]] = {"kind": "dice_mid never worse than dice_e",
                               "value": len(worse), "at": ", ".join(worse) or "–",
                               "pass": not worse}
    return out


# ---- outputs ---------------------------------------------------------------------------------
def table_rows(cases: Iterable[dict]) -> list[tuple]:
    out = []
    for c in cases:
        for estimator, key in (("dice_e", "alignment"), ("dice_mid", "alignment_mid"),
                               ("dice_gauss2", "alignment_gauss2"),
                               ("dice_e_nostate", "alignment_nostate")):
            for view, b in (c.get(key) or {}).items():
                out.append((c["set"], c["label"], c["data"], c["topology"], c["lr"],
                            c["batch_size"], c["nodes"], c["removal"], c["hops"],
                            c["curvature"], c["dtype"], estimator, view, b["n"], b["pearson"],
                            b["spearman"], b["sign_agreement"], b["rel_err"],
                            (c.get("second_order_share") or {}).get(view)))
    return out


def _f(v: object, digits: int = 6) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def view_table(cases: list[dict], columns: list[tuple[str, str, str | None, int]]
               ) -> list[str]:
    """A markdown table with one row per case and view; each column is (header, the case's
    block of per-view results, its metric, digits); the metric None reads the block as
    view → value (the second-order share)."""
    lines = ["| case | view | n | " + " | ".join(h for h, *_ in columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    for c in cases:
        for view, b in c["alignment"].items():
            cells = []
            for _, key, metric, digits in columns:
                value = (c.get(key) or {}).get(view)
                if metric is not None:
                    value = (value or {}).get(metric)
                cells.append(_f(value, digits))
            lines.append(f"| {c['label']} | {view} | {b['n']} | " + " | ".join(cells) + " |")
    return lines


def report_md(summary: dict, pictures: list[str]) -> str:
    t = summary["targets"]
    lines = [
        "# DICE-E against DICE-GT",
        "",
        *provenance_lines(summary),
        f"`{summary['data']}`, `{summary['model']}`, {summary['dtype']}; each case samples "
        "events e = (j, t, S) uniformly over nodes and steps and follows them for r hops (hop s = "
        "s gossip rounds after the event, not graph distance) with the exact counterfactual. "
        "Views: `hop_s` = the (event, node) entries of hop s; `one_hop` = E[e,0,j] + "
        "Σ_{k≠j} E[e,1,k] per event (Definition 2 of the DICE paper); `all` = every entry. "
        "rel_err = Σ|E − G| / Σ|G|.",
        "",
        f"**Targets** (Spearman ≥ {t['min_spearman']} in every view): "
        + ("all met." if t["all_pass"] else "NOT all met."),
        "",
        "| target case | min Spearman | at | pass |",
        "|---|---|---|---|",
    ]
    for label, v in t["checked"].items():
        lines.append(f"| {label} | {_f(v['min_spearman'])} | {v['at']} | {v['pass']} |")
    lines.append("")
    for label, gap in t["curvature_gap"].items():
        lines += [f"**What the Hessian term buys** — `{gap['with_curvature']}` against "
                  f"`{label}` (same runs without (I − ηH)):", "",
                  "| hop | Spearman with | Spearman without | rel_err with | rel_err without |",
                  "|---|---|---|---|---|"]
        sp, re = gap["spearman_by_hop"], gap["rel_err_by_hop"]
        for s in range(len(sp["curvature"])):
            lines.append(f"| {s + 1} | {_f(sp['curvature'][s])} | {_f(sp['no_curvature'][s])} "
                         f"| {_f(re['curvature'][s], 3)} | {_f(re['no_curvature'][s], 3)} |")
        lines.append("")
    if t.get("midpoint"):
        lines += ["**dice_mid targets**", "", "| case | target | value | at | pass |",
                  "|---|---|---|---|---|"]
        for label, v in t["midpoint"].items():
            lines.append(f"| {label} | {v['kind']} | {_f(v['value'])} | {v['at']} | "
                         f"{v['pass']} |")
        lines.append("")
    estimators = (("E", "alignment"), ("mid", "alignment_mid"))
    for kind, title in (("core", "Every core case, every view"),
                        ("hard", "Hard cases (large η‖x‖²), every view")):
        chosen = [c for c in summary["cases"] if c["set"] == kind]
        if not chosen:
            continue
        two = kind == "hard"  # the hard cases also run dice_gauss2
        shown = estimators + ((("gauss2", "alignment_gauss2"),) if two else ())
        lines += [f"## {title}", "",
                  "ρ = Σ\\|dice_mid − dice_e\\| / Σ\\|dice_mid\\|, the second-order share (no "
                  "ground truth needed)."
                  + (" gauss2 = `dice_gauss2`, the two-point Gauss–Legendre rule." if two else ""),
                  "",
                  *view_table(chosen, [(f"Spearman {n}", k, "spearman", 6) for n, k in shown]
                              + [(f"rel_err {n}", k, "rel_err", 3) for n, k in shown]
                              + [(f"sign agr. {n}", k, "sign_agreement", 4)
                                 for n, k in estimators]
                              + [("ρ", "second_order_share", None, 3)]), ""]
    chosen = [c for c in summary["cases"] if c["set"] == "optimizers"]
    if chosen:
        shown = estimators + (("nostate", "alignment_nostate"),)
        lines += ["## Stateful optimizers", "",
                  "DICE-E carries the pair (δ̂θ, δ̂s) through the JVP of the optimizer's step; "
                  "`nostate` is the ablation that drops δ̂s (the optimizer state's "
                  "perturbation) and keeps only the θ-path of the step's Jacobian.", "",
                  *view_table(chosen, [(f"Spearman {n}", k, "spearman", 6) for n, k in shown]
                              + [(f"rel_err {n}", k, "rel_err", 3) for n, k in shown]), ""]
    sweep = [c for c in summary["cases"] if c["set"] == "sweep"]
    if sweep:
        lines += ["## Sweep", "",
                  "Per case: Spearman of the one-hop view, of hop 1 and of the last hop; the "
                  "smallest Pearson and sign agreement over the views; rel_err of the last hop. "
                  "Every view of every case is in `alignment.csv`.", "",
                  "| case | Spearman one_hop | hop 1 | hop r | min Pearson | min sign agr. | "
                  "rel_err hop r |", "|---|---|---|---|---|---|---|"]
        for c in sweep:
            a, last = c["alignment"], f"hop_{c['hops']}"
            lines.append(f"| {c['label']} | {_f(a['one_hop']['spearman'])} | "
                         f"{_f(a['hop_1']['spearman'])} | {_f(a[last]['spearman'])} | "
                         f"{_f(worst(a, 'pearson')[0])} | "
                         f"{_f(worst(a, 'sign_agreement')[0], 4)} | "
                         f"{_f(a[last]['rel_err'], 3)} |")
        lines.append("")
    if summary.get("precision"):
        p = summary["precision"]
        lines += [f"## Precision of float32 ground truth (`{p['case']}`)", "",
                  "The same case in float32 and float64 (same events, same batches), matched "
                  "entry by entry. gt_noise = Σ|G32 − G64| / Σ|G64|: how far float32 DICE-GT "
                  "is from float64's; it must stay well below the estimator's own rel_err.", "",
                  "| hop | n | median \\|G\\| | gt_noise | e_noise | rel_err f32 | rel_err f64 "
                  "| sign agr. f32 | sign agr. f64 |", "|---|---|---|---|---|---|---|---|---|"]
        for hop, v in p["by_hop"].items():
            lines.append(f"| {hop[4:]} | {v['n']} | {v['median_abs_gt']:.3g} | "
                         f"{v['gt_noise']:.3g} | {v['e_noise']:.3g} | "
                         f"{_f(v['rel_err_float32'], 3)} | {_f(v['rel_err_float64'], 3)} | "
                         f"{_f(v['sign_agreement_float32'], 4)} | "
                         f"{_f(v['sign_agreement_float64'], 4)} |")
        lines.append("")
    lines += footer(pictures, "Files: `summary.json`, `alignment.csv` (every case × view), "
                              "`cases/<case>/influence.csv` (every (event, hop, node) entry), "
                              "`config.yaml`.")
    return "\n".join(lines)


def data_available(name: str) -> bool:
    root = group_option("data", name).get("root")
    return root is None or Path(root).is_dir()


class AlignmentTask(Task):
    name = "alignment"

    def cases(self, session: Session) -> list[runner.Case]:
        cfg = session.cfg
        hard = hard_cases(cfg)
        missing = sorted({c.data for c in hard if c.data and not data_available(c.data)})
        if missing:
            session.say(f"alignment: the hard cases on {', '.join(missing)} are left out: "
                        "their data files are missing (apt-get install dataset-fashion-mnist)")
        if cfg.alignment.sweep == "optimizers":
            cases = optimizer_cases(cfg)
        else:
            cases = core_cases(cfg) + [c for c in hard if c.data not in missing]
            cases += (sweep_cases(cfg) if cfg.alignment.sweep == "full" else [])
            cases += precision_cases(cfg)
        for case in cases:  # every setting is checked before the first run starts
            session.build(case_config(cfg, case))
        return [runner.Case(c.label, c.label, c) for c in cases]

    def announce(self, session: Session, cases: list[runner.Case]) -> str:
        return f"alignment: {len(cases)} runs ({session.cfg.alignment.sweep} sweep)"

    def run_case(self, session: Session, case: runner.Case, done: dict) -> dict | None:
        spec: Case = case.spec
        rows, wall = run_case(session, session.cfg, spec)
        if session.rank != 0:
            return None
        result = {**asdict(spec), "wall_s": wall, "alignment": ordered_blocks(rows),
                  "alignment_mid": ordered_blocks(rows, "dice_mid"),
                  "second_order_share": _ordered(second_order_share(rows, "dice_mid"))}
        if spec.optim:
            result["alignment_nostate"] = ordered_blocks(rows, "dice_e_nostate")
        if spec.set == "hard":
            result["alignment_gauss2"] = ordered_blocks(rows, "dice_gauss2")
        folder = session.out / "cases" / slug(spec.label)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(folder / "influence.csv", INFLUENCE_COLUMNS,
                  sorted(rows, key=lambda r: (r.event, r.hop, r.node)))
        return {"case": result, "rows": rows}

    def progress(self, case: runner.Case, result: dict) -> str:
        c = result["case"]
        blocks, mid = c["alignment"], c["alignment_mid"]
        (value, where), (value_mid, where_mid) = worst(blocks), worst(mid)
        return (f"{case.label}: {c['wall_s']:.1f} s, min Spearman dice_e {value:.6f} ({where}), "
                f"dice_mid {value_mid:.6f} ({where_mid}); rel_err all "
                f"{blocks['all']['rel_err']:.3g} / {mid['all']['rel_err']:.3g}")

    def summarize(self, cfg: Config, cases: list[runner.Case], results: dict,
                  wall_s: float) -> dict:
        self.cases_done = [r["case"] for r in results.values()]
        self.rows_of = {key: r["rows"] for key, r in results.items()}
        return summarize(cfg, self.cases_done, self.rows_of)

    def tables(self, summary: dict, results: dict) -> list[Table]:
        return [Table("alignment.csv", TABLE_COLUMNS, table_rows(summary["cases"]))]

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        return plots(out, [c for c in self.cases_done if c["set"] != "precision"], self.rows_of)

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(summary, pictures)

    def closing(self, summary: dict, out: Path) -> list[str]:
        met = summary["targets"]["all_pass"]
        return [f"alignment: targets {'met' if met else 'NOT met'}; report: {out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, AlignmentTask())


def summarize(cfg: Config, results: list[dict], rows_of: dict[str, list[tuple]]) -> dict:
    main = [c for c in results if c["set"] != "precision"]
    pairs = np.array([(c["second_order_share"][v], c["alignment"][v]["rel_err"])
                      for c in main for v in c["alignment"]
                      if c["second_order_share"].get(v) and c["alignment"][v]["rel_err"]])
    summary = {
        "data": cfg.data.name, "model": f"{cfg.model.name} {list(cfg.model.hidden)} "
        f"{cfg.model.activation}".strip(), "dtype": cfg.dtype,
        "sweep": cfg.alignment.sweep, "cases": main,
        "calibration": {  # ρ against the true rel_err of dice_e, over every case and view
            "n": len(pairs),
            "spearman": alignment(pairs[:, 0], pairs[:, 1])["spearman"] if len(pairs) else None,
            "median_ratio_rel_err_over_rho": float(np.median(pairs[:, 1] / pairs[:, 0]))
            if len(pairs) else None},
        "targets": targets(main, float(cfg.alignment.min_spearman),
                           cfg.alignment.mid_min_spearman),
    }
    prec = [c for c in results if c["set"] == "precision"]
    if len(prec) == 2:
        summary["precision"] = {
            "case": prec[0]["label"].rsplit("/", 1)[0],
            "by_hop": precision_report(rows_of[prec[0]["label"]], rows_of[prec[1]["label"]]),
            "float32": prec[0]["alignment"], "float64": prec[1]["alignment"],
        }
    return summary


# ---- figures ---------------------------------------------------------------------------------
def plots(out: Path, cases: list[dict], rows_of: dict[str, list[tuple]]) -> list[str]:
    pictures = []
    core = [c for c in cases if c["set"] == "core"]
    sweep = [c for c in cases if c["set"] == "sweep"]
    if any(c.get("second_order_share") for c in cases):
        pictures.append(calibration(out, cases))
    if core:
        pictures += scatter_grid(out, "scatter", core, rows_of)
        pictures.append(by_hop_curves(out, "spearman_vs_hop.png", core,
                                      "core cases: solid = with curvature, dashed = without"))
    if sweep:
        pictures += scatter_grid(out, "sweep_scatter", sweep, rows_of, max_hop=None)
        pictures.append(sweep_curves(out, sweep))
    return pictures


def _view_pairs(rows: list[InfluenceRow], view: str) -> np.ndarray:
    """(G, E) pairs of one view."""
    rows = [r for r in rows if r.dice_gt is not None]
    if view == "one_hop":
        acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in rows:
            if r.hop == 0 or (r.hop == 1 and r.node != r.source):
                acc[r.event][0] += r.dice_gt
                acc[r.event][1] += r.dice_e
        return np.array(list(acc.values())).reshape(-1, 2)
    hop = int(view[4:])
    return np.array([(r.dice_gt, r.dice_e) for r in rows if r.hop == hop]).reshape(-1, 2)


def scatter_grid(out: Path, stem: str, cases: list[dict], rows_of: dict[str, list[tuple]],
                 max_hop: int | None = 8) -> list[str]:
    """Rows = cases, columns = one_hop, hop_0 … hop_R: E against G on symmetric-log axes
    (linear within the smallest 10 % of |G|), the diagonal E = G dashed."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    if max_hop is None:  # sweep pages: one_hop, hop 1 and the last hop only
        columns = ["one_hop", "hop_1", f"hop_{max(c['hops'] for c in cases)}"]
    else:
        columns = ["one_hop"] + [f"hop_{s}" for s in
                                 range(min(max_hop, max(c["hops"] for c in cases)) + 1)]
    names = []
    for page in range(0, len(cases), SCATTER_ROWS_PER_PAGE):
        chunk = cases[page:page + SCATTER_ROWS_PER_PAGE]
        fig, axes = plt.subplots(len(chunk), len(columns),
                                 figsize=(2.5 * len(columns), 2.4 * len(chunk)), squeeze=False)
        for row, case in zip(axes, chunk, strict=True):
            for ax, view in zip(row, columns, strict=True):
                block = case["alignment"].get(view)
                pairs = _view_pairs(rows_of[case["label"]], view) if block else np.empty((0, 2))
                if len(pairs) == 0:
                    ax.axis("off")
                    continue
                ax.scatter(pairs[:, 0], pairs[:, 1], s=3, alpha=0.5, lw=0)
                lo, hi = pairs.min(), pairs.max()
                ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls="--")
                thresh = float(np.quantile(np.abs(pairs[:, 0]), 0.1)) or 1e-12
                ax.set_xscale("symlog", linthresh=thresh)
                ax.set_yscale("symlog", linthresh=thresh)
                ax.tick_params(labelsize=5)
                sp = block["spearman"]
                ax.set_title(f"{view}: ρ={sp:.4f}" if sp is not None else view, fontsize=7)
            row[0].set_ylabel(case["label"].replace("/", "\n", 2) + "\nDICE-E", fontsize=6)
        for ax in axes[-1]:
            ax.set_xlabel("DICE-GT", fontsize=7)
        fig.tight_layout()
        paged = len(cases) > SCATTER_ROWS_PER_PAGE
        name = f"{stem}_{page // SCATTER_ROWS_PER_PAGE + 1}.png" if paged else f"{stem}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


def calibration(out: Path, cases: list[dict]) -> str:
    """The second-order share ρ (no ground truth needed) against dice_e's true rel_err, one
    point per case and view: how well the run's own warning tracks the real error."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    marks = {"core": "o", "hard": "^", "sweep": "s"}
    for kind, mark in marks.items():
        pts = [(c["second_order_share"][v], c["alignment"][v]["rel_err"])
               for c in cases if c["set"] == kind for v in c["alignment"]
               if (c.get("second_order_share") or {}).get(v) is not None
               and c["alignment"][v]["rel_err"] is not None]
        if pts:
            x, y = np.array(pts).T
            ax.loglog(x, y, mark, ms=4, alpha=0.6, label=f"{kind} ({len(pts)} case × view)")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="ρ = rel_err")
    ax.axvline(0.05, color="red", lw=0.8, ls=":", label="warning above ρ = 0.05")
    ax.set(xlabel="second-order share ρ = Σ|mid − E| / Σ|mid|",
           ylabel="dice_e rel_err = Σ|E − G| / Σ|G|", title="Does the warning track the error?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    return "calibration.png"


def _hop_series(case: dict, metric: str) -> tuple[list[int], list[float]]:
    hops = [s for s in range(case["hops"] + 1) if f"hop_{s}" in case["alignment"]]
    vals = [case["alignment"][f"hop_{s}"][metric] for s in hops]
    return hops, [math.nan if v is None else v for v in vals]


def by_hop_curves(out: Path, name: str, cases: list[dict], title: str) -> str:
    """1 − Spearman and rel_err against hop s (log scale: every value is near 1 or 0)."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    keyed: dict[tuple, int] = {}
    for case in cases:
        key = (case["topology"], case["lr"], case["removal"], case["hops"])
        colour = colours[keyed.setdefault(key, len(keyed)) % 10]
        style = "-" if case["curvature"] else "--"
        hops, sp = _hop_series(case, "spearman")
        _, re = _hop_series(case, "rel_err")
        a1.semilogy(hops, np.maximum(1 - np.array(sp), 1e-8), style, marker="o", ms=3,
                    color=colour, label=case["label"])
        a2.semilogy(hops, re, style, marker="o", ms=3, color=colour, label=case["label"])
    a1.axhline(0.01, color="red", lw=0.8, ls=":", label="Spearman = 0.99")
    for ax in (a1, a2):
        ax.set_xticks(range(max(c["hops"] for c in cases) + 1))
    a1.set(xlabel="hop s", ylabel="1 − Spearman(E, G)  (1e-8: Spearman = 1)", title=title)
    a2.set(xlabel="hop s", ylabel="rel_err = Σ|E − G| / Σ|G|", title="relative error")
    a1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def sweep_curves(out: Path, cases: list[dict]) -> str:
    """One panel per topology: 1 − Spearman against hop for every sweep case."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    topologies = list(dict.fromkeys(c["topology"] for c in cases))
    fig, axes = plt.subplots(1, len(topologies), figsize=(4 * len(topologies), 3.8),
                             squeeze=False, sharey=True)
    for ax, topo in zip(axes[0], topologies, strict=True):
        mine = [c for c in cases if c["topology"] == topo]
        settings = sorted({(c["lr"], c["batch_size"], c["nodes"]) for c in mine})
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(settings), 1)))
        for c in mine:
            colour = colours[settings.index((c["lr"], c["batch_size"], c["nodes"]))]
            hops, sp = _hop_series(c, "spearman")
            ax.semilogy(hops, np.maximum(1 - np.array(sp), 1e-8),
                        "-" if c["curvature"] else "--", marker="o", ms=2, color=colour,
                        label=f"lr {c['lr']:g}, B {c['batch_size']}, n {c['nodes']}"
                        if c["curvature"] else None)
        ax.axhline(0.01, color="red", lw=0.8, ls=":")
        ax.set(title=f"{topo} (dashed: no curvature)", xlabel="hop s",
               xticks=range(max(c["hops"] for c in mine) + 1))
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("1 − Spearman(E, G)")
    fig.tight_layout()
    fig.savefig(out / "sweep_spearman_vs_hop.png", dpi=110)
    plt.close(fig)
    return "sweep_spearman_vs_hop.png"

