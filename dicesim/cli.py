"""`python -m dicesim [overrides]` and `torchrun … -m dicesim [overrides]`."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dicesim import rundir
from dicesim.checkpoint import (
    Checkpoints,
    as_written,
    difference,
    find_resume,
    first_difference,
    result_settings,
)
from dicesim.comm import Comm, PeerError
from dicesim.config import (
    CONFIG_DIR,
    Config,
    as_dict,
    check_group_choice,
    compose_checked,
    load_noting,
    sweep_points,
)
from dicesim.config import GROUPS as GROUPS  # re-exported: the config groups users type
from dicesim.engine import Simulation, configure_device, local_rank, resolve_device
from dicesim.errors import ConfigError
from dicesim.events import ESTIMATORS
from dicesim.provenance import headline
from dicesim.stopping import (
    EXIT_PEER,
    SIGNAL_CODES,
    SIGNALS,
    Guard,
    Interrupted,
    Stopped,
    exit_with,
    on_signal,
    record_pid,
    record_status,
)
from dicesim.trainer import RunResult

# flags after which the command line is still a list of overrides to check (a sweep)
SWEEP_FLAGS = ("-m", "--multirun")


def fail(message: str, code: int = 2) -> None:
    """One line and exit `code`; in a multi-rank run only rank 0 prints it."""
    exit_with(message, code)


def check_group_choices(argv: list[str]) -> None:
    """Unknown group options (`topology=foo`) fail with the valid choices, exit 2."""
    for arg in argv:
        try:
            check_group_choice(arg)
        except ConfigError as err:
            fail(str(err))


def run_target(cfg: Config) -> rundir.Target:
    """Where this run writes (precedence in dicesim/rundir.py): out_dir, else Hydra's
    hydra.run.dir / sweep job directory when given, else the unique default name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return rundir.choose(str(cfg.out_dir), list(hc.overrides.task), list(hc.overrides.hydra),
                         hydra_run_dir=None if multirun else hc.runtime.output_dir,
                         job_dir=hc.runtime.output_dir if multirun else None,
                         job_num=hc.job.num if multirun else None)


def guard_for(cfg: Config, world: int, rank: int) -> Guard:
    """The divergence rule of one run: abort_on_nonfinite, divergence_factor (null: off)."""
    return Guard(world, rank, abort_on_nonfinite=cfg.abort_on_nonfinite,
                 divergence_factor=cfg.divergence_factor)


@dataclass
class Session:
    """This process's part of one command: rank, device, process group, run directory.
    Experiment drivers use it to run several simulations over the same ranks."""

    cfg: Config
    world: int
    rank: int
    device: torch.device
    backend: str
    out: Path | None = None  # rank 0 only
    comm: Comm | None = None

    def say(self, *args: object) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def ready_to_train(self, driver: str, runs: str = "run") -> bool:
        """For an experiment driver once every run is built: on a dry run say so and return
        False; otherwise claim the run directory (unless a caller already set one)."""
        if self.cfg.dry_run:
            self.say(f"{driver}: dry run — every {runs} is valid, nothing trained")
            return False
        if self.out is None:
            prepare_output(self)
        return True

    def build(self, cfg: Config) -> Simulation:
        """A validated simulation; a bad setting ends the command with exit 2."""
        try:
            sim = Simulation(cfg, self.world, self.rank)
            guard_for(cfg, self.world, self.rank)
            return sim
        except ConfigError as err:
            fail(str(err))
            raise  # unreachable: fail exits

    def simulate(self, sim: Simulation, on_flush=None, checkpoints=None) -> RunResult:
        """Run one simulation. A peer failure ends this rank (exit 3, one line); a signal
        or a diverged loss raises Stopped on every rank at the same step."""
        try:
            if self.comm is None:
                self.comm = Comm(self.backend, sim.run.timeout_s, self.device)
            if self.cfg.driver:  # an experiment's next run: every rank starts it
                SIGNALS.check_together("experiment")
            self.comm.guard = guard_for(sim.cfg, self.world, self.rank)
            return sim.execute(self.comm, log=self.say, checkpoints=checkpoints,
                               on_flush=on_flush)
        except PeerError as err:
            peer_failed(err)
            raise  # unreachable

    def close(self) -> None:
        if self.comm is not None:
            try:
                self.comm.close()
            except PeerError as err:
                peer_failed(err)


