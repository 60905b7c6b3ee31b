"""`python -m dicesim [overrides]` and `torchrun … -m dicesim [overrides]`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dicesim.comm import Comm, PeerError
from dicesim.engine import Simulation, local_rank, resolve_device
from dicesim.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("topology", "data", "model", "optim", "influence", "attack", "experiment")


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


def execute(cfg: DictConfig) -> dict | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        sim = Simulation(cfg, world, rank)
        device, backend = resolve_device(cfg, local_rank())
    except ConfigError as err:
        fail(str(err))
    say = print if rank == 0 else (lambda *a, **k: None)
    plan = sim.describe()
    say("dicesim: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in plan.items()) + f", backend={backend}")
    if cfg.get("dry_run", False):
        say("dicesim: dry run — configuration is valid, nothing trained")
        return None
    out = None
    if rank == 0:
        out = run_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        say(f"dicesim: writing to {out}")
    comm = Comm(backend, sim.run.timeout_s, device)
    try:
        result = sim.execute(comm, log=say)
    except PeerError as err:
        fail(str(err), code=3)
    finally:
        comm.close()
    if rank != 0:
        return None
    from dicesim.report import write_all

    summary = write_all(out, sim, result, plots=bool(cfg.get("plots", True)))
    f = summary["final"]
    say(f"dicesim: done in {summary['wall_s']:.1f} s ({summary['node_steps_per_s']:.0f} "
        f"node-steps/s); test accuracy {f['test_acc']}; report: {out / 'report.md'}")
    for view, block in summary.get("alignment", {}).items():
        say(f"  {view:>8}: n={block['n']} spearman={block['spearman']} "
            f"pearson={block['pearson']} rel_err={block['rel_err']}")
    return summary


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    execute(cfg)


def main() -> None:
    check_group_choices(sys.argv[1:])
    _hydra_main()
