"""`make alignment`: how well DICE-E tracks the exact DICE-GT.

Every case is one single-run simulation with `influence.events` sampled events
e = (j, t, S) followed for r hops with ground truth. For each case the alignment of
E[e,s,k] against G[e,s,k] is reported

- per hop s over the (event, node) entries of that hop (`hop_<s>`),
- for the one-hop view (the DICE paper's Definition 2): E[e,0,j] + Σ_{k≠j} E[e,1,k] per event,
- over every entry (`all`),

as Pearson, Spearman, sign agreement and rel_err = Σ|E − G| / Σ|G| (report.alignment).

Both estimators are reported: `dice_e` (the paper's first-order DICE-E) and `dice_mid` (its
midpoint rule; the hard cases add `dice_gauss2`, the two-point rule), with the second-order
share ρ = Σ|dice_mid − dice_e| / Σ|dice_mid|, the quantity a plain run reports without ground
truth (there against its accurate column, dice_gauss2 by default), so its calibration
against the true rel_err shows.

`alignment.sweep=core` (default) runs the target cases and the `hard` set
(Fashion-MNIST at lr 0.2 and 0.5, where first-order DICE-E degrades; skipped with a note
when the Debian package dataset-fashion-mnist is absent); `alignment.sweep=full` adds the
grid (topologies × learning rates × batch sizes × node counts × curvature on/off).
`alignment.precision` reruns one single-sample case in float64 and compares the two ground
truths entry by entry (how precise float32 DICE-GT is).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from dicesim.config import Config, as_dict
from dicesim.experiments import group_option, runner, topology_options, variant
from dicesim.experiments.alignment.analysis import (
    ordered,
    ordered_blocks,
    precision_report,
    summarize,
    targets,
    worst,
)
from dicesim.experiments.alignment.cases import (
    Alignment,
    Case,
    Sweep,
    case_label,
    cases_of,
    check_alignment,
    parse_case,
)
from dicesim.experiments.alignment.report import TABLE_COLUMNS, plots, report_md, table_rows
from dicesim.experiments.runner import Table, Task, slug
from dicesim.influence.events import INFLUENCE_COLUMNS
from dicesim.report.summary import second_order_share, write_csv
from dicesim.run.session import Session

__all__ = ["Alignment", "AlignmentTask", "Case", "Sweep", "case_config", "case_label",
           "cases_of", "check_alignment", "parse_case", "precision_report", "run", "summarize",
           "targets", "worst"]


# ---- running ---------------------------------------------------------------------------------
def case_config(cfg: Config, case: Case) -> Config:
    extra: dict = {}
    if case.data and case.data != cfg.data.name:
        extra["data"] = {**group_option("data", case.data), **dict(cfg.alignment.hard_data)}
    estimators = ["dice_e", "dice_mid"]
    if case.set == "hard":
        estimators.append("dice_gauss2")
    if case.optim:
        extra["optim"] = {**as_dict(cfg.optim), **case.optim}
        estimators.append("dice_e_nostate")
    return variant(cfg, **extra, topology=topology_options(cfg, case.topology), optim__lr=case.lr,
                   batch_size=case.batch_size, nodes=case.nodes, steps=case.steps,
                   dtype=case.dtype, eval_every=case.steps, influence__events=case.events,
                   influence__removal=case.removal, influence__hops=case.hops,
                   influence__curvature=case.curvature, influence__ground_truth=True,
                   influence__estimators=estimators,
                   influence__step_range=None, counterfactual__remove=[])


def run_case(session: Session, cfg: Config, case: Case) -> tuple[list[tuple], float]:
    """Influence rows (event, source, step, n_removed, hop, node, dice_e, dice_gt) on rank 0."""
    sim = session.build(case_config(cfg, case))
    result = session.simulate(sim)
    return result.influence, result.wall_s


def data_available(name: str) -> bool:
    root = group_option("data", name).get("root")
    return root is None or Path(root).is_dir()


class AlignmentTask(Task):
    name = "alignment"

    def cases(self, session: Session) -> list[runner.Case]:
        cfg = session.cfg
        hard = cases_of(cfg, "hard")
        missing = sorted({c.data for c in hard if c.data and not data_available(c.data)})
        if missing:
            session.say(f"alignment: the hard cases on {', '.join(missing)} are left out: "
                        "their data files are missing (apt-get install dataset-fashion-mnist)")
        if cfg.alignment.sweep == "optimizers":
            cases = cases_of(cfg, "optimizers")
        else:
            cases = cases_of(cfg, "core") + [c for c in hard if c.data not in missing]
            cases += cases_of(cfg, "sweep") if cfg.alignment.sweep == "full" else []
            cases += cases_of(cfg, "precision")
        for case in cases:  # every setting is checked before the first run starts
            session.build(case_config(cfg, case))
        return [runner.Case(c.label, c.label, c) for c in cases]

    def announce(self, session: Session, cases: list[runner.Case]) -> str:
        return f"alignment: {len(cases)} runs ({session.cfg.alignment.sweep} sweep)"

    def run_case(self, session: Session, case: runner.Case, done: dict) -> dict | None:
        spec: Case = case.spec
        rows, wall = run_case(session, session.cfg, spec)
        if session.rank != 0:
            return None
        result = {**asdict(spec), "wall_s": wall, "alignment": ordered_blocks(rows),
                  "alignment_mid": ordered_blocks(rows, "dice_mid"),
                  "second_order_share": ordered(second_order_share(rows, "dice_mid"))}
        if spec.optim:
            result["alignment_nostate"] = ordered_blocks(rows, "dice_e_nostate")
        if spec.set == "hard":
            result["alignment_gauss2"] = ordered_blocks(rows, "dice_gauss2")
        folder = session.out / "cases" / slug(spec.label)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(folder / "influence.csv", INFLUENCE_COLUMNS,
                  sorted(rows, key=lambda r: (r.event, r.hop, r.node)))
        return {"case": result, "rows": rows}

    def progress(self, case: runner.Case, result: dict) -> str:
        c = result["case"]
        blocks, mid = c["alignment"], c["alignment_mid"]
        (value, where), (value_mid, where_mid) = worst(blocks), worst(mid)
        return (f"{case.label}: {c['wall_s']:.1f} s, min Spearman dice_e {value:.6f} ({where}), "
                f"dice_mid {value_mid:.6f} ({where_mid}); rel_err all "
                f"{blocks['all']['rel_err']:.3g} / {mid['all']['rel_err']:.3g}")

    def summarize(self, cfg: Config, cases: list[runner.Case], results: dict,
                  wall_s: float) -> dict:
        self.cases_done = [r["case"] for r in results.values()]
        self.rows_of = {key: r["rows"] for key, r in results.items()}
        return summarize(cfg, self.cases_done, self.rows_of)

    def tables(self, summary: dict, results: dict) -> list[Table]:
        return [Table("alignment.csv", TABLE_COLUMNS, table_rows(summary["cases"]))]

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict) -> list[str]:
        return plots(out, [c for c in self.cases_done if c["set"] != "precision"], self.rows_of)

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        return report_md(summary, pictures)

    def closing(self, summary: dict, out: Path) -> list[str]:
        met = summary["targets"]["all_pass"]
        return [f"alignment: targets {'met' if met else 'NOT met'}; report: {out / 'report.md'}"]


def run(session: Session) -> dict | None:
    return runner.run(session, AlignmentTask())
