"""`make cascade`: how influence spreads and fades hop by hop (hop s = s gossip
rounds after the event, not graph distance).

1. Per topology, sampled whole-batch events followed for r hops. For hop s:
   total(s) = mean over events of |Σ_k E[e,s,k]| (and of |Σ_k G[e,s,k]|), the influence the
   batch still has on the network's probe loss s gossip rounds later. Under a doubly
   stochastic W, Σ_k δ̂_k is only changed by the local factors (I − η H_k), so the total is
   *damped*, not diluted; the mean per reached node |E[e,s,k]| also shows the dilution.
2. The `hub` topology: events at the hub and at a leaf at the same steps. To first order
   the hop-1 total is q ∇L'ᵀ δ̂_j · Σ_k W[k,j], so the column sum of W at the source, the
   "walk mass" m_s(j) = 1ᵀ W^{t+s−1} ⋯ W^t e_j, predicts the asymmetry.
3. Each graph drawn with every node coloured by the influence it received:
   Σ_e Σ_{s≥1} |E[e,s,k]| over the events of other sources j_e ≠ k.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicesim.config import Config, TopologyName, bounded, default_list, register_block
from dicesim.experiments import runner, topology_options, variant
from dicesim.experiments.cascade.report import plots, report_md
from dicesim.experiments.runner import Case, Table, Task
from dicesim.graph.topology import Topology
from dicesim.influence.events import InfluenceRow
from dicesim.report.stats import hop_totals
from dicesim.run.session import Session


@dataclass
class Cascade:
    """The `cascade:` block of configs/experiment/cascade.yaml."""

    topologies: list[TopologyName] = default_list("ring", "torus", "exponential",
                                                  "one_peer_exponential", "hub")
    draw: list[TopologyName] = default_list("ring", "torus", "exponential", "hub")
    leaf: int | None = bounded(None, 0)
    hub_first_step: int = bounded(0, 0)
    hub_stride: int = bounded(2, 1)


register_block("cascade", Cascade)


TOTAL_COLUMNS = ("run", "hop", "mean_abs_total_e", "mean_abs_total_gt", "mean_abs_entry_e",
                 "mean_reached", "walk_mass")


# ---- measurements ----------------------------------------------------------------------------
def decay(rows: list[InfluenceRow]) -> dict[int, dict[str, float]]:
    """Per hop s: hop_totals (mean over events of |Σ_k E| and |Σ_k G|), the mean |E[e,s,k]|
    over reached (event, node) entries, and the mean number of nodes reached."""
    totals = hop_totals(rows)
    entries: dict[int, list[float]] = defaultdict(list)
    reached: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        entries[r.hop].append(abs(r.dice_e))
        reached[r.hop][r.event] += 1
    return {hop: {"mean_abs_total_e": totals[hop]["mean_abs_e"],
                  "mean_abs_total_gt": totals[hop]["mean_abs_gt"],
                  "mean_abs_entry_e": float(np.mean(entries[hop])),
                  "mean_reached": float(np.mean(list(reached[hop].values())))}
            for hop in totals}


def received(rows: list[InfluenceRow], nodes: int) -> np.ndarray:
    """Σ_e Σ_{s≥1} |E[e,s,k]| per node k, over events whose source is not k."""
    out = np.zeros(nodes)
    for r in rows:
        if r.hop >= 1 and r.node != r.source:
            out[r.node] += abs(r.dice_e)
    return out


def walk_mass(topology: Topology, source: int, step: int, hops: int) -> list[float]:
    """m_s = 1ᵀ W^{t+s−1} ⋯ W^t e_j for s = 0 … r: the total weight of all walks from j."""
    v = np.zeros(topology.n)
    v[source] = 1.0
    out = [1.0]
    for s in range(hops):
        v = topology.W_sparse(step + s) @ v
        out.append(float(v.sum()))
    return out


def mean_walk_mass(topology: Topology, events: list[tuple[int, int]], hops: int) -> list[float]:
    return list(np.mean([walk_mass(topology, j, t, hops) for j, t in events], axis=0))


def event_totals(rows: list[InfluenceRow], column: str = "dice_e"
                 ) -> dict[int, dict[int, float]]:
    """event → hop → Σ_k value of one estimator column (dice_e, dice_gt)."""
    out: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        value = getattr(r, column)
        if value is not None:
            out[r.event][r.hop] += value
    return out


def hub_versus_leaf(rows: list[InfluenceRow], hub: int, leaf: int, hops: int) -> dict:
    """Paired comparison: per step, Σ_{s≥1} |Σ_k E[e,s,k]| of the hub's event and the leaf's."""
    src_step = {r.event: (r.source, r.step) for r in rows}
    result: dict = {"hub": hub, "leaf": leaf}
    for name in ("dice_e", "dice_gt"):
        tot = event_totals(rows, name)
        per = {src_step[ev]: [abs(tot[ev][s]) for s in range(hops + 1)] for ev in tot}
        steps = sorted({t for (j, t) in per if j == hub} & {t for (j, t) in per if j == leaf})
        hub_by_hop = np.array([per[(hub, t)] for t in steps])
        leaf_by_hop = np.array([per[(leaf, t)] for t in steps])
        hub_total, leaf_total = hub_by_hop[:, 1:].sum(1), leaf_by_hop[:, 1:].sum(1)
        result[name] = {
            "pairs": len(steps),
            "hub_mean_total_hops_ge_1": float(hub_total.mean()),
            "leaf_mean_total_hops_ge_1": float(leaf_total.mean()),
            "ratio": float(hub_total.mean() / leaf_total.mean()),
            "hub_larger_fraction": float(np.mean(hub_total > leaf_total)),
            "hub_by_hop": hub_by_hop.mean(0).tolist(),
            "leaf_by_hop": leaf_by_hop.mean(0).tolist(),
        }
    return result


# ---- running ---------------------------------------------------------------------------------
def topology_config(cfg: Config, name: str, **extra: object) -> Config:
    return variant(cfg, topology=topology_options(cfg, name), counterfactual__remove=[],
                   eval_every=cfg.steps, **extra)


def hub_events(cfg: Config, hub: int, leaf: int) -> list[dict]:
    c = cfg.cascade
    hops, steps = int(cfg.influence.hops), int(cfg.steps)
    chosen = range(int(c.hub_first_step), steps - hops + 1, int(c.hub_stride))
    return [{"node": j, "step": t, "samples": "all"} for t in chosen for j in (hub, leaf)]


class CascadeTask(Task):
    name = "cascade"

    def cases(self, session: Session) -> list[Case]:
        cfg = session.cfg
        c = cfg.cascade
        plan = [(name, topology_config(cfg, name)) for name in c.topologies]
        self.hub = int(topology_options(cfg, "hub").get("hub", 0))
        self.leaf = int(c.leaf) if c.leaf is not None else (self.hub + cfg.nodes // 2) % cfg.nodes
        plan.append(("hub_vs_leaf", topology_config(
            cfg, "hub", influence__events=hub_events(cfg, self.hub, self.leaf))))
        cases = [Case(label, label, session.build(conf)) for label, conf in plan]
        self.topologies = {c.key: c.spec.topology for c in cases}
        return cases

    def announce(self, session: Session, cases: list[Case]) -> str:
        return f"cascade: {len(cases)} runs, r = {int(session.cfg.influence.hops)} hops"

    def run_case(self, session: Session, case: Case, done: dict) -> dict | None:
        sim = case.spec
        result = session.simulate(sim)
        if session.rank != 0:
            return None
        hops, rows = int(session.cfg.influence.hops), result.influence
        per_hop = decay(rows)
        mass = mean_walk_mass(sim.topology, [(e.source, e.step) for e in sim.events], hops)
        for s, v in per_hop.items():
            v["walk_mass"] = mass[s]
        return {"topology": sim.topology.name, "events": len(sim.events),
                "spectral_gap": sim.topology.spectral_gap(), "wall_s": result.wall_s,
                "by_hop": per_hop, "received": received(rows, sim.run.nodes).tolist(),
                "_rows": rows}

    def progress(self, case: Case, result: dict) -> str:
        by_hop = result["by_hop"]
        hops = max(by_hop)
        first, last = by_hop[1]["mean_abs_total_e"], by_hop[hops]["mean_abs_total_e"]
        return (f"{case.label}: {result['wall_s']:.1f} s, |Σ_k E| hop 1 {first:.3g} → hop "
                f"{hops} {last:.3g} (×{last / first:.3f})")

    def summarize(self, cfg: Config, cases: list[Case], results: dict, wall_s: float) -> dict:
        hops, hub, leaf = int(cfg.influence.hops), self.hub, self.leaf
        rows = results["hub_vs_leaf"]["_rows"]
        top = cases[-1].spec.topology
        hv = hub_versus_leaf(rows, hub, leaf, hops)
        hv["walk_mass_hub"] = walk_mass(top, hub, 0, hops)
        hv["walk_mass_leaf"] = walk_mass(top, leaf, 0, hops)
        hv["hub_received"] = split_received(rows, cfg.nodes, hub, leaf)
        return {"nodes": cfg.nodes, "steps": cfg.steps, "hops": hops, "lr": cfg.optim.lr,
                "batch_size": cfg.batch_size, "removal": "batch",
                "runs": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                         for k, v in results.items()},
                "hub_vs_leaf": hv}

    def tables(self, summary: dict, results: dict) -> list[Table]:
        return [Table("cascade.csv", TOTAL_COLUMNS, [
            (label, s, v["mean_abs_total_e"], v["mean_abs_total_gt"], v["mean_abs_entry_e"],
             v["mean_reached"], v["walk_mass"])
            for label, r in results.items() for s, v in r["by_hop"].items()])]

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        runs = {k: {**v, "_topology": self.topologies[k]} for k, v in results.items()}
        return plots(out, runs, summary["hub_vs_leaf"], cfg.cascade)

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(summary, pictures)

    def closing(self, summary: dict, out: Path) -> list[str]:
        e = summary["hub_vs_leaf"]["dice_e"]
        return [f"cascade: hub/leaf influence at hops ≥ 1: ×{e['ratio']:.2f} (hub larger in "
                f"{e['hub_larger_fraction']:.0%} of {e['pairs']} pairs); report: "
                f"{out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, CascadeTask())


def split_received(rows: list[InfluenceRow], nodes: int, hub: int, leaf: int) -> dict[str, list]:
    return {"from_hub": received([r for r in rows if r.source == hub], nodes).tolist(),
            "from_leaf": received([r for r in rows if r.source == leaf], nodes).tolist()}