def peer_failed(err: PeerError) -> None:
    """Exit 3 with the rank's own line: each rank saw the failure from its side."""
    exit_with(str(err), EXIT_PEER, everyone=True)


def stopped(session: Session, stop: Stopped, sim: Simulation | None) -> None:
    """A signal or a diverged loss stopped every rank at the same step: rank 0 writes what
    is finished, then all leave together (the others wait in the closing barrier, so plain
    torchrun, which ends the remaining ranks once one has exited non-zero, cannot cut the
    writing short), run the signal hooks, exit with one line. A signal answered after the
    step loop (stop.phase) was answered at an agreed check point: on every rank too."""
    if stop.reason == "signal":
        SIGNALS.answered = True  # writing the finished rows below is not interrupted again
    if session.rank == 0 and session.out is not None and sim is not None:
        from dicesim.report import LOSS_METRIC, write_all

        status = {"status": "interrupted" if stop.reason == "signal" else "diverged",
                  "stopped_at": stop.step,
                  "node_steps_per_s": sim.run.nodes * stop.step / max(stop.result.wall_s, 1e-9)}
        if stop.reason == "diverged":
            f = stop.detail
            status["first_nonfinite"] = {"step": f.step, "node": f.node,
                                         "metric": LOSS_METRIC[f.what], "value": f.value}
        write_all(session.out, sim, stop.result, plots=False, status=status)
    session.close()
    if stop.reason == "signal":
        for hook in on_signal:
            hook(stop.detail, stop.step)
    if session.comm is not None:
        session.comm.let_rank0_leave_first()
    exit_with(stop.message(session.out), stop.code,
              prefix="" if stop.reason == "signal" else "error: ")


def open_session(cfg: Config) -> Session:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device, backend = resolve_device(cfg, local_rank())
    except ConfigError as err:
        exit_with(str(err), 2, everyone=True)  # may differ per rank (its own GPU): all print
    configure_device(device, cfg.allow_tf32)
    return Session(cfg, world, rank, device, backend)


def prepare_output(session: Session, resume: bool = False,
                   plan: RunDirPlan | None = None) -> None:
    """Rank 0 claims the run directory (dicesim/rundir.py) and writes config.yaml; a
    directory that cannot be used ends the run with one line, exit 2. `plan` (from
    plan_checkpoints) names a directory to re-enter or to start this run afresh in."""
    if session.rank == 0:
        cfg = session.cfg
        overwrite = cfg.overwrite or (plan is not None and plan.replace)
        resume = resume or (plan is not None and plan.reenter)
        try:
            target = run_target(cfg) if plan is None or plan.folder is None else rundir.Target(
                plan.folder, unique=False, source="resume")
            session.out = rundir.claim(target, overwrite, resume=resume)
            resolved = as_dict(cfg)
            resolved["out_dir"] = str(session.out)
            rundir.write_config(session.out, OmegaConf.to_yaml(resolved), resume=resume)
        except ConfigError as err:
            fail(str(err))
        session.say(f"dicesim: writing to {session.out}")


@dataclass
class RunDirPlan:
    folder: Path | None = None  # the directory resume names (None: the usual choice)
    reenter: bool = False  # continue from its checkpoint: keep what is there
    replace: bool = False  # resume=auto without a checkpoint: this run's own first attempt


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


def check_same_run(folder: Path, cfg: Config) -> bool:
    """resume=auto found no checkpoint: the directory may hold this run's own first attempt
    (killed before its first checkpoint), whose outputs it replaces (True); outputs of a
    run with other settings are refused."""
    written = folder / "config.yaml"
    if not written.is_file():
        return False
    before, now = result_settings(OmegaConf.load(written)), result_settings(cfg)
    key = first_difference(as_written(before), now)
    if key is not None:
        raise ConfigError(f"resume=auto: {folder} holds a run with other settings "
                          f"({difference(key, before, now)}) and no checkpoint; "
                          "choose another out_dir, or overwrite=true")
    return True


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
        from dicesim.report import write_influence

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
    from dicesim.report import write_all

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
