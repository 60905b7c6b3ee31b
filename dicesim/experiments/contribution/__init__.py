"""`make contribution`: each node's contribution by DICE-E, validated by leave-one-node-out.

Nodes hold data of graded quality: node k's labels are wrong for a fraction p_k of its
samples (p_k from 0 to `noise_max`; the runs get it as `data.label_noise`).

- DICE-E contribution of node j (its data's accumulated r-hop DICE, Definition 3):
    C_j = Σ_t Σ_{s≤r} Σ_k E[(j,t,B_j^t), s, k],
  one whole-batch event per (node, step) for every step of training; all of them ride in
  one run (no ground truth: each event costs one gradient, and one HVP per reached row
  and hop). Also the one-hop view (Definition 2): Σ_t (E[e,0,j] + Σ_{k≠j} E[e,1,k]).
- Node-level ground truth (leave-one-node-out): node j keeps gossiping but never takes a
  gradient step (`counterfactual.remove` of its whole batch at every step), and
    LOO_j = L(θ^T) − L(θ̃^T),   L(θ) = Σ_k q_k L'_k(θ_k),
  the final probe loss with j's data minus without it (negative: j's data helped).
- Spearman(C, LOO) over nodes; target ≥ `min_spearman` (0.8 on 8–16 nodes).
- Reciprocity (our reading of the paper's Definition 5, built on proximal influence,
  Definition 4). The benefit j's data gave its out-neighbour k over training is
    b_{j→k} = −Σ_t E[(j,t), 1, k]   (k ≠ j; positive: j's batches lowered k's probe loss).
  Per edge {j,k}: ρ_{jk} = b_{k→j} / b_{j→k}, what j got back from k per unit it gave k
  (ρ_{kj} = 1/ρ_{jk}; 1 = balanced; negative = one side harms the other). Per node:
  given_j = Σ_k b_{j→k}, received_j = Σ_k b_{k→j}, ρ_j = received_j / given_j, and the
  bounded balance β_j = (received_j − given_j) / (|received_j| + |given_j|) ∈ [−1, 1]
  (+1: only takes, −1: only gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicesim.common.errors import ConfigError
from dicesim.config import MAX_HOPS, Config, bounded, default_list, register_block, show
from dicesim.experiments import final_loss, runner, topology_options, variant
from dicesim.experiments.contribution.report import node_rows, plots, report_md
from dicesim.experiments.runner import Case, Table, Task
from dicesim.influence.events import InfluenceRow
from dicesim.report.stats import pearson, spearman
from dicesim.run.session import Session


@dataclass
class Contribution:
    """The `contribution:` block of configs/experiment/contribution.yaml."""

    node_counts: list[int] = default_list(8, 16)
    noise_max: float = bounded(0.6, 0, 1)
    noise: list[float] | None = None
    hops: int = bounded(2, 0, MAX_HOPS)
    curvature: bool = True
    min_spearman: float = bounded(0.8, -1, 1)


def check_contribution(c: Config) -> None:
    k = c.contribution
    if not k.node_counts or any(v < 2 for v in k.node_counts):
        raise ConfigError(f"contribution.node_counts={show(k.node_counts)}: needs one or "
                          "more node counts >= 2, e.g. contribution.node_counts=[8,16]")
    if k.noise is not None and (any(not 0 <= v <= 1 for v in k.noise) or any(
            n != len(k.noise) for n in k.node_counts)):
        raise ConfigError(f"contribution.noise={show(k.noise)}: fractions in [0, 1], "
                          "one per node of every contribution.node_counts, or null")


register_block("contribution", Contribution, check_contribution)


NODE_COLUMNS = ("nodes", "node", "label_noise", "dice_r_hop", "dice_one_hop", "full_horizon",
                "loo", "rank_dice", "rank_loo", "given", "received", "reciprocity", "balance")
EDGE_COLUMNS = ("nodes", "j", "k", "given_j_to_k", "given_k_to_j", "reciprocity_jk")


# ---- data quality ----------------------------------------------------------------------------
def noise_levels(cfg: Config, nodes: int) -> np.ndarray:
    """p_k: `contribution.noise` as given, else evenly from 0 to noise_max over the nodes."""
    given = cfg.contribution.noise
    if given is not None:
        return np.asarray(given, dtype=float)
    return np.linspace(0.0, float(cfg.contribution.noise_max), nodes)


# ---- measurements ----------------------------------------------------------------------------
def dice_contributions(rows: list[InfluenceRow], nodes: int) -> dict[str, np.ndarray]:
    """r-hop (Σ over every hop and node) and one-hop (Definition 2) sums per source node,
    and the accumulated proximal influence P[j, k] = Σ_t E[(j,t), 1, k], k ≠ j."""
    r_hop, one_hop = np.zeros(nodes), np.zeros(nodes)
    proximal = np.zeros((nodes, nodes))
    for r in rows:
        r_hop[r.source] += r.dice_e
        if r.hop == 0 or (r.hop == 1 and r.node != r.source):
            one_hop[r.source] += r.dice_e
        if r.hop == 1 and r.node != r.source:
            proximal[r.source, r.node] += r.dice_e
    return {"r_hop": r_hop, "one_hop": one_hop, "proximal": proximal}


def reciprocity(proximal: np.ndarray, W_support: np.ndarray) -> tuple[list[dict], dict]:
    """Per edge and per node, from the benefit b_{j→k} = −P[j, k] (see the module doc)."""
    b = -proximal
    n = len(b)
    edges = []
    for j in range(n):
        for k in range(j + 1, n):
            if W_support[k, j] and W_support[j, k]:
                edges.append({"j": j, "k": k, "given_j_to_k": float(b[j, k]),
                              "given_k_to_j": float(b[k, j]),
                              "reciprocity_jk": _ratio(b[k, j], b[j, k])})
    given, got = b.sum(1), b.sum(0)
    per_node = {"given": given.tolist(), "received": got.tolist(),
                "reciprocity": [_ratio(got[j], given[j]) for j in range(n)],
                "balance": [float((got[j] - given[j]) / (abs(got[j]) + abs(given[j])))
                            if abs(got[j]) + abs(given[j]) > 0 else None for j in range(n)]}
    return edges, per_node


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b != 0 else None


def ranks(values: np.ndarray) -> list[int]:
    """1 = most helpful (most negative influence)."""
    order = np.argsort(np.asarray(values), kind="stable")  # ties: first come first
    out = np.empty(len(order), dtype=int)
    out[order] = np.arange(1, len(order) + 1)
    return out.tolist()


# ---- running ---------------------------------------------------------------------------------
def setting_configs(cfg: Config, nodes: int) -> tuple[Config, list[Config]]:
    """The tracking run (one event per node and step) and the baseline + leave-one-out runs."""
    c = cfg.contribution
    steps, hops = int(cfg.steps), int(c.hops)
    common = {"topology": topology_options(cfg, cfg.topology.name), "nodes": nodes,
              "counterfactual__remove": [], "data__label_noise": noise_levels(cfg, nodes).tolist()}
    events = [{"node": j, "step": t, "samples": "all"} for t in range(steps)
              for j in range(nodes)]
    # r extra steps let the last events' cascades finish; nothing before T changes
    tracking = variant(cfg, **common, steps=steps + hops, eval_every=steps + hops,
                       influence__events=events, influence__hops=hops,
                       influence__ground_truth=False, influence__estimators=["dice_e"],
                       influence__curvature=bool(c.curvature), influence__proximal=False)
    # the run with every node's data also carries the full-horizon reverse pass
    runs = [variant(cfg, **common, steps=steps, eval_every=steps, influence__events=0,
                    attribution__enabled=True, attribution__target="network")]
    for j in range(nodes):
        removal = [{"node": j, "step": t, "samples": "all"} for t in range(steps)]
        runs.append(variant(cfg, **{**common, "counterfactual__remove": removal}, steps=steps,
                            eval_every=steps, influence__events=0))
    return tracking, runs


def run_setting(session: Session, cfg: Config, nodes: int) -> dict | None:
    noise = noise_levels(cfg, nodes)
    tracking_cfg, loo_cfgs = setting_configs(cfg, nodes)
    sim = session.build(tracking_cfg)
    result = session.simulate(sim)
    losses, full = [], None
    for conf in loo_cfgs:
        loo_sim = session.build(conf)
        res = session.simulate(loo_sim)
        if session.rank == 0:
            losses.append(final_loss(loo_sim, res.metrics))
            if res.attribution is not None:  # Σ_t λ_j^{t+½}·δ_j^{t+½} per source node j
                full = res.attribution.node_totals.sum(0)
    if session.rank != 0:
        return None
    with_all, without = losses[0], np.array(losses[1:])
    loo = with_all - without  # LOO_j = L(with j) − L(without j)
    dice = dice_contributions(result.influence, nodes)
    support = sim.topology.support()
    edges, per_node = reciprocity(dice["proximal"], support)
    min_sp = float(cfg.contribution.min_spearman)
    sp_r = spearman(dice["r_hop"], loo)
    sp_1 = spearman(dice["one_hop"], loo)
    sp_f = spearman(full, loo)
    return {
        "nodes": nodes, "topology": sim.topology.name, "steps": int(cfg.steps),
        "hops": int(cfg.contribution.hops), "events": len(sim.events),
        "label_noise": noise.tolist(), "final_probe_loss": with_all,
        "dice_r_hop": dice["r_hop"].tolist(), "dice_one_hop": dice["one_hop"].tolist(),
        "loo": loo.tolist(), "full_horizon": full.tolist(),
        "rank_dice": ranks(dice["r_hop"]), "rank_loo": ranks(loo),
        "spearman_r_hop_vs_loo": sp_r, "spearman_one_hop_vs_loo": sp_1,
        "spearman_full_horizon_vs_loo": sp_f,
        "pearson_full_horizon_vs_loo": pearson(full, loo),
        "rel_err_full_horizon_vs_loo": float(np.abs(full - loo).sum() / np.abs(loo).sum()),
        "rel_err_r_hop_vs_loo": float(np.abs(dice["r_hop"] - loo).sum() / np.abs(loo).sum()),
        "pearson_r_hop_vs_loo": pearson(dice["r_hop"], loo),
        "spearman_loo_vs_noise": spearman(loo, noise),
        "spearman_dice_vs_noise": spearman(dice["r_hop"], noise),
        "pass": bool(sp_r >= min_sp), "tracking_wall_s": result.wall_s,
        "reciprocity": {"edges": edges, "nodes": per_node},
    }


class ContributionTask(Task):
    name = "contribution"

    def cases(self, session: Session) -> list[Case]:
        cfg = session.cfg
        cases = []
        for n in [int(n) for n in cfg.contribution.node_counts]:  # all valid before training
            tracking, runs = setting_configs(cfg, n)
            noise_levels(cfg, n)
            session.build(tracking)
            session.build(runs[-1])
            cases.append(Case(f"{n}_nodes", f"{n} nodes", n))
        return cases

    def announce(self, session: Session, cases: list[Case]) -> str:
        return (f"contribution: node counts {[c.spec for c in cases]}; per count one tracking "
                f"run with {session.cfg.steps} × nodes events and nodes + 1 leave-one-out runs")

    def run_case(self, session: Session, case: Case, done: dict) -> dict | None:
        return run_setting(session, session.cfg, case.spec)

    def progress(self, case: Case, s: dict) -> str:
        return (f"{case.label}: Spearman(DICE-E, leave-one-out) = "
                f"{s['spearman_r_hop_vs_loo']:.4f} (one-hop view "
                f"{s['spearman_one_hop_vs_loo']:.4f}); full horizon: Spearman "
                f"{s['spearman_full_horizon_vs_loo']:.4f}, rel_err "
                f"{s['rel_err_full_horizon_vs_loo']:.4f} (r-hop rel_err "
                f"{s['rel_err_r_hop_vs_loo']:.4f})")

    def summarize(self, cfg: Config, cases: list[Case], results: dict, wall_s: float) -> dict:
        settings = list(results.values())
        min_sp = float(cfg.contribution.min_spearman)
        return {"settings": settings,
                "targets": {"min_spearman": min_sp,
                            "all_pass": all(s["pass"] for s in settings)}}

    def tables(self, summary: dict, results: dict) -> list[Table]:
        settings = summary["settings"]
        return [Table("nodes.csv", NODE_COLUMNS, node_rows(settings)),
                Table("edges.csv", EDGE_COLUMNS, [
                    (s["nodes"], e["j"], e["k"], e["given_j_to_k"], e["given_k_to_j"],
                     e["reciprocity_jk"]) for s in settings for e in s["reciprocity"]["edges"]])]

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        return plots(out, summary["settings"])

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(cfg, summary, pictures)

    def closing(self, summary: dict, out: Path) -> list[str]:
        met = summary["targets"]["all_pass"]
        return [f"contribution: target {'met' if met else 'NOT met'}; report: "
                f"{out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, ContributionTask())
