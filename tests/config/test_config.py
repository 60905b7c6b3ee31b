"""The typed configuration schema (dicesim/config.py): every preset composes and validates,
its values reach the typed config unchanged, valid edge cases pass, sweeps expand as
Hydra's basic sweeper does, and the schema's choices match what the builders accept."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_csv, run_dicesim
from omegaconf import OmegaConf

from dicesim import config
from dicesim.cli import check_composes
from dicesim.common.errors import ConfigError
from dicesim.config import as_dict, compose_checked, load, sweep_points, validate

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def checked(*overrides: str):
    return compose_checked([list(overrides)])[0]


def same_values(raw, typed, where: str = "") -> None:
    """Every value of the composed YAML is in the typed config, equal (60 == 60.0)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            assert key in typed, f"{where}{key} dropped"
            same_values(value, typed[key], f"{where}{key}.")
    elif isinstance(raw, list):
        assert len(raw) == len(typed), where
        for i, (a, b) in enumerate(zip(raw, typed, strict=True)):
            same_values(a, b, f"{where}[{i}]")
    else:
        assert raw == typed and type(raw) is not bool or raw is typed, (where, raw, typed)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes_and_validates(experiment):
    cfg = checked(f"experiment={experiment}")
    assert isinstance(cfg, config.Config)
    assert cfg.name == experiment
    for block in config.block_names():  # only its own blocks are present
        cls = config.block_schema(block).cls
        present = config.block_preset(block) == experiment
        assert isinstance(getattr(cfg, block), cls) if present else getattr(cfg, block) is None


def test_each_block_is_its_preset_driver_s_and_loads_on_demand():
    """A block's schema is registered by the driver its preset names, and composing one
    experiment imports that driver and no other (the runner they share is not a driver)."""
    for block in config.block_names():
        cls, preset = config.block_schema(block).cls, config.block_preset(block)
        driver = OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml").driver
        home = f"dicesim.experiments.{driver}"  # the driver's module, or a module of its package
        assert cls.__module__ == home or cls.__module__.startswith(home + "."), (block, cls)
    probe = ("import sys\nfrom dicesim.config import compose\n"
             "assert not any(m.startswith('dicesim.experiments.') for m in sys.modules)\n"
             "cfg = compose(['experiment=attribution'], quiet=True)\n"
             "print(type(cfg.retrain).__module__, type(cfg.retrain).__name__)\n"
             "print(sorted(m for m in sys.modules if m.startswith('dicesim.experiments.')\n"
             "             and m != 'dicesim.experiments.runner'))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["dicesim.experiments.attribution Retrain",
                                        "['dicesim.experiments.attribution']"]


GROUP_OPTIONS = [(g, o) for g in ("topology", "data", "model", "optim", "influence", "attack",
                                  "defense") for o in options(g)]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS,
                         ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_keeps_its_values(group, option, tmp_path):
    extra = {("topology", "file"): [f"topology.path={tmp_path / 'W.npy'}"],
             ("model", "cnn"): ["data.image=true"],
             ("model", "resnet"): ["data.image=true"], ("model", "vit"): ["data.image=true"],
             ("model", "custom"): ["model._target_=examples.small_net.SmallNet"],
             ("model", "linear"): ["data=synthetic_regression"],
             ("defense", "dice"): ["influence.proximal=true"]}.get((group, option), [])
    with config_dir():
        from hydra import compose

        raw = compose("config", overrides=[f"{group}={option}", *extra])
    typed = load(raw)
    same_values(OmegaConf.to_container(raw[group]), as_dict(getattr(typed, group)), group)


def config_dir():
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3")


def test_root_values_unchanged():
    with config_dir():
        from hydra import compose

        raw = compose("config")
    typed = load(raw)
    same_values(OmegaConf.to_container(raw, resolve=True), as_dict(typed))


def test_valid_edge_cases_pass(tmp_path):
    assert checked("influence.hops=0").influence.hops == 0
    assert checked("nodes=8", "nodes=16").nodes == 16
    assert checked("topology=file", f"topology.path={tmp_path}/W.npy").topology.path.endswith(
        "W.npy")
    assert checked("influence.events=[{node:1,step:2,samples:all}]").influence.events[0] == {
        "node": 1, "step": 2, "samples": "all"}
    assert checked("influence.removal=3").influence.removal == 3
    assert checked("attack=label_flip", "attack.nodes=[1,2]").attack.nodes == [1, 2]
    assert checked("resume=auto").resume == "auto"
    assert checked(f"resume={tmp_path}").resume == str(tmp_path)
    assert checked("checkpoint.every=10", "checkpoint.keep=1").checkpoint.every == 10
    assert checked("+model.channels=[4]").model.channels == [4]
    for key in ("plots", "progress", "dry_run", "save_params", "overwrite", "abort_on_nonfinite",
                "influence.ground_truth", "influence.curvature", "data.standardize"):
        for value in (True, False):
            got = checked(f"{key}={str(value).lower()}")
            for part in key.split("."):
                got = getattr(got, part)
            assert got is value


