"""The one runner of every experiment driver: a driver is a :class:`Task` (its cases, the
analysis of one case, the summary, the tables, the report and the figures); the runner
validates every case before training, answers a dry run, claims (or re-enters) the run
directory, runs the cases over the command's ranks, keeps each finished case's result on
disk as it completes, and writes summary.json, the CSV tables and report.md on rank 0.

Interrupted and resumed (docs/running.md, "Experiments"): a finished case's result is
written whole to ``cases/<case>/result.pkl`` (a temporary name, then a rename) before the
next case starts. A signal (or a diverged loss) drops the case in progress; summary.json
then says ``"status": "interrupted"`` with the finished cases. ``resume=auto`` (same
out_dir) or ``resume=<dir>`` re-enters the directory of a run with the same settings, skips
the finished cases (their results are read back, not recomputed) and redoes the rest, so
the final summary is the one an uninterrupted run writes.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicesim.common.errors import ConfigError
from dicesim.common.stopping import Interrupted, Stopped
from dicesim.common.writers import write_atomic, write_bytes_atomic, write_csv, write_json
from dicesim.config import Config
from dicesim.run.provenance import stamped
from dicesim.run.session import (
    RunDirPlan,
    Session,
    check_same_run,
    fail,
    prepare_output,
    run_target,
)

CASES_DIR = "cases"
RESULT_FILE = "result.pkl"


@dataclass
class Case:
    """One unit of work that finishes whole: usually one simulation, sometimes several
    that only make sense together. `key` names its folder under cases/ and must be unique."""

    key: str
    label: str = ""
    spec: object = None  # what the task needs to run it (configs, built simulations, …)

    def __post_init__(self) -> None:
        self.label = self.label or self.key


@dataclass
class Table:
    """A CSV file of the run directory."""

    name: str
    columns: Sequence[str]
    rows: list[Sequence] = field(default_factory=list)


class Task:
    """What a driver supplies; the runner calls it in this order. Results are what
    `run_case` returns on rank 0 (None on the other ranks): picklable, and all that the
    summary, tables, report and figures need, since a resumed run reads them back."""

    name = "experiment"

    def cases(self, session: Session) -> list[Case]:
        """Every case, each validated (session.build) before any training."""
        raise NotImplementedError

    def announce(self, session: Session, cases: list[Case]) -> str:
        """The line said once the cases are validated."""
        return f"{self.name}: {len(cases)} cases"

    def run_case(self, session: Session, case: Case, done: dict[str, object]) -> object:
        """Run one case on every rank; rank 0 returns its result. `done` holds the results
        of the cases before it (rank 0 only)."""
        raise NotImplementedError

    def progress(self, case: Case, result: object) -> str:
        """The line said when a case finished (rank 0)."""
        return case.label

    def summarize(self, cfg: Config, cases: list[Case], results: dict[str, object],
                  wall_s: float) -> dict:
        raise NotImplementedError

    def tables(self, summary: dict, results: dict[str, object]) -> list[Table]:
        return []

    def figures(self, out: Path, cfg: Config, summary: dict, results: dict[str, object]
                ) -> list[str]:
        """Draw the PNGs (only when plots=true); return their file names."""
        return []

    def report(self, cfg: Config, summary: dict, pictures: list[str]) -> str:
        raise NotImplementedError

    def closing(self, summary: dict, out: Path) -> list[str]:
        """The lines said after everything is written."""
        return [f"{self.name}: done; report: {out / 'report.md'}"]


def target_lines(targets: dict[str, bool]) -> list[str]:
    """`  target <name>: met|MISSED`, one line per target of a summary."""
    return [f"  target {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]


# ---- the store of finished cases -------------------------------------------------------------
def slug(key: str) -> str:
    return key.replace("/", "__")


def result_path(out: Path, key: str) -> Path:
    return out / CASES_DIR / slug(key) / RESULT_FILE


def save_result(out: Path, key: str, result: object) -> None:
    path = result_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def load_result(out: Path, key: str) -> object:
    return pickle.loads(result_path(out, key).read_bytes())


def finished_keys(out: Path, cases: list[Case]) -> list[str]:
    return [c.key for c in cases if result_path(out, c.key).is_file()]


def mark_interrupted(session: Session, task: Task, cases: list[Case], finished: list[str],
                     reason: str) -> None:
    """summary.json of a stopped experiment: what is finished and how to continue (the
    generated sbatch script requeues a job whose summary.json says interrupted)."""
    if session.rank != 0 or session.out is None:
        return
    write_json(session.out / "summary.json", stamped({
        "experiment": task.name, "status": "interrupted" if reason == "signal" else reason,
        "cases": len(cases), "finished": finished,
        "resume": f"rerun with resume=auto (same out_dir) or resume={session.out}"}))
    session.say(f"{task.name}: {len(finished)} of {len(cases)} cases finished and kept in "
                f"{session.out}; resume=auto (same out_dir) or resume={session.out} continues")


# ---- the run directory -----------------------------------------------------------------------
def resume_plan(cfg: Config) -> RunDirPlan | None:
    """Where `resume` points an experiment (None: claim a fresh directory as usual):
    resume=auto re-enters out_dir when it holds this experiment's earlier attempt (same
    settings; other settings are refused) and starts there afresh otherwise; resume=DIR
    re-enters DIR, which must hold a run of the same settings."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        target = run_target(cfg)
        if target.unique:  # a fresh default name: nothing to find
            return None
        folder = target.path
    else:
        folder = Path(cfg.resume).expanduser()
    if not (folder / "config.yaml").is_file():
        if cfg.resume != "auto":
            raise ConfigError(f"resume={cfg.resume}: no config.yaml there, so no run to "
                              "continue; give the directory of an earlier run or resume=auto")
        return RunDirPlan(folder)
    if cfg.overwrite:
        return RunDirPlan(folder)  # start afresh there: overwrite removes the old outputs
    check_same_run(folder, cfg)
    return RunDirPlan(folder, reenter=True)


