"""What rank 0 writes into the run directory: CSVs, summary.json, plots, report.md."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from dicesim.engine import METRIC_COLUMNS, RunResult, Simulation
from dicesim.tracker import INFLUENCE_COLUMNS, PROXIMAL_COLUMNS


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(columns)
        for row in rows:
            out.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v))
                          else f"{v:.10g}" if isinstance(v, float) else v for v in row])
    os.replace(tmp, path)


# ---- alignment of DICE-E with DICE-GT -----------------------------------------------------
def alignment(e: np.ndarray, g: np.ndarray) -> dict:
    """Pearson, Spearman, sign agreement and rel_err = Σ|E − G| / Σ|G| of paired values."""
    e, g = np.asarray(e, float), np.asarray(g, float)
    n = len(e)
    out = {"n": n, "pearson": None, "spearman": None, "sign_agreement": None, "rel_err": None}
    if n == 0:
        return out
    out["sign_agreement"] = float(np.mean(np.sign(e) == np.sign(g)))
    denom = np.abs(g).sum()
    out["rel_err"] = float(np.abs(e - g).sum() / denom) if denom > 0 else None
    if n >= 2 and np.std(e) > 0 and np.std(g) > 0:
        from scipy import stats  # scale: imported only when there is something to correlate

        out["pearson"] = float(stats.pearsonr(e, g)[0])
        out["spearman"] = float(stats.spearmanr(e, g)[0])
    return out


def alignment_blocks(rows: list[tuple]) -> dict:
    """one_hop (Definition 2: E[e,0,j] + Σ_{k≠j} E[e,1,k] per event), hop_<s>, all."""
    rows = [r for r in rows if r[7] is not None]
    if not rows:
        return {}
    blocks: dict[str, dict] = {}
    one_hop: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_hop: dict[int, list[tuple]] = defaultdict(list)
    for ev, src, _step, _n, hop, node, e, g in rows:
        by_hop[hop].append((e, g))
        if hop == 0 or (hop == 1 and node != src):
            one_hop[ev][0] += e
            one_hop[ev][1] += g
    pairs = np.array(list(one_hop.values()))
    blocks["one_hop"] = alignment(pairs[:, 0], pairs[:, 1])
    for hop in sorted(by_hop):
        pairs = np.array(by_hop[hop])
        blocks[f"hop_{hop}"] = alignment(pairs[:, 0], pairs[:, 1])
    pairs = np.array([(r[6], r[7]) for r in rows])
    blocks["all"] = alignment(pairs[:, 0], pairs[:, 1])
    return blocks


def hop_totals(rows: list[tuple]) -> dict[int, dict[str, float]]:
    """Mean over events of Σ_k |E[e,s,k]| (and of |G|) per hop s: the cascade's decay."""
    per: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for ev, _src, _step, _n, hop, _node, e, g in rows:
        per[(ev, hop)][0] += e
        per[(ev, hop)][1] += g if g is not None else math.nan
    out: dict[int, dict[str, float]] = {}
    for hop in sorted({h for _, h in per}):
        vals = np.array([v for (_, h), v in per.items() if h == hop])
        out[hop] = {"mean_abs_e": float(np.mean(np.abs(vals[:, 0]))),
                    "mean_abs_gt": float(np.mean(np.abs(vals[:, 1])))}
    return out


# ---- writing -------------------------------------------------------------------------------
def write_influence(out: Path, result: RunResult) -> None:
    rows = sorted(result.influence, key=lambda r: (r[0], r[4], r[5]))
    write_csv(out / "influence.csv", INFLUENCE_COLUMNS, rows)
    if result.proximal:
        write_csv(out / "proximal.csv", PROXIMAL_COLUMNS, sorted(result.proximal))


