"""`python -m dicesim [overrides]` and `torchrun … -m dicesim [overrides]`."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dicesim.comm import Comm, PeerError
from dicesim.config import CONFIG_DIR, check_group_choice, compose_checked, load, sweep_points
from dicesim.config import GROUPS as GROUPS  # re-exported: the config groups users type
from dicesim.engine import RunResult, Simulation, local_rank, resolve_device
from dicesim.errors import ConfigError

# flags after which the command line is still a list of overrides to check (a sweep)
SWEEP_FLAGS = ("-m", "--multirun")


def fail(message: str, code: int = 2) -> None:
    print(f"dicesim: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_group_choices(argv: list[str]) -> None:
    """Unknown group options (`topology=foo`) fail with the valid choices, exit 2."""
    for arg in argv:
        try:
            check_group_choice(arg)
        except ConfigError as err:
            fail(str(err))


def run_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.runtime.output_dir)
    return Path(cfg.out_dir)


@dataclass
class Session:
    """This process's part of one command: rank, device, process group, run directory.
    Experiment drivers use it to run several simulations over the same ranks."""

    cfg: DictConfig
    world: int
    rank: int
    device: torch.device
    backend: str
    out: Path | None = None  # rank 0 only
    comm: Comm | None = None

    def say(self, *args: object) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def build(self, cfg: DictConfig) -> Simulation:
        """A validated simulation; a bad setting ends the command with exit 2."""
        try:
            return Simulation(cfg, self.world, self.rank)
        except ConfigError as err:
            fail(str(err))
            raise  # unreachable: fail exits

    def simulate(self, sim: Simulation) -> RunResult:
        if self.comm is None:
            self.comm = Comm(self.backend, sim.run.timeout_s, self.device)
        try:
            return sim.execute(self.comm, log=self.say)
        except PeerError as err:
            fail(str(err), code=3)
            raise

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()


def open_session(cfg: DictConfig) -> Session:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device, backend = resolve_device(cfg, local_rank())
    except ConfigError as err:
        fail(str(err))
    return Session(cfg, world, rank, device, backend)


def prepare_output(session: Session) -> None:
    if session.rank == 0:
        session.out = run_dir(session.cfg)
        session.out.mkdir(parents=True, exist_ok=True)
        (session.out / "config.yaml").write_text(OmegaConf.to_yaml(session.cfg, resolve=True))
        session.say(f"dicesim: writing to {session.out}")


def execute(cfg: DictConfig) -> dict | None:
    session = open_session(cfg)
    driver = cfg.get("driver")
    if driver:
        module = importlib.import_module(f"dicesim.experiments.{driver}")
        try:
            return module.run(session)
        finally:
            session.close()
    sim = session.build(cfg)
    plan = sim.describe()
    session.say("dicesim: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in plan.items()) + f", backend={session.backend}")
    if cfg.get("dry_run", False):
        session.say("dicesim: dry run — configuration is valid, nothing trained")
        return None
    prepare_output(session)
    if session.rank == 0 and sim.tracking:
        from dicesim.report import write_influence

        # finished events reach disk as they are gathered: a crash keeps them
        sim.on_flush = lambda partial: write_influence(session.out, partial)
    try:
        result = session.simulate(sim)
    finally:
        session.close()
    if session.rank != 0:
        return None
    from dicesim.report import write_all

    out = session.out
    summary = write_all(out, sim, result, plots=bool(cfg.get("plots", True)))
    f = summary["final"]
    session.say(f"dicesim: done in {summary['wall_s']:.1f} s ({summary['node_steps_per_s']:.0f} "
                f"node-steps/s); test accuracy {f['test_acc']:.4f}; report: {out / 'report.md'}")
    for view, block in summary.get("alignment", {}).items():
        session.say(f"  {view:>8}: n={block['n']} spearman={block['spearman']} "
                    f"pearson={block['pearson']} rel_err={block['rel_err']}")
    return summary


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:  # the one validation boundary: typed schema, strict booleans, ranges
        typed = load(cfg)
    except ConfigError as err:
        fail(str(err))
    execute(typed)


def check_composes(argv: list[str]) -> None:
    """Compose and validate the config up front so that a typo, a wrong type or a bad
    value is one line, exit 2, before anything runs. With -m every point of the sweep is
    checked before the first job starts. Command lines with Hydra's other flags (--cfg,
    --help, …) go straight to Hydra."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in SWEEP_FLAGS for f in flags):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    try:
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


def main() -> None:
    check_group_choices(sys.argv[1:])
    check_composes(sys.argv[1:])
    _hydra_main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the process group destroyed. Gloo's worker threads can
        # still abort the interpreter's finalization (SIGABRT, "terminate called without an
        # active exception"), so a rank of a distributed run leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
