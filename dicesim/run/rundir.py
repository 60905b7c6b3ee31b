"""Run directories: each run writes into a directory that holds no other run's outputs.

Where a run writes (precedence, highest first):

1. ``out_dir=DIR`` given on the command line: exactly DIR (multirun: DIR/<job number>).
2. ``hydra.run.dir=DIR`` given on the command line (multirun: ``hydra.sweep.dir`` and
   ``hydra.sweep.subdir``, i.e. Hydra's own job directory): exactly that directory.
   Giving both 1 and 2 with different values is refused.
3. Otherwise the default ``out_dir`` of configs/config.yaml,
   ``outputs/${name}/${now:%Y-%m-%d_%H-%M-%S}``, made unique: it is created with an
   atomic ``mkdir``; when another run already took the name, ``-1``, ``-2``, … is added.

An explicitly named directory that already holds a run's outputs is refused unless
``overwrite=true``, which first removes those outputs (and only those: see
:data:`OUTPUT_FILES`). :func:`refuse_existing_outputs` takes a ``resume`` flag so that a
run that re-enters its own directory on purpose can bypass the check.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicesim.common.errors import ConfigError

#: Files a run (or an experiment driver) writes; overwrite=true removes exactly these.
OUTPUT_FILES = ("config.yaml", "metrics.csv", "influence.csv", "proximal.csv", "summary.json",
                "report.md", "params.pt", "alignment.csv", "scores.csv", "cascade.csv",
                "nodes.csv", "edges.csv", "partition.csv", "attribution.csv", "samples.csv",
                "retrain.csv", "removal.csv")
OUTPUT_GLOBS = ("*.png",)
OUTPUT_DIRS = ("checkpoints", "cases")
DEFAULT_OUT_DIR = "outputs/${name}/${now:%Y-%m-%d_%H-%M-%S}"


class RunDirError(ConfigError):
    """The run directory cannot be used; one line, exit 2."""


@dataclass(frozen=True)
class Target:
    """Where a run writes: ``path``; ``unique`` means a default name that gets a suffix
    on a clash instead of being refused."""

    path: Path
    unique: bool
    source: str  # "out_dir", "hydra.run.dir", "hydra.sweep.dir" or "default"


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the command line gives `key` (``out_dir=…``, ``++out_dir=…``), if any."""
    found = None
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.lstrip("+~") == key:
            found = value
    return found


def choose(out_dir: str, overrides: Sequence[str], hydra_overrides: Sequence[str],
           hydra_run_dir: str | None, job_dir: str | None = None,
           job_num: int | None = None) -> Target:
    """Pick the run directory (module docstring). `out_dir` is the config's resolved value,
    `overrides`/`hydra_overrides` the command line's task and hydra.* overrides,
    `hydra_run_dir` the resolved hydra.run.dir, `job_dir` Hydra's job directory in a
    multirun (None in a single run) and `job_num` its job number."""
    explicit = _override_value(overrides, "out_dir") is not None
    if job_dir is not None:  # a multirun job
        if explicit:
            return Target(Path(out_dir) / str(job_num), False, "out_dir")
        return Target(Path(job_dir), False, "hydra.sweep.dir")
    hydra_explicit = _override_value(hydra_overrides, "hydra.run.dir") is not None
    if explicit and hydra_explicit and Path(out_dir).resolve() != Path(
            str(hydra_run_dir)).resolve():
        raise RunDirError(
            f"out_dir={out_dir} and hydra.run.dir={hydra_run_dir} name different directories; "
            "give one of them (out_dir is an alias of hydra.run.dir)")
    if explicit:
        return Target(Path(out_dir), False, "out_dir")
    if hydra_explicit:
        return Target(Path(str(hydra_run_dir)), False, "hydra.run.dir")
    return Target(Path(out_dir), True, "default")


