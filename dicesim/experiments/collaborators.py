"""`make collaborators`: influence-guided collaborator selection against an attack.

Per topology, five runs on the same seed, data split and batches:

  no_attack      nobody misbehaves (the reference)
  no_defense     the attack of the `attack` group, plain gossip θ_k ← Σ_l W[k,l] θ_l
  dice           the attack; each honest k drops in-neighbour j once Σ_{last window} of the
                 proximal influence q_k W[k,j] ∇L'_k(θ_k^{t+1})ᵀ Δ_j^t it measured is > threshold
                 (harmful), and renormalizes its row (W stays row-stochastic)
  trimmed_mean   the attack; coordinate-wise trimmed mean over self and in-neighbours
  oracle         the attack; honest nodes cut the attacked nodes from step 0 (the best any
                 selection that drops neighbours can do)

The score is the honest nodes' mean test accuracy at θ^T (the attacked nodes of the attacked
runs are left out of every condition, the reference included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components

from dicesim.cli import Session, prepare_output
from dicesim.config import Config, TopologyName, default_list, register_block
from dicesim.engine import Simulation
from dicesim.errors import ConfigError
from dicesim.experiments import group_option, variant
from dicesim.provenance import provenance_lines, stamped
from dicesim.report import footer, write_atomic, write_json
from dicesim.trainer import RunResult


@dataclass
class Collaborators:
    """The `collaborators:` block of configs/experiment/collaborators.yaml."""

    topologies: list[TopologyName] = default_list("ring", "exponential")


def check_collaborators(c: Config) -> None:
    if c.driver is not None and c.attack.kind == "none":
        raise ConfigError("experiment=collaborators needs an attack: pick one with "
                          "attack=label_flip, attack=scaled_update, ...")


register_block("collaborators", Collaborators, check_collaborators)

# condition → (attacked?, defense.kind)
CONDITIONS = {"no_attack": (False, "none"), "no_defense": (True, "none"),
              "dice": (True, "dice"), "trimmed_mean": (True, "trimmed_mean"),
              "oracle": (True, "oracle")}
LABELS = {"no_attack": "no attack", "no_defense": "attack, no defence",
          "dice": "attack + DICE selection", "trimmed_mean": "attack + trimmed mean",
          "oracle": "attack + oracle cut"}


@dataclass
class Run:
    topology: str
    condition: str
    sim: Simulation
    outcome: dict = field(default_factory=dict)


def build_runs(session: Session) -> list[Run]:
    cfg = session.cfg
    runs = []
    for topo in cfg.collaborators.topologies:
        for cond, (attacked, defense) in CONDITIONS.items():
            over = {"topology": group_option("topology", topo), "defense__kind": defense,
                    "influence__proximal": defense == "dice"}
            if not attacked:
                over["attack__kind"] = "none"
            runs.append(Run(topo, cond, session.build(variant(cfg, **over))))
    return runs


def honest_components(sim: Simulation, attacked: np.ndarray) -> list[int]:
    """Sizes of the strongly connected components the honest nodes form without the
    attacked ones (union of W^t over the period): what any selection that drops every
    attacked neighbour leaves to learn from."""
    honest = np.setdiff1d(np.arange(sim.run.nodes), attacked)
    edges = sum(sim.topology.W(t) > 0 for t in range(sim.topology.period))
    _, labels = connected_components(edges[np.ix_(honest, honest)], connection="strong")
    return sorted(np.bincount(labels).tolist(), reverse=True)


def run_one(session: Session, run: Run, attacked: np.ndarray) -> None:
    sim = run.sim
    t0 = time.perf_counter()
    result = session.simulate(sim)
    if session.rank != 0:
        return
    n = sim.run.nodes
    final = np.zeros((n, n), dtype=bool)  # final[k, j]: honest k gives in-neighbour j weight 0
    block = n // len(result.aggregator)
    for rank, state in enumerate(result.aggregator):  # the aggregators' final states
        if state["dropped"] is not None:
            final[rank * block:(rank + 1) * block] = state["dropped"]
    honest = np.setdiff1d(np.arange(n), attacked)
    run.outcome = {
        "honest_test_acc": float(np.mean(np.asarray(result.test_acc)[honest])),
        "honest_test_acc_min": float(np.min(np.asarray(result.test_acc)[honest])),
        "curve": honest_curve(result, honest),
        "wall_s": time.perf_counter() - t0,
        **edge_drops(sim, final, attacked),
    }


def edge_drops(sim: Simulation, final: np.ndarray, attacked: np.ndarray) -> dict:
    """Fractions of the honest receivers' in-edges from attacked / honest senders that the
    defense had cut at the end."""
    n = sim.run.nodes
    edges = sum(sim.topology.W(t) > 0 for t in range(sim.topology.period)).astype(bool)
    edges[np.arange(n), np.arange(n)] = False
    edges[attacked] = False  # only honest receivers defend
    from_bad = edges & np.isin(np.arange(n), attacked)[None, :]
    from_good = edges & ~from_bad

    def share(mask: np.ndarray) -> float | None:
        return float(final[mask].mean()) if mask.any() else None

    return {"attacker_edges_dropped": share(from_bad), "honest_edges_dropped": share(from_good)}


def honest_curve(result: RunResult, honest: np.ndarray) -> dict[str, list[float]]:
    """Mean probe accuracy of the honest nodes at every evaluated step."""
    rows = np.array([(r.step, r.node, r.probe_acc) for r in result.metrics], dtype=float)
    rows = rows[np.isin(rows[:, 1], honest)]
    steps = np.unique(rows[:, 0])
    return {"step": steps.astype(int).tolist(),
            "probe_acc": [float(rows[rows[:, 0] == t, 2].mean()) for t in steps]}


def run(session: Session) -> dict | None:
    cfg = session.cfg
    runs = build_runs(session)  # every variant validated before any training
    attacked = next(r.sim.attack.nodes for r in runs if r.condition == "no_defense")
    session.say(f"dicesim collaborators: {len(runs)} runs, attack {cfg.attack.kind} on nodes "
                f"{attacked.tolist()}, topologies {', '.join(cfg.collaborators.topologies)}")
    if cfg.dry_run:
        session.say("dicesim: dry run — every configuration is valid, nothing trained")
        return None
    prepare_output(session)
    t0 = time.perf_counter()
    for i, r in enumerate(runs):
        run_one(session, r, attacked)
        if session.rank == 0:
            session.say(f"  [{i + 1}/{len(runs)}] {r.topology:<12} {r.condition:<13} honest "
                        f"test acc {r.outcome['honest_test_acc']:.4f} "
                        f"({r.outcome['wall_s']:.1f} s)")
    if session.rank != 0:
        return None
    assert session.out is not None
    summary = summarize(cfg, runs, attacked, time.perf_counter() - t0)
    write_json(session.out / "summary.json", stamped(summary))  # strict JSON: no bare NaN
    pictures = plots(session.out, runs) if cfg.plots else []
    write_atomic(session.out / "report.md", report_md(summary, pictures))
    for name, met in summary["targets"].items():
        session.say(f"  target {name}: {'met' if met else 'MISSED'}")
    session.say(f"dicesim collaborators: done; report: {session.out / 'report.md'}")
    return summary


# ---- outputs ------------------------------------------------------------------------------
def summarize(cfg: Config, runs: list[Run], attacked: np.ndarray, wall_s: float) -> dict:
    results, targets, gap_to_oracle = [], {}, {}
    for topo in cfg.collaborators.topologies:
        mine = {r.condition: r for r in runs if r.topology == topo}
        clean = mine["no_attack"].outcome["honest_test_acc"]
        drop = {c: 100 * (clean - r.outcome["honest_test_acc"]) for c, r in mine.items()}
        for c, r in mine.items():
            out = {k: v for k, v in r.outcome.items() if k != "curve"}
            results.append({"topology": topo, "condition": c, "drop_points": drop[c], **out})
        gap_to_oracle[topo] = drop["dice"] - drop["oracle"]
        targets[f"{topo}_no_defense_loses_ge_5_points"] = bool(drop["no_defense"] >= 5)
        targets[f"{topo}_dice_within_2_points_of_no_attack"] = bool(drop["dice"] <= 2)
    first = runs[0].sim
    return {
        "experiment": "collaborators", "nodes": int(cfg.nodes), "steps": int(cfg.steps),
        "data": cfg.data.name, "model": cfg.model.name, "lr": float(cfg.optim.lr),
        "attack": {"kind": cfg.attack.kind, "nodes": attacked.tolist(),
                   "start": int(cfg.attack.start), "scale": float(cfg.attack.scale),
                   "sigma": float(cfg.attack.sigma)},
        "defense": {k: getattr(cfg.defense, k) for k in ("window", "threshold", "warmup", "trim")},
        "honest_components": {r.topology: honest_components(r.sim, attacked) for r in runs
                              if r.condition == "no_attack"},
        "spectral_gap": {r.topology: r.sim.topology.spectral_gap() for r in runs
                         if r.condition == "no_attack"},
        "dice_minus_oracle_points": gap_to_oracle,
        "params_per_node": first.model.P, "wall_s": wall_s,
        "results": results, "targets": targets,
    }


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def report_md(summary: dict, pictures: list[str]) -> str:
    a, d = summary["attack"], summary["defense"]
    lines = [
        "# Influence-guided collaborator selection",
        "",
        *provenance_lines(summary),
        f"{summary['nodes']} nodes, {summary['steps']} steps, `{summary['model']}` on "
        f"`{summary['data']}`, lr {summary['lr']:g}. Attack `{a['kind']}` on nodes {a['nodes']} "
        f"from step {a['start']}. DICE selection: an honest node drops an in-neighbour whose "
        f"proximal influence summed over its last {d['window']} measured steps is > "
        f"{d['threshold']:g} (harmful), deciding from step {d['warmup']} on; trimmed mean "
        f"drops {d['trim']} value(s) at each end per coordinate.",
        "",
        "Honest nodes' test accuracy at the end (mean, min over honest nodes); drop = points "
        "below the attack-free run; edges cut = share of the honest nodes' in-edges from "
        "attacked / honest senders with weight 0 at the end.",
        "",
        "| topology | condition | mean acc | min acc | drop (points) | edges cut: attacked / "
        "honest |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        cut = (f"{_fmt(r['attacker_edges_dropped'], '.2f')} / "
               f"{_fmt(r['honest_edges_dropped'], '.2f')}")
        cut = cut if r["condition"] in ("dice", "oracle") else ""
        lines.append(f"| {r['topology']} | {LABELS[r['condition']]} | "
                     f"{r['honest_test_acc']:.4f} | {r['honest_test_acc_min']:.4f} | "
                     f"{r['drop_points']:+.2f} | {cut} |")
    lines += ["", "Without the attacked nodes the honest nodes form strongly connected "
              "components of sizes " + "; ".join(
                  f"{t}: {s}" for t, s in summary["honest_components"].items())
              + " — a selection that cuts every attacked neighbour leaves each component "
              "to learn from its own data only; the oracle cut shows that limit. DICE selection "
              "minus oracle, in points of accuracy lost: " + "; ".join(
                  f"{t}: {g:+.2f}" for t, g in summary["dice_minus_oracle_points"].items())
              + ".", "", "Targets:", ""]
    for name, met in summary["targets"].items():
        lines.append(f"- {name}: **{'met' if met else 'missed'}**")
    lines.append("")
    lines += footer(pictures, "Files: `summary.json`, `config.yaml`.")
    return "\n".join(lines)


def plots(out: Path, runs: list[Run]) -> list[str]:
    from dicesim.plots import plt  # the Agg backend, chosen there

    topologies = list(dict.fromkeys(r.topology for r in runs))
    fig, axes = plt.subplots(1, 1 + len(topologies), figsize=(5 + 4.5 * len(topologies), 4))
    width = 0.8 / len(CONDITIONS)
    for i, cond in enumerate(CONDITIONS):
        acc = [next(r.outcome["honest_test_acc"] for r in runs
                    if r.topology == t and r.condition == cond) for t in topologies]
        x = np.arange(len(topologies)) + (i - (len(CONDITIONS) - 1) / 2) * width
        axes[0].bar(x, acc, width, label=LABELS[cond], color=f"C{i}")
    axes[0].set_xticks(np.arange(len(topologies)), topologies)
    axes[0].set(ylabel="honest nodes' test accuracy", ylim=(0, 1), title="final")
    for ax, topo in zip(axes[1:], topologies, strict=True):
        for i, cond in enumerate(CONDITIONS):
            r = next(r for r in runs if r.topology == topo and r.condition == cond)
            ax.plot(r.outcome["curve"]["step"], r.outcome["curve"]["probe_acc"], color=f"C{i}",
                    label=LABELS[cond])
        ax.set(xlabel="step", ylabel="honest mean probe accuracy", ylim=(0, 1), title=topo)
    axes[-1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out / "collaborators.png", dpi=110)
    plt.close(fig)
    return ["collaborators.png"]
