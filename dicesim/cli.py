"""`python -m dicesim [overrides]` and `torchrun … -m dicesim [overrides]`."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from dicesim.comm.exchange import PeerError
from dicesim.common.errors import ConfigError
from dicesim.common.stopping import (
    SIGNAL_CODES,
    SIGNALS,
    Interrupted,
    Stopped,
    exit_with,
    on_signal,
    record_pid,
    record_status,
)
from dicesim.config import (
    CONFIG_DIR,
    Config,
    check_group_choice,
    compose_checked,
    load_noting,
    sweep_points,
)
from dicesim.config import GROUPS as GROUPS  # re-exported: the config groups users type
from dicesim.influence.events import ESTIMATORS
from dicesim.run import rundir
from dicesim.run.checkpoint import Checkpoints, find_resume
from dicesim.run.engine import Simulation, local_rank, resolve_device
from dicesim.run.provenance import headline
from dicesim.run.session import (  # re-exported: tests and older callers import them here
    RunDirPlan,
    Session,
    check_same_run,
    fail,
    guard_for,
    open_session,
    peer_failed,
    prepare_output,
    run_target,
)

__all__ = ["GROUPS", "RunDirPlan", "Session", "fail", "guard_for", "open_session", "main",
           "prepare_output", "run_target"]

# flags after which the command line is still a list of overrides to check (a sweep)
SWEEP_FLAGS = ("-m", "--multirun")


def check_group_choices(argv: list[str]) -> None:
    """Unknown group options (`topology=foo`) fail with the valid choices, exit 2."""
    for arg in argv:
        try:
            check_group_choice(arg)
        except ConfigError as err:
            fail(str(err))


def stopped(session: Session, stop: Stopped, sim: Simulation | None) -> None:
    """A signal or a diverged loss stopped every rank at the same step: rank 0 writes what
    is finished, then all leave together (the others wait in the closing barrier, so plain
    torchrun, which ends the remaining ranks once one has exited non-zero, cannot cut the
    writing short), run the signal hooks, exit with one line. A signal answered after the
    step loop (stop.phase) was seen by this rank alone: no closing barrier then."""
    if stop.reason == "signal":
        SIGNALS.answered = True  # writing the finished rows below is not interrupted again
    if session.rank == 0 and session.out is not None and sim is not None:
        from dicesim.report.summary import LOSS_METRIC, write_all

        status = {"status": "interrupted" if stop.reason == "signal" else "diverged",
                  "stopped_at": stop.step,
                  "node_steps_per_s": sim.run.nodes * stop.step / max(stop.result.wall_s, 1e-9)}
        if stop.reason == "diverged":
            f = stop.detail
            status["first_nonfinite"] = {"step": f.step, "node": f.node,
                                         "metric": LOSS_METRIC[f.what], "value": f.value}
        write_all(session.out, sim, stop.result, plots=False, status=status)
    session.close()
    if session.comm is not None:
        session.comm.let_rank0_leave_first()
    if stop.reason == "signal":
        for hook in on_signal:
            hook(stop.detail, stop.step)
    exit_with(stop.message(session.out), stop.code,
              prefix="" if stop.reason == "signal" else "error: ")


def plan_checkpoints(session: Session) -> tuple[Checkpoints | None, RunDirPlan]:
    """(what saves and loads checkpoints, where the run writes); the keys' types and
    ranges were checked by the schema. Called on every rank; only rank 0 writes."""
    cfg = session.cfg
    every, keep = cfg.checkpoint.every, cfg.checkpoint.keep
    if not every and cfg.resume is None:
        return None, RunDirPlan()
    try:
        plan, source = locate_resume(cfg, session.world)
    except ConfigError as err:
        fail(str(err))
    if source is not None:
        session.say(f"dicesim: resuming from {source}")
    return Checkpoints(None, every, keep, cfg, session.world, source), plan


def locate_resume(cfg: Config, world: int) -> tuple[RunDirPlan, Path | None]:
    """Where `resume` points and the checkpoint to load (None: start afresh): `resume=DIR`
    continues DIR's newest checkpoint there; `resume=auto` continues the run directory's
    own, or starts this run afresh there when it has none (a directory of a run with other
    settings is refused). ConfigError (one line) when a checkpoint does not fit."""
    resume = cfg.resume
    if resume is None:
        return RunDirPlan(), None
    if resume == "auto":
        target = run_target(cfg)
        folder = None if target.unique else target.path  # a fresh default name: nothing to find
    else:
        folder = Path(resume)
    source, replace = None, False
    if folder is not None:
        source = find_resume(folder, cfg, world, explicit=resume != "auto")
        if source is None and resume == "auto":
            replace = check_same_run(folder, cfg)
    return RunDirPlan(folder, source is not None, replace), source


def execute(cfg: Config, kept: Sequence[str] = ()) -> dict | None:
    """Run one command's settings; `kept` are the values a named group kept over the
    preset's (config.keep_named_groups), said after the run's headline."""
    session = open_session(cfg)
    record_pid()
    try:
        return run_session(session, kept)
    except Interrupted as stop:  # a phase outside the step loop answered a signal
        session.close()  # several ranks: all answered it at the same agreed check point
        if session.comm is not None:
            session.comm.let_rank0_leave_first()
        where = f"; the files written so far are in {session.out}" if session.out else ""
        exit_with(f"interrupted in the {stop.phase} phase ({SIGNAL_NAMES[stop.signum]})"
                  f"{where}", stop.code, prefix="")
        return None  # unreachable: exit_with exits


def run_session(session: Session, kept: Sequence[str]) -> dict | None:
    cfg = session.cfg
    driver = cfg.driver
    if driver:
        if kept:
            session.say(f"dicesim: kept {'; '.join(kept)}")
        module = importlib.import_module(f"dicesim.experiments.{driver}")
        try:
            summary = module.run(session)
        except PeerError as err:
            peer_failed(err)
        except Stopped as stop:
            stopped(session, stop, None)
        session.close()
        finish_signalled(session)
        return summary
    sim = session.build(cfg)
    plan = sim.describe()
    session.say(f"dicesim: {headline(sim)}")
    if kept:
        session.say(f"dicesim: kept {'; '.join(kept)}")
    session.say("dicesim: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in plan.items()) + f", backend={session.backend}")
    if cfg.dry_run:
        session.say("dicesim: dry run — configuration is valid, nothing trained")
        return None
    checkpoints, plan = plan_checkpoints(session)
    prepare_output(session, plan=plan)
    if checkpoints is not None:
        checkpoints.folder = session.out
    on_flush = None
    if session.rank == 0 and sim.tracking:
        from dicesim.report.summary import write_influence

        # finished events reach disk as they are gathered: a crash keeps them
        on_flush = lambda partial: write_influence(session.out, partial)  # noqa: E731
    try:
        result = session.simulate(sim, on_flush=on_flush, checkpoints=checkpoints)
    except Stopped as stop:
        stopped(session, stop, sim)
    session.close()
    if session.rank != 0:
        finish_signalled(session)
        return None
    from dicesim.report.summary import write_all

    out = session.out
    summary = write_all(out, sim, result, plots=cfg.plots)
    finish_signalled(session)
    f = summary["final"]
    acc = "–" if f["test_acc"] is None else f"{f['test_acc']:.4f}"
    if f.get("consensus_test_acc") is not None:
        acc += f" (consensus model θ̄: {f['consensus_test_acc']:.4f})"
    session.say(f"dicesim: done in {summary['wall_s']:.1f} s ({summary['node_steps_per_s']:.0f} "
                f"node-steps/s); test accuracy {acc}; report: {out / 'report.md'}")
    if summary.get("diverged"):
        bad = summary.get("first_nonfinite") or {}
        print(f"dicesim: warning: the run diverged (first non-finite {bad.get('metric')} at "
              f"step {bad.get('step')} on node {bad.get('node')}); summary.json marks it "
              "(diverged, nonfinite)", file=sys.stderr, flush=True)
    for name, blocks in summary.get("alignment", {}).items():
        if name not in ESTIMATORS:
            continue
        for view, block in blocks.items():
            session.say(f"  {name:>11} {view:>8}: n={block['n']} spearman={block['spearman']} "
                        f"pearson={block['pearson']} rel_err={block['rel_err']}")
    warning = (summary.get("reliability") or {}).get("warning")
    if warning:
        print(f"dicesim: warning: {warning}", file=sys.stderr, flush=True)
    return summary


def finish_signalled(session: Session) -> None:
    """A signal that arrived after the last agreed stop point: the run is complete (its
    outputs are written); still end with the signal's exit code and one line."""
    if SIGNALS.received is not None:
        where = f"; outputs are complete in {session.out}" if session.out is not None else ""
        exit_with(f"interrupted after the last step ({SIGNAL_NAMES[SIGNALS.received]}){where}",
                  SIGNAL_CODES[SIGNALS.received], prefix="")


