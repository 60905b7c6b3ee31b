"""PNG figures of a run. Imported only when plotting (matplotlib, Agg backend). `result`
is anything with `metrics` (rows indexable like MetricRow) and `influence` (rows with
InfluenceRow's attributes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dicesim.report.stats import hop_totals  # noqa: E402

if TYPE_CHECKING:
    from dicesim.influence.events import InfluenceRow
    from dicesim.run.trainer import RunResult

# Above this many nodes the per-node panels draw the distribution over nodes (mean, a
# 10–90 % band, the median) and a few highlighted nodes instead of one line per node.
AGGREGATE_ABOVE = 32
BAND = (0.10, 0.90)
PANELS = (  # metrics column, title, y label
    (3, "probe loss", "L'(θ_k)"),
    (4, "probe accuracy", "accuracy"),
    (5, "distance to the average model", "‖θ_k − θ̄‖"),
)


def metric_grid(metrics: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps [S], nodes [N], values [len(PANELS), S, N]) from metrics rows; NaN where a
    (step, node) has no row."""
    cols = [0, 1, *(c for c, _, _ in PANELS)]
    arr = np.array([[r[c] for c in cols] for r in metrics], dtype=float).reshape(-1, len(cols))
    steps, si = np.unique(arr[:, 0], return_inverse=True)
    nodes, ni = np.unique(arr[:, 1], return_inverse=True)
    grid = np.full((len(PANELS), len(steps), len(nodes)), np.nan)
    grid[:, si, ni] = arr[:, 2:].T
    return steps, nodes.astype(int), grid


def highlighted(nodes: np.ndarray, final_loss: np.ndarray) -> dict[int, str]:
    """The nodes with the lowest, median and highest final probe loss, labelled."""
    order = np.argsort(np.where(np.isnan(final_loss), np.inf, final_loss), kind="stable")
    picks = {"lowest final loss": order[0], "median": order[len(order) // 2],
             "highest final loss": order[-1]}
    out: dict[int, str] = {}
    for label, i in picks.items():
        out.setdefault(int(nodes[i]), f"node {int(nodes[i])} ({label})")
    return out


def training_curves(out: Path, result: RunResult) -> str:
    steps, nodes, grid = metric_grid(result.metrics)
    grid[2] = np.maximum(grid[2], 1e-12)  # log scale
    aggregate = len(nodes) > AGGREGATE_ABOVE
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if aggregate:
        marked = highlighted(nodes, grid[0, -1])  # the last evaluation is the final step
        colors = dict(zip(marked, ("tab:green", "tab:blue", "tab:red"), strict=False))
    for ax, values, (_, title, ylabel) in zip(axes, grid, PANELS, strict=True):
        if aggregate:
            lo, hi = np.nanquantile(values, BAND, axis=1)
            ax.fill_between(steps, lo, hi, color="grey", alpha=0.3, lw=0,
                            label=f"{100 * BAND[0]:.0f}–{100 * BAND[1]:.0f} % of nodes")
            ax.plot(steps, np.nanmedian(values, axis=1), color="grey", lw=1, ls="--",
                    label="median")
            for node, label in marked.items():
                col = int(np.searchsorted(nodes, node))
                ax.plot(steps, values[:, col], lw=1, color=colors[node], label=label)
        else:
            for col in range(len(nodes)):
                ax.plot(steps, values[:, col], lw=0.8, alpha=0.6,
                        color=plt.cm.viridis(col / max(len(nodes) - 1, 1)))
        ax.plot(steps, np.nanmean(values, axis=1), color="black", lw=2, label="mean over nodes")
        who = f"{len(nodes):,} nodes" if aggregate else "per node"
        ax.set(title=f"{title} ({who})", xlabel="step", ylabel=ylabel)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7 if aggregate else None)
    if not aggregate:
        axes[1].legend()
    fig.subplots_adjust(left=0.055, right=0.99, bottom=0.13, top=0.92, wspace=0.22)
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    return "training.png"


ESTIMATOR_STYLE = {"dice_e": ("DICE-E (first order)", "tab:blue", "o"),
                   "dice_mid": ("dice_mid (midpoint)", "tab:orange", "x"),
                   "dice_gauss2": ("dice_gauss2 (two-point)", "tab:green", "+")}


def scatter_by_hop(out: Path, rows: list[InfluenceRow]) -> str | None:
    """Each estimator against DICE-GT, one panel per hop, the diagonal dashed."""
    rows = [r for r in rows if r.dice_gt is not None]
    if not rows or all(getattr(rows[0], name) is None for name in ESTIMATOR_STYLE):
        return None  # influence.estimators=[]: DICE-GT alone, nothing to set against it
    hops = sorted({r.hop for r in rows})
    fig, axes = plt.subplots(1, len(hops), figsize=(3.6 * len(hops), 3.8), squeeze=False)
    for ax, hop in zip(axes[0], hops, strict=True):
        at_hop = [r for r in rows if r.hop == hop]
        gt = np.array([r.dice_gt for r in at_hop])
        for name, (label, colour, marker) in ESTIMATOR_STYLE.items():
            values = [getattr(r, name) for r in at_hop]
            if any(v is None for v in values):
                continue
            rho = np.corrcoef(gt, values)[0, 1] if len(gt) > 1 else float("nan")
            ax.scatter(gt, values, s=8, alpha=0.6, color=colour, marker=marker,
                       label=f"{label}: Pearson {rho:.3f}", rasterized=len(gt) > 5000)
        lo, hi = gt.min(), gt.max()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set(title=f"hop {hop}  (n={len(gt)})", xlabel="DICE-GT", ylabel="estimate")
        ax.legend(fontsize=6)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.subplots_adjust(left=0.75 / fig.get_figwidth(), right=0.99, bottom=0.14, top=0.9,
                        wspace=0.35)
    fig.savefig(out / "alignment.png", dpi=110)
    plt.close(fig)
    return "alignment.png"


