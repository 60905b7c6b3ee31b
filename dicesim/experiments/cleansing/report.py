"""report.md and the figure of the cleansing experiment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicesim.report.present import fmt, footer, md_table, report_head, roc_curves, save_figure


def report_md(s: dict, pictures: list[str]) -> str:
    a, sub, acc = s["auc"], s["dice_subset"], s["test_acc"]
    lines = [
        *report_head("Data cleansing by full-horizon attribution", s),
        f"{s['nodes']} nodes, {s['steps']} steps; nodes {s['noisy_nodes']} have {s['flip']:.0%} "
        f"of their labels flipped ({s['flipped']} of {s['samples']} samples). Score = the "
        "sample's first-order influence on the final network probe loss (positive: harmful).",
        "",
        "| score | ROC-AUC for the flipped samples |", "|---|---|",
        f"| full-horizon attribution | {fmt(a['full_horizon'], '.4f')} |",
        f"| per-sample training loss | {fmt(a['train_loss'], '.4f')} |",
        f"| per-sample gradient norm | {fmt(a['grad_norm'], '.4f')} |",
        f"| r-hop DICE-E (r = {s['hops']} gossip rounds after the step; {sub['n']} sampled "
        "samples) | "
        f"{fmt(sub['dice_r_hop'], '.4f')} (full-horizon on the same: "
        f"{fmt(sub['full_horizon'], '.4f')}) |",
        "",
        f"Honest test accuracy: clean {acc['clean']:.4f}, noisy {acc['noisy']:.4f} (the noise "
        f"cost {acc['noise_cost']:.4f}).",
        "",
        *md_table(["k", "removed", "flipped among them", "test acc",
                   "share of the cost recovered"],
                  ([f"{r['method']} {r['k']:.0%}", r["removed"], r["flipped_removed"],
                    f"{r['test_acc']:.4f}", fmt(r["recovered"], ".4f")] for r in s["removal"])),
    ]
    d = s["diagnostics"]
    top = d["top_flipped_count"]
    lines += ["", "Diagnostics (not targets): the influence summed over one quarter of the run's "
              "steps only.", "",
              *md_table(["steps", "ROC-AUC", "share of Σ abs(influence)"],
                        ([f"{q['steps'][0]}–{q['steps'][1]}", fmt(q["auc"], ".4f"),
                          f"{q['share_abs']:.2f}"] for q in d["quarters"]))]
    lines += ["", f"{d['flipped_helpful']} of {s['flipped']} flipped samples have a negative "
              f"influence (removing them would raise the probe loss). The top {s['flipped']} by "
              f"influence: {top['flipped']} flipped, {top['clean_on_noisy_nodes']} clean on noisy "
              f"nodes, {top['clean_on_clean_nodes']} clean on clean nodes."]
    lines += ["", "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                          for k, v in s["targets"].items()), ""]
    lines += footer(pictures, "Files: `summary.json`, `scores.csv`, `removal.csv`, "
                              "`config.yaml`.")
    return "\n".join(lines)


def closing_lines(summary: dict) -> list[str]:
    """What the run says at the end: the ROC-AUCs and the accuracies."""
    auc, subset, acc = summary["auc"], summary["dice_subset"], summary["test_acc"]
    return [f"cleansing: ROC-AUC full-horizon {auc['full_horizon']:.4f}, train loss "
            f"{auc['train_loss']:.4f}, grad norm {auc['grad_norm']:.4f}, r-hop DICE "
            f"{fmt(subset['dice_r_hop'], '.4f')} (full-horizon "
            f"{fmt(subset['full_horizon'], '.4f')} on the same {subset['n']} samples)",
            f"cleansing: test accuracy clean {acc['clean']:.4f}, noisy {acc['noisy']:.4f}; "
            + ", ".join(f"{r['method']} {r['k']:.0%}: {r['test_acc']:.4f}"
                        for r in summary["removal"][1:])]


def plots(out: Path, value: np.ndarray, loss: np.ndarray, gnorm: np.ndarray,
          flipped: np.ndarray, removal_rows: list[tuple], clean_acc: float) -> list[str]:
    """ROC curves of the scores; honest test accuracy after each removal."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    roc_curves(ax, {"full-horizon": value, "train loss": loss, "grad norm": gnorm}, flipped)
    ax.set(title="finding the flipped samples")
    ax.legend(fontsize=8)
    ax = axes[1]
    for method in ("top", "random"):
        pts = [(r[0], r[4]) for r in removal_rows if r[1] == method]
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(removal_rows[0][4], color="C3", lw=0.8, label="no removal")
    ax.axhline(clean_acc, color="C2", lw=0.8, ls="--", label="no label noise")
    ax.set(xlabel="removed samples (%)", ylabel="honest test accuracy",
           title="retrained after removal")
    ax.legend(fontsize=8)
    return [save_figure(fig, out, "cleansing.png")]
