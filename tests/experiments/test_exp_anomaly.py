"""`make anomaly`: the config composes, the scoring is right, and a tiny run ranks the
attacked node first by its DICE score."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from dicesim.experiments.anomaly import evaluate

ROOT = Path(__file__).resolve().parents[2]


def dicesim(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dicesim", "device=cpu", "backend=gloo",
                           *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_config_composes() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=anomaly"])
    assert cfg.driver == "anomaly" and cfg.influence.proximal and cfg.influence.events == 0
    assert cfg.nodes == 16 and cfg.data.name == "digits"
    assert set(cfg.anomaly.attacks) == {"label_flip", "feature_noise", "free_rider",
                                        "scaled_update"}
    assert list(cfg.anomaly.topologies) == ["ring", "exponential"]


def test_evaluate_pairs_and_nodes() -> None:
    # receivers 0, 1; sender 3 is attacked; one honest pair (1 → 2) outranks an attacked one
    scores = {(0, 3): 5.0, (1, 3): 1.0, (0, 2): -1.0, (1, 2): 2.0, (0, 1): -3.0}
    out = evaluate(scores, np.array([3]))
    assert out["pairs"] == 5 and out["attack_pairs"] == 2
    assert np.isclose(out["roc_auc"], 5 / 6)  # 5 of the 6 (attacked, honest) pairs ordered
    assert out["ranking"] == [3] and out["precision_at_k"] == 1.0  # node 3: mean 3 > 0.5
    assert out["node_roc_auc"] == 1.0


def test_tiny_run_ranks_the_attacker_first(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = dicesim("experiment=anomaly", "nodes=6", "steps=40", "attack.nodes=[2]",
                   "anomaly.attacks=[label_flip,scaled_update]", "anomaly.topologies=[ring]",
                   f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == {"label_flip_ring_dice_roc_auc_ge_0.95": True}
    for case in summary["cases"]:
        assert case["attackers"] == [2] and case["dice_ranking"] == [2]
    dice = [r for r in summary["results"] if r["method"] == "dice"]
    assert len(dice) == 2
    assert all(r["roc_auc"] == 1.0 and r["precision_at_k"] == 1.0 for r in dice)
    # the attacked node's neighbours (1 and 3) measured a harmful (positive) influence
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert {(r["receiver"], r["sender"]) for r in rows if r["attacked"] == "1"} == {
        ("1", "2"), ("3", "2")}
    assert all((float(r["dice"]) > 0) == (r["attacked"] == "1") for r in rows)
    for name in ("report.md", "roc_auc.png", "scores.png", "config.yaml"):
        assert (out / name).is_file()


def test_bad_attack_name_stops_before_training(tmp_path: Path) -> None:
    proc = dicesim("experiment=anomaly", "anomaly.attacks=[none]", f"out_dir={tmp_path / 'x'}")
    assert proc.returncode == 2
    assert "anomaly.attacks: none is not an attack" in proc.stderr
    assert not (tmp_path / "x").exists()
