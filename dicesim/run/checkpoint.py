"""Exact checkpoint and resume.

`checkpoint.every=K` saves the state of every part after each K-th step: θ, the local
optimizer's state, the aggregator's state, the event book and every tracker's rows in
flight, and (rank 0) the rows already gathered. Batches and W^t are pure functions of
(seed, node, step), so nothing else is needed to continue bit for bit.

Layout, inside the run directory (only rank 0 writes; each rank's state is gathered):

    checkpoints/step_000040/meta.json     step, ranks, the settings that shape results
    checkpoints/step_000040/rank0.pt …    one file per rank (torch.save of plain tensors)

A checkpoint is written into `step_…tmp-<pid>`, each file fsynced, and the directory
renamed into place last, so a kill during a write leaves the previous one usable.
`resume=DIR` (or `resume=auto`: the run directory's own, if any) continues from the
newest complete checkpoint; `checkpoint.keep` bounds how many stay on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from dicesim.common.errors import ConfigError
from dicesim.common.faults import inject
from dicesim.common.stopping import SIGNALS, Interrupted
from dicesim.config import RENAMED_ESTIMATORS, as_dict

# keys that do not change any number the run writes (where, how verbose, how checkpointed)
NOT_RESULTS = {"name", "out_dir", "progress", "plots", "dry_run", "timeout_s", "checkpoint",
               "resume", "overwrite", "save_params", "device", "backend", "hydra",
               "abort_on_nonfinite", "divergence_factor", "influence.flush_every"}
PREFIX = "step_"
HOST_STATE = {"train_loss"}  # kept on the host wherever it is (the divergence rule's)
#: settings added after runs were already written, with the value that such a run ran with:
#: a config.yaml or a checkpoint without the key counts as that value
BEFORE_IT_EXISTED: dict[str, object] = {
    "eval.budget": None,  # every node on everything
    "allow_tf32": False,  # no run had used CUDA
}


def result_settings(cfg: Mapping) -> dict[str, object]:
    """The config flattened to dotted keys, less those that cannot change results."""
    plain = as_dict(cfg)
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if prefix.rstrip(".") in NOT_RESULTS:
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(plain, "")
    names = out.get("influence.estimators")
    if isinstance(names, list):  # a run written under an estimator's old name resumes
        out["influence.estimators"] = [RENAMED_ESTIMATORS.get(n, n) if isinstance(n, str)
                                       else n for n in names]
    return out


def as_written(before: Mapping) -> dict[str, object]:
    """result_settings read back from a run directory or a checkpoint (BEFORE_IT_EXISTED
    fills the keys that it predates)."""
    return {**BEFORE_IT_EXISTED, **before}


def _shown(value: object) -> str:
    return "null" if value is None else repr(value)


def difference(key: str, written: Mapping, now: Mapping) -> str:
    """How `key` differs, for a refusal's line (`written`: as read back, before as_written)."""
    if key in BEFORE_IT_EXISTED and key not in written:
        then = _shown(BEFORE_IT_EXISTED[key])
        return (f"{key}: absent, written before that setting existed, so it ran as {key}="
                f"{then}; now {key}={_shown(now.get(key))}; resume with {key}={then}")
    return f"{key}={written.get(key)!r}, now {now.get(key)!r}"


def first_difference(before: dict, now: dict) -> str | None:
    """The first key (sorted) whose value differs between two result_settings."""
    return next((k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)),
                None)


def _to_plain(obj: object) -> object:
    """numpy arrays become tensors (torch.load(weights_only=True) takes no numpy objects)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):  # NamedTuple rows become plain tuples
        return (list if isinstance(obj, list) else tuple)(_to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_plain(obj: object) -> object:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_from_plain(v) for v in obj)
    return obj


def on_device(obj: object, device: torch.device) -> object:
    """Every tensor of a loaded state on the rank's device, in one place: θ, the optimizer's
    state, the trackers' rows, Proximal's received updates, the attribution keeper's θ^t
    (numpy arrays, already back from _from_plain, stay on the host; so do HOST_STATE
    values, wherever they sit)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v if k in HOST_STATE else on_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return (list if isinstance(obj, list) else tuple)(on_device(v, device) for v in obj)
    return obj


def _fsync_write(path: Path, write) -> None:
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def complete(folder: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


class Checkpoints:
    """Saving (every K steps, rank 0 writes) and loading (each rank its own file)."""

    def __init__(self, folder: Path | None, every: int, keep: int, cfg: Mapping, world: int,
                 resume_from: Path | None = None):
        self.folder, self.every, self.keep = folder, every, keep
        self.settings = result_settings(cfg)
        self.world = world
        self.resume_from = resume_from

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def attach(self, trainer) -> None:
        trainer.checkpoints = self
        if self.resume_from is not None:
            rank = trainer.comm.rank
            state = torch.load(self.resume_from / f"rank{rank}.pt", weights_only=True,
                               map_location="cpu")
            state = _from_plain(state)
            trainer.load_state_dict(on_device(state, trainer.comm.device))

    def save(self, trainer, step: int) -> None:
        gathered = trainer.comm.gather_to_root(_to_plain(trainer.state_dict()))
        if trainer.comm.rank != 0 or self.folder is None:
            return
        root = self.folder / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{PREFIX}{step:06d}"
        tmp = root / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for rank, state in enumerate(gathered):
                if self.world == 1:  # several ranks: the next agreed step answers a signal
                    SIGNALS.check("checkpoint")
                _fsync_write(tmp / f"rank{rank}.pt", lambda f, s=state: torch.save(s, f))
                inject(0, step, "checkpoint")  # tests: die halfway through
        except Interrupted:  # the previous checkpoint stays the newest complete one
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta = {"step": step, "ranks": self.world, "settings": self.settings}
        _fsync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        if final.exists():  # a rerun of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete(self.folder)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def find_resume(folder: Path, cfg: Mapping, world: int, explicit: bool) -> Path | None:
    """The newest complete checkpoint of `folder`, checked against this run's settings;
    None (start fresh) when `resume=auto` finds none. Raises ConfigError with one line."""
    found = complete(folder)
    if not found:
        if explicit:
            raise ConfigError(f"resume={folder}: no complete checkpoint in {folder}/checkpoints;"
                              " run with checkpoint.every=K first, or resume=auto")
        return None
    latest = found[-1]
    meta = json.loads((latest / "meta.json").read_text())
    if meta["ranks"] != world:
        raise ConfigError(f"resume: the checkpoint {latest} was written by {meta['ranks']} "
                          f"rank(s), this run has {world}; resume with the same number of ranks")
    now = result_settings(cfg)
    key = first_difference(as_written(meta["settings"]), now)
    if key is not None:
        raise ConfigError(f"resume: the checkpoint {latest.name} has other settings "
                          f"({difference(key, meta['settings'], now)}); resume with the "
                          "same settings or start a new run")
    if not all((latest / f"rank{r}.pt").is_file() for r in range(world)):
        raise ConfigError(f"resume: {latest} is missing a rank's file")
    return latest