def claim(session: Session) -> bool:
    """Rank 0 claims (or re-enters) the run directory; True when it re-entered one."""
    if session.rank != 0:
        return False
    if session.out is not None:  # a caller chose the directory (tests)
        return session.cfg.resume is not None
    try:
        plan = resume_plan(session.cfg)
    except ConfigError as err:
        fail(str(err))
    prepare_output(session, plan=plan)
    return plan is not None and plan.reenter


# ---- the run ---------------------------------------------------------------------------------
def run(session: Session, task: Task) -> dict | None:
    cfg = session.cfg
    cases = task.cases(session)  # every case validated before any training
    session.say(task.announce(session, cases))
    if cfg.dry_run:
        session.say(f"{task.name}: dry run — every case is valid, nothing trained")
        return None
    reentered = claim(session)
    results: dict[str, object] = {}
    finished: list[str] = []
    if session.rank == 0 and reentered:
        finished = finished_keys(session.out, cases)
        results = {key: load_result(session.out, key) for key in finished}
        if finished:
            session.say(f"{task.name}: resuming; {len(finished)} of {len(cases)} cases "
                        "finished earlier are read back")
    skip = set(session.share(finished))  # every rank skips the same cases
    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        if case.key in skip:
            continue
        try:
            result = task.run_case(session, case, results)
        except (Stopped, Interrupted) as stop:
            reason = stop.reason if isinstance(stop, Stopped) else "signal"
            mark_interrupted(session, task, cases, finished, reason)
            raise
        if session.rank == 0:
            save_result(session.out, case.key, result)
            results[case.key] = result
            finished.append(case.key)
            session.say(f"  [{i}/{len(cases)}] {task.progress(case, result)}")
    if session.rank != 0:
        return None
    return finish(session, task, cases, results, time.perf_counter() - t0)


def finish(session: Session, task: Task, cases: list[Case], results: dict[str, object],
           wall_s: float) -> dict:
    """Rank 0: the summary and every output file."""
    cfg, out = session.cfg, session.out
    assert out is not None
    ordered = {c.key: results[c.key] for c in cases}
    summary = task.summarize(cfg, cases, ordered, wall_s)
    for table in task.tables(summary, ordered):
        write_csv(out / table.name, table.columns, table.rows)
    write_json(out / "summary.json", stamped(summary))  # strict JSON: no bare NaN
    pictures = task.figures(out, cfg, summary, ordered) if cfg.plots else []
    write_atomic(out / "report.md", task.report(cfg, summary, pictures))
    for line in task.closing(summary, out):
        session.say(line)
    return summary
