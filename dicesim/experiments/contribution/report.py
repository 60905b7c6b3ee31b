"""nodes.csv's rows, report.md and the figure of the contribution experiment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicesim.config import Config
from dicesim.report.present import fmt, footer, md_table, report_head, save_figure


def node_rows(settings: list[dict]) -> list[tuple]:
    out = []
    for s in settings:
        r = s["reciprocity"]["nodes"]
        for j in range(s["nodes"]):
            out.append((s["nodes"], j, s["label_noise"][j], s["dice_r_hop"][j],
                        s["dice_one_hop"][j], s["full_horizon"][j], s["loo"][j],
                        s["rank_dice"][j], s["rank_loo"][j],
                        r["given"][j], r["received"][j], r["reciprocity"][j], r["balance"][j]))
    return out


SETTING_KEYS = ("spearman_r_hop_vs_loo", "spearman_one_hop_vs_loo", "pearson_r_hop_vs_loo",
                "spearman_loo_vs_noise", "spearman_dice_vs_noise", "final_probe_loss")


# ---- report ----------------------------------------------------------------------------------
def report_md(cfg: Config, summary: dict, pictures: list[str]) -> str:
    t, settings = summary["targets"], summary["settings"]
    lines = report_head(
        "Node contributions: DICE-E against leave-one-node-out", summary,
        f"`{cfg.data.name}`, `{cfg.model.name}`, lr {cfg.optim.lr:g}, batch {cfg.batch_size}, "
        f"{cfg.steps} steps on `{cfg.topology.name}`. Node k's labels are wrong for a fraction "
        "p_k of its samples. DICE-E contribution C_j = Σ_t Σ_{s≤r} Σ_k E[(j,t,B_j^t),s,k] (one "
        "whole-batch event per node and step, followed r hops: hop s = s gossip rounds after "
        "the step, not graph distance); leave-one-out LOO_j = L(θ^T) − L(θ̃^T) with "
        "θ̃ the run where node j gossips but takes no gradient step. Negative = helped; "
        "rank 1 = most helpful.",
        "",
        f"**Target** Spearman(C, LOO) ≥ {t['min_spearman']}: "
        + ("met." if t["all_pass"] else "NOT met."), "")
    lines += md_table(["nodes", "Spearman r-hop", "Spearman one-hop", "Pearson r-hop",
                       "Spearman(LOO, noise)", "Spearman(C, noise)", "final probe loss"],
                      ([s["nodes"], *(f"{s[k]:.4f}" for k in SETTING_KEYS)] for s in settings))
    lines += full_horizon_lines(settings)
    for s in settings:
        lines += node_table(s)
    lines += [
        "",
        "## Reciprocity",
        "",
        "b_{j→k} = −Σ_t E[(j,t),1,k] is the benefit node j's batches gave out-neighbour k one "
        "gossip round later (accumulated proximal influence, Definition 4 of the DICE "
        "paper). Per edge "
        "ρ_{jk} = b_{k→j} / b_{j→k} (what j got back per unit given; in `edges.csv`); per node "
        "given_j = Σ_k b_{j→k}, received_j = Σ_k b_{k→j}, ρ_j = received_j / given_j and "
        "β_j = (received − given) / (|received| + |given|) ∈ [−1, 1]: β ≈ 0 trades evenly, "
        "β > 0 takes more than it gives (β = 1: gives nothing, or harms), β < 0 gives more "
        "than it gets back. ρ < 0 means one side's data harms the other.",
        "",
    ]
    lines += footer(pictures, "Files: `summary.json`, `nodes.csv`, `edges.csv`, `config.yaml`.")
    return "\n".join(lines)


def full_horizon_lines(settings: list[dict]) -> list[str]:
    return ["", "Full horizon (one reverse pass, `attribution`): F_j = Σ_t λ_j^{t+½}·δ_j^{t+½}, "
            "the first-order effect of all of node j's batches on the final loss.", "",
            *md_table(["nodes", "Spearman(F, LOO)", "Pearson(F, LOO)", "rel_err(F, LOO)",
                       "rel_err(r-hop C, LOO)"],
                      ([s["nodes"], *(f"{s[k]:.4f}" for k in (
                          "spearman_full_horizon_vs_loo", "pearson_full_horizon_vs_loo",
                          "rel_err_full_horizon_vs_loo", "rel_err_r_hop_vs_loo"))]
                       for s in settings))]


def node_table(s: dict) -> list[str]:
    """One setting's nodes: noise, contributions, ranks and what each gives and receives."""
    r = s["reciprocity"]["nodes"]
    return ["", f"### {s['nodes']} nodes ({s['events']} events, r = {s['hops']})", "",
            *md_table(["node", "label noise", "C (r-hop)", "C (one-hop)", "LOO", "rank C",
                       "rank LOO", "given", "received", "ρ_j", "β_j"],
                      ([j, f"{s['label_noise'][j]:.0%}", f"{s['dice_r_hop'][j]:.4g}",
                        f"{s['dice_one_hop'][j]:.4g}", f"{s['loo'][j]:.4g}", s["rank_dice"][j],
                        s["rank_loo"][j], f"{r['given'][j]:.3g}", f"{r['received'][j]:.3g}",
                        fmt(r["reciprocity"][j], ".3g"), fmt(r["balance"][j], ".3f")]
                       for j in range(s["nodes"])))]


def plots(out: Path, settings: list[dict]) -> list[str]:
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, axes = plt.subplots(2, len(settings), figsize=(5.5 * len(settings), 8.4),
                             squeeze=False)
    for col, s in enumerate(settings):
        noise = np.array(s["label_noise"])
        ax = axes[0][col]
        sc = ax.scatter(s["loo"], s["dice_r_hop"], c=noise, cmap="plasma", s=40)
        for j in range(s["nodes"]):
            ax.annotate(str(j), (s["loo"][j], s["dice_r_hop"][j]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(xlabel="leave-one-out LOO_j", ylabel="DICE-E contribution C_j",
               title=f"{s['nodes']} nodes: Spearman {s['spearman_r_hop_vs_loo']:.3f}")
        fig.colorbar(sc, ax=ax, label="label noise p_j")
        ax = axes[1][col]
        r = s["reciprocity"]["nodes"]
        x = np.arange(s["nodes"])
        ax.bar(x - 0.2, r["given"], 0.4, label="given Σ_k b_{j→k}")
        ax.bar(x + 0.2, r["received"], 0.4, label="received Σ_k b_{k→j}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="node j (label noise grows →)", ylabel="benefit (−proximal DICE-E)",
               title="reciprocity: what each node gives and receives", xticks=x)
        ax.legend(fontsize=7)
    return [save_figure(fig, out, "contribution.png")]

