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

from dicesim.checkpoint import Checkpoints, find_resume
from dicesim.comm import Comm, PeerError
from dicesim.engine import Simulation, local_rank, resolve_device
from dicesim.errors import ConfigError
from dicesim.events import ESTIMATORS
from dicesim.trainer import RunResult

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("topology", "data", "model", "optim", "influence", "attack", "defense", "experiment")


def fail(message: str, code: int = 2) -> None:
    print(f"dicesim: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_group_choices(argv: list[str]) -> None:
    """Unknown group options (`topology=foo`) fail with the valid choices, exit 2."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or "," in value:
            continue
        if not (CONFIG_DIR / key / f"{value}.yaml").is_file():
            choices = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
            fail(f"{key}={value}: unknown {key}; choose one of {', '.join(choices)}")


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

    def simulate(self, sim: Simulation, on_flush=None, checkpoints=None) -> RunResult:
        if self.comm is None:
            self.comm = Comm(self.backend, sim.run.timeout_s, self.device)
        try:
            return sim.execute(self.comm, log=self.say, checkpoints=checkpoints,
                               on_flush=on_flush)
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


def prepare_output(session: Session, folder: Path | None = None) -> None:
    if session.rank == 0:
        session.out = folder if folder is not None else run_dir(session.cfg)
        session.out.mkdir(parents=True, exist_ok=True)
        (session.out / "config.yaml").write_text(OmegaConf.to_yaml(session.cfg, resolve=True))
        session.say(f"dicesim: writing to {session.out}")


def plan_checkpoints(session: Session, sim: Simulation) -> tuple[Checkpoints | None,
                                                                 Path | None]:
    """(what saves and loads checkpoints, the run directory when resuming): `resume=DIR`
    continues DIR's newest checkpoint in DIR; `resume=auto` continues the run directory's
    own if it has one and starts fresh otherwise."""
    cfg = session.cfg
    ck = cfg.get("checkpoint") or {}
    every, keep, resume = ck.get("every", 0), ck.get("keep", 2), cfg.get("resume")
    for key, value, least in (("checkpoint.every", every, 0), ("checkpoint.keep", keep, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            fail(f"{key}={value}: must be an integer >= {least}")
    if resume is not None and not isinstance(resume, str):
        fail(f"resume={resume}: give the run directory to continue, or auto")
    if not every and resume is None:
        return None, None
    folder = Path(cfg.out_dir) if resume in (None, "auto") else Path(resume)
    try:
        source = None if resume is None else find_resume(folder, cfg, session.world,
                                                         explicit=resume != "auto")
    except ConfigError as err:
        fail(str(err))
    if source is not None:
        session.say(f"dicesim: resuming from {source}")
    return Checkpoints(None, every, keep, cfg, session.world, source), folder if source else None


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
    checkpoints, folder = plan_checkpoints(session, sim)
    prepare_output(session, folder)
    if checkpoints is not None:
        checkpoints.folder = session.out
    on_flush = None
    if session.rank == 0 and sim.tracking:
        from dicesim.report import write_influence

        # finished events reach disk as they are gathered: a crash keeps them
        on_flush = lambda partial: write_influence(session.out, partial)  # noqa: E731
    try:
        result = session.simulate(sim, on_flush=on_flush, checkpoints=checkpoints)
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
    for name, blocks in summary.get("alignment", {}).items():
        if name not in ESTIMATORS:
            continue
        for view, block in blocks.items():
            session.say(f"  {name:>8} {view:>8}: n={block['n']} spearman={block['spearman']} "
                        f"pearson={block['pearson']} rel_err={block['rel_err']}")
    warning = (summary.get("reliability") or {}).get("warning")
    if warning:
        print(f"dicesim: warning: {warning}", file=sys.stderr, flush=True)
    return summary


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    execute(cfg)


def check_composes(argv: list[str]) -> None:
    """Compose the config once up front so a typo or bad syntax is one line, exit 2.
    Command lines with Hydra's own flags (-m, --cfg, …) go straight to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=argv)
    except Exception as err:  # Hydra's override and composition errors
        fail(" ".join(str(err).split()))
    driver = cfg.get("driver")
    if driver and importlib.util.find_spec(f"dicesim.experiments.{driver}") is None:
        fail(f"driver={driver}: no such experiment driver in dicesim/experiments")


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
