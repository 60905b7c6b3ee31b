"""alignment.csv's rows, report.md and the figures of the alignment experiment."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dicesim.experiments.alignment.analysis import worst
from dicesim.influence.events import InfluenceRow
from dicesim.report.present import fmt, footer, md_table, report_head, save_figure

TABLE_COLUMNS = ("set", "label", "data", "topology", "lr", "batch_size", "nodes", "removal",
                 "hops", "curvature", "dtype", "estimator", "view", "n", "pearson", "spearman",
                 "sign_agreement", "rel_err", "second_order_share")
SCATTER_ROWS_PER_PAGE = 16


def table_rows(cases: Iterable[dict]) -> list[tuple]:
    out = []
    for c in cases:
        for estimator, key in (("dice_e", "alignment"), ("dice_mid", "alignment_mid"),
                               ("dice_gauss2", "alignment_gauss2"),
                               ("dice_e_nostate", "alignment_nostate")):
            for view, b in (c.get(key) or {}).items():
                out.append((c["set"], c["label"], c["data"], c["topology"], c["lr"],
                            c["batch_size"], c["nodes"], c["removal"], c["hops"],
                            c["curvature"], c["dtype"], estimator, view, b["n"], b["pearson"],
                            b["spearman"], b["sign_agreement"], b["rel_err"],
                            (c.get("second_order_share") or {}).get(view)))
    return out


def _g(value: object, digits: int = 6) -> str:
    return fmt(value, f".{digits}g")


def view_table(cases: list[dict], columns: list[tuple[str, str, str | None, int]]
               ) -> list[str]:
    """A markdown table with one row per case and view; each column is (header, the case's
    block of per-view results, its metric, digits); the metric None reads the block as
    view → value (the second-order share)."""
    def cells(c: dict, view: str) -> list[str]:
        out = []
        for _, key, metric, digits in columns:
            value = (c.get(key) or {}).get(view)
            if metric is not None:
                value = (value or {}).get(metric)
            out.append(_g(value, digits))
        return out

    return md_table(["case", "view", "n", *(h for h, *_ in columns)],
                    ([c["label"], view, b["n"], *cells(c, view)]
                     for c in cases for view, b in c["alignment"].items()))


def report_md(summary: dict, pictures: list[str]) -> str:
    t = summary["targets"]
    lines = report_head(
        "DICE-E against DICE-GT", summary,
        f"`{summary['data']}`, `{summary['model']}`, {summary['dtype']}; each case samples "
        "events e = (j, t, S) uniformly over nodes and steps and follows them for r hops (hop s = "
        "s gossip rounds after the event, not graph distance) with the exact counterfactual. "
        "Views: `hop_s` = the (event, node) entries of hop s; `one_hop` = E[e,0,j] + "
        "Σ_{k≠j} E[e,1,k] per event (Definition 2 of the DICE paper); `all` = every entry. "
        "rel_err = Σ|E − G| / Σ|G|.", "")
    lines += target_lines(t) + curvature_gap_lines(t) + midpoint_lines(t)
    for kind, title in (("core", "Every core case, every view"),
                        ("hard", "Hard cases (large η‖x‖²), every view")):
        lines += estimator_section([c for c in summary["cases"] if c["set"] == kind], kind, title)
    lines += optimizer_section([c for c in summary["cases"] if c["set"] == "optimizers"])
    lines += sweep_section([c for c in summary["cases"] if c["set"] == "sweep"])
    if summary.get("precision"):
        lines += precision_section(summary["precision"])
    lines += footer(pictures, "Files: `summary.json`, `alignment.csv` (every case × view), "
                              "`cases/<case>/influence.csv` (every (event, hop, node) entry), "
                              "`config.yaml`.")
    return "\n".join(lines)


def target_lines(t: dict) -> list[str]:
    return [f"**Targets** (Spearman ≥ {t['min_spearman']} in every view): "
            + ("all met." if t["all_pass"] else "NOT all met."), "",
            *md_table(["target case", "min Spearman", "at", "pass"],
                      ([label, _g(v["min_spearman"]), v["at"], v["pass"]]
                       for label, v in t["checked"].items())), ""]


def curvature_gap_lines(t: dict) -> list[str]:
    """Per no-curvature twin: Spearman and rel_err by hop with and without (I − ηH)."""
    lines = []
    for label, gap in t["curvature_gap"].items():
        sp, re = gap["spearman_by_hop"], gap["rel_err_by_hop"]
        lines += [f"**What the Hessian term buys** — `{gap['with_curvature']}` against "
                  f"`{label}` (same runs without (I − ηH)):", "",
                  *md_table(["hop", "Spearman with", "Spearman without", "rel_err with",
                             "rel_err without"],
                            ([s + 1, _g(sp["curvature"][s]), _g(sp["no_curvature"][s]),
                              _g(re["curvature"][s], 3), _g(re["no_curvature"][s], 3)]
                             for s in range(len(sp["curvature"])))), ""]
    return lines


def midpoint_lines(t: dict) -> list[str]:
    if not t.get("midpoint"):
        return []
    return ["**dice_mid targets**", "",
            *md_table(["case", "target", "value", "at", "pass"],
                      ([label, v["kind"], _g(v["value"]), v["at"], v["pass"]]
                       for label, v in t["midpoint"].items())), ""]


ESTIMATORS = (("E", "alignment"), ("mid", "alignment_mid"))  # report name, summary key


def estimator_section(chosen: list[dict], kind: str, title: str) -> list[str]:
    """Every view of the core (or hard) cases: Spearman, rel_err and sign agreement of each
    estimator, and the second-order share ρ."""
    if not chosen:
        return []
    two = kind == "hard"  # the hard cases also run dice_gauss2
    shown = ESTIMATORS + ((("gauss2", "alignment_gauss2"),) if two else ())
    return [f"## {title}", "",
            "ρ = Σ\\|dice_mid − dice_e\\| / Σ\\|dice_mid\\|, the second-order share (no "
            "ground truth needed)."
            + (" gauss2 = `dice_gauss2`, the two-point Gauss–Legendre rule." if two else ""),
            "",
            *view_table(chosen, [(f"Spearman {n}", k, "spearman", 6) for n, k in shown]
                        + [(f"rel_err {n}", k, "rel_err", 3) for n, k in shown]
                        + [(f"sign agr. {n}", k, "sign_agreement", 4) for n, k in ESTIMATORS]
                        + [("ρ", "second_order_share", None, 3)]), ""]


def optimizer_section(chosen: list[dict]) -> list[str]:
    if not chosen:
        return []
    shown = ESTIMATORS + (("nostate", "alignment_nostate"),)
    return ["## Stateful optimizers", "",
            "DICE-E carries the pair (δ̂θ, δ̂s) through the JVP of the optimizer's step; "
            "`nostate` is the ablation that drops δ̂s (the optimizer state's "
            "perturbation) and keeps only the θ-path of the step's Jacobian.", "",
            *view_table(chosen, [(f"Spearman {n}", k, "spearman", 6) for n, k in shown]
                        + [(f"rel_err {n}", k, "rel_err", 3) for n, k in shown]), ""]


def sweep_section(sweep: list[dict]) -> list[str]:
    if not sweep:
        return []

    def row(c: dict) -> list[str]:
        a, last = c["alignment"], f"hop_{c['hops']}"
        return [c["label"], _g(a["one_hop"]["spearman"]), _g(a["hop_1"]["spearman"]),
                _g(a[last]["spearman"]), _g(worst(a, "pearson")[0]),
                _g(worst(a, "sign_agreement")[0], 4), _g(a[last]["rel_err"], 3)]

    return ["## Sweep", "",
            "Per case: Spearman of the one-hop view, of hop 1 and of the last hop; the "
            "smallest Pearson and sign agreement over the views; rel_err of the last hop. "
            "Every view of every case is in `alignment.csv`.", "",
            *md_table(["case", "Spearman one_hop", "hop 1", "hop r", "min Pearson",
                       "min sign agr.", "rel_err hop r"], map(row, sweep)), ""]


def precision_section(p: dict) -> list[str]:
    return [f"## Precision of float32 ground truth (`{p['case']}`)", "",
            "The same case in float32 and float64 (same events, same batches), matched "
            "entry by entry. gt_noise = Σ|G32 − G64| / Σ|G64|: how far float32 DICE-GT "
            "is from float64's; it must stay well below the estimator's own rel_err.", "",
            *md_table(["hop", "n", "median \\|G\\|", "gt_noise", "e_noise", "rel_err f32",
                       "rel_err f64", "sign agr. f32", "sign agr. f64"],
                      ([hop[4:], v["n"], f"{v['median_abs_gt']:.3g}", f"{v['gt_noise']:.3g}",
                        f"{v['e_noise']:.3g}", _g(v["rel_err_float32"], 3),
                        _g(v["rel_err_float64"], 3), _g(v["sign_agreement_float32"], 4),
                        _g(v["sign_agreement_float64"], 4)] for hop, v in p["by_hop"].items())),
            ""]


# ---- figures ---------------------------------------------------------------------------------
def plots(out: Path, cases: list[dict], rows_of: dict[str, list[tuple]]) -> list[str]:
    pictures = []
    core = [c for c in cases if c["set"] == "core"]
    sweep = [c for c in cases if c["set"] == "sweep"]
    if any(c.get("second_order_share") for c in cases):
        pictures.append(calibration(out, cases))
    if core:
        pictures += scatter_grid(out, "scatter", core, rows_of)
        pictures.append(by_hop_curves(out, "spearman_vs_hop.png", core,
                                      "core cases: solid = with curvature, dashed = without"))
    if sweep:
        pictures += scatter_grid(out, "sweep_scatter", sweep, rows_of, max_hop=None)
        pictures.append(sweep_curves(out, sweep))
    return pictures


def _view_pairs(rows: list[InfluenceRow], view: str) -> np.ndarray:
    """(G, E) pairs of one view."""
    rows = [r for r in rows if r.dice_gt is not None]
    if view == "one_hop":
        acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in rows:
            if r.hop == 0 or (r.hop == 1 and r.node != r.source):
                acc[r.event][0] += r.dice_gt
                acc[r.event][1] += r.dice_e
        return np.array(list(acc.values())).reshape(-1, 2)
    hop = int(view[4:])
    return np.array([(r.dice_gt, r.dice_e) for r in rows if r.hop == hop]).reshape(-1, 2)


def scatter_grid(out: Path, stem: str, cases: list[dict], rows_of: dict[str, list[tuple]],
                 max_hop: int | None = 8) -> list[str]:
    """Rows = cases, columns = one_hop, hop_0 … hop_R: E against G on symmetric-log axes
    (linear within the smallest 10 % of |G|), the diagonal E = G dashed."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    if max_hop is None:  # sweep pages: one_hop, hop 1 and the last hop only
        columns = ["one_hop", "hop_1", f"hop_{max(c['hops'] for c in cases)}"]
    else:
        columns = ["one_hop"] + [f"hop_{s}" for s in
                                 range(min(max_hop, max(c["hops"] for c in cases)) + 1)]
    names = []
    for page in range(0, len(cases), SCATTER_ROWS_PER_PAGE):
        chunk = cases[page:page + SCATTER_ROWS_PER_PAGE]
        fig, axes = plt.subplots(len(chunk), len(columns),
                                 figsize=(2.5 * len(columns), 2.4 * len(chunk)), squeeze=False)
        for row, case in zip(axes, chunk, strict=True):
            for ax, view in zip(row, columns, strict=True):
                block = case["alignment"].get(view)
                pairs = _view_pairs(rows_of[case["label"]], view) if block else np.empty((0, 2))
                if len(pairs) == 0:
                    ax.axis("off")
                    continue
                ax.scatter(pairs[:, 0], pairs[:, 1], s=3, alpha=0.5, lw=0)
                lo, hi = pairs.min(), pairs.max()
                ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls="--")
                thresh = float(np.quantile(np.abs(pairs[:, 0]), 0.1)) or 1e-12
                ax.set_xscale("symlog", linthresh=thresh)
                ax.set_yscale("symlog", linthresh=thresh)
                ax.tick_params(labelsize=5)
                sp = block["spearman"]
                ax.set_title(f"{view}: ρ={sp:.4f}" if sp is not None else view, fontsize=7)
            row[0].set_ylabel(case["label"].replace("/", "\n", 2) + "\nDICE-E", fontsize=6)
        for ax in axes[-1]:
            ax.set_xlabel("DICE-GT", fontsize=7)
        paged = len(cases) > SCATTER_ROWS_PER_PAGE
        name = f"{stem}_{page // SCATTER_ROWS_PER_PAGE + 1}.png" if paged else f"{stem}.png"
        names.append(save_figure(fig, out, name, dpi=90))
    return names


