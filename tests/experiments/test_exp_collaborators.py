"""`make collaborators`: the config composes, and in a tiny run DICE selection cuts the
attacker and keeps the honest nodes' accuracy where plain gossip loses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from scipy import sparse

from dicesim.config import Defense
from dicesim.optim.aggregate import build_aggregator

ROOT = Path(__file__).resolve().parents[2]


def test_config_composes() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=collaborators"])
        flipped = compose("config", overrides=["experiment=collaborators", "attack=label_flip"])
    assert cfg.driver == "collaborators" and cfg.attack.kind == "scaled_update"
    assert flipped.attack.kind == "label_flip"  # the attack group stays the user's choice
    assert cfg.defense.window >= 1 and cfg.nodes == 16
    assert list(cfg.collaborators.topologies) == ["ring", "exponential"]


def test_tiny_run_dice_cuts_the_attacker(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dicesim", "device=cpu", "backend=gloo", "experiment=collaborators",
         "nodes=6", "steps=40",
         "attack.nodes=[1]", "collaborators.topologies=[complete]", f"out_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    res = {r["condition"]: r for r in summary["results"]}
    assert set(res) == {"no_attack", "no_defense", "dice", "trimmed_mean", "oracle"}
    # every honest receiver ends giving the attacker weight 0, and no honest neighbour
    assert res["dice"]["attacker_edges_dropped"] == 1.0
    assert res["dice"]["honest_edges_dropped"] == 0.0
    assert res["dice"]["honest_test_acc"] >= res["no_defense"]["honest_test_acc"] + 0.2
    assert res["no_attack"]["drop_points"] == 0.0
    assert summary["targets"]["complete_dice_within_2_points_of_no_attack"]
    for name in ("report.md", "collaborators.png", "config.yaml"):
        assert (out / name).is_file()
    version = summary["provenance"]["dicesim"]  # experiments carry provenance too
    assert version and f"dicesim {version}, " in (out / "report.md").read_text()


def test_dice_selection_verdict_stands_and_rows_stay_stochastic() -> None:
    W = sparse.csr_array(np.full((3, 3), 1 / 3))  # W^t as the topology gives it: CSR
    d = build_aggregator(Defense(kind="dice", window=2, warmup=1), attacked=np.array([2]),
                      nodes=3, local=np.arange(3))
    assert d.weights(W) is W
    d.observe(0, np.array([[0.0, -1.0, 2.0], [-1.0, 0.0, 3.0], [1.0, 1.0, 0.0]]))
    cut = d.weights(W).toarray()
    assert cut[0, 2] == cut[1, 2] == 0.0 and np.allclose(cut.sum(axis=1), 1.0)
    assert np.allclose(cut[2], W.toarray()[2])  # the attacked node itself does not defend
    for t in range(1, 6):  # no longer mixed, node 2 is no longer measured: zeros don't count
        d.observe(t, np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
        cut = d.weights(W).toarray()
    assert cut[0, 2] == cut[1, 2] == 0.0 and cut[0, 1] == cut[1, 0] == 0.5
    oracle = build_aggregator(Defense(kind="oracle"), attacked=np.array([2]), nodes=3,
                           local=np.arange(3))
    assert np.allclose(oracle.weights(W).toarray(), cut)
