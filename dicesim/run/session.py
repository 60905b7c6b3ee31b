"""One command's processes: rank, device, process group and run directory (:class:`Session`),
and the one-line failures. The command line (dicesim/cli.py) and the experiment runner
(dicesim/experiments/runner.py) both build on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dicesim.comm.exchange import Comm, PeerError
from dicesim.common.errors import ConfigError
from dicesim.common.stopping import EXIT_PEER, SIGNALS, Guard, exit_with
from dicesim.config import Config, as_dict
from dicesim.run import rundir
from dicesim.run.checkpoint import as_written, difference, first_difference, result_settings
from dicesim.run.engine import Simulation, configure_device, local_rank, resolve_device
from dicesim.run.trainer import RunResult


def fail(message: str, code: int = 2) -> None:
    """One line and exit `code`; in a multi-rank run only rank 0 prints it."""
    exit_with(message, code)


def run_target(cfg: Config) -> rundir.Target:
    """Where this run writes (precedence in dicesim/run/rundir.py): out_dir, else Hydra's
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
            self.connect(sim.run.timeout_s)
            if self.cfg.driver:  # an experiment's next run: every rank starts it
                SIGNALS.check_together("experiment")
            self.comm.guard = guard_for(sim.cfg, self.world, self.rank)
            return sim.execute(self.comm, log=self.say, checkpoints=checkpoints,
                               on_flush=on_flush)
        except PeerError as err:
            peer_failed(err)
            raise  # unreachable

    def connect(self, timeout_s: float | None = None) -> Comm:
        """The process group, formed on first use (`timeout_s`: the command's own)."""
        if self.comm is None:
            limit = self.cfg.timeout_s if timeout_s is None else timeout_s
            self.comm = Comm(self.backend, limit, self.device)
        return self.comm

    def share(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (what the other ranks pass is ignored)."""
        if self.world == 1:
            return obj
        try:
            return self.connect().broadcast_from_root(obj)
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
    """Rank 0 claims the run directory (dicesim/run/rundir.py) and writes config.yaml; a
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


