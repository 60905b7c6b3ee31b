"""Bad input (docs/design.md §4): every invalid setting stops before training with ONE line
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

from dicesim.cli import GROUPS, check_composes, check_group_choices
from dicesim.common.errors import ConfigError
from dicesim.config import compose
from dicesim.run.engine import Simulation, resolve_device

REPO = Path(__file__).resolve().parents[2]
PREFIX = "dicesim: error:"
FAST = ("nodes=4", "steps=5", "influence.events=8", "progress=false", "plots=false")
HAS_GPU = torch.cuda.is_available()
TIMEOUT = 300  # a hang guard: the commands start together on a shared 2-core machine


def compose_config(*overrides: str):
    return compose(overrides, quiet=True)


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
    paths["empty"] = folder / "empty.npy"
    paths["empty"].write_bytes(b"")  # np.load: EOFError
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
    ("file-empty-npy", ["topology=file", "topology.path={empty}"], "topology.path",
     "could not read"),
    ("file-matrix-with-metropolis", ["topology=file", "topology.path={negative}",
                                     "topology.weights=metropolis_hastings"],
     "topology.weights=metropolis_hastings", "gives the weights itself"),
    ("torus-prime-nodes", ["topology=torus", "nodes=7"], "nodes=7", "nodes=6 or nodes=8"),
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
    ("alie-with-checkpoints", ["attack=alie", "checkpoint.every=2"], "attack.kind=alie",
     "checkpoint.every=0"),
    ("ipm-with-influence", ["attack=ipm", "influence.events=[{node:0,step:1}]"],
     "attack.kind=ipm", "influence.events=0"),
    ("alie-with-attribution", ["attack=alie", "attribution.enabled=true"], "attack.kind=alie",
     "attribution.enabled=false"),
    ("linear-on-classification", ["model=linear"], "model", "regression"),
    ("cnn-without-images", ["model=cnn"], "model", "data.image=true"),
    ("image-on-flat-data", ["data=synthetic", "data.image=true"], "data.image", None),
    ("dirichlet-alpha-0", ["data.partition=dirichlet", "data.alpha=0"], "data.alpha", None),
    ("label-skew-more-classes-than-data", ["data.partition=label_skew",
                                           "data.classes_per_node=11"],
     "data.classes_per_node=11", "10 classes"),
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
    with pytest.raises(ConfigError) as err:
        cfg = compose_config(*FAST, *fill(overrides, matrices), f"out_dir={out}")
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
    "file-empty-npy": (["topology=file", "topology.path={empty}"], "topology.path"),
    "hydra-run-dir-unmakeable": (["hydra.run.dir=/proc/dicesim-x"], "hydra.run.dir"),
    "torus-prime-nodes": (["topology=torus", "nodes=7"], "topology.rows=1"),
    "appended-typo": (["+nodse=8"], "did you mean nodes?"),
    "bool-not-true-false": (["save_params=no"], "save_params=no"),
    # every sweep point is checked before the first job starts (no sweep directory either)
    "multirun-bad-point": (["-m", "nodes=8,abc", "hydra.sweep.dir={root}/sweep"], "nodes=abc"),
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
            args = [a.replace("{root}", str(root)) for a in fill(overrides, matrices)]
            self._start(name, [sys.executable, "-m", "dicesim", *args], env)
        self._start("dry-run", [sys.executable, "-m", "dicesim", "dry_run=true"], env)
        self._start("torchrun-indivisible",
                    [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", "-m", "dicesim", "device=cpu", "backend=gloo",
                     "nodes=3"], env)

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
    assert not (commands.root / "sweep").exists()


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


# ---------------------------------------------------------------- the typed schema (in-process CLI)
#
# Every key of the schema (dicesim/config.py) with a wrong type, a wrong range and a typo,
# through the CLI's own up-front check (`check_composes`, what `python -m dicesim` runs
# before Hydra starts): exit code 2, one stderr line naming the key, nothing on stdout,
# no traceback and no output directory.

N16 = ",".join(["0.0625"] * 15)
# (key, presets it needs, wrong-type values, wrong-range values); a typo case per key too
KEYS = [
    ("name", [], ["[a]"], ["a/b", "''"]),
    ("nodes", [], ["abc", "1.5"], ["0", "-3"]),
    ("steps", [], ["abc", "true"], ["0"]),
    ("batch_size", [], ["1.5"], ["0"]),
    ("seed", [], ["abc"], ["-1", "4294967296"]),
    ("dtype", [], ["[1]"], ["float16"]),
    ("device", [], ["[x]"], ["tpu"]),
    ("backend", [], ["[x]"], ["mpi"]),
    ("allow_tf32", [], ["yes", "1"], []),
    ("timeout_s", [], ["abc"], ["0", "-5", "inf"]),
    ("eval_every", [], ["abc"], ["0"]),
    ("init", [], ["[x]"], ["random"]),
    ("progress", [], ["yes", "1"], []),
    ("dry_run", [], ["no", "0"], []),
    ("driver", [], ["[x]"], ["..cli", "a/b", "no_such_driver"]),
    ("plots", [], ["1", "on"], []),
    ("save_params", [], ["no", "off"], []),
    ("out_dir", [], ["[1]"], ["''"]),
    ("overwrite", [], ["yes", "2"], []),
    ("abort_on_nonfinite", [], ["off", "0"], []),
    ("divergence_factor", [], ["abc", "[1]"], ["1", "0.5", "-3"]),
    ("resume", [], ["[x]"], ["/nonexistent/run", "''"]),
    ("checkpoint.every", [], ["abc"], ["-1"]),
    ("checkpoint.keep", [], ["abc"], ["0"]),
    ("eval.budget", [], ["abc", "1.5"], ["0", "-1", "8"]),
    ("counterfactual.remove", [], ["5"], ["[{node:99,step:1}]", "[{node:0,step:999}]"]),
    ("attribution.enabled", [], ["yes", "1"], []),
    ("attribution.target", [], ["5", "[a]", "[1.5]"], ["[99]", "[-1]", "[1,1]", "[]", "everyone"]),
    ("attribution.keep_every", [], ["abc", "1.5"], ["0", "-2", "201"]),
    ("attribution.samples", [], ["on"], []),
    ("attribution.plot_node", [], ["abc"], ["16", "-1"]),
    ("topology.name", [], ["[x]"], ["foo"]),
    ("topology.weights", [], ["[x]"], ["bogus"]),
    ("topology.rows", ["topology=torus"], ["abc"], ["0"]),
    ("topology.center", ["topology=star"], ["abc"], ["99", "-1"]),
    ("topology.p", ["topology=erdos_renyi"], ["abc"], ["0", "1.5"]),
    ("topology.k", ["topology=small_world"], ["abc"], ["1"]),
    ("topology.beta", ["topology=small_world"], ["abc"], ["2", "-0.5"]),
    ("topology.hub", ["topology=hub"], ["abc"], ["99"]),
    ("topology.hub_weight", ["topology=hub"], ["abc"], ["1", "0"]),
    ("topology.path", ["topology=file"], ["[x]"], ["''"]),
    ("topology.directed", ["topology=file"], ["yes", "2"], []),
    ("data.name", [], ["[x]"], ["foo"]),
    ("data.partition", [], ["[x]"], ["random"]),
    ("data.alpha", [], ["abc"], ["0", "-1"]),
    ("data.classes_per_node", ["data=synthetic", "data.partition=label_skew"], ["abc", "1.5"],
     ["0", "5"]),
    ("data.probe_size", [], ["abc"], ["0"]),
    ("data.max_train", [], ["abc"], ["0"]),
    ("data.max_test", [], ["abc"], ["-1"]),
    ("data.image", [], ["yes", "1"], []),
    ("data.standardize", [], ["no", "0"], []),
    ("data.probe", [], ["[x]"], ["bogus"]),
    ("data.node_probe_size", [], ["abc"], ["0"]),
    ("data.label_noise", [], ["abc", "[a]"], ["[1.5]", "[-0.1]"]),
    ("data.input_scale", [], ["abc", "[1]"], ["0", "-2"]),
    ("data.test_size", [], ["abc"], ["0", "1"]),
    ("data.root", ["data=fashion_mnist"], ["[x]"], []),
    ("data.labels", ["data=cifar100"], ["[x]"], ["medium"]),
    ("data.task", ["data=synthetic"], ["[x]"], ["clustering"]),
    ("data.n_samples", ["data=synthetic"], ["abc"], ["1"]),
    ("data.n_features", ["data=synthetic"], ["abc"], ["0"]),
    ("data.n_classes", ["data=synthetic"], ["abc"], ["1"]),
    ("data.noise", ["data=synthetic"], ["abc"], ["-0.1"]),
    ("model.name", [], ["[x]"], ["resnet"]),
    ("model.hidden", [], ["abc", "[a]", "64"], ["[0]", "[]", "[64,-1]"]),
    ("model.activation", [], ["[x]"], ["swish"]),
    ("model.channels", ["model=cnn", "data.image=true"], ["abc"], ["[0]"]),
    ("model.depth", ["model=resnet", "data.image=true"], ["abc"], ["7", "10"]),
    ("model.width", ["model=resnet", "data.image=true"], ["abc"], ["0", "3"]),
    ("model.norm", ["model=resnet", "data.image=true"], ["[x]"], ["batch", "layer"]),
    ("model.groups", ["model=resnet", "data.image=true"], ["abc"], ["0", "3"]),
    ("model.patch", ["model=vit", "data.image=true"], ["abc"], ["0"]),
    ("model.dim", ["model=vit", "data.image=true"], ["abc"], ["0", "15"]),
    ("model.heads", ["model=vit", "data.image=true"], ["abc"], ["0", "3"]),
    ("model.mlp_dim", ["model=vit", "data.image=true"], ["abc"], ["0"]),
    ("model._target_", ["model=custom"], ["[x]"], ["''", "null"]),
    ("model.kwargs", ["model=custom", "model._target_=a.B"], ["abc", "[1]"], []),
    ("optim.name", [], ["[x]"], ["rmsprop", "sgdm"]),
    ("optim.lr", [], ["abc", "true"], ["0", "-0.1", "nan"]),
    ("optim.momentum", [], ["abc", "true"], ["-0.1", "1.5", "nan"]),
    ("optim.dampening", [], ["abc"], ["-1", "2"]),
    ("optim.nesterov", [], ["yes", "1"], []),
    ("optim.weight_decay", [], ["abc"], ["-0.01", "inf"]),
    ("optim.betas", ["optim=adam"], ["abc", "[a,b]"],
     ["[0.9]", "[1.0,0.999]", "[-0.1,0.9]", "[0.9,0.999,0.5]"]),
    ("optim.eps", ["optim=adam"], ["abc"], ["0", "-1e-8"]),
    ("optim.gossip_state", ["optim=momentum"], ["yes", "1"], []),
    ("optim.schedule", [], ["[x]"], ["cosin", "linear"]),
    ("optim.min_lr", ["optim.schedule=cosine"], ["abc"], ["-1", "1"]),
    ("optim.warmup_steps", ["optim.schedule=linear_warmup_cosine"], ["abc", "1.5"],
     ["0", "-1", "999"]),
    ("optim.step_size", ["optim.schedule=step"], ["abc"], ["0", "-3"]),
    ("optim.gamma", ["optim.schedule=step"], ["abc"], ["0", "1.5"]),
    ("influence.events", [], ["foo", "1.5", "true"],
     ["-1", "[{node:99,step:1}]", "[{node:0,step:999}]", "[{node:0}]", "[5]",
      "[{node:0,step:1,samples:abc}]", "[{node:0,step:1,samples:0}]", "[{node:a,step:1}]"]),
    ("influence.removal", [], ["3.5", "true"], ["foo", "0", "999"]),
    ("influence.step_range", [], ["abc", "[a,b]"], ["[4,1]", "[1,2,3]", "[0,9999]"]),
    ("influence.hops", [], ["abc"], ["-1", "9"]),
    ("influence.ground_truth", [], ["yes", "1.5", "[1]"], ["-1"]),
    ("influence.estimators", [], ["5", "dice_e"], ["[dice_x]", "[dice_e,dice_e]"]),
    ("influence.curvature", [], ["1"], []),
    ("influence.proximal", [], ["on"], []),
    ("influence.node_weights", [], ["abc", "[a]"], ["[1,2]", f"[-1,{N16}]"]),
    ("influence.flush_every", [], ["abc"], ["0"]),
    ("attack.kind", [], ["[x]"], ["bogus"]),
    ("attack.nodes", ["attack=label_flip"], ["3", "[a]"], ["[99]", "[-1]", "[1,1]"]),
    ("attack.fraction", ["attack=label_flip"], ["abc"], ["1.5", "-0.1"]),
    ("attack.start", ["attack=label_flip"], ["abc"], ["999", "-1"]),
    ("attack.end", ["attack=label_flip", "attack.start=5"], ["abc", "1.5"], ["5", "201"]),
    ("attack.sigma", [], ["abc"], ["-1", "inf"]),
    ("attack.scale", [], ["abc"], ["nan"]),
    ("attack.z", ["attack=alie"], ["abc", "[1]"], ["-0.5", "inf"]),
    ("attack.epsilon", ["attack=ipm"], ["abc"], ["0", "-1", "nan"]),
    ("defense.kind", [], ["[x]"], ["bogus"]),
    ("defense.window", [], ["abc"], ["0"]),
    ("defense.threshold", [], ["abc"], ["inf"]),
    ("defense.warmup", [], ["abc"], ["-1"]),
    ("defense.trim", [], ["abc"], ["-1"]),
    ("alignment.sweep", ["experiment=alignment"], ["[x]"], ["bogus"]),
    ("alignment.min_spearman", ["experiment=alignment"], ["abc"], ["2"]),
    ("alignment.core", ["experiment=alignment"], ["5"],
     ["[{topology:foo,lr:0.1,hops:1}]", "[{topology:ring,lr:0,hops:1}]",
      "[{topology:ring,lr:0.1,hops:9}]", "[{topology:ring,lr:0.1}]"]),
    ("alignment.hard", ["experiment=alignment"], ["5"],
     ["[{data:foo,topology:ring,lr:0.1,hops:1}]", "[{topology:ring,lr:0.1,hops:1,dat:digits}]"]),
    ("alignment.optimizers", ["experiment=alignment"], ["5"],
     ["[{topology:ring,lr:0.05,hops:3,optim:{momentun:0.9}}]",
      "[{topology:ring,lr:0.05,hops:3,optim:{lr:0.1}}]",
      "[{topology:ring,lr:0.05,hops:3,optim:5}]",
      "[{topology:ring,lr:0.05,hops:3,optim:{momentum:-1}}]"]),
    ("alignment.hard_data", ["experiment=alignment"], ["5"], ["{max_tset:5}"]),
    ("alignment.mid_min_spearman", ["experiment=alignment"], ["5"],
     ["[{lr:0.2}]", "[{lr:0.2,min:2}]"]),
    ("alignment.full.topologies", ["experiment=alignment"], ["abc"], ["[foo]"]),
    ("alignment.full.lrs", ["experiment=alignment"], ["[a]"], ["[0]"]),
    ("alignment.full.curvature", ["experiment=alignment"], ["[yes]"], []),
    ("alignment.full.hops", ["experiment=alignment"], ["abc"], ["9"]),
    ("alignment.precision.enabled", ["experiment=alignment"], ["yes"], []),
    ("alignment.precision.lr", ["experiment=alignment"], ["abc"], ["0"]),
    ("alignment.precision.topology", ["experiment=alignment"], ["[x]"], ["foo"]),
    ("cascade.topologies", ["experiment=cascade"], ["abc"], ["[foo]"]),
    ("cascade.leaf", ["experiment=cascade"], ["abc"], ["-1"]),
    ("cascade.hub_stride", ["experiment=cascade"], ["abc"], ["0"]),
    ("cascade.hub_first_step", ["experiment=cascade"], ["abc"], ["-1"]),
    ("contribution.node_counts", ["experiment=contribution"], ["abc"], ["[1]", "[]"]),
    ("contribution.noise_max", ["experiment=contribution"], ["abc"], ["2"]),
    ("contribution.noise", ["experiment=contribution"], ["abc"], ["[2]"]),
    ("contribution.hops", ["experiment=contribution"], ["abc"], ["9"]),
    ("contribution.curvature", ["experiment=contribution"], ["yes"], []),
    ("retrain.batches", ["experiment=attribution"], ["abc"], ["-1"]),
    ("retrain.samples", ["experiment=attribution"], ["abc", "1.5"], ["-1"]),
    ("cleansing.noisy_nodes", ["experiment=cleansing"], ["abc"], ["0"]),
    ("cleansing.flip", ["experiment=cleansing"], ["abc"], ["0", "1.5"]),
    ("cleansing.remove", ["experiment=cleansing"], ["abc"], ["[0]", "[1.5]", "[]"]),
    ("cleansing.hops", ["experiment=cleansing"], ["abc"], ["9", "-1"]),
    ("cleansing.baseline_events", ["experiment=cleansing"], ["abc"], ["-1"]),
    ("cleansing.min_auc", ["experiment=cleansing"], ["abc"], ["2"]),
    ("anomaly.attacks", ["experiment=anomaly"], ["abc"], ["[none]"]),
    ("anomaly.topologies", ["experiment=anomaly"], ["abc"], ["[foo]"]),
    ("anomaly.window", ["experiment=anomaly"], ["abc"], ["0"]),
    ("anomaly.per_weight", ["experiment=anomaly"], ["yes"], []),
    ("anomaly.example", ["experiment=anomaly"], ["abc"], ["[a]"]),
    ("collaborators.topologies", ["experiment=collaborators"], ["abc"], ["[foo]"]),
]


def typo(key: str) -> str:
    """The key with two letters of its last part swapped (or one doubled letter dropped)."""
    parent, _, leaf = key.rpartition(".")
    i = len(leaf) // 2
    wrong = leaf[:i - 1] + leaf[i] + leaf[i - 1] + leaf[i + 1:]
    if wrong == leaf:
        wrong = leaf[:i] + leaf[i + 1:]
    return f"{parent}.{wrong}" if parent else wrong


def schema_cases() -> list:
    cases = []
    for key, presets, wrong_types, wrong_ranges in KEYS:
        for kind, values in (("type", wrong_types), ("range", wrong_ranges)):
            for value in values:
                cases.append(pytest.param([*presets, f"{key}={value}"], key,
                                          id=f"{kind}:{key}={value}"))
        cases.append(pytest.param([*presets, f"{typo(key)}=1"], f"did you mean {key}?",
                                  id=f"typo:{typo(key)}"))
    return cases


OTHER_CASES = [  # (id, argv, keyword)
    ("plus-typo", ["+nodse=8"], "did you mean nodes?"),
    ("last-value-named", ["nodes=4", "nodes=abc"], "nodes=abc: must be an integer"),
    ("plus-unknown", ["+foo=1"], "foo: unknown key"),
    ("plus-unknown-group-key", ["+topology.foo=1"], "topology.foo: unknown key"),
    ("block-without-experiment", ["alignment.sweep=full"], "experiment=alignment"),
    ("event-key-typo", ["influence.events=[{nod:1,step:2}]"], "did you mean node?"),
    ("remove-key-typo", ["counterfactual.remove=[{node:1,stpe:2}]"], "did you mean step?"),
    ("core-key-typo", ["experiment=alignment", "alignment.core=[{topology:ring,lr:0.1,hosp:1}]"],
     "did you mean hops?"),
    ("full-key-typo", ["experiment=alignment", "alignment.full.hosp=3"],
     "did you mean alignment.full.hops?"),
    ("key-of-another-option", ["data=fashion_mnist", "data.test_size=0.1"], "data.test_size"),
    ("group-option-typo", ["topology=rnig"], "did you mean topology=ring?"),
    ("interpolation-unknown", ["nodes=${nope}"], "nodes"),
    ("interpolation-wrong-type", ["nodes=${optim.lr}"], "nodes"),
    ("grammar", ["nodes=[1"], "nodes=[1"),
    ("list-without-multirun", ["nodes=8,16"], "nodes=8,16"),
    ("hops-past-run", ["steps=3", "influence.hops=4", "influence.events=5"], "influence.hops"),
    ("event-hops-past-run", ["influence.hops=4", "influence.events=[{node:0,step:198}]"],
     "influence.events[0].step"),
    ("attack-start-outside-run", ["attack=label_flip", "steps=10", "attack.start=10"],
     "attack.start"),
    ("step-range-past-hops", ["steps=10", "influence.hops=3", "influence.step_range=[0,8]"],
     "influence.step_range"),
    ("node-weights-for-16-nodes", ["nodes=8", f"influence.node_weights=[{N16},0.0625]"],
     "influence.node_weights"),
    ("removal-over-batch", ["batch_size=8", "influence.removal=9"], "influence.removal"),
    ("multirun-bad-point", ["-m", "nodes=8,abc"], "nodes=abc"),
    ("multirun-bad-group", ["-m", "topology=ring,foo"], "topology=foo"),
    ("multirun-range", ["-m", "seed=range(0,3)", "batch_size=0"], "batch_size=0"),
    ("multirun-choice", ["-m", "optim.lr=choice(0.1,-1)"], "optim.lr=-1"),
    ("multirun-glob", ["-m", "topology=glob(*)"], "topology.path"),
    ("multirun-later-key-wins", ["-m", "nodes=8,16", "nodes=4,0"], "nodes=0"),
    ("multirun-interval", ["--multirun", "optim.lr=interval(0,1)"], "interval"),
    ("multirun-builder-check", ["-m", "batch_size=8,5000"], "batch_size=5000"),
    ("metropolis-on-directed", ["topology=exponential",
                                "topology.weights=metropolis_hastings"], "topology.weights"),
    ("torus-rows-not-dividing", ["topology=torus", "nodes=16", "topology.rows=3"],
     "topology.rows=3"),
    ("small-world-k-too-big", ["topology=small_world", "nodes=4", "topology.k=4"],
     "topology.k=4"),
    ("linear-on-classification", ["model=linear"], "data=synthetic_regression"),
    ("logreg-on-regression", ["model=logreg", "data=synthetic_regression"], "model=linear"),
    ("dirichlet-on-regression", ["model=linear", "data=synthetic_regression",
                                 "data.partition=dirichlet"], "data.partition"),
    ("image-on-synthetic", ["data=synthetic", "data.image=true"], "data.image"),
    ("cnn-on-flat", ["model=cnn"], "data.image=true"),
    ("dice-without-proximal", ["defense=dice"], "influence.proximal"),
    ("nesterov-without-momentum", ["optim.nesterov=true"], "optim.nesterov"),
    ("gossip-state-of-plain-sgd", ["optim.gossip_state=true"], "optim.gossip_state"),
    ("momentum-with-adam", ["optim=adam", "optim.momentum=0.9"], "optim.momentum"),
    ("unknown-optim-preset", ["optim=rmsprop"], "optim"),
    ("group-given-a-number", ["checkpoint=5"], "checkpoint=5"),
    ("group-given-null", ["counterfactual=null"], "counterfactual=null"),
    ("block-given-a-number", ["experiment=alignment", "alignment.full=3"], "alignment.full=3"),
    ("attribution-with-a-defense", ["attribution.enabled=true", "defense=trimmed_mean"],
     "defense.kind=none"),
    ("attribution-keep-every-past-run", ["steps=10", "attribution.keep_every=11"],
     "attribution.keep_every=11"),
    ("attribution-target-outside-graph", ["nodes=8", "attribution.target=[8]"],
     "attribution.target"),
]


def run_check(argv: list[str], capsys, out: Path) -> str:
    """check_composes on out_dir=out plus the command line: the one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        check_composes([f"out_dir={out}", *argv])  # the case's own out_dir comes later, wins
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""
    assert not out.exists()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "keyword"), schema_cases())
