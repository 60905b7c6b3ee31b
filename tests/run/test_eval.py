"""The evaluation budget (eval.budget, engine.EvalPlan): what the per-node test accuracy,
the probe metrics every eval_every steps and the consensus model θ̄'s accuracy cover."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config

from dicesim.comm.exchange import Comm
from dicesim.common.errors import ConfigError
from dicesim.model.models import FlatModel
from dicesim.report.summary import evaluation_line, summarize
from dicesim.run.engine import Simulation, eval_subset

FAST = ("steps=4", "batch_size=8", "dtype=float64", "model.hidden=[8]",
        "data.probe_size=40", "eval_every=2", "influence.events=0", "progress=false")


def run(*overrides: str, spy: list | None = None, monkeypatch=None):
    sim = Simulation(make_config(*FAST, *overrides))
    if spy is not None:  # every per-node evaluation's (rows, samples)
        original = FlatModel.probe_eval

        def counted(self, theta, x, y, per_row=False, **kwargs):
            spy.append((theta.shape[0], y.shape[-1]))
            return original(self, theta, x, y, per_row, **kwargs)

        monkeypatch.setattr(FlatModel, "probe_eval", counted)
    return sim, sim.execute(Comm("gloo", 60, torch.device("cpu")))


def accuracy(sim: Simulation, theta: torch.Tensor, ids: np.ndarray | None) -> float:
    """θ's test accuracy on these test samples, one forward pass (the oracle)."""
    x, y = sim.data.x_test.to(theta.dtype), sim.data.y_test
    if ids is not None:
        x, y = x[torch.as_tensor(ids)], y[torch.as_tensor(ids)]
    with torch.no_grad():
        predicted = sim.model.forward(theta, x).argmax(-1)
    return float((predicted == y).double().mean())


def test_sixteen_nodes_by_default_evaluate_every_node_on_everything():
    sim, result = run("nodes=16")
    plan = sim.evaluation
    assert plan.test_ids is None and plan.probe_ids is None
    assert (plan.test_samples, plan.probe_samples) == (len(sim.data.y_test), 40)
    expected = [accuracy(sim, theta, None) for theta in result.final_params]
    np.testing.assert_allclose(result.test_acc, expected, rtol=0, atol=1e-12)
    consensus = accuracy(sim, result.final_params.mean(0), None)
    assert result.consensus_test_acc == pytest.approx(consensus, abs=1e-12)
    block = summarize(sim, result)["evaluation"]
    assert block["nodes"] == 16 and block["test_samples"] == block["test_total"] == 359
    assert "all 359 test samples" in evaluation_line(block)


def test_over_the_budget_every_node_sees_a_seeded_subset_and_the_consensus_everything(
        monkeypatch):
    """32 nodes, budget 960 sample-forwards: each node on 30 of the 359 test samples and
    30 of the 40 probe samples; θ̄ on all 359."""
    calls: list[tuple[int, int]] = []
    sim, result = run("nodes=32", "eval.budget=960", spy=calls, monkeypatch=monkeypatch)
    plan = sim.evaluation
    assert (plan.test_samples, plan.probe_samples) == (30, 30)
    for ids, total in ((plan.test_ids, 359), (plan.probe_ids, 40)):
        assert len(np.unique(ids)) == 30 and np.all(np.diff(ids) > 0) and ids[-1] < total
    again = Simulation(make_config(*FAST, "nodes=32", "eval.budget=960")).evaluation
    np.testing.assert_array_equal(again.test_ids, plan.test_ids)  # seeded
    assert not np.array_equal(plan.test_ids[:30], np.arange(30))

    expected = [accuracy(sim, theta, plan.test_ids) for theta in result.final_params]
    np.testing.assert_allclose(result.test_acc, expected, rtol=0, atol=1e-12)
    consensus = accuracy(sim, result.final_params.mean(0), None)
    assert result.consensus_test_acc == pytest.approx(consensus, abs=1e-12)
    # every per-node evaluation (metrics at t = 0, 2, 4 and the test pass) within the budget
    per_node = [(rows, m) for rows, m in calls if rows == 32]
    assert len(per_node) == 4 and all(rows * m <= 960 for rows, m in per_node)
    assert calls[-1] == (1, 359)  # θ̄ on the whole test split
    # the final metric rows: each node's probe loss on its 30 probe samples
    final = sorted((r for r in result.metrics if r.step == 4), key=lambda r: r.node)
    x, y = sim.data.x_probe.double(), sim.data.y_probe
    ids = torch.as_tensor(plan.probe_ids)
    with torch.no_grad():
        want = [float(torch.nn.functional.cross_entropy(sim.model.forward(theta, x[ids]), y[ids]))
                for theta in result.final_params]
    np.testing.assert_allclose([r.probe_loss for r in final], want, rtol=1e-10)

    line = evaluation_line(summarize(sim, result)["evaluation"])
    assert "the same 30 of the 359 test samples" in line and "30 of the 40 probe" in line