def summarize(sim: Simulation, result: RunResult) -> dict:
    s = sim.run
    final = [r for r in result.metrics if r[0] == s.steps]
    summary = {
        **sim.describe(),
        "wall_s": result.wall_s,
        "node_steps_per_s": s.nodes * s.steps / max(result.wall_s, 1e-9),
        "gossip_share": result.gossip_s / max(result.wall_s, 1e-9),
        "gossip_cpu_share": result.gossip_cpu_s / max(result.cpu_s, 1e-9),
        "final": {
            "probe_loss": float(np.mean([r[3] for r in final])) if final else None,
            "probe_acc": float(np.mean([r[4] for r in final])) if final else None,
            "test_acc": float(np.mean(result.test_acc)) if result.test_acc else None,
            "consensus_dist": float(np.mean([r[5] for r in final])) if final else None,
        },
    }
    if result.influence:
        summary["alignment"] = alignment_blocks(result.influence)
        summary["hop_totals"] = {str(k): v for k, v in hop_totals(result.influence).items()}
    return summary


def write_all(out: Path, sim: Simulation, result: RunResult, plots: bool = True) -> dict:
    write_csv(out / "metrics.csv", METRIC_COLUMNS, sorted(result.metrics))
    if sim.cfg.get("save_params", False) and result.final_params is not None:
        torch.save(result.final_params, out / "params.pt")
    if sim.tracking:
        write_influence(out, result)
    summary = summarize(sim, result)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    pictures = []
    if plots:
        from dicesim import plots as plotting  # matplotlib only when plotting

        pictures = plotting.all_plots(out, sim, result)
    write_atomic(out / "report.md", report_md(sim, summary, pictures))
    return summary


def footer(pictures: list[str], files: str) -> list[str]:
    """The end of every report.md: the pictures, then a line naming the run's files."""
    return [line for pic in pictures for line in (f"![{pic}]({pic})", "")] + [files, ""]


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report_md(sim: Simulation, summary: dict, pictures: list[str]) -> str:
    f = summary["final"]
    gap = summary["spectral_gap"]  # scale: None (with a note) where the sparse solver failed
    gap = f"{gap:.4f}" if gap is not None else f"not computed: {sim.topology.spectral_gap_note}"
    lines = [
        f"# dicesim run: {sim.cfg.get('name', 'run')}",
        "",
        f"{summary['nodes']} nodes on `{summary['topology']}` (spectral gap "
        f"{gap}), {summary['ranks']} rank(s), {summary['steps']} steps, "
        f"`{sim.cfg['model']['name']}` ({summary['params_per_node']} parameters per node) on "
        f"`{summary['data']}`, lr {sim.run.lr:g}, batch {sim.run.batch_size}.",
        "",
        "| final (mean over nodes) | value |",
        "|---|---|",
        f"| probe loss | {_fmt(f['probe_loss'])} |",
        f"| probe accuracy | {_fmt(f['probe_acc'])} |",
        f"| test accuracy | {_fmt(f['test_acc'])} |",
        f"| consensus distance ‖θ_k − θ̄‖ | {_fmt(f['consensus_dist'])} |",
        f"| wall time (s) | {summary['wall_s']:.2f} |",
        f"| node-steps/s | {summary['node_steps_per_s']:.1f} |",
        "",
    ]
    if "alignment" in summary:
        lines += [
            "## DICE-E against the exact ground truth",
            "",
            f"{summary['events']} events followed for {summary['hops']} hop(s). Influence = loss "
            "with the data − loss without it (negative: the data helped).",
            "",
            "| view | n | Pearson | Spearman | sign agreement | rel. error |",
            "|---|---|---|---|---|---|",
        ]
        for view, b in summary["alignment"].items():
            lines.append(f"| {view} | {b['n']} | {_fmt(b['pearson'])} | {_fmt(b['spearman'])} | "
                         f"{_fmt(b['sign_agreement'])} | {_fmt(b['rel_err'])} |")
        lines += ["", "| hop | mean \\|Σ_k E\\| | mean \\|Σ_k GT\\| |", "|---|---|---|"]
        for hop, v in summary["hop_totals"].items():
            lines.append(f"| {hop} | {v['mean_abs_e']:.3g} | {v['mean_abs_gt']:.3g} |")
        lines.append("")
    lines += footer(pictures, "Files: `metrics.csv` (per step and node), `influence.csv` "
                              "(per event, hop and node), `summary.json`, `config.yaml`.")
    return "\n".join(lines)
