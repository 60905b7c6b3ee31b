"""The config of a plain run composed by a forked worker (dicesim/composeworker.py) is the
one the run would compose itself; any failure of the worker falls back to that."""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from dicesim import composeworker
from dicesim.composeworker import RunInfo, compose_plain, start_early, take_early
from dicesim.errors import ConfigError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork: Linux")

ARGV = ["nodes=6", "steps=4", "topology=exponential", "optim=momentum", "hydra.run.dir=somewhere",
        "out_dir=elsewhere/run"]


def _same(a, b) -> None:
    (cfg_a, info_a), (cfg_b, info_b) = a, b
    assert OmegaConf.to_container(cfg_a) == OmegaConf.to_container(cfg_b)  # unresolved
    assert OmegaConf.get_type(cfg_a) is OmegaConf.get_type(cfg_b)
    assert OmegaConf.is_readonly(cfg_a) == OmegaConf.is_readonly(cfg_b)
    assert OmegaConf.is_struct(cfg_a) == OmegaConf.is_struct(cfg_b)
    assert info_a == info_b


def test_worker_composes_what_this_process_would(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    start_early(ARGV)
    early = take_early(ARGV)
    assert early is not None
    here = compose_plain(ARGV)
    _same(early, here)
    info = here[1]
    assert isinstance(info, RunInfo) and info.output_dir.endswith("/somewhere")
    assert info.task_overrides == [a for a in ARGV if not a.startswith("hydra.")]
    assert info.hydra_overrides == ["hydra.run.dir=somewhere"]
    assert take_early(ARGV) is None  # taken once


@pytest.mark.parametrize("bad", ["topology=rign", "stepz=3", "steps=-1", "lr=[1"])
def test_worker_sends_the_one_line_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as here:
        compose_plain(["nodes=4", bad])
    start_early(["nodes=4", bad])
    with pytest.raises(ConfigError) as early:
        take_early(["nodes=4", bad])
    assert str(early.value) == str(here.value)


def test_no_worker_for_flags_ranks_or_another_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    start_early(["-m", "nodes=4,8"])  # a sweep: Hydra's main composes
    assert composeworker._EARLY is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a multi-process run
    start_early(["nodes=4"])
    assert composeworker._EARLY is None
    monkeypatch.delenv("WORLD_SIZE")
    start_early(["nodes=4"])
    assert take_early(["nodes=5"]) is None  # composed for another command line: unused
    assert composeworker._EARLY is None


def test_a_failing_worker_leaves_composing_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def broken(argv):
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(composeworker, "compose_plain", broken)  # the fork inherits it
    start_early(["nodes=4"])
    assert take_early(["nodes=4"]) is None


def test_the_worker_never_imports_torch() -> None:
    """Composing (Hydra, the schema, every check, the experiments' blocks) imports nothing
    that imports torch, so the worker is done long before the run's own import of torch."""
    import subprocess

    from conftest import REPO

    code = ("import sys\n"
            "from dicesim.composeworker import compose_plain\n"
            "for argv in ([], ['optim=adam', 'topology=small_world'], ['experiment=cleansing'],\n"
            "             ['experiment=alignment'], ['experiment=attribution']):\n"
            "    compose_plain(argv)\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'sklearn') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
