"""`make cascade`: the config composes; on a tiny ring the per-hop totals decay and the
hub's batch outweighs a leaf's."""

from __future__ import annotations

from conftest import make_config

from dicesim.cli import open_session
from dicesim.experiments import cascade

TINY = ("experiment=cascade", "nodes=8", "steps=14", "batch_size=8", "model.hidden=[16]",
        "data.probe_size=60", "influence.events=12", "influence.hops=4",
        "cascade.topologies=[ring]", "cascade.draw=[ring]", "cascade.hub_stride=3")


def test_config_composes():
    cfg = make_config("experiment=cascade")
    assert cfg.driver == "cascade" and cfg.influence.removal == "batch"
    assert "hub" in cfg.cascade.topologies and cfg.influence.hops >= 3


def test_tiny_cascade_decays_and_favours_the_hub(tmp_path):
    cfg = make_config(*TINY)
    session = open_session(cfg)
    session.out = tmp_path
    summary = cascade.run(session)
    ring = summary["runs"]["ring"]["by_hop"]
    totals = [ring[s]["mean_abs_total_e"] for s in range(1, 5)]
    entries = [ring[s]["mean_abs_entry_e"] for s in range(5)]
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False)), totals
    assert all(a > b for a, b in zip(entries, entries[1:], strict=False)), entries
    # ground truth shows the same totals
    for s in range(5):
        assert abs(ring[s]["mean_abs_total_gt"] / ring[s]["mean_abs_total_e"] - 1) < 0.05
    hv = summary["hub_vs_leaf"]
    assert hv["dice_e"]["ratio"] > 2 and hv["dice_gt"]["ratio"] > 2
    assert hv["dice_e"]["hub_larger_fraction"] == 1.0
    for name in ("cascade.csv", "summary.json", "report.md", "cascade_decay.png", "graphs.png"):
        assert (tmp_path / name).is_file(), name
