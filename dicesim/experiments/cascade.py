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

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicesim.config import Config, TopologyName, bounded, default_list, register_block
from dicesim.experiments import runner, topology_options, variant
from dicesim.experiments.runner import Case, Table, Task
from dicesim.graph.topology import Topology
from dicesim.influence.events import InfluenceRow
from dicesim.report.summary import footer, hop_totals
from dicesim.run.provenance import provenance_lines
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


# ---- report ----------------------------------------------------------------------------------
def report_md(summary: Mapping, pictures: list[str]) -> str:
    hops = summary["hops"]
    lines = [
        "# The influence cascade",
        "",
        *provenance_lines(summary),
        f"{summary['nodes']} nodes, {summary['steps']} steps, lr {summary['lr']:g}, batch "
        f"{summary['batch_size']}; whole-batch events followed for r = {hops} hops (hop s = s "
        "gossip rounds after the event, not graph distance) with the exact counterfactual. "
        "total(s) = mean over events of |Σ_k E[e,s,k]| (the batch's "
        "effect on the network's q-weighted probe loss s rounds later); entry(s) = mean "
        "|E[e,s,k]| over reached nodes; walk mass = 1ᵀ W^s e_j (what W alone predicts for "
        "the total, relative to hop 0).",
        "",
        "| run | hop | total E | total GT | entry E | nodes reached | walk mass |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in summary["runs"].items():
        for s, v in r["by_hop"].items():
            lines.append(f"| {label} | {s} | {v['mean_abs_total_e']:.4g} | "
                         f"{v['mean_abs_total_gt']:.4g} | {v['mean_abs_entry_e']:.3g} | "
                         f"{v['mean_reached']:.1f} | {v['walk_mass']:.3g} |")
    hv = summary["hub_vs_leaf"]
    e, g = hv["dice_e"], hv["dice_gt"]
    lines += [
        "",
        f"## The same step's batch at the hub (node {hv['hub']}) versus at a leaf "
        f"(node {hv['leaf']})",
        "",
        f"{e['pairs']} steps; at each, one event removes the hub's whole batch and another "
        "the leaf's (each node's own batch of that step: the engine draws batches per node). "
        "Total influence at hops ≥ 1 = Σ_{s≥1} |Σ_k E[e,s,k]|, averaged over the steps.",
        "",
        "| | hub | leaf | hub / leaf | hub larger in |",
        "|---|---|---|---|---|",
        f"| DICE-E | {e['hub_mean_total_hops_ge_1']:.4g} | {e['leaf_mean_total_hops_ge_1']:.4g} "
        f"| {e['ratio']:.3g} | {e['hub_larger_fraction']:.0%} of pairs |",
        f"| DICE-GT | {g['hub_mean_total_hops_ge_1']:.4g} | {g['leaf_mean_total_hops_ge_1']:.4g} "
        f"| {g['ratio']:.3g} | {g['hub_larger_fraction']:.0%} of pairs |",
        f"| walk mass Σ_{{s≥1}} 1ᵀW^s e_j | {sum(hv['walk_mass_hub'][1:]):.4g} | "
        f"{sum(hv['walk_mass_leaf'][1:]):.4g} | "
        f"{sum(hv['walk_mass_hub'][1:]) / sum(hv['walk_mass_leaf'][1:]):.3g} | |",
        "",
        "| hop | hub: total E | leaf: total E | ratio | walk-mass ratio |",
        "|---|---|---|---|---|",
    ]
    for s in range(hops + 1):
        h, lf = e["hub_by_hop"][s], e["leaf_by_hop"][s]
        wm = hv["walk_mass_hub"][s] / hv["walk_mass_leaf"][s]
        lines.append(f"| {s} | {h:.4g} | {lf:.4g} | {h / lf if lf else math.nan:.3g} | "
                     f"{wm:.3g} |")
    lines.append("")
    lines += footer(pictures, "Files: `summary.json`, `cascade.csv` (per run and hop), "
                              "`config.yaml`.")
    return "\n".join(lines)


# ---- figures ---------------------------------------------------------------------------------
def plots(out: Path, runs: dict[str, dict], hv: dict, c: Config) -> list[str]:
    return [decay_plot(out, runs, hv), graph_plot(out, runs, hv, list(c.draw))]


def decay_plot(out: Path, runs: dict[str, dict], hv: dict) -> str:
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    for i, (label, r) in enumerate(runs.items()):
        if label == "hub_vs_leaf":
            continue
        hops = sorted(r["by_hop"])
        v = r["by_hop"]
        a1.semilogy(hops, [v[s]["mean_abs_total_e"] for s in hops], "o-", color=colours[i],
                    label=label)
        a1.semilogy(hops, [v[s]["mean_abs_total_gt"] for s in hops], "x", color=colours[i],
                    ms=7)
        a2.semilogy(hops, [v[s]["mean_abs_entry_e"] for s in hops], "o-", color=colours[i],
                    label=label)
    a1.set(xlabel="hop s", ylabel="mean over events of |Σ_k influence|",
           title="total influence (lines: DICE-E, ×: DICE-GT)")
    a2.set(xlabel="hop s", ylabel="mean |E[e,s,k]| over reached nodes",
           title="per reached node (damping × dilution)")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    e, g = hv["dice_e"], hv["dice_gt"]
    hops = list(range(len(e["hub_by_hop"])))
    a3.semilogy(hops, e["hub_by_hop"], "o-", color="C3", label=f"batch at the hub ({hv['hub']})")
    a3.semilogy(hops, g["hub_by_hop"], "x", color="C3", ms=7)
    a3.semilogy(hops, e["leaf_by_hop"], "o-", color="C0", label=f"batch at a leaf ({hv['leaf']})")
    a3.semilogy(hops, g["leaf_by_hop"], "x", color="C0", ms=7)
    a3.set(xlabel="hop s", ylabel="mean over events of |Σ_k influence|",
           title="hub versus leaf (×: DICE-GT)")
    a3.legend(fontsize=7)
    for ax in (a1, a2, a3):
        ax.set_xticks(hops)
    fig.tight_layout()
    fig.savefig(out / "cascade_decay.png", dpi=110)
    plt.close(fig)
    return "cascade_decay.png"


def layout(topology: Topology) -> dict[int, tuple[float, float]]:
    """Circle for rings and exponential graphs, grid for the torus, hub in the middle."""
    import networkx as nx

    n = topology.n
    if topology.name == "hub":
        hub = int(np.argmax([topology.W(0)[:, k].sum() for k in range(n)]))
        leaves = [k for k in range(n) if k != hub]
        return nx.shell_layout(nx.empty_graph(n), [[hub], leaves])
    if topology.name == "torus":
        union = topology.support()
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        rows = next((d for d in divisors if _is_torus(union, d, n // d)), 1)
        cols = n // rows
        return {k: (k % cols, -(k // cols)) for k in range(n)}
    return nx.circular_layout(nx.empty_graph(n))


def _is_torus(union: np.ndarray, rows: int, cols: int) -> bool:
    """Whether node 0's neighbours are those of a rows × cols torus."""
    want = {(0 + 1) % cols, (cols - 1) % cols, cols % (rows * cols),
            ((rows - 1) * cols) % (rows * cols)} - {0}
    return set(np.flatnonzero(union[:, 0])) - {0} == want


def graph_plot(out: Path, runs: dict[str, dict], hv: dict, draw: list[str]) -> str:
    import networkx as nx
    from matplotlib.colors import LogNorm

    from dicesim.report.plots import plt  # the Agg backend, chosen there

    panels = [(label, runs[label]["_topology"], np.array(runs[label]["received"]), None)
              for label in draw if label in runs]
    top = runs["hub_vs_leaf"]["_topology"]
    panels += [(f"hub: batch at the hub ({hv['hub']})", top,
                np.array(hv["hub_received"]["from_hub"]), hv["hub"]),
               (f"hub: batch at a leaf ({hv['leaf']})", top,
                np.array(hv["hub_received"]["from_leaf"]), hv["leaf"])]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, topology, values, source) in zip(axes.flat, panels, strict=False):
        union = topology.support()
        g = nx.Graph()
        g.add_nodes_from(range(topology.n))
        g.add_edges_from((int(a), int(b)) for a, b in zip(*np.nonzero(union), strict=True)
                         if a != b)
        pos = layout(topology)
        positive = values[values > 0]
        lo = float(positive.min()) if len(positive) else 1e-12
        hi = float(values.max()) if len(positive) else 1.0
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
        nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.25, width=0.7)
        shown = np.where(values > 0, values, lo)
        nodes = nx.draw_networkx_nodes(g, pos, ax=ax, node_color=shown, cmap="viridis",
                                       node_size=260)
        nodes.set_norm(norm)
        if source is not None:
            nx.draw_networkx_nodes(g, pos, nodelist=[source], ax=ax, node_color="none",
                                   edgecolors="red", linewidths=2.5, node_size=420)
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=7, font_color="white")
        fig.colorbar(nodes, ax=ax, shrink=0.8, label="Σ_e Σ_{s≥1} |E[e,s,k]| received")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "graphs.png", dpi=100)
    plt.close(fig)
    return "graphs.png"