def test_new_keys_and_defaults():
    cfg = checked()
    assert (cfg.overwrite, cfg.abort_on_nonfinite, cfg.resume) == (False, True, None)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep) == (0, 2)


def test_typed_and_closed():
    cfg = checked("optim.lr=1", "timeout_s=5", "topology=torus", "data=synthetic")
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.timeout_s, float)
    assert type(cfg.topology) is config.TorusTopology and type(cfg.data) is config.SyntheticData
    assert cfg.topology.name == "torus" and f"{cfg.topology.name}" == "torus"  # str Enums
    with pytest.raises(ConfigError, match="nodse: unknown key; did you mean nodes"):
        checked("+nodse=3")


def test_validate_alone_checks_ranges():
    cfg = checked()
    cfg.nodes = 0
    with pytest.raises(ConfigError, match="nodes=0"):
        validate(cfg)
    with pytest.raises(ConfigError, match="nodes=0"):  # a changed copy is checked as well
        dataclasses.replace(checked(), nodes=0)
    with pytest.raises(ConfigError, match="influence.hops=9"):
        config.with_changes(checked(), influence__hops=9)
    assert config.with_changes(checked(), influence__hops=2).influence.hops == 2


def test_preset_events_shrink_to_the_run_and_explicit_ones_do_not(capsys):
    """Part 8: the demo's 40 events over 8 nodes and 5 steps with 3 hops: starts 0..2, so
    8 · 3 = 24 (node, step) pairs exist; a count the user set that does not fit stays an
    error."""
    cfg = config.compose(["nodes=8", "steps=5"])
    assert cfg.influence.events == 24
    assert capsys.readouterr().out.strip() == (
        "dicesim: influence.events: the preset's 40 events do not fit 5 steps with 3 hops; "
        "using 24")
    assert compose_checked([["nodes=8", "steps=2"]])[0].influence.events == 0
    assert compose_checked([["nodes=8"]])[0].influence.events == 40  # fits: unchanged
    with pytest.raises(ConfigError, match="influence.events=40: only 24"):
        from dicesim.run.engine import Simulation

        Simulation(compose_checked([["nodes=8", "steps=5", "influence.events=40"]])[0])


def test_a_short_run_of_the_demo_says_it_shrank_its_events_once(tmp_path):
    proc = run_dicesim(tmp_path, "nodes=8", "steps=5")
    line = ("dicesim: influence.events: the preset's 40 events do not fit 5 steps with 3 "
            "hops; using 24")
    assert proc.stdout.splitlines().count(line) == 1
    assert len({row["event"] for row in read_csv(tmp_path / "influence.csv")}) == 24


def test_sweep_points_expand_like_the_basic_sweeper():
    assert sweep_points(["nodes=8,16", "seed=range(0,2)", "steps=5"]) == [
        ["nodes=8", "seed=0", "steps=5"], ["nodes=8", "seed=1", "steps=5"],
        ["nodes=16", "seed=0", "steps=5"], ["nodes=16", "seed=1", "steps=5"]]
    assert sweep_points(["nodes=8,16", "nodes=4"]) == [["nodes=4"]]
    assert sweep_points(["topology=glob(*ring)"]) == [["topology=directed_ring"],
                                                       ["topology=ring"]]
    assert sweep_points(["optim.lr=choice(0.1,0.01)"]) == [["optim.lr=0.1"], ["optim.lr=0.01"]]
    assert sweep_points([]) == [[]]


def test_valid_command_lines_pass_the_up_front_check(capsys, tmp_path):
    out = f"out_dir={tmp_path / 'run'}"
    check_composes(["nodes=8", out])
    check_composes(["-m", "nodes=4,8", "topology=ring,torus", out])
    check_composes(["experiment=alignment", "alignment.sweep=full", out])
    check_composes(["--cfg", "job", "nodes=abc"])  # Hydra's own flags go straight to Hydra
    # a launcher that sends jobs elsewhere: only the schema here (the data is there)
    check_composes(["-m", "hydra/launcher=basic", "batch_size=8,5000", out])
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "run").exists()


