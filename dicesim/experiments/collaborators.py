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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components

from dicesim.common.errors import ConfigError
from dicesim.config import Config, TopologyName, default_list, register_block
from dicesim.experiments import group_option, runner, variant
from dicesim.experiments.runner import Case, Task
from dicesim.report.present import fmt, footer, marks
from dicesim.run.engine import Simulation
from dicesim.run.provenance import provenance_lines
from dicesim.run.session import Session
from dicesim.run.trainer import RunResult


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


def honest_components(sim: Simulation, attacked: np.ndarray) -> list[int]:
    """Sizes of the strongly connected components the honest nodes form without the
    attacked ones (union of W^t over the period): what any selection that drops every
    attacked neighbour leaves to learn from."""
    honest = np.setdiff1d(np.arange(sim.run.nodes), attacked)
    edges = sum(sim.topology.W(t) > 0 for t in range(sim.topology.period))
    _, labels = connected_components(edges[np.ix_(honest, honest)], connection="strong")
    return sorted(np.bincount(labels).tolist(), reverse=True)


def outcome(sim: Simulation, result: RunResult, attacked: np.ndarray, wall_s: float) -> dict:
    """One run's result: the honest nodes' accuracy, their curve, and the edges cut."""
    n = sim.run.nodes
    final = np.zeros((n, n), dtype=bool)  # final[k, j]: honest k gives in-neighbour j weight 0
    block = n // len(result.aggregator)
    for rank, state in enumerate(result.aggregator):  # the aggregators' final states
        if state["dropped"] is not None:
            final[rank * block:(rank + 1) * block] = state["dropped"]
    honest = np.setdiff1d(np.arange(n), attacked)
    return {
        "honest_test_acc": float(np.mean(np.asarray(result.test_acc)[honest])),
        "honest_test_acc_min": float(np.min(np.asarray(result.test_acc)[honest])),
        "curve": honest_curve(result, honest),
        "wall_s": wall_s,
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


class CollaboratorsTask(Task):
    name = "collaborators"

    def cases(self, session: Session) -> list[Case]:
        cfg = session.cfg
        out = []
        for topo in cfg.collaborators.topologies:
            for cond, (attacked, defense) in CONDITIONS.items():
                over = {"topology": group_option("topology", topo), "defense__kind": defense,
                        "influence__proximal": defense == "dice"}
                if not attacked:
                    over["attack__kind"] = "none"
                out.append(Case(f"{topo}/{cond}", f"{topo:<12} {cond:<13}",
                                session.build(variant(cfg, **over))))
        self.attacked = next(c.spec.attack.nodes for c in out if c.key.endswith("/no_defense"))
        return out

    def announce(self, session: Session, cases: list[Case]) -> str:
        cfg = session.cfg
        return (f"dicesim collaborators: {len(cases)} runs, attack {cfg.attack.kind} on nodes "
                f"{self.attacked.tolist()}, topologies {', '.join(cfg.collaborators.topologies)}")

    def run_case(self, session: Session, case: Case, done: dict) -> dict | None:
        t0 = time.perf_counter()
        result = session.simulate(case.spec)
        if session.rank != 0:
            return None
        return outcome(case.spec, result, self.attacked, time.perf_counter() - t0)

    def progress(self, case: Case, result: dict) -> str:
        return (f"{case.label} honest test acc {result['honest_test_acc']:.4f} "
                f"({result['wall_s']:.1f} s)")

    def summarize(self, cfg: Config, cases: list[Case], results: dict, wall_s: float) -> dict:
        return summarize(cfg, cases, results, self.attacked, wall_s)

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        return plots(out, cfg, results)

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(summary, pictures)

    def closing(self, summary: dict, out: Path) -> list[str]:
        return [*runner.target_lines(summary["targets"]),
                f"dicesim collaborators: done; report: {out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, CollaboratorsTask())


# ---- outputs ------------------------------------------------------------------------------
def summarize(cfg: Config, cases: list[Case], outcomes: dict[str, dict], attacked: np.ndarray,
              wall_s: float) -> dict:
    results, targets, gap_to_oracle = [], {}, {}
    for topo in cfg.collaborators.topologies:
        mine = {cond: outcomes[f"{topo}/{cond}"] for cond in CONDITIONS}
        clean = mine["no_attack"]["honest_test_acc"]
        drop = {c: 100 * (clean - r["honest_test_acc"]) for c, r in mine.items()}
        for c, r in mine.items():
            out = {k: v for k, v in r.items() if k != "curve"}
            results.append({"topology": topo, "condition": c, "drop_points": drop[c], **out})
        gap_to_oracle[topo] = drop["dice"] - drop["oracle"]
        targets[f"{topo}_no_defense_loses_ge_5_points"] = bool(drop["no_defense"] >= 5)
        targets[f"{topo}_dice_within_2_points_of_no_attack"] = bool(drop["dice"] <= 2)
    reference = {c.key.split("/")[0]: c.spec for c in cases if c.key.endswith("/no_attack")}
    return {
        "experiment": "collaborators", "nodes": int(cfg.nodes), "steps": int(cfg.steps),
        "data": cfg.data.name, "model": cfg.model.name, "lr": float(cfg.optim.lr),
        "attack": {"kind": cfg.attack.kind, "nodes": attacked.tolist(),
                   "start": int(cfg.attack.start), "scale": float(cfg.attack.scale),
                   "sigma": float(cfg.attack.sigma)},
        "defense": {k: getattr(cfg.defense, k) for k in ("window", "threshold", "warmup", "trim")},
        "honest_components": {t: honest_components(sim, attacked)
                              for t, sim in reference.items()},
        "spectral_gap": {t: sim.topology.spectral_gap() for t, sim in reference.items()},
        "dice_minus_oracle_points": gap_to_oracle,
        "params_per_node": cases[0].spec.model.P, "wall_s": wall_s,
        "results": results, "targets": targets,
    }


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
        cut = f"{fmt(r['attacker_edges_dropped'], '.2f')} / {fmt(r['honest_edges_dropped'], '.2f')}"
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
    lines += [*marks(summary["targets"]), ""]
    lines += footer(pictures, "Files: `summary.json`, `config.yaml`.")
    return "\n".join(lines)


def plots(out: Path, cfg: Config, outcomes: dict[str, dict]) -> list[str]:
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    topologies = list(cfg.collaborators.topologies)
    fig, axes = plt.subplots(1, 1 + len(topologies), figsize=(5 + 4.5 * len(topologies), 4))
    width = 0.8 / len(CONDITIONS)
    for i, cond in enumerate(CONDITIONS):
        acc = [outcomes[f"{t}/{cond}"]["honest_test_acc"] for t in topologies]
        x = np.arange(len(topologies)) + (i - (len(CONDITIONS) - 1) / 2) * width
        axes[0].bar(x, acc, width, label=LABELS[cond], color=f"C{i}")
    axes[0].set_xticks(np.arange(len(topologies)), topologies)
    axes[0].set(ylabel="honest nodes' test accuracy", ylim=(0, 1), title="final")
    for ax, topo in zip(axes[1:], topologies, strict=True):
        for i, cond in enumerate(CONDITIONS):
            curve = outcomes[f"{topo}/{cond}"]["curve"]
            ax.plot(curve["step"], curve["probe_acc"], color=f"C{i}", label=LABELS[cond])
        ax.set(xlabel="step", ylabel="honest mean probe accuracy", ylim=(0, 1), title=topo)
    axes[-1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out / "collaborators.png", dpi=110)
    plt.close(fig)
    return ["collaborators.png"]