def test_subset_is_none_when_everything_fits_or_the_budget_is_off():
    assert eval_subset(359, 16, 16 * 359, 0, 1) is None
    assert eval_subset(10**6, 10**4, None, 0, 1) is None
    assert len(eval_subset(360, 16, 16 * 359, 0, 1)) == 359


def test_null_budget_evaluates_everything():
    sim = Simulation(make_config(*FAST, "nodes=32", "eval.budget=null"))
    assert sim.evaluation.test_ids is None and sim.evaluation.probe_ids is None


@pytest.mark.parametrize("budget", [8, 0])
def test_a_budget_below_one_sample_per_node_is_one_line(budget):
    with pytest.raises(ConfigError) as err:
        make_config(*FAST, "nodes=16", f"eval.budget={budget}")
    assert "eval.budget" in str(err.value) and "\n" not in str(err.value)


def test_two_ranks_evaluate_the_same_subset(tmp_path):
    """Each rank evaluates its own nodes on the plan's subset: the mean per-node test
    accuracy and θ̄'s accuracy from params.pt (every node's θ^T) match the summary."""
    import json

    from conftest import run_dicesim

    overrides = (*FAST, "nodes=32", "eval.budget=960", "save_params=true", "plots=false")
    run_dicesim(tmp_path / "run", *overrides, ranks=2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    params = torch.load(tmp_path / "run" / "params.pt")
    sim = Simulation(make_config(*overrides))
    ids = sim.evaluation.test_ids
    assert summary["evaluation"]["test_samples"] == len(ids) == 30
    mean = np.mean([accuracy(sim, theta, ids) for theta in params])
    assert summary["final"]["test_acc"] == pytest.approx(mean, abs=1e-12)
    consensus = accuracy(sim, params.mean(0), None)
    assert summary["final"]["consensus_test_acc"] == pytest.approx(consensus, abs=1e-12)


def test_per_node_probes_take_the_same_positions_of_every_z_k():
    """data.probe=per_node, 16 probe samples per node, budget 32 × 8: every node's metrics
    on positions plan.probe_ids of its own Z'_k."""
    sim, result = run("nodes=32", "data.probe=per_node", "data.node_probe_size=16",
                      "eval.budget=256")
    ids = sim.evaluation.probe_ids
    assert len(ids) == 8 and sim.evaluation.probe_total == 16
    final = sorted((r for r in result.metrics if r.step == 4), key=lambda r: r.node)
    x, y = sim.data.x_train.double(), sim.data.y_train
    want = []
    with torch.no_grad():
        for k, theta in enumerate(result.final_params):
            mine = torch.as_tensor(sim.node_probe_ids[k][ids])
            want.append(float(torch.nn.functional.cross_entropy(
                sim.model.forward(theta, x[mine]), y[mine])))
    np.testing.assert_allclose([r.probe_loss for r in final], want, rtol=1e-10)