def test_schema_refuses_bad_key(argv, keyword, capsys, tmp_path):
    line = run_check(argv, capsys, tmp_path / "run")
    assert keyword in line, f"{keyword!r} not named in: {line}"


@pytest.mark.parametrize(("argv", "keyword"), [pytest.param(a, k, id=i) for i, a, k in OTHER_CASES])
def test_command_line_refused_up_front(argv, keyword, capsys, tmp_path):
    line = run_check(argv, capsys, tmp_path / "run")
    assert keyword in line, f"{keyword!r} not named in: {line}"


def test_every_schema_key_has_cases():
    """KEYS covers every leaf of the schema (experiment blocks: their main keys)."""
    import dataclasses
    import typing

    from dicesim import config

    covered = {key for key, *_ in KEYS}
    options = [*config.TOPOLOGY_SCHEMAS.values(), *config.DATA_SCHEMAS.values(),
               *config.MODEL_SCHEMAS.values()]
    for cls in options:
        group = ("topology" if issubclass(cls, config.Topology) else
                 "model" if issubclass(cls, config.Model) else "data")
        for f in dataclasses.fields(cls):
            assert f"{group}.{f.name}" in covered, (cls.__name__, f.name)
    hints = typing.get_type_hints(config.Config)
    for f in dataclasses.fields(config.Config):
        if f.name in config.block_names() or f.name in ("topology", "data"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            for sub in dataclasses.fields(hints[f.name]):
                assert f"{f.name}.{sub.name}" in covered, f"{f.name}.{sub.name}"
        else:
            assert f.name in covered, f.name
    assert len(schema_cases()) + len(OTHER_CASES) >= 150
