"""`make attribution` (experiment=attribution): one run with the full-horizon reverse pass
(its usual outputs: attribution.csv, samples.csv, plots), then the attribution checked
against retraining: `retrain.batches` random whole-batch removals (node j takes no step
at t) and `retrain.samples` random single samples, each a complete second run with
`counterfactual.remove`, compared on the final network probe loss
F = Σ_k q_k L'_k(θ_k^T):  retrained difference F(with) − F(without) against the
first-order attribution λ_j^{t+½}·δ_j^{t+½}. Reports Spearman, Pearson and
rel_err = Σ|A − R| / Σ|R| per kind; writes retrain.csv and retrain.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicesim.config import Config, bounded, register_block
from dicesim.experiments import final_loss, runner, variant
from dicesim.experiments.runner import Case, Table, Task
from dicesim.model.data import batch_ids
from dicesim.report.stats import pearson, spearman
from dicesim.report.summary import write_all
from dicesim.run.engine import Simulation
from dicesim.run.session import Session


@dataclass
class Retrain:
    """The `retrain:` block of configs/experiment/attribution.yaml: removals retrained."""

    batches: int = bounded(100, 0)
    samples: int = bounded(100, 0)


register_block("retrain", Retrain)


RETRAIN_COLUMNS = ("kind", "node", "step", "sample", "attribution", "retrained")


def removals(cfg: Config, sim: Simulation) -> list[tuple[str, int, int, int | None]]:
    """(kind, node, step, sample id or None) of every retrained removal, seeded."""
    s, c = sim.run, cfg.retrain
    rng = np.random.default_rng([s.seed, 1212])
    pairs = s.nodes * s.steps
    out = []
    for i in rng.choice(pairs, size=min(int(c.batches), pairs), replace=False):
        out.append(("batch", int(i % s.nodes), int(i // s.nodes), None))
    for i in rng.choice(pairs, size=min(int(c.samples), pairs), replace=False):
        j, t = int(i % s.nodes), int(i // s.nodes)
        ids = batch_ids(sim.parts[j], s.batch_size, t, s.seed, j)
        out.append(("sample", j, t, int(ids[rng.integers(len(ids))])))
    return out


def agreement(a: np.ndarray, r: np.ndarray) -> dict:
    return {"n": int(len(a)), "spearman": spearman(a, r), "pearson": pearson(a, r),
            "rel_err": float(np.abs(a - r).sum() / np.abs(r).sum())}


class AttributionTask(Task):
    """Case 'attributed': the run with the reverse pass (its usual outputs are written when
    it finishes); then one case per retrained removal."""

    name = "attribution"

    def cases(self, session: Session) -> list[Case]:
        cfg = session.cfg
        base = variant(cfg, attribution__enabled=True, influence__events=0,
                       eval_every=cfg.steps)
        sim = session.build(base)
        self.plan = removals(cfg, sim)
        self.plain = variant(base, attribution__enabled=False)
        session.build(variant(self.plain, counterfactual__remove=[
            {"node": 0, "step": 0, "samples": "all"}]))
        return [Case("attributed", "run with the reverse pass", sim)] + [
            Case(f"{kind}_{j}_{t}" + ("" if sample is None else f"_{sample}"),
                 f"retrained without {kind} of node {j} at step {t}", (kind, j, t, sample))
            for kind, j, t, sample in self.plan]

    def announce(self, session: Session, cases: list[Case]) -> str:
        c = session.cfg.retrain
        return (f"attribution: one run with the reverse pass, then {len(self.plan)} "
                f"retrainings ({c.batches} batches, {c.samples} samples)")

    def run_case(self, session: Session, case: Case, done: dict) -> dict | None:
        if case.key == "attributed":
            return self.attributed(session, case.spec)
        kind, j, t, sample = case.spec
        removal = {"node": j, "step": t, "samples": "all" if sample is None else [sample]}
        cf_sim = session.build(variant(self.plain, counterfactual__remove=[removal]))
        cf = session.simulate(cf_sim)
        if session.rank != 0:
            return None
        base = done["attributed"]
        return {"row": (kind, j, t, -1 if sample is None else sample, base["values"][case.key],
                        base["with_all"] - final_loss(cf_sim, cf.metrics))}

    def attributed(self, session: Session, sim: Simulation) -> dict | None:
        """The reverse-pass run: its outputs, F(with all), and the attribution of every
        planned removal."""
        result = session.simulate(sim)
        if session.rank != 0:
            return None
        a, out = result.attribution, session.out
        values = {}
        for kind, j, t, sample in self.plan:
            key = f"{kind}_{j}_{t}" + ("" if sample is None else f"_{sample}")
            if sample is None:
                values[key] = float(a.batch[t, :, j].sum())
            else:
                ids = batch_ids(sim.parts[j], sim.run.batch_size, t, sim.run.seed, j)
                values[key] = a.sample_value(j, t, np.flatnonzero(ids == sample))
        summary = write_all(out, sim, result, plots=session.cfg.plots)
        return {"summary": summary, "report": (out / "report.md").read_text(),
                "with_all": final_loss(sim, result.metrics), "values": values}

    def progress(self, case: Case, result: dict) -> str:
        if case.key == "attributed":
            return case.label
        return f"{case.label}: attribution {result['row'][4]:.4g}, retrained {result['row'][5]:.4g}"

    def summarize(self, cfg: Config, cases: list[Case], results: dict, wall_s: float) -> dict:
        self.rows = [r["row"] for key, r in results.items() if key != "attributed"]
        check = {}
        for kind in ("batch", "sample"):
            pick = [r for r in self.rows if r[0] == kind]
            if len(pick) >= 3:
                check[kind] = agreement(np.array([r[4] for r in pick]),
                                        np.array([r[5] for r in pick]))
        self.base_report = results["attributed"]["report"]
        return {**results["attributed"]["summary"], "retrain": check}

    def tables(self, summary: dict, results: dict) -> list[Table]:
        return [Table("retrain.csv", RETRAIN_COLUMNS, self.rows)]

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        if not self.rows:
            return []
        retrain_plot(out, self.rows, summary["retrain"])
        return ["retrain.png"]

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        lines = ["", "## Against retraining", "",
                 "| removal | n | Spearman | Pearson | rel_err |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['spearman']:.4f} | {v['pearson']:.4f} | "
                  f"{v['rel_err']:.4f} |" for k, v in summary["retrain"].items()]
        lines += [line for pic in pictures for line in ("", f"![{pic}]({pic})")]
        return self.base_report + "\n".join(lines) + "\n"

    def closing(self, summary: dict, out: Path) -> list[str]:
        block = summary["attribution"]
        return [*(f"attribution vs retraining ({kind}, n={v['n']}): Spearman "
                  f"{v['spearman']:.4f}, Pearson {v['pearson']:.4f}, rel_err {v['rel_err']:.4f}"
                  for kind, v in summary["retrain"].items()),
                f"attribution: reverse pass {block['wall_s']:.2f} s = "
                f"{block['cost_ratio']:.2f}× training; report: {out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, AttributionTask())


def retrain_plot(out, rows: list[tuple], check: dict) -> None:
    from dicesim.report.plots import plt

    kinds = [k for k in ("batch", "sample") if k in check]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        pick = [r for r in rows if r[0] == kind]
        r_, a_ = [r[5] for r in pick], [r[4] for r in pick]
        ax.scatter(r_, a_, s=10)
        lim = max(map(abs, r_ + a_))
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.6)
        c = check[kind]
        ax.set(xlabel="retrained F(with) − F(without)", ylabel="attribution λ·δ",
               title=f"{kind}: Spearman {c['spearman']:.3f}, rel_err {c['rel_err']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "retrain.png", dpi=110)
    plt.close(fig)
