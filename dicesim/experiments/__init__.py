"""Experiment drivers: each runs several simulations over the same ranks and writes one
summary.json, report.md and PNGs. Selected by `driver:` in an `experiment=` config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from dicesim.config import CONFIG_DIR, Config, as_dict
from dicesim.config import variant as variant  # re-exported: a checked copy for one run

if TYPE_CHECKING:
    from dicesim.run.engine import Simulation


def group_option(group: str, name: str) -> dict:
    """The values of configs/<group>/<name>.yaml, e.g. group_option("topology", "hub")."""
    values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"))
    values.pop("defaults", None)  # the option's schema: variant picks it by name
    return values


def topology_options(cfg: Config, name: str) -> dict:
    """configs/topology/<name>.yaml, or the run's topology.* (command line included) when the
    run's topology is `name`."""
    if cfg.topology.name == name:
        return as_dict(cfg.topology)
    return group_option("topology", name)


def final_loss(sim: Simulation, metrics: list) -> float:
    """L(θ^T) = Σ_k q_k L'_k(θ_k^T) from a run's metric rows."""
    last = {r.node: r.probe_loss for r in metrics if r.step == sim.run.steps}
    return float(sum(sim.q[k] * last[k] for k in range(sim.run.nodes)))
