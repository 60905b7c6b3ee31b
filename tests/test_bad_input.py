"""Bad input (DESIGN §4): every invalid setting stops before training with ONE line
`dicesim: error: <setting>: <what is wrong and how to fix it>` on stderr, exit code 2,
and nothing written.

Three layers, cheapest first:
- unknown config-group names, through the CLI's own check (in-process, no Hydra);
- most settings in-process: resolve_device + the Simulation constructor must raise a
  one-line ConfigError that names the setting (the CLI prints exactly that line);
- a handful of representative commands as real subprocesses (started together, so the
  ~3 s of imports each overlap) for the exit code / one line / nothing-written contract,
  plus torchrun with nodes not divisible over ranks and a valid dry run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from dicesim.cli import GROUPS, check_group_choices
from dicesim.engine import Simulation, resolve_device
from dicesim.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PREFIX = "dicesim: error:"
FAST = ("nodes=4", "steps=5", "progress=false", "plots=false")
HAS_GPU = torch.cuda.is_available()
TIMEOUT = 60


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def write_matrices(folder: Path) -> dict[str, Path]:
    """Bad 4x4 mixing matrices: a negative weight, rows not summing to 1, two islands."""
    folder.mkdir(parents=True, exist_ok=True)
    neg = np.full((4, 4), 0.25)
    neg[0, 0], neg[0, 1] = 0.75, -0.25  # row still sums to 1
    nonstochastic = np.full((4, 4), 0.3)
    disconnected = np.zeros((4, 4))
    disconnected[:2, :2] = disconnected[2:, 2:] = 0.5  # block-diagonal
    paths = {}
    for name, w in (("negative", neg), ("nonstochastic", nonstochastic),
                    ("disconnected", disconnected)):
        paths[name] = folder / f"{name}.npy"
        np.save(paths[name], w)
    paths["missing"] = folder / "missing.npy"
    return paths


def fill(overrides: list[str], matrices: dict[str, Path]) -> list[str]:
    """Put the matrix paths into `{negative}`-style placeholders (events keep their braces)."""
    out = []
    for o in overrides:
        for key, path in matrices.items():
            o = o.replace("{" + key + "}", str(path))
        out.append(o)
    return out


def assert_one_error_line(stderr: str, keyword: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith(PREFIX), line
    assert keyword in line, f"{keyword!r} not named in: {line}"
    return line


# ---------------------------------------------------------------- unknown group names

@pytest.mark.parametrize("group", GROUPS)
def test_unknown_group_name(group, capsys):
    """`topology=foo` etc. fail with the valid choices before Hydra composes anything."""
    with pytest.raises(SystemExit) as exit_info:
        check_group_choices([f"{group}=foo", "nodes=4"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    line = assert_one_error_line(captured.err, f"{group}=foo")
    assert "choose one of" in line
    assert captured.out == ""


# ---------------------------------------------------------------- in-process validation

# (id, overrides, keyword the one-line message must contain, [extra substring])
IN_PROCESS = [
    ("file-negative", ["topology=file", "topology.path={negative}"], "topology.path", "negative"),
    ("file-not-row-stochastic", ["topology=file", "topology.path={nonstochastic}"],
     "topology.path", "row-stochastic"),
    ("file-disconnected", ["topology=file", "topology.path={disconnected}"], "topology.path",
     "connected"),
    ("file-missing", ["topology=file", "topology.path={missing}"], "topology.path",
     "no such file"),
    ("file-path-unset", ["topology=file"], "topology.path", None),
    ("missing-dataset", ["data=fashion_mnist", "data.root=/nonexistent"], "data.root",
     "apt-get"),
    ("steps-0", ["steps=0"], "steps", None),
    ("steps-negative", ["steps=-1"], "steps", None),
    ("nodes-0", ["nodes=0"], "nodes", None),
    ("batch_size-0", ["batch_size=0"], "batch_size", None),
    ("lr-0", ["optim.lr=0"], "optim.lr", None),
    ("dtype-float16", ["dtype=float16"], "dtype", "float32"),
    ("event-node-outside", ["influence.events=[{node:99,step:1}]"], "influence", "node 99"),
    ("event-step-outside", ["influence.events=[{node:0,step:999}]"], "influence", "step 999"),
    ("hops-negative", ["influence.hops=-1"], "influence.hops", None),
    ("hops-too-many", ["influence.hops=9"], "influence.hops", None),
    ("hops-past-last-step", ["influence.hops=4", "influence.events=[{node:0,step:3}]"],
     "influence.hops", "past the last step"),
    ("sample-not-in-batch", ["influence.events=[{node:0,step:1,samples:[999999]}]"],
     "influence", "999999"),
    ("sample-count-0", ["influence.events=[{node:0,step:1,samples:0}]"], "influence",
     "samples=0"),
    ("events-negative", ["influence.events=-1"], "influence.events", None),
    ("attack-node-outside", ["attack=label_flip", "attack.nodes=[99]"], "attack.nodes", "99"),
    ("attack-start-outside", ["attack=label_flip", "attack.start=99"], "attack.start", None),
    ("linear-on-classification", ["model=linear"], "model", "regression"),
    ("cnn-without-images", ["model=cnn"], "model", "data.image=true"),
    ("image-on-flat-data", ["data=synthetic", "data.image=true"], "data.image", None),
    ("dirichlet-alpha-0", ["data.partition=dirichlet", "data.alpha=0"], "data.alpha", None),
    ("node-weights-wrong-length", ["influence.node_weights=[1,2]"], "influence.node_weights",
     None),
    ("dice-without-proximal", ["defense=dice"], "influence.proximal", None),
    ("device-unknown", ["device=tpu"], "device", None),
    ("eval_every-0", ["eval_every=0"], "eval_every", None),
    pytest.param("batch-larger-than-node-data", ["batch_size=5000"], "batch_size", None),
    pytest.param("flush_every-0", ["influence.flush_every=0"], "influence.flush_every", None),
    pytest.param("lr-not-a-number", ["optim.lr=abc"], "optim.lr", None),
    pytest.param("seed-not-a-number", ["seed=abc"], "seed", None),
    pytest.param("timeout-not-a-number", ["timeout_s=abc"], "timeout_s", None),
    pytest.param("steps-bool", ["steps=true", "influence.events=0", "influence.hops=0"],
                 "steps", None),
    pytest.param("event-without-step", ["influence.events=[{node:0}]"], "influence", None),
    pytest.param("events-string", ["influence.events=foo"], "influence.events", None),
    pytest.param("removal-unknown", ["influence.removal=foo"], "influence.removal", None),
    pytest.param("event-samples-string", ["influence.events=[{node:0,step:1,samples:abc}]"],
                 "samples", None),
    pytest.param("step-range-reversed", ["influence.step_range=[4,1]"], "influence.step_range",
                 None),
    pytest.param("counterfactual-node-outside", ["counterfactual.remove=[{node:9,step:1}]"],
                 "counterfactual.remove", None),
    pytest.param("max-train-not-a-number", ["data.max_train=abc"], "data.max_train", None),
    pytest.param("test-size-not-a-number", ["data.test_size=abc"], "data.test_size", None),
]
if not HAS_GPU:
    IN_PROCESS += [("nccl-without-gpu", ["backend=nccl"], "backend=nccl", "gloo"),
                   ("cuda-without-gpu", ["device=cuda"], "device=cuda", "cpu")]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.fixture(scope="module")
def matrices(tmp_path_factory) -> dict[str, Path]:
    return write_matrices(tmp_path_factory.mktemp("W"))


@pytest.mark.parametrize(("case", "overrides", "keyword", "extra"), IN_PROCESS,
                         ids=[_case_id(c) for c in IN_PROCESS])
def test_bad_setting_raises_one_line_config_error(case, overrides, keyword, extra, matrices,
                                                  tmp_path):
    out = tmp_path / "run"
    cfg = compose_config(*FAST, *fill(overrides, matrices), f"out_dir={out}")
    with pytest.raises(ConfigError) as err:
        resolve_device(cfg, 0)
        Simulation(cfg)
    message = str(err.value)
    assert "\n" not in message, message
    assert keyword in message, f"{keyword!r} not named in: {message}"
    if extra is not None:
        assert extra in message, f"{extra!r} not in: {message}"
    assert not out.exists()


# ---------------------------------------------------------------- real commands

SUBPROCESS = {  # id: (overrides, keyword)
    "unknown-topology": (["topology=foo"], "topology"),
    "file-negative": (["topology=file", "topology.path={negative}"], "topology.path"),
    "missing-dataset": (["data=fashion_mnist", "data.root=/nonexistent"], "apt-get"),
    "steps-0": (["steps=0"], "steps"),
    "hops-past-last-step": (["influence.hops=4", "influence.events=[{node:0,step:3}]"],
                            "influence.hops"),
    "unknown-key": (["stpes=5"], "stpes"),
}
if not HAS_GPU:
    SUBPROCESS["nccl-without-gpu"] = (["backend=nccl"], "backend=nccl")


class Commands:
    """Starts every command at once (the imports overlap), waits on each when asked."""

    def __init__(self, root: Path, matrices: dict[str, Path]):
        self.root = root
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        env.pop("RANK", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, tuple[int, str, str]] = {}
        for name, (overrides, _) in SUBPROCESS.items():
            args = fill(overrides, matrices)
            self._start(name, [sys.executable, "-m", "dicesim", *args], env)
        self._start("dry-run", [sys.executable, "-m", "dicesim", "dry_run=true"], env)
        self._start("torchrun-indivisible",
                    [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", "-m", "dicesim", "nodes=3"], env)

    def out(self, name: str) -> Path:
        return self.root / name / "run"

    def _start(self, name: str, cmd: list[str], env: dict) -> None:
        (self.root / name).mkdir(parents=True)
        # FAST first: the case's own overrides (nodes=3, steps=0) come later and win
        cmd = [*cmd[:cmd.index("dicesim") + 1], *FAST, *cmd[cmd.index("dicesim") + 1:],
               f"out_dir={self.out(name)}"]
        self.procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)

    def result(self, name: str) -> tuple[int, str, str]:
        if name not in self.results:
            proc = self.procs[name]
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                pytest.fail(f"{name}: no answer within {TIMEOUT} s")
            self.results[name] = (proc.returncode, stdout, stderr)
        return self.results[name]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def commands(tmp_path_factory, matrices):
    cmds = Commands(tmp_path_factory.mktemp("cmd"), matrices)
    yield cmds
    cmds.close()


SUBPROCESS_PARAMS = [pytest.param(name, id=name) for name in SUBPROCESS]


@pytest.mark.parametrize("name", SUBPROCESS_PARAMS)
def test_command_exits_2_with_one_line_and_writes_nothing(name, commands):
    code, stdout, stderr = commands.result(name)
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit code {code}\n{stderr}"
    assert_one_error_line(stderr, SUBPROCESS[name][1])
    assert not commands.out(name).exists()


TRACEBACK_IN_DICESIM = re.compile(r'File "[^"]*[/\\]dicesim[/\\][^"]*\.py"')


def test_torchrun_nodes_not_divisible_over_ranks(commands):
    """Every rank stops with the same line before any process group exists; torchrun then
    reports the failed children (its own lines and traceback), but nothing from dicesim's
    code raises and nothing is written."""
    code, stdout, stderr = commands.result("torchrun-indivisible")
    assert code != 0
    ours = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    assert ours, stderr
    assert all("nodes=3" in line and "2 ranks" in line for line in ours), ours
    assert not TRACEBACK_IN_DICESIM.search(stderr), stderr
    assert "exitcode  : 2" in stderr  # the children exited with the contract's code
    assert not commands.out("torchrun-indivisible").exists()


def test_dry_run_of_valid_config_exits_0_and_writes_nothing(commands):
    code, stdout, stderr = commands.result("dry-run")
    assert code == 0, stderr
    assert "dry run" in stdout
    assert PREFIX not in stderr
    assert not commands.out("dry-run").exists()
