"""`make contribution`: the config composes; a pure-noise node ranks last both by
leave-one-node-out and by its accumulated DICE-E."""

from __future__ import annotations

import pytest
from conftest import make_config

from dicesim.cli import open_session
from dicesim.experiments import contribution
from dicesim.run.engine import Simulation

TINY = ("experiment=contribution", "steps=30", "batch_size=16", "model.hidden=[16]",
        "data.probe_size=60", "contribution.node_counts=[5]",
        "contribution.noise=[0,0,0,0,1.0]")


def test_config_composes():
    cfg = make_config("experiment=contribution")
    assert cfg.driver == "contribution"
    assert 8 <= min(cfg.contribution.node_counts) and max(cfg.contribution.node_counts) <= 16
    assert cfg.contribution.min_spearman == 0.8


def test_labels_are_corrupted_in_the_right_amount():
    clean = Simulation(make_config(*TINY, "nodes=5")).data.y_train
    sim = Simulation(make_config(*TINY, "nodes=5", "data.label_noise=[0,0.25,0.5,0.75,1]"))
    for k, ids in enumerate(sim.parts):
        wrong = (sim.data.y_train[ids] != clean[ids]).float().mean().item()
        assert wrong == pytest.approx(0.25 * k, abs=0.5 / len(ids))


def test_tiny_contribution_puts_the_pure_noise_node_last(tmp_path):
    cfg = make_config(*TINY)
    session = open_session(cfg)
    session.out = tmp_path
    summary = contribution.run(session)
    (s,) = summary["settings"]
    assert s["rank_loo"][4] == 5 and s["rank_dice"][4] == 5
    assert s["loo"][4] > 0 > max(s["loo"][:4])  # the noise hurt; clean data helped
    assert s["dice_r_hop"][4] > 0 > max(s["dice_r_hop"][:4])
    assert s["full_horizon"][4] > 0 > max(s["full_horizon"][:4])  # the reverse pass agrees
    assert s["spearman_full_horizon_vs_loo"] >= 0.8
    # the noisy node's neighbours give it benefit it does not return
    assert s["reciprocity"]["nodes"]["balance"][4] > 0
    for name in ("nodes.csv", "edges.csv", "summary.json", "report.md", "contribution.png"):
        assert (tmp_path / name).is_file(), name


def test_ranks_are_scipys_ordinal_ranks_ties_included():
    """contribution.ranks (numpy) = scipy.stats.rankdata(method="ordinal"): ties by position."""
    import numpy as np
    from scipy import stats

    from dicesim.experiments.contribution import ranks

    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 16):
        values = rng.integers(0, 4, size=size).astype(float)
        assert ranks(values) == stats.rankdata(values, method="ordinal").astype(int).tolist()
