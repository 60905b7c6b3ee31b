"""report.md and the figures of the anomaly experiment (its summary and cases in, text
and PNGs out)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicesim.config import Config
from dicesim.experiments.runner import Table
from dicesim.report.present import (
    fmt,
    footer,
    grouped_bars,
    marks,
    md_table,
    report_head,
    save_figure,
)

if TYPE_CHECKING:
    from dicesim.experiments.anomaly import Case

LABELS = {"dice": "DICE proximal influence", "update_norm": "update norm",
          "neg_cosine": "−cosine to own update", "probe_loss": "probe loss of neighbour"}


def score_table(cases: list[Case]) -> Table:
    methods = list(cases[0].outcome["methods"])
    rows = []
    for c in cases:
        s, attacked = c.outcome["scores"], set(c.outcome["attackers"])
        for k, j in sorted(s["dice"]):
            rows.append((c.attack, c.topology, k, j, int(j in attacked),
                         *[s[m].get((k, j), float("nan")) for m in methods]))
    return Table("scores.csv", ("attack", "topology", "receiver", "sender", "attacked",
                                *methods), rows)


def report_md(summary: dict, pictures: list[str]) -> str:
    window = summary["window"] or f"every step from {summary['attack_start']}"
    by = {(r["attack"], r["topology"], r["method"]): r for r in summary["results"]}
    methods = list(dict.fromkeys(r["method"] for r in summary["results"]))

    def row(c: dict) -> list[str]:
        found = [by[(c["attack"], c["topology"], m)] for m in methods]
        return [c["attack"], c["topology"], f"{c['honest_test_acc']:.3f}",
                *(f"{fmt(r['roc_auc'], '.3f')} / {fmt(r['precision_at_k'], '.3f')}"
                  for r in found)]

    lines = report_head(
        "Anomaly detection by proximal influence", summary,
        f"{summary['nodes']} nodes, {summary['steps']} steps, `{summary['model']}` on "
        f"`{summary['data']}`, lr {summary['lr']:g}. Each honest node scores each in-neighbour "
        f"by the proximal influence it measured (window: {window}; "
        f"{'per unit of mixing weight' if summary['per_weight'] else 'as measured'}), "
        "against baselines computed from the same received messages. Higher = more suspicious.",
        "",
        "ROC-AUC over (honest receiver, in-neighbour) pairs; P@m = precision of the m "
        "highest-scored senders (score averaged over their honest receivers), m = number "
        "of attacked nodes.", "")
    lines += md_table(["attack", "topology", "honest test acc",
                       *(f"{LABELS[m]} AUC / P@m" for m in methods)], map(row, summary["cases"]))
    lines += ["", "Targets:", "", *marks(summary["targets"]), ""]
    lines += footer(pictures, "Files: `summary.json`, `scores.csv` (every pair's score by "
                              "every method), `config.yaml`.")
    return "\n".join(lines)


def plots(out: Path, cfg: Config, cases: list[Case]) -> list[str]:
    ex = list(cfg.anomaly.example)
    example = next((c for c in cases if [c.attack, c.topology] == ex), cases[0])
    return [auc_bars(out, cases), score_plot(out, example)]


def auc_bars(out: Path, cases: list[Case]) -> str:
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases) + 2), 4))
    grouped_bars(ax, [f"{c.attack}\n{c.topology}" for c in cases],
                 {LABELS[m]: [c.outcome["methods"][m]["roc_auc"] for c in cases]
                  for m in cases[0].outcome["methods"]})
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axhline(0.95, color="black", lw=0.8, ls="--", label="target 0.95")
    ax.set(ylabel="ROC-AUC (pairs)", ylim=(0, 1.05), title="which neighbour is attacked?")
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, out, "roc_auc.png")


def score_plot(out: Path, case: Case) -> str:
    """The example case: each pair's DICE score, and the mean influence per step."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    attacked = set(case.outcome["attackers"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for (_, j), v in case.outcome["scores"]["dice"].items():
        axes[0].scatter(j, v, color="C3" if j in attacked else "C0", s=18, alpha=0.8)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(xlabel="sender j (red: attacked)", ylabel="score ∇L'_kᵀΔ_j (mean over steps)",
                title=f"DICE score per (receiver, sender): {case.attack} on {case.topology}")
    tr = case.outcome["trace"]
    for key, color in (("attacked", "C3"), ("honest", "C0")):
        vals = [np.nan if v is None else v for v in tr[key]]
        axes[1].plot(tr["step"], vals, color=color, lw=1, label=f"from {key} senders")
    axes[1].axvline(tr["first_scored"], color="grey", lw=0.8, ls="--")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="step t", ylabel="mean proximal influence on honest k",
                title="> 0: raised the receiver's probe loss")
    axes[1].legend()
    return save_figure(fig, out, "scores.png")
