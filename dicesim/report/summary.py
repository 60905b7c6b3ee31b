"""What rank 0 writes into the run directory: CSVs, summary.json, plots, report.md."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dicesim import IMPORTED_AT
from dicesim.common.stopping import SIGNALS
from dicesim.common.writers import strict, temp_path, write_atomic, write_csv, write_json  # noqa: F401
from dicesim.influence.events import ESTIMATORS, INFLUENCE_COLUMNS, PROXIMAL_COLUMNS, InfluenceRow
from dicesim.report.present import footer
from dicesim.report.stats import hop_totals, pearson, spearman  # noqa: F401 - hop_totals re-exported
from dicesim.run.engine import Simulation
from dicesim.run.provenance import (
    describe_optimizer,
    describe_partition,
    provenance,
    provenance_line,
    resolved,
    topology_weights,
    write_partition,
)
from dicesim.run.trainer import METRIC_COLUMNS, RunResult


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
        out["pearson"] = pearson(e, g)
        out["spearman"] = spearman(e, g)
    return out


def view_pairs(rows: list[InfluenceRow], a: str, b: str) -> dict[str, np.ndarray]:
    """Paired values of columns a and b per view: one_hop (Definition 2: the hop-0 term plus
    Σ_{k≠j} of hop 1, per event), hop_<s> and all; rows where either is missing are left
    out. Each view is an array [n, 2]."""
    rows = [r for r in rows if getattr(r, a) is not None and getattr(r, b) is not None]
    if not rows:
        return {}
    one_hop: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_hop: dict[int, list[tuple]] = defaultdict(list)
    for r in rows:
        pair = (getattr(r, a), getattr(r, b))
        by_hop[r.hop].append(pair)
        if r.hop == 0 or (r.hop == 1 and r.node != r.source):
            one_hop[r.event][0] += pair[0]
            one_hop[r.event][1] += pair[1]
    views = {"one_hop": np.array(list(one_hop.values())).reshape(-1, 2)}
    views.update({f"hop_{hop}": np.array(by_hop[hop]) for hop in sorted(by_hop)})
    views["all"] = np.array([(getattr(r, a), getattr(r, b)) for r in rows])
    return views


def alignment_blocks(rows: list[InfluenceRow], estimator: str = "dice_e") -> dict:
    """Alignment of one estimator column with DICE-GT in every view."""
    return {view: alignment(p[:, 0], p[:, 1])
            for view, p in view_pairs(rows, estimator, "dice_gt").items()}


RELIABILITY_LIMIT = 0.05


ACCURATE = ("dice_gauss2", "dice_mid")  # the columns ρ judges DICE-E by, best first


def accurate_column(rows: list[InfluenceRow]) -> str | None:
    """The most accurate higher-order estimator the rows carry (dice_gauss2, else dice_mid)."""
    return next((c for c in ACCURATE if any(getattr(r, c) is not None for r in rows)), None)


def second_order_share(rows: list[InfluenceRow], accurate: str) -> dict[str, float | None]:
    """ρ = Σ|A − dice_e| / Σ|A| per view, A the accurate column: how much of the
    influence the first-order estimator misses. Needs no ground truth."""
    out: dict[str, float | None] = {}
    for view, p in view_pairs(rows, accurate, "dice_e").items():
        denom = np.abs(p[:, 0]).sum()
        out[view] = float(np.abs(p[:, 0] - p[:, 1]).sum() / denom) if denom > 0 else None
    return out


def reliability(rows: list[InfluenceRow]) -> dict | None:
    """The second-order share per view and, above RELIABILITY_LIMIT in any view, one
    warning line for the end of the run and the top of report.md that names the accurate
    column to read instead."""
    accurate = accurate_column(rows)
    shares = second_order_share(rows, accurate) if accurate else {}
    if not shares:
        return None
    worst_view, worst = max(((v, s) for v, s in shares.items() if s is not None),
                            key=lambda vs: vs[1], default=(None, 0.0))
    warning = None
    if worst > RELIABILITY_LIMIT:
        warning = (f"first-order DICE-E is off by ~{100 * worst:.0f} % at these settings "
                   f"(second-order share {worst:.3f} in view {worst_view}, against "
                   f"{accurate}); use the {accurate} column or lower optim.lr")
    return {"accurate": accurate, "second_order_share": shares, "limit": RELIABILITY_LIMIT,
            "max": worst, "max_view": worst_view, "warning": warning}


def views(alignment_summary: dict) -> dict[str, dict]:
    """The view blocks of summary['alignment'] (not its per-estimator sub-dicts)."""
    return {k: v for k, v in alignment_summary.items() if k not in ESTIMATORS}


# ---- writing -------------------------------------------------------------------------------
def write_influence(out: Path, result: RunResult) -> None:
    rows = sorted(result.influence, key=lambda r: (r.event, r.hop, r.node))
    write_csv(out / "influence.csv", INFLUENCE_COLUMNS, rows)
    if result.proximal:
        write_csv(out / "proximal.csv", PROXIMAL_COLUMNS, sorted(result.proximal))


def summarize(sim: Simulation, result: RunResult) -> dict:
    s = sim.run
    final = [r for r in result.metrics if r.step == s.steps]
    summary = {
        **sim.describe(),
        **resolved(sim),
        "provenance": provenance(),
        "wall_s": result.wall_s,
        "node_steps_per_s": s.nodes * s.steps / max(result.wall_s, 1e-9),
        "gossip_share": result.gossip_s / max(result.wall_s, 1e-9),
        "gossip_cpu_share": result.gossip_cpu_s / max(result.cpu_s, 1e-9),
        "final": {  # per-node numbers: means over nodes
            "probe_loss": float(np.mean([r.probe_loss for r in final])) if final else None,
            "probe_acc": float(np.mean([r.probe_acc for r in final])) if final else None,
            "test_acc": float(np.mean(result.test_acc)) if result.test_acc else None,
            "consensus_dist": float(np.mean([r.consensus_dist for r in final])) if final else None,
            "consensus_test_acc": result.consensus_test_acc,
        },
        "evaluation": evaluation_block(sim, result),
    }
    if result.influence:
        per = {name: alignment_blocks(result.influence, name)
               for name in sim.influence.estimators}
        per = {name: blocks for name, blocks in per.items() if blocks}
        if per:  # views of the first estimator on top (dice_e by default), then each one's
            summary["alignment"] = {**next(iter(per.values())), **per}
        summary["hop_totals"] = {str(k): v for k, v in hop_totals(result.influence).items()}
        summary["reliability"] = reliability(result.influence)
    return summary


def evaluation_block(sim: Simulation, result: RunResult) -> dict:
    """What the evaluations covered (engine.EvalPlan) and the spread of the per-node test
    accuracy over nodes."""
    block = sim.evaluation.describe()
    acc = np.asarray(result.test_acc, dtype=float)
    if len(acc):
        q10, median, q90 = np.quantile(acc, (0.1, 0.5, 0.9))
        block["node_test_acc"] = {"mean": float(acc.mean()), "min": float(acc.min()),
                                  "q10": float(q10), "median": float(median),
                                  "q90": float(q90), "max": float(acc.max())}
    return block


def evaluation_line(evaluation: dict) -> str:
    """report.md's sentence on what the test and probe numbers were measured on."""
    n, m, total = evaluation["nodes"], evaluation["test_samples"], evaluation["test_total"]
    test = (f"all {total:,} test samples" if m == total else
            f"the same {m:,} of the {total:,} test samples (a seeded subset)")
    pm, ptotal = evaluation["probe_samples"], evaluation["probe_total"]
    probe = (f"all {ptotal:,} probe samples" if pm == ptotal else
             f"{pm:,} of the {ptotal:,} probe samples")
    budget = evaluation["budget"]
    limit = ("no budget (eval.budget=null)" if budget is None else
             f"eval.budget={budget:,} sample-forwards per evaluation")
    return (f"Evaluated: the consensus model θ̄ on all {total:,} test samples; each of the "
            f"{n:,} nodes on {test}; the metrics every eval_every steps on {probe} ({limit}).")


