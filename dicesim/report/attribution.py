"""The outputs of full-horizon attribution (dicesim.influence.attribution): attribution.csv,
samples.csv, the summary block, report.md's lines and the figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicesim.common.writers import write_csv
from dicesim.influence.attribution import Attribution

BATCH_COLUMNS = ("source", "step", "target", "value")
SAMPLE_COLUMNS = ("sample", "node", "count", "value")


def batch_rows(a: Attribution) -> list[tuple]:
    names = a.settings.target_names
    T, m, n = a.batch.shape
    return [(j, t, names[i], float(a.batch[t, i, j]))
            for t in range(T) for j in range(n) for i in range(m)]


def summary_block(a: Attribution) -> dict:
    totals = a.node_totals
    names = a.settings.target_names
    block = {
        "target": "network" if a.settings.targets is None else list(a.settings.targets),
        "keep_every": a.settings.keep_every,
        "node_totals": totals.sum(0).tolist(),  # Σ over targets, per source node
        "node_totals_by_target": {name: totals[i].tolist() for i, name in enumerate(names)},
        "wall_s": a.wall_s, "train_wall_s": a.train_wall_s,
        "cost_ratio": a.wall_s / a.train_wall_s if a.train_wall_s > 0 else None,
        "memory_bytes": a.memory_bytes, "trajectory_bytes": a.trajectory_bytes,
    }
    if a.samples is not None:
        _, _, _, value = a.sample_totals()
        block["samples"] = int(len(value))
        block["most_harmful_sample_value"] = float(value.max()) if len(value) else None
    return block


def write_attribution(out: Path, sim, a: Attribution, plots: bool = True) -> dict:

    write_csv(out / "attribution.csv", BATCH_COLUMNS, batch_rows(a))
    if a.samples is not None:
        ids, node, count, value = a.sample_totals()
        write_csv(out / "samples.csv", SAMPLE_COLUMNS,
                  [(int(i), int(k), int(c), float(v))
                   for i, k, c, v in zip(ids, node, count, value, strict=True)])
    block = summary_block(a)
    if plots:
        block["plots"] = attribution_plots(out, a)
    return block


def attribution_plots(out: Path, a: Attribution) -> list[str]:
    from dicesim.report.plots import AGGREGATE_ABOVE, plt  # the Agg backend, chosen there

    totals = a.node_totals  # [m, n]
    T, m, n = a.batch.shape
    title = "full-horizon influence Σ_t λ_j^{t+½}·δ_j^{t+½} (negative: helped)"
    if n > AGGREGATE_ABOVE and m <= 8:  # a population: one curve per target over node ids
        fig, ax = plt.subplots(figsize=(10, 3.6))
        for i, name in enumerate(a.settings.target_names):
            ax.plot(np.arange(n), totals[i], lw=0.5, label=f"target {name}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="source node j (its data)", ylabel="influence", title=title, xlim=(0, n - 1))
        ax.legend(fontsize=7)
    else:  # one cell per (target, source); at most 12 × 8 inches, ticks only where they read
        fig, ax = plt.subplots(figsize=(min(12.0, max(4.0, 0.35 * n + 2)),
                                        min(8.0, max(2.2, 0.35 * m + 1.6))))
        lim = float(np.abs(totals).max()) or 1.0
        im = ax.imshow(totals, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                       interpolation="nearest")
        ax.set(xlabel="source node j (its data)", ylabel="target", title=title)
        if m <= AGGREGATE_ABOVE:
            ax.set(yticks=range(m), yticklabels=a.settings.target_names)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "attribution_heatmap.png", dpi=110)
    plt.close(fig)

    per_source = a.batch.sum(1)  # [T, n] on Σ targets
    node = a.settings.plot_node
    if node is None:
        node = int(np.abs(per_source.sum(0)).argmax())
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = np.arange(T)
    ax.plot(steps, per_source[:, node], lw=0.8, label=f"node {node}: its batch at step t")
    ax2 = ax.twinx()
    ax2.plot(steps, np.cumsum(per_source[:, node]), color="C1", lw=1.2,
             label="cumulative Σ_{τ≤t}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="training step t", ylabel="influence on the final target",
           title=f"node {node}'s data over training (negative: helped)")
    ax2.set_ylabel("cumulative")
    fig.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "attribution_over_time.png", dpi=110)
    plt.close(fig)
    return ["attribution_heatmap.png", "attribution_over_time.png"]


def report_lines(block: dict) -> list[str]:
    """The report.md section of a run with attribution."""
    totals = block["node_totals"]
    order = np.argsort(totals)
    ratio = block.get("cost_ratio")
    lines = [
        "## Full-horizon attribution",
        "",
        f"One reverse pass over the trajectory (θ kept every {block['keep_every']} steps) gives "
        f"every batch's first-order influence on the final target ({block['target']}): "
        "`attribution.csv` per (source node, step, target), `samples.csv` per training sample. "
        f"Reverse pass {block['wall_s']:.2f} s"
        + (f" = {ratio:.2f}× training" if ratio is not None else "")
        + f"; peak memory {block['memory_bytes'] / 2**20:.1f} MiB.",
        "",
        "| node | total influence (negative: helped) |",
        "|---|---|",
    ]
    lines += [f"| {int(j)} | {totals[j]:.4g} |" for j in order]
    return lines + [""]