def calibration(out: Path, cases: list[dict]) -> str:
    """The second-order share ρ (no ground truth needed) against dice_e's true rel_err, one
    point per case and view: how well the run's own warning tracks the real error."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    marks = {"core": "o", "hard": "^", "sweep": "s"}
    for kind, mark in marks.items():
        pts = [(c["second_order_share"][v], c["alignment"][v]["rel_err"])
               for c in cases if c["set"] == kind for v in c["alignment"]
               if (c.get("second_order_share") or {}).get(v) is not None
               and c["alignment"][v]["rel_err"] is not None]
        if pts:
            x, y = np.array(pts).T
            ax.loglog(x, y, mark, ms=4, alpha=0.6, label=f"{kind} ({len(pts)} case × view)")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="ρ = rel_err")
    ax.axvline(0.05, color="red", lw=0.8, ls=":", label="warning above ρ = 0.05")
    ax.set(xlabel="second-order share ρ = Σ|mid − E| / Σ|mid|",
           ylabel="dice_e rel_err = Σ|E − G| / Σ|G|", title="Does the warning track the error?")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "calibration.png")


def _hop_series(case: dict, metric: str) -> tuple[list[int], list[float]]:
    hops = [s for s in range(case["hops"] + 1) if f"hop_{s}" in case["alignment"]]
    vals = [case["alignment"][f"hop_{s}"][metric] for s in hops]
    return hops, [math.nan if v is None else v for v in vals]


def by_hop_curves(out: Path, name: str, cases: list[dict], title: str) -> str:
    """1 − Spearman and rel_err against hop s (log scale: every value is near 1 or 0)."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    keyed: dict[tuple, int] = {}
    for case in cases:
        key = (case["topology"], case["lr"], case["removal"], case["hops"])
        colour = colours[keyed.setdefault(key, len(keyed)) % 10]
        style = "-" if case["curvature"] else "--"
        hops, sp = _hop_series(case, "spearman")
        _, re = _hop_series(case, "rel_err")
        a1.semilogy(hops, np.maximum(1 - np.array(sp), 1e-8), style, marker="o", ms=3,
                    color=colour, label=case["label"])
        a2.semilogy(hops, re, style, marker="o", ms=3, color=colour, label=case["label"])
    a1.axhline(0.01, color="red", lw=0.8, ls=":", label="Spearman = 0.99")
    for ax in (a1, a2):
        ax.set_xticks(range(max(c["hops"] for c in cases) + 1))
    a1.set(xlabel="hop s", ylabel="1 − Spearman(E, G)  (1e-8: Spearman = 1)", title=title)
    a2.set(xlabel="hop s", ylabel="rel_err = Σ|E − G| / Σ|G|", title="relative error")
    a1.legend(fontsize=6)
    return save_figure(fig, out, name)