def outputs_in(path: Path) -> list[Path]:
    """The run outputs present in `path` (nothing else is ever counted or removed)."""
    if not path.is_dir():
        return []
    found = [path / n for n in OUTPUT_FILES if (path / n).exists()]
    found += [p for g in OUTPUT_GLOBS for p in sorted(path.glob(g)) if p.is_file()]
    found += [path / d for d in OUTPUT_DIRS if (path / d).is_dir()]
    found += [p for n in OUTPUT_FILES for p in path.glob(f".{n}.*.tmp")]  # our temp files
    return found


def refuse_existing_outputs(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse (RunDirError) a directory holding another run's outputs; with `overwrite`,
    remove those outputs instead. `resume=True` re-enters a run on purpose: no check."""
    if resume:
        return
    found = outputs_in(path)
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", …" if len(found) > 4 else "")
        raise RunDirError(
            f"out_dir={path} already holds another run's outputs ({names}); choose a new "
            "out_dir, or pass overwrite=true to replace them")
    for p in found:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise RunDirError(f"overwrite=true: cannot remove {p}: {err.strerror}") from err


def _mkdirs(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"{what}={path}: cannot create the directory ({err.strerror}); "
                          "choose a writable out_dir") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"{what}={path}: the directory is not writable; "
                          "choose a writable out_dir")


def create_unique(base: Path, limit: int = 1000) -> Path:
    """Create `base`, else `base-1`, `base-2`, … atomically (mkdir without exist_ok)."""
    _mkdirs(base.parent, "out_dir")
    for i in range(limit):
        candidate = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            raise RunDirError(f"out_dir={candidate}: cannot create the directory "
                              f"({err.strerror}); choose a writable out_dir") from err
    raise RunDirError(f"out_dir={base}: {limit} runs with this name already; "
                      "set name=… or out_dir=…")


def claim(target: Target, overwrite: bool, resume: bool = False) -> Path:
    """Create (or check) the run directory and return it. Only rank 0 calls this."""
    if target.unique and not resume:
        return create_unique(target.path)
    _mkdirs(target.path, target.source if target.source != "default" else "out_dir")
    refuse_existing_outputs(target.path, overwrite, resume)
    return target.path


def write_config(path: Path, text: str, resume: bool = False) -> None:
    """Write config.yaml as the run's claim on `path`: created exclusively, so that a second
    run that checked the directory at the same moment is refused instead of mixed in."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if resume else os.O_EXCL)
    try:
        fd = os.open(path / "config.yaml", flags, 0o644)
    except FileExistsError as err:
        raise RunDirError(f"out_dir={path}: another run started writing here just now; "
                          "choose a new out_dir") from err
    except OSError as err:
        raise RunDirError(f"out_dir={path}: cannot write config.yaml ({err.strerror})") from err
    with os.fdopen(fd, "w") as f:
        f.write(text)


def probe(target: Target, overwrite: bool, resume: bool = False) -> None:
    """Check, without leaving anything behind, that `claim` would succeed (the launcher's
    pre-flight check): the refusal rule, and a real mkdir where the run would write (removed
    again; os.access says little when running as root)."""
    path = target.path
    what = target.source if target.source != "default" else "out_dir"
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what}={path}: exists and is not a directory")
    if path.exists() and not target.unique and not overwrite and not resume:
        refuse_existing_outputs(path, False)
    if path.exists():  # a directory made here, or a sibling for a suffixed default name
        test = (path.with_name(f".{path.name}.probe-{os.getpid()}") if target.unique
                else path / f".probe-{os.getpid()}")
    else:
        test = path
    missing = [test]
    while not missing[-1].parent.exists() and missing[-1].parent != missing[-1]:
        missing.append(missing[-1].parent)
    try:
        try:
            test.mkdir(parents=True)
        except OSError as err:
            raise RunDirError(f"{what}={path}: cannot create the directory ({err.strerror}); "
                              "choose a writable out_dir") from err
    finally:
        for p in missing:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