# the cascade figure reads the first of these columns that every row carries (else the
# first that some rows carry): the exact counterfactual, then the most accurate estimator
CASCADE_COLUMNS = (("dice_gt", "DICE-GT"), ("dice_gauss2", "dice_gauss2"),
                   ("dice_mid", "dice_mid"), ("dice_e", "DICE-E"))
TOTAL_STYLE = (("mean_abs_e", "o-", "DICE-E"), ("mean_abs_mid", "x-", "dice_mid"),
               ("mean_abs_gauss2", "d-", "dice_gauss2"), ("mean_abs_gt", "s--", "DICE-GT"))
MAX_POINTS = 20_000  # points drawn in the distance panel (the medians use every row)


def cascade_column(rows: list[InfluenceRow]) -> tuple[str, str] | None:
    """(column, label) the cascade figure plots: see CASCADE_COLUMNS."""
    for complete in (True, False):
        for column, label in CASCADE_COLUMNS:
            present = [getattr(r, column, None) is not None for r in rows]
            if all(present) if complete else any(present):
                return column, label
    return None


def cascade_decay(out: Path, rows: list[InfluenceRow]) -> str | None:
    """Left: |influence| per (event, node) against the node's graph distance from the
    event's source, one colour per hop r (gossip rounds after the event), the median per
    distance drawn as a line. Right: the total over nodes per gossip round."""
    totals = hop_totals(rows)
    chosen = cascade_column(rows)
    if len(totals) < 2 or chosen is None:
        return None
    column, label = chosen
    fig, (by_distance, by_round) = plt.subplots(
        1, 2, figsize=(12.5, 4.6), gridspec_kw={"width_ratios": (1.7, 1)})
    _influence_by_distance(by_distance, rows, column, label)
    _totals_by_round(by_round, totals)
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.13, top=0.9, wspace=0.22)
    fig.savefig(out / "cascade.png", dpi=110)
    plt.close(fig)
    return "cascade.png"


def _influence_by_distance(ax, rows: list[InfluenceRow], column: str, label: str) -> None:
    kept = [r for r in rows if getattr(r, column) is not None
            and getattr(r, "distance", None) is not None and r.distance >= 0]
    if not kept:
        ax.set_axis_off()
        return
    hop = np.array([r.hop for r in kept])
    distance = np.array([r.distance for r in kept])
    size = np.abs(np.array([getattr(r, column) for r in kept], dtype=float))
    hops = np.unique(hop)
    positive = size[size > 0]
    log = len(positive) > 0 and positive.max() >= 100 * positive.min()
    shown = np.maximum(size, positive.min()) if log else size  # exact zeros at the floor
    width = 0.8 / len(hops)  # each hop its own lane within a distance
    drawn = np.random.default_rng(0).permutation(len(kept))[:MAX_POINTS]
    jitter = np.random.default_rng(1).uniform(-0.3, 0.3, len(kept)) * width
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(hops)))
    for colour, r in zip(colours, hops, strict=True):
        lane = (r - (hops[0] + hops[-1]) / 2) * width
        here = drawn[hop[drawn] == r]
        ax.scatter(distance[here] + lane + jitter[here], shown[here], s=6, alpha=0.35,
                   color=colour, lw=0, rasterized=len(here) > 2000)
        at_r = hop == r
        ds = np.unique(distance[at_r])
        medians = [np.median(shown[at_r & (distance == d)]) for d in ds]
        ax.plot(ds + lane, medians, "o-", color=colour, lw=1.8, ms=5, mec="black", mew=0.6,
                label=f"r = {r}")
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_xticks(np.unique(distance))
    ax.set(xlabel="graph distance from the event's source (fewest edges j → k; a time-varying "
                  "graph: the union over its period)",
           ylabel=f"|{label}[e, r, k]| per node",
           title=f"influence per node by distance from the source ({label}; points: one per "
                 "event and node, lines: median)")
    ax.title.set_fontsize(9.5)
    ax.legend(fontsize=7, title="gossip rounds r\nafter the event", title_fontsize=7)


def _totals_by_round(ax, totals: dict[int, dict[str, float | None]]) -> None:
    rounds = list(totals)
    drawn: list[float] = []
    for key, style, label in TOTAL_STYLE:
        values = [totals[r][key] for r in rounds]
        if all(v is not None for v in values):
            ax.plot(rounds, values, style, label=label)
            drawn += values
    positive = [v for v in drawn if v > 0]
    if positive and max(positive) >= 100 * min(positive):  # log when it spans two decades
        ax.set_yscale("log")
    else:  # from zero: a change of a few per cent looks like one
        ax.set_ylim(bottom=0, top=1.1 * max(drawn, default=1.0))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set(xlabel="gossip rounds r after the event", ylabel="mean over events of |Σ_k influence|",
           title="total over nodes per gossip round", xticks=rounds)
    ax.title.set_fontsize(9.5)
    ax.legend(fontsize=7)


# every figure of a plain run: name -> draw(out, result), the file name or None (nothing to
# draw), in report.md's order (dicesim.report.summary.draw_figures).
FIGURES: dict[str, Callable[[Path, RunResult], str | None]] = {
    "training": lambda out, r: training_curves(out, r) if r.metrics else None,
    "alignment": lambda out, r: scatter_by_hop(out, r.influence) if r.influence else None,
    "cascade": lambda out, r: cascade_decay(out, r.influence) if r.influence else None,
}
