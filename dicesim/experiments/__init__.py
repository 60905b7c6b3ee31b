"""Experiment drivers: each runs several simulations over the same ranks and writes one
summary.json, report.md and PNGs. Selected by `driver:` in an `experiment=` config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


def group_option(group: str, name: str) -> dict:
    """The contents of configs/<group>/<name>.yaml, e.g. group_option("topology", "hub")."""
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"))


def variant(cfg: DictConfig, **dotted: Any) -> DictConfig:
    """A copy of cfg for one sub-run. Keys are dotted paths with '__' for '.', e.g.
    variant(cfg, optim__lr=0.1, topology=group_option("topology", "hub"))."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(out, False)
    out.driver = None
    out.progress = False
    for key, value in dotted.items():
        OmegaConf.update(out, key.replace("__", "."), value, merge=False)
    return out
