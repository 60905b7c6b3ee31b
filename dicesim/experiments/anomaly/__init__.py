"""`make anomaly`: catch misbehaving nodes by the proximal influence their neighbours measure.

One run per (attack, topology), with influence.proximal=true. Over the scoring steps 𝒯
(t ≥ attack.start; the last `anomaly.window` of them when set) each honest receiver k
scores each in-neighbour j, higher = more suspicious:

  dice          mean_{t∈𝒯} I_t(j→k) / (q_k W^t[k,j]) = ∇L'_k(θ_k^{t+1})ᵀ Δ_j^t
                (proximal influence, Definition 4, per unit of mixing weight; > 0: harmful)
  update_norm   mean ‖Δ_j^t‖
  neg_cosine    mean −cos(Δ_j^t, Δ_k^t)                  (k's own update as the reference)
  probe_loss    mean L'_k(θ_j^{t+½}) − L'_k(θ_k^{t+½})   (k's probe loss of j's parameters)

The baselines use what k receives at the same steps (BaselineSignals, a tracker of the
run). ROC-AUC is over pairs (k, j) with label "j is attacked"; at node level s_j = mean
over j's honest out-neighbours k of s_kj, and precision is taken at m = the number of
attacked nodes. Each rank's tracker sees its own receivers; rank 0 gathers them, so this
runs under torchrun.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn.functional import cosine_similarity

from dicesim.comm.exchange import Channel
from dicesim.common.errors import ConfigError
from dicesim.config import (
    ATTACKS,
    TOPOLOGIES,
    AttackKind,
    Config,
    TopologyName,
    bounded,
    default_list,
    register_block,
    show,
)
from dicesim.experiments import group_option, runner, variant
from dicesim.experiments.anomaly.report import plots, report_md, score_table
from dicesim.experiments.runner import Table, Task
from dicesim.graph.topology import senders
from dicesim.influence.events import ProximalRow
from dicesim.influence.trackers import Tracker
from dicesim.report.present import fmt
from dicesim.run.engine import RunParts, Simulation
from dicesim.run.session import Session
from dicesim.run.trainer import RunResult, Step


@dataclass
class Anomaly:
    """The `anomaly:` block of configs/experiment/anomaly.yaml."""

    attacks: list[AttackKind] = default_list("label_flip", "feature_noise", "free_rider",
                                             "scaled_update")
    topologies: list[TopologyName] = default_list("ring", "exponential")
    window: int | None = bounded(None, 1)
    per_weight: bool = True
    example: list[str] = default_list("label_flip", "ring")


def check_anomaly(c: Config) -> None:
    a = c.anomaly
    if "none" in a.attacks:
        raise ConfigError("anomaly.attacks: none is not an attack; "
                          f"choose from {', '.join(ATTACKS[1:])}")
    ex = list(a.example)
    if len(ex) != 2 or ex[0] not in ATTACKS[1:] or ex[1] not in TOPOLOGIES:
        raise ConfigError(f"anomaly.example={show(ex)}: must be [attack, topology], "
                          "e.g. anomaly.example=[label_flip, ring]")


register_block("anomaly", Anomaly, check_anomaly)


METHODS = ("dice", "update_norm", "neg_cosine", "probe_loss")  # report.LABELS names them
Pair = tuple[int, int]  # (receiver k, sender j)


@dataclass
class Case:
    attack: str
    topology: str
    sim: Simulation
    outcome: dict = field(default_factory=dict)


def scoring_steps(sim: Simulation, window: int | None) -> range:
    """𝒯: steps from attack.start on, only the last `window` of the run when set."""
    first = sim.attack.start if window is None else max(sim.attack.start, sim.run.steps - window)
    return range(first, sim.run.steps)


class BaselineSignals(Tracker):
    """Per (honest local receiver k, in-neighbour j) the running sums of ‖Δ_j‖,
    −cos(Δ_j, Δ_k) and L'_k(θ_j^{t+½}) − L'_k(θ_k^{t+½}) over the scoring steps (L'_k on
    k's own probe set Z'_k when data.probe=per_node). It sends every node's update Δ_j
    with the parameters and reads the received θ^{t+½} and W^t as mixed off the Step."""

    def __init__(self, parts: RunParts, steps: range):
        sim = parts.sim
        self.parts, self.steps, self.layout = parts, steps, sim.layout
        self.honest = np.setdiff1d(sim.layout.local_nodes, sim.attack.nodes)
        self.sums: dict[Pair, np.ndarray] = {}
        self.counts: dict[Pair, int] = defaultdict(int)

    def channels(self, step: Step) -> list[Channel]:
        return [Channel(np.arange(self.layout.nodes), step.update)]

    def after_gossip(self, step: Step, received: list[Channel]) -> None:
        if step.t not in self.steps:
            return
        model, probe = self.parts.model, self.parts.probe
        half = step.half  # θ_k^{t+½} of the local nodes
        for k in self.honest:
            i = self.layout.local_index(int(k))
            nbrs = [int(j) for j in senders(step.W, k) if j != k]
            rows = received[0].positions(nbrs, half.device)  # j's rows, the same in both
            updates = received[0].available[rows]  # Δ_j^t
            x, y, per_node = probe.at(i)
            if per_node:
                x, y = x[0], y[0]
            losses = model.probe_losses(  # L'_k(θ_j^{t+½}) …, L'_k(θ_k^{t+½})
                torch.cat([step.received.available[rows], half[i:i + 1]]), x, y)
            cos = cosine_similarity(updates, step.update[i][None], dim=1)
            values = torch.stack([updates.norm(dim=1), -cos, losses[:-1] - losses[-1]], dim=1)
            for j, v in zip(nbrs, values.double().cpu().numpy(), strict=True):
                self.sums[(int(k), j)] = self.sums.get((int(k), j), 0.0) + v
                self.counts[(int(k), j)] += 1

    def means(self) -> dict[Pair, np.ndarray]:
        return {p: s / self.counts[p] for p, s in self.sums.items()}


def dice_scores(sim: Simulation, rows: list[ProximalRow], steps: range,
                per_weight: bool) -> dict[Pair, float]:
    """Mean proximal influence per (honest receiver k, sender j) over 𝒯, optionally divided
    by q_k W^t[k,j] (the weight k gave j), so receivers with other weights compare."""
    attacked = set(sim.attack.nodes.tolist())
    values: dict[Pair, list[float]] = defaultdict(list)
    for r in rows:
        t, j, k = r.step, r.sender, r.receiver
        if t in steps and k not in attacked:
            scale = sim.q[k] * sim.topology.W_sparse(t)[k, j] if per_weight else 1.0
            values[(int(k), int(j))].append(r.value / scale)
    return {p: float(np.mean(v)) for p, v in values.items()}


def _finite(s: np.ndarray) -> np.ndarray:
    """Non-finite scores (a diverged run) count as the most (or least) suspicious."""
    ok = s[np.isfinite(s)]
    hi, lo = (ok.max() + 1, ok.min() - 1) if len(ok) else (1.0, -1.0)
    return np.nan_to_num(s, nan=hi, posinf=hi, neginf=lo)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def evaluate(scores: dict[Pair, float], attacked: np.ndarray) -> dict:
    """ROC-AUC over pairs; node-level ROC-AUC and precision at m = |attacked|."""
    pairs = sorted(scores)
    s = _finite(np.array([scores[p] for p in pairs], dtype=float))
    y = np.isin([j for _, j in pairs], attacked)
    by_sender: dict[int, list[float]] = defaultdict(list)
    for (_, j), v in zip(pairs, s, strict=True):
        by_sender[j].append(v)
    senders = np.array(sorted(by_sender))
    node_s = np.array([np.mean(by_sender[j]) for j in senders])
    node_y = np.isin(senders, attacked)
    m = len(attacked)
    top = senders[np.argsort(-node_s, kind="stable")[:m]]
    return {"roc_auc": _auc(y, s), "node_roc_auc": _auc(node_y, node_s),
            "precision_at_k": float(np.isin(top, attacked).sum() / m) if m else None,
            "k": m, "pairs": len(pairs), "attack_pairs": int(y.sum()),
            "attackers_scored": int(node_y.sum()), "ranking": [int(j) for j in top]}


# ---- the driver ---------------------------------------------------------------------------
def run_case(session: Session, case: Case, window: int | None, per_weight: bool) -> None:
    sim = case.sim
    steps = scoring_steps(sim, window)
    made: list[BaselineSignals] = []
    sim.extra_trackers.append(lambda parts: made.append(BaselineSignals(parts, steps))
                              or made[-1])
    t0 = time.perf_counter()
    result = session.simulate(sim)
    assert session.comm is not None
    gathered = session.comm.gather_to_root(made[0].means())
    if session.rank != 0:
        return
    baseline = {p: v for part in gathered for p, v in part.items()}
    scores = {"dice": dice_scores(sim, result.proximal, steps, per_weight)}
    for i, method in enumerate(METHODS[1:]):
        scores[method] = {p: float(v[i]) for p, v in baseline.items()}
    attacked = sim.attack.nodes
    honest = np.setdiff1d(np.arange(sim.run.nodes), attacked)
    case.outcome = {
        "attackers": attacked.tolist(),
        "honest_test_acc": float(np.mean(np.asarray(result.test_acc)[honest])),
        "wall_s": time.perf_counter() - t0,
        "scores": scores,
        "methods": {m: evaluate(scores[m], attacked) for m in METHODS},
        "trace": influence_trace(result, sim, steps),
    }


def influence_trace(result: RunResult, sim: Simulation, steps: range) -> dict[str, list]:
    """Per step: mean proximal influence on honest receivers from attacked / honest senders."""
    attacked = sim.attack.nodes
    rows = np.array(result.proximal, dtype=float).reshape(-1, 4)
    rows = rows[~np.isin(rows[:, 2], attacked)]
    out: dict[str, list] = {"step": list(range(sim.run.steps)), "attacked": [], "honest": []}
    for t in out["step"]:
        at = rows[rows[:, 0] == t]
        bad = np.isin(at[:, 1], attacked)
        out["attacked"].append(float(at[bad, 3].mean()) if bad.any() else None)
        out["honest"].append(float(at[~bad, 3].mean()) if (~bad).any() else None)
    out["first_scored"] = steps.start
    return out


class AnomalyTask(Task):
    name = "anomaly"

    def cases(self, session: Session) -> list[runner.Case]:
        cfg = session.cfg
        return [runner.Case(f"{a}/{topo}", f"{a:>13} on {topo:<12}", Case(a, topo, session.build(
            variant(cfg, attack__kind=a, topology=group_option("topology", topo),
                    influence__proximal=True, defense__kind="none"))))
            for topo in cfg.anomaly.topologies for a in cfg.anomaly.attacks]

    def announce(self, session: Session, cases: list[runner.Case]) -> str:
        cfg, spec = session.cfg, session.cfg.anomaly
        return (f"dicesim anomaly: {len(cases)} runs ({', '.join(spec.attacks)} × "
                f"{', '.join(spec.topologies)}), {cfg.nodes} nodes, {cfg.steps} steps")

    def run_case(self, session: Session, case: runner.Case, done: dict) -> dict | None:
        spec = session.cfg.anomaly
        run_case(session, case.spec, spec.window, spec.per_weight)
        return case.spec.outcome if session.rank == 0 else None

    def progress(self, case: runner.Case, result: dict) -> str:
        return (case.label + " " + "  ".join(f"{m} {fmt(result['methods'][m]['roc_auc'], '.3f')}"
                                       for m in METHODS) + f"  ({result['wall_s']:.1f} s)")

    @staticmethod
    def filled(cases: list[runner.Case], results: dict) -> list[Case]:
        return [Case(c.spec.attack, c.spec.topology, c.spec.sim, results[c.key]) for c in cases]

    def summarize(self, cfg: Config, cases: list[runner.Case], results: dict,
                  wall_s: float) -> dict:
        self.done = self.filled(cases, results)
        return summarize(cfg, self.done, wall_s)

    def tables(self, summary: dict, results: dict) -> list[Table]:
        return [score_table(self.done)]

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        return plots(out, cfg, self.done)

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(summary, pictures)

    def closing(self, summary: dict, out: Path) -> list[str]:
        return [*runner.target_lines(summary["targets"]),
                f"dicesim anomaly: done; report: {out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, AnomalyTask())


# ---- outputs (report.md and the figures: report.py) -------------------------------------
def summarize(cfg: Config, cases: list[Case], wall_s: float) -> dict:
    results = []
    for c in cases:
        for m in METHODS:
            r = {k: v for k, v in c.outcome["methods"][m].items() if k != "ranking"}
            results.append({"attack": c.attack, "topology": c.topology, "method": m, **r})
    targets = {}
    for c in cases:
        if c.attack == "label_flip" and c.topology in ("ring", "exponential"):
            auc = c.outcome["methods"]["dice"]["roc_auc"]
            targets[f"label_flip_{c.topology}_dice_roc_auc_ge_0.95"] = bool(
                auc is not None and auc >= 0.95)
    return {
        "experiment": "anomaly", "nodes": int(cfg.nodes), "steps": int(cfg.steps),
        "data": cfg.data.name, "model": cfg.model.name, "lr": float(cfg.optim.lr),
        "window": cfg.anomaly.window, "per_weight": bool(cfg.anomaly.per_weight),
        "attack_start": int(cfg.attack.start), "wall_s": wall_s,
        "cases": [{"attack": c.attack, "topology": c.topology,
                   "attackers": c.outcome["attackers"],
                   "honest_test_acc": c.outcome["honest_test_acc"],
                   "dice_ranking": c.outcome["methods"]["dice"]["ranking"],
                   "wall_s": c.outcome["wall_s"]} for c in cases],
        "results": results, "targets": targets,
    }