def test_choices_match_the_presets():
    """Every Enum of a group's option names has a YAML file per member, and no more."""
    assert set(config.TOPOLOGIES) == set(options("topology"))
    assert set(config.ATTACKS) == set(options("attack"))
    assert set(config.DEFENSES) == set(options("defense"))
    assert set(config.MODELS) == set(options("model"))


def test_schema_defaults_match_the_yaml_presets():
    """The dataclass defaults are the values of the default presets (one source of truth
    for users: the YAML; the schema must not disagree with it)."""
    pairs = [("config.yaml", None, config.Config()), ("influence/default.yaml", None,
                                                     config.Influence()),
             ("optim/sgd.yaml", None, config.Optim()), ("model/mlp.yaml", None, config.Model()),
             ("attack/none.yaml", None, config.Attack()),
             ("defense/none.yaml", None, config.Defense()),
             ("data/digits.yaml", None, config.DigitsData()),
             ("data/synthetic.yaml", None, config.SyntheticData())]
    pairs += [(f"topology/{name}.yaml", None, cls(name=name))
              for name, cls in config.TOPOLOGY_SCHEMAS.items()]
    pairs += [(f"experiment/{config.block_preset(block)}.yaml", block,
               config.block_schema(block).cls()) for block in config.block_names()]
    for path, block, instance in pairs:
        yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / path))
        if block:
            yaml = yaml[block]
        defaults = dataclasses.asdict(instance)
        for key, value in yaml.items():
            cases = ("core", "hard", "optimizers", "mid_min_spearman")
            if key in ("defaults", "hydra", *cases) or isinstance(value, dict) and key not in (
                    "full", "precision", "checkpoint"):
                continue
            assert key in defaults, f"{path}: {key} has no schema field"
            assert defaults[key] == value, f"{path}: {key}: {defaults[key]!r} != yaml {value!r}"


def option_values(group: str, option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml"))


@pytest.mark.parametrize("experiment, group, option", [
    ("demo", "optim", "adam"),  # demo sets optim.lr: 0.05, adam.yaml 0.001
    ("cascade", "optim", "sgd"),  # cascade sets 0.1; sgd named by the user: its own 0.05
    ("attribution", "topology", "exponential"),  # attribution sets topology.name: ring
    ("cleansing", "data", "digits"),  # cleansing sets data.probe_size: 400
])
def test_a_group_named_by_the_user_keeps_its_own_values(experiment, group, option):
    cfg = checked(f"experiment={experiment}", f"{group}={option}")
    own = option_values(group, option)
    own.pop("defaults", None)  # the option's schema
    same_values(own, as_dict(getattr(cfg, group)), group)
    # the preset does set one of these keys to another value: it is what was dropped
    preset = option_values("experiment", experiment)[group]
    assert any(own[key] != value for key, value in preset.items() if key in own)


def test_a_key_the_user_sets_wins_and_unnamed_groups_keep_the_preset():
    assert checked("optim=adam", "optim.lr=0.2").optim.lr == 0.2
    assert checked("experiment=cascade").optim.lr == 0.1  # optim not named: the preset's
    assert checked("experiment=cascade", "optim=adam").optim.lr == 0.001
    cfg = checked("experiment=cascade", "optim=adam", "optim.betas=[0.8,0.9]")
    assert list(cfg.optim.betas) == [0.8, 0.9] and cfg.optim.lr == 0.001


def test_keeping_a_group_says_which_values_it_put_back():
    with config_dir():
        from hydra import compose

        raw = compose("config", overrides=["experiment=cascade", "optim=adam"])
    assert raw.optim.lr == 0.1  # Hydra's order alone: the preset composed last wins
    notes = config.keep_named_groups(raw, ["experiment=cascade", "optim=adam"])
    assert notes == ["optim.lr=0.001 of optim=adam over experiment=cascade's 0.1"]
    assert raw.optim.lr == 0.001
    assert config.keep_named_groups(raw, ["experiment=cascade", "optim=adam"]) == []


def test_a_run_trains_with_the_named_group_s_own_values(tmp_path):
    proc = run_dicesim(tmp_path, "optim=adam", "nodes=2", "steps=2", "influence.events=0")
    assert "dicesim: kept optim.lr=0.001 of optim=adam over experiment=demo's 0.05" in \
        proc.stdout.splitlines()
    assert OmegaConf.load(tmp_path / "config.yaml").optim.lr == 0.001