SIGNAL_NAMES = {sig: sig.name for sig in SIGNAL_CODES}


def _hydra_job(composed: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    try:  # the one validation boundary: typed schema, strict booleans, ranges
        settings, kept = load_noting(composed, overrides)
    except ConfigError as err:
        fail(str(err))
    execute(settings, kept)


def check_composes(argv: list[str]) -> None:
    """Compose and validate the config up front, in this process and with the same Hydra
    compose path as the job, so that a typo, a wrong type or a bad value is one line,
    exit 2, before anything runs (Hydra's own main would print several lines and exit 1).
    Command lines with Hydra's other flags (--cfg, --help, …) go straight to Hydra."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in SWEEP_FLAGS for f in flags):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        # Hydra's sweeper composes a job only when it starts it, so a bad value in the
        # last point would fail after the first jobs ran: the points are expanded here
        # and every one is checked before the first job.
        points = sweep_points(overrides) if flags else [overrides]
        configs = compose_checked(points)
        # a sweep that runs here (Hydra's basic launcher): the builders' checks too (data
        # files, W, batch size, GPUs) for every point. Jobs that another launcher sends to
        # other machines are checked there, where their data and devices are.
        local = not any(o.lstrip("+~").startswith("hydra/launcher=") for o in overrides)
        if flags and local:
            for cfg in configs:
                if not cfg.driver:
                    resolve_device(cfg, local_rank())
                    Simulation(cfg, int(os.environ.get("WORLD_SIZE", "1")), 0)
    except ConfigError as err:
        fail(str(err))


def check_hydra_dirs(argv: list[str]) -> None:
    """hydra.run.dir / hydra.sweep.dir given literally: Hydra makes them before the job
    starts, so one that cannot be made (/proc/x) would end in its traceback; say it here."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                rundir.probe(rundir.Target(Path(value), False, key), overwrite=True,
                             resume=True)
            except ConfigError as err:
                fail(str(err))


def main() -> None:
    """`python -m dicesim [overrides]`: check the command line, then Hydra's main runs it
    (build, train, write, draw: all in this process)."""
    import hydra

    SIGNALS.install()  # Ctrl-C / SIGTERM: stop at an agreed step, flush, one line (130/143)
    argv = sys.argv[1:]
    check_group_choices(argv)
    check_composes(argv)
    check_hydra_dirs(argv)
    hydra.main(config_path=str(CONFIG_DIR), config_name="config",
               version_base="1.3")(_hydra_job)()
    record_status(0, "")  # under dicesim.launch: this rank finished
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the process group destroyed. Gloo's worker threads can
        # still abort the interpreter's finalization (SIGABRT, "terminate called without an
        # active exception"), so a rank of a distributed run leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