#: summary.json's name of a diverged loss ("training" / "probe", stopping.Finding.what): the
#: metrics.csv column, whether the divergence guard or the metric rows found it
LOSS_METRIC = {"training": "train_loss", "probe": "probe_loss"}


def diverged_rows(result: RunResult, steps: int) -> list[dict]:
    """Metric rows with a non-finite training or probe loss (the final rows' training loss
    is NaN by design and not counted)."""
    bad = []
    for step, node, train, probe, *_ in result.metrics:
        for what, v in (("training", train), ("probe", probe)):
            if what == "training" and step in (0, steps):  # NaN by design there
                continue
            if v is not None and not math.isfinite(v):
                bad.append({"step": step, "node": node, "metric": LOSS_METRIC[what]})
    return bad


def write_all(out: Path, sim: Simulation, result: RunResult, plots: bool = True,
              status: dict | None = None) -> dict:
    """Every output of one run. `status` (e.g. {"status": "interrupted", "stopped_at": 12})
    goes into summary.json; without it the run is "complete"."""
    outputs_at = time.perf_counter()
    write_csv(out / "metrics.csv", METRIC_COLUMNS, sorted(result.metrics))
    write_partition(out, sim)
    if sim.cfg.save_params and result.final_params is not None:
        torch.save(result.final_params, out / "params.pt")
    if sim.tracking:
        write_influence(out, result)
    SIGNALS.check("outputs")  # the rows are on disk; the summary and figures may not be
    summary = summarize(sim, result)
    if result.attribution is not None:  # full horizon (dicesim/influence/attribution.py)
        from dicesim.report.attribution import write_attribution

        SIGNALS.check("outputs")
        summary["attribution"] = write_attribution(out, sim, result.attribution, plots)
    summary.update(status or {"status": "complete"})
    bad = diverged_rows(result, sim.run.steps)
    summary["diverged"] = bool(bad) or summary.get("status") == "diverged"
    if bad and "first_nonfinite" not in summary:  # the guard's finding stopped the run
        summary["first_nonfinite"] = bad[0]
    timings = summary["timings_s"] = run_timings(result)
    SIGNALS.check("outputs")
    summary = write_json(out / "summary.json", summary)
    pictures = []
    if plots:
        plots_at = time.perf_counter()
        pictures = draw_figures(out, result)
        timings["plots"] = time.perf_counter() - plots_at
    SIGNALS.check("outputs")
    write_atomic(out / "report.md", report_md(sim, summary, pictures))
    timings["outputs"] = time.perf_counter() - outputs_at - timings.get("plots", 0.0)
    timings["total"] = time.perf_counter() - IMPORTED_AT
    summary["timings_s"] = timings
    return write_json(out / "summary.json", summary)


