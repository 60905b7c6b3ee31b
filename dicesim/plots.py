"""PNG figures of a run. Imported only when plotting (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dicesim.engine import Simulation  # noqa: E402
from dicesim.events import InfluenceRow  # noqa: E402
from dicesim.report import hop_totals  # noqa: E402
from dicesim.trainer import RunResult  # noqa: E402


def training_curves(out: Path, result: RunResult) -> str:
    by_node: dict[int, list[tuple]] = defaultdict(list)
    for row in sorted(result.metrics):
        by_node[row[1]].append(row)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for node, rows in by_node.items():
        steps = [r[0] for r in rows]
        kw = {"lw": 0.8, "alpha": 0.6, "color": plt.cm.viridis(node / max(len(by_node) - 1, 1))}
        axes[0].plot(steps, [r[3] for r in rows], **kw)
        axes[1].plot(steps, [r[4] for r in rows], **kw)
        axes[2].plot(steps, [max(r[5], 1e-12) for r in rows], **kw)
    mean = sorted({r[0] for r in result.metrics})
    for ax, col in zip(axes[:2], (3, 4), strict=True):
        avg = [np.mean([r[col] for r in result.metrics if r[0] == t]) for t in mean]
        ax.plot(mean, avg, color="black", lw=2, label="mean over nodes")
        ax.legend()
    axes[0].set(title="probe loss per node", xlabel="step", ylabel="L'(θ_k)")
    axes[1].set(title="probe accuracy per node", xlabel="step", ylabel="accuracy")
    axes[2].set(title="distance to the average model", xlabel="step", ylabel="‖θ_k − θ̄‖",
                yscale="log")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    return "training.png"


ESTIMATOR_STYLE = {"dice_e": ("DICE-E (first order)", "tab:blue", "o"),
                   "dice_mid": ("dice_mid (midpoint)", "tab:orange", "x")}


def scatter_by_hop(out: Path, rows: list[InfluenceRow]) -> str | None:
    """Each estimator against DICE-GT, one panel per hop, the diagonal dashed."""
    rows = [r for r in rows if r.dice_gt is not None]
    if not rows:
        return None
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
                       label=f"{label}: Pearson {rho:.3f}")
        lo, hi = gt.min(), gt.max()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set(title=f"hop {hop}  (n={len(gt)})", xlabel="DICE-GT", ylabel="estimate")
        ax.legend(fontsize=6)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    fig.savefig(out / "alignment.png", dpi=110)
    plt.close(fig)
    return "alignment.png"


def cascade_decay(out: Path, rows: list[InfluenceRow]) -> str | None:
    totals = hop_totals(rows)
    if len(totals) < 2:
        return None
    hops = list(totals)
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for key, style, label in (("mean_abs_e", "o-", "DICE-E"), ("mean_abs_mid", "x-", "dice_mid"),
                              ("mean_abs_gt", "s--", "DICE-GT")):
        values = [totals[h][key] for h in hops]
        if all(v is not None for v in values):
            ax.semilogy(hops, values, style, label=label)
    ax.set(xlabel="hop s", ylabel="mean over events of |Σ_k influence|",
           title="the cascade's decay with distance", xticks=hops)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cascade.png", dpi=110)
    plt.close(fig)
    return "cascade.png"


def all_plots(out: Path, sim: Simulation, result: RunResult) -> list[str]:
    pics = [training_curves(out, result)] if result.metrics else []
    if result.influence:
        pics += [p for p in (scatter_by_hop(out, result.influence),
                             cascade_decay(out, result.influence)) if p]
    return pics
