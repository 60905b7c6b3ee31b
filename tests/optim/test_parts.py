"""The parts of the training loop across ranks: every attack and every aggregator give
the same numbers on 2 ranks as on 1 (float64), and trackers follow W^t as mixed."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_run, make_config, run_dicesim

from dicesim.comm.exchange import Comm
from dicesim.run.engine import Simulation

BASE = ("nodes=4", "steps=10", "batch_size=8", "dtype=float64", "model.hidden=[6]",
        "data.probe_size=40", "eval_every=1", "topology=complete", "attack.nodes=[1]",
        "influence.events=[{node:0,step:2},{node:3,step:4,samples:2}]", "influence.hops=2")


def in_process(*overrides: str):
    sim = Simulation(make_config(*overrides, "progress=false"))
    return sim, sim.execute(Comm("gloo", 60, torch.device("cpu")))


@pytest.mark.parametrize(("attack", "defense"), [
    ("label_flip", "none"), ("scaled_update", "dice"), ("free_rider", "trimmed_mean"),
    ("feature_noise", "oracle")])
def test_attacks_and_aggregators_give_the_same_values_on_two_ranks(tmp_path, attack, defense):
    overrides = (*BASE, f"attack={attack}", f"defense={defense}", "influence.proximal=true",
                 "defense.warmup=2", "defense.window=3", "save_params=true")
    _, single = in_process(*overrides)
    out = tmp_path / "two"
    run_dicesim(out, *overrides, ranks=2)
    assert len(single.proximal) > 0
    assert_same_run(out, single, rows_rtol=1e-8)


def test_trackers_mix_with_the_defended_weights():
    """Under the oracle cut no honest node mixes attacked node 1, so the perturbation of an
    event at node 1 never leaves it: E and G are exactly 0 at every other node. A tracker
    mixing with the plain W (a complete graph) would spread it to all four."""
    event = ("attack=scaled_update", "influence.events=[{node:1,step:2}]", "influence.hops=2")
    _, cut = in_process(*BASE, *event, "defense=oracle")
    _, plain = in_process(*BASE, *event, "defense=none")
    for result, spreads in ((cut, False), (plain, True)):
        others = [row for row in result.influence if row.hop >= 1 and row.node != 1]
        assert len(others) == 6  # hops 1, 2 × nodes 0, 2, 3 (reach follows the graph)
        for row in others:
            assert (row.dice_e != 0 and row.dice_gt != 0) == spreads, row


def test_every_estimator_name_is_a_registered_tracker():
    from dicesim.config import ESTIMATORS
    from dicesim.influence.trackers import registered

    assert set(ESTIMATORS) <= set(registered())


def test_trackers_are_built_from_the_registry_in_registration_order(monkeypatch):
    """A tracker registered from its own module is built and called at every θ^t without
    any change to the engine; the estimators run asks for are built in registration order
    (ground truth first, then dice_e, then the Gauss rules)."""
    from dicesim.influence import trackers
    from dicesim.influence.trackers import Tracker, register

    seen: list[int] = []

    class Counting(Tracker):
        def at_theta(self, step) -> None:
            seen.append(step.t)

    monkeypatch.setattr(trackers, "TRACKERS", dict(trackers.registered()))
    register("counting")(lambda ctx: Counting())
    sim = Simulation(make_config(*BASE, "influence.estimators=[dice_gauss2,dice_e]",
                                 "progress=false"))
    from dicesim.run.engine import build_trainer

    trainer = build_trainer(sim, Comm("gloo", 60, torch.device("cpu")))
    names = [type(tr).__name__ for tr in trainer.parts.trackers]
    assert names == ["GroundTruth", "DiceE", "DiceGauss", "Counting"]
    trainer.run()
    assert seen == list(range(sim.run.steps + 1))