def draw_figures(out: Path, result: RunResult) -> list[str]:
    """Every figure of a plain run in `out`, drawn in this process; the file names in
    report order."""
    from dicesim.report.plots import FIGURES  # matplotlib: imported only when drawing

    drawn = []
    for draw in FIGURES.values():
        SIGNALS.check("figures")
        drawn.append(draw(out, result))
    return [name for name in drawn if name]


def run_timings(result: RunResult) -> dict[str, float]:
    """Where this process's wall time went (seconds): `startup` from dicesim's first import
    to the first step (imports, config, graph, data, model), `training` the step loop;
    `evaluation` the test accuracies after it; after the outputs, `outputs` (files and
    report), `plots` and `total`."""
    timings = {"training": result.wall_s, "evaluation": result.eval_s}
    if result.first_step_at > 0:
        timings = {"startup": result.first_step_at - IMPORTED_AT, **timings}
    return timings


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


TOTAL_NAMES = (("mean_abs_e", "E"), ("mean_abs_mid", "mid"), ("mean_abs_gauss2", "gauss2"),
               ("mean_abs_gt", "GT"))  # hop_totals keys and their column names


def report_md(sim: Simulation, summary: dict, pictures: list[str]) -> str:
    f = summary["final"]
    gap = summary["spectral_gap"]  # scale: None (with a note) where the sparse solver failed
    gap = f"{gap:.4f}" if gap is not None else f"not computed: {sim.topology.spectral_gap_note}"
    lines = [
        f"# dicesim run: {sim.cfg.name}",
        "",
        f"{summary['nodes']} nodes on `{summary['topology']}` ({topology_weights(sim)} "
        f"weights, spectral gap {gap}), {summary['ranks']} rank(s), {summary['steps']} steps, "
        f"`{sim.cfg.model.name}` ({summary['params_per_node']} parameters per node) on "
        f"`{summary['data']}` ({describe_partition(sim)} partition; samples per node and class "
        f"in `partition.csv`), optimizer {describe_optimizer(sim)}, batch {sim.run.batch_size}.",
        "",
        provenance_line(summary["provenance"]),
        "",
        "| final (mean over nodes) | value |",
        "|---|---|",
        f"| probe loss | {_fmt(f['probe_loss'])} |",
        f"| probe accuracy | {_fmt(f['probe_acc'])} |",
        f"| test accuracy | {_fmt(f['test_acc'])} |",
        f"| test accuracy of the consensus model θ̄ | {_fmt(f['consensus_test_acc'])} |",
        f"| consensus distance ‖θ_k − θ̄‖ | {_fmt(f['consensus_dist'])} |",
        f"| wall time (s) | {summary['wall_s']:.2f} |",
        f"| node-steps/s | {summary['node_steps_per_s']:.1f} |",
        "",
        evaluation_line(summary["evaluation"]),
        "",
    ]
    warning = (summary.get("reliability") or {}).get("warning")
    if warning:
        lines[1:1] = ["", f"> **Warning:** {warning}."]
    if "alignment" in summary:
        per = {k: v for k, v in summary["alignment"].items() if k in ESTIMATORS}
        lines += [
            "## The estimators against the exact ground truth",
            "",
            f"{summary['events']} events followed for {summary['hops']} hop(s); hop r = r gossip "
            "rounds after the event (not graph distance). Influence = loss "
            "with the data − loss without it (negative: the data helped). `dice_e` is the "
            "paper's first-order DICE-E, `dice_gauss2` its two-point Gauss–Legendre rule, "
            "`dice_mid` its midpoint rule.",
            "",
            "| estimator | view | n | Pearson | Spearman | sign agreement | rel. error |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, blocks in per.items():
            for view, b in blocks.items():
                lines.append(f"| {name} | {view} | {b['n']} | {_fmt(b['pearson'])} | "
                             f"{_fmt(b['spearman'])} | {_fmt(b['sign_agreement'])} | "
                             f"{_fmt(b['rel_err'])} |")
    if "hop_totals" in summary:
        totals = summary["hop_totals"].values()
        shown = [(key, name) for key, name in TOTAL_NAMES
                 if any(v.get(key) is not None for v in totals)]
        lines += ["", "| hop | " + " | ".join(f"mean \\|Σ_k {name}\\|" for _, name in shown)
                  + " |", "|---|" + "---|" * len(shown)]
        for hop, v in summary["hop_totals"].items():
            lines.append(f"| {hop} | " + " | ".join(_fmt(v.get(key)) for key, _ in shown) + " |")
        rel = summary.get("reliability")
        if rel:
            shares = ", ".join(f"{view} {_fmt(v)}" for view, v in
                               rel["second_order_share"].items())
            a = rel["accurate"]
            lines += ["", f"Second-order share ρ = Σ\\|{a} − dice_e\\| / Σ\\|{a}\\| "
                          f"(no ground truth needed; warning above {rel['limit']}): {shares}."]
        lines.append("")
    if "attribution" in summary:
        from dicesim.report.attribution import report_lines

        lines += report_lines(summary["attribution"])
        pictures = pictures + summary["attribution"].get("plots", [])
    files = ["`metrics.csv` (per step and node)", "`partition.csv` (per node and class)"]
    if sim.tracking:
        files.append("`influence.csv` (per event, hop and node)")
    if sim.influence.proximal:
        files.append("`proximal.csv` (per step, sender and receiver)")
    lines += footer(pictures, f"Files: {', '.join(files)}, `summary.json`, `config.yaml`.")
    return "\n".join(lines)
