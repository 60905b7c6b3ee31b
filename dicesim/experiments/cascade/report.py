"""report.md and the figures of the cascade experiment."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dicesim.config import Config
from dicesim.report.present import footer, md_table, node_values_graph, report_head, save_figure


# ---- report ----------------------------------------------------------------------------------
def report_md(summary: dict, pictures: list[str]) -> str:
    lines = report_head(
        "The influence cascade", summary,
        f"{summary['nodes']} nodes, {summary['steps']} steps, lr {summary['lr']:g}, batch "
        f"{summary['batch_size']}; whole-batch events followed for r = {summary['hops']} hops "
        "(hop s = s gossip rounds after the event, not graph distance) with the exact "
        "counterfactual. total(s) = mean over events of |Σ_k E[e,s,k]| (the batch's "
        "effect on the network's q-weighted probe loss s rounds later); entry(s) = mean "
        "|E[e,s,k]| over reached nodes; walk mass = 1ᵀ W^s e_j (what W alone predicts for "
        "the total, relative to hop 0).", "")
    lines += md_table(["run", "hop", "total E", "total GT", "entry E", "nodes reached",
                       "walk mass"],
                      ([label, s, f"{v['mean_abs_total_e']:.4g}", f"{v['mean_abs_total_gt']:.4g}",
                        f"{v['mean_abs_entry_e']:.3g}", f"{v['mean_reached']:.1f}",
                        f"{v['walk_mass']:.3g}"]
                       for label, r in summary["runs"].items() for s, v in r["by_hop"].items()))
    lines += hub_versus_leaf_lines(summary["hub_vs_leaf"], summary["hops"])
    lines += footer(pictures, "Files: `summary.json`, `cascade.csv` (per run and hop), "
                              "`config.yaml`.")
    return "\n".join(lines)


def hub_versus_leaf_lines(hv: dict, hops: int) -> list[str]:
    e, g = hv["dice_e"], hv["dice_gt"]
    mass_hub, mass_leaf = sum(hv["walk_mass_hub"][1:]), sum(hv["walk_mass_leaf"][1:])
    lines = [
        "", f"## The same step's batch at the hub (node {hv['hub']}) versus at a leaf "
        f"(node {hv['leaf']})", "",
        f"{e['pairs']} steps; at each, one event removes the hub's whole batch and another "
        "the leaf's (each node's own batch of that step: the engine draws batches per node). "
        "Total influence at hops ≥ 1 = Σ_{s≥1} |Σ_k E[e,s,k]|, averaged over the steps.", "",
        *md_table(["", "hub", "leaf", "hub / leaf", "hub larger in"], [
            *([name, f"{x['hub_mean_total_hops_ge_1']:.4g}",
               f"{x['leaf_mean_total_hops_ge_1']:.4g}", f"{x['ratio']:.3g}",
               f"{x['hub_larger_fraction']:.0%} of pairs"]
              for name, x in (("DICE-E", e), ("DICE-GT", g))),
            ["walk mass Σ_{s≥1} 1ᵀW^s e_j", f"{mass_hub:.4g}", f"{mass_leaf:.4g}",
             f"{mass_hub / mass_leaf:.3g}", ""]]), ""]

    def ratio_row(s: int) -> list[str]:
        h, lf = e["hub_by_hop"][s], e["leaf_by_hop"][s]
        wm = hv["walk_mass_hub"][s] / hv["walk_mass_leaf"][s]
        return [str(s), f"{h:.4g}", f"{lf:.4g}", f"{h / lf if lf else math.nan:.3g}", f"{wm:.3g}"]

    return lines + md_table(["hop", "hub: total E", "leaf: total E", "ratio", "walk-mass ratio"],
                            map(ratio_row, range(hops + 1))) + [""]


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
    return save_figure(fig, out, "cascade_decay.png")


def graph_plot(out: Path, runs: dict[str, dict], hv: dict, draw: list[str]) -> str:
    """Each drawn topology's nodes coloured by the influence they received, then the hub
    graph twice: from the hub's batches and from the leaf's."""
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
        node_values_graph(fig, ax, topology, values, source,
                          "Σ_e Σ_{s≥1} |E[e,s,k]| received")
        ax.set_title(title, fontsize=9)
    return save_figure(fig, out, "graphs.png", dpi=100)
