"""A plain run's config composed by a forked worker while `python -m dicesim` imports torch.

Composing with Hydra (importing Hydra, reading the config groups, validating) takes about
0.4 s and needs nothing from torch. `python -m dicesim` forks this worker first thing
(`start_early`), so on a machine with a second core the config is ready when torch is;
the run takes it with `take_early`. The worker sends back the typed config, the run's
Hydra facts (`RunInfo`) or the one-line ConfigError, pickled. When there is no worker
(a command line with Hydra flags, a rank of a multi-process run, no fork on this
platform) or it fails, the run composes in its own process, as before. This module and
the worker import nothing that imports torch.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from dicesim.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass(frozen=True)
class RunInfo:
    """What a plain run needs of Hydra's own config: its overrides and run directory."""

    task_overrides: list[str]  # hydra.overrides.task: the command line's overrides
    hydra_overrides: list[str]  # hydra.overrides.hydra: those of hydra.* keys
    output_dir: str  # hydra.run.dir, absolute


def compose_plain(argv: list[str]) -> tuple[DictConfig, RunInfo]:
    """The typed config of a command line without Hydra flags, and its RunInfo; a bad
    override or value raises ConfigError (one line)."""
    from dicesim.config import compose_run

    cfg, node = compose_run(argv)
    return cfg, RunInfo(list(node.overrides.task), list(node.overrides.hydra),
                        os.path.abspath(node.run.dir))


def install_resolvers() -> None:
    """The resolvers Hydra registers for a job that a config resolved after composing may
    use (`now`, `python_version`), registered here without importing Hydra. (`${hydra:…}`
    cannot appear in a dicesim config: validation resolves it while composing, before
    Hydra would set HydraConfig.)"""
    from omegaconf import OmegaConf

    version = sys.version_info
    versions = {"major": f"{version[0]}", "minor": f"{version[0]}.{version[1]}",
                "micro": f"{version[0]}.{version[1]}.{version[2]}"}
    OmegaConf.register_new_resolver(
        "now", lambda pattern: datetime.now().strftime(pattern), use_cache=True, replace=True)
    OmegaConf.register_new_resolver(
        "python_version", lambda level="minor": versions.get(level), replace=True)


_EARLY: tuple[int, int, list[str]] | None = None  # (pid, read end, argv) of the worker


def plain(argv: list[str]) -> bool:
    """A plain command line: overrides only, no Hydra flag (sweeps, --cfg, --help, …);
    `python -m dicesim` runs it with `cli.run_single`, the rest with Hydra's main."""
    return not any(a.startswith("-") for a in argv)


def single_plain(argv: list[str]) -> bool:
    """A plain command line run by one process (not a rank of a multi-process run): the
    runs the workers `python -m dicesim` forks at its start are for."""
    return plain(argv) and os.environ.get("WORLD_SIZE", "1") == "1"


def start_early(argv: list[str]) -> None:
    """Fork the worker for a plain single-process command line, on Linux; otherwise do
    nothing."""
    global _EARLY
    if not single_plain(argv) or not sys.platform.startswith("linux"):
        return
    read, write = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return
    if pid == 0:
        os.close(read)
        _serve(list(argv), write)
    os.close(write)
    _EARLY = (pid, read, list(argv))


def take_early(argv: list[str]) -> tuple[DictConfig, RunInfo] | None:
    """The worker's config for this command line, or None (no worker, another command
    line, or the worker failed: compose here). Raises the worker's ConfigError."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is None:
        return None
    pid, read, composed_for = early
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    status = os.waitpid(pid, 0)[1]
    if composed_for != list(argv) or os.waitstatus_to_exitcode(status) != 0 or not payload:
        return None
    try:
        kind, value = pickle.loads(payload)
    except Exception:  # a truncated or unreadable reply: compose here instead
        return None
    if kind == "error":
        raise ConfigError(value)
    return value


def _serve(argv: list[str], write: int) -> None:
    code = 1
    try:
        # Ctrl-C reaches the whole process group: the run reports it; the worker just ends
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            reply: tuple[str, object] = ("config", compose_plain(argv))
        except ConfigError as err:
            reply = ("error", str(err))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(pickle.dumps(reply, pickle.HIGHEST_PROTOCOL))
        code = 0
    finally:
        os._exit(code)