def sweep_curves(out: Path, cases: list[dict]) -> str:
    """One panel per topology: 1 − Spearman against hop for every sweep case."""
    from dicesim.report.plots import plt  # the Agg backend, chosen there

    topologies = list(dict.fromkeys(c["topology"] for c in cases))
    fig, axes = plt.subplots(1, len(topologies), figsize=(4 * len(topologies), 3.8),
                             squeeze=False, sharey=True)
    for ax, topo in zip(axes[0], topologies, strict=True):
        mine = [c for c in cases if c["topology"] == topo]
        settings = sorted({(c["lr"], c["batch_size"], c["nodes"]) for c in mine})
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(settings), 1)))
        for c in mine:
            colour = colours[settings.index((c["lr"], c["batch_size"], c["nodes"]))]
            hops, sp = _hop_series(c, "spearman")
            ax.semilogy(hops, np.maximum(1 - np.array(sp), 1e-8),
                        "-" if c["curvature"] else "--", marker="o", ms=2, color=colour,
                        label=f"lr {c['lr']:g}, B {c['batch_size']}, n {c['nodes']}"
                        if c["curvature"] else None)
        ax.axhline(0.01, color="red", lw=0.8, ls=":")
        ax.set(title=f"{topo} (dashed: no curvature)", xlabel="hop s",
               xticks=range(max(c["hops"] for c in mine) + 1))
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("1 − Spearman(E, G)")
    return save_figure(fig, out, "sweep_spearman_vs_hop.png")
