"""Full-horizon attribution (docs/design.md, "Full horizon (the reverse pass)")."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, dicesim_command, make_config, read_csv, run_dicesim
from scipy import stats
from torch.func import hessian

from dicesim.comm.exchange import Comm
from dicesim.run.engine import Simulation
from dicesim.testing.oracle import dense_trajectory

QUADRATIC = ("data=synthetic_regression", "model=linear", "dtype=float64", "nodes=4",
             "batch_size=8", "steps=12", "optim.lr=0.05", "data.probe_size=50",
             "influence.events=0", "attribution.enabled=true", "attribution.keep_every=5")
SMALL_MLP = ("dtype=float64", "model.hidden=[6]", "data.probe_size=40", "batch_size=8",
             "topology=exponential", "attribution.enabled=true")


def execute(*overrides: str):
    sim = Simulation(make_config(*overrides, "progress=false"))
    return sim, sim.execute(Comm("gloo", 60, torch.device("cpu")))


def network_loss(sim: Simulation, theta: torch.Tensor) -> float:
    xp, yp = sim.data.x_probe.to(sim.run.dtype), sim.data.y_probe
    yp = yp.to(sim.run.dtype) if sim.model.regression else yp
    return float(sum(sim.q[k] * sim.model.probe_loss(theta[k], xp, yp)
                     for k in range(sim.run.nodes)))


# ---- exactness for linear regression -------------------------------------------------------
@pytest.mark.parametrize("topology", ["hub", "one_peer_exponential"])
def test_linear_regression_attribution_is_the_linearized_counterfactual(topology):
    """Quadratic loss, SGD, float64: the dynamics are affine, so λ·δ is exact up to the
    probe loss's own curvature: A − G = ½ Σ_k q_k δ_kᵀ H' δ_k at T (rtol 1e-9), for whole
    batches and single samples, keep_every not dividing T."""
    base = (*QUADRATIC, f"topology={topology}")
    sim, result = execute(*base)
    a = result.attribution
    real = dense_trajectory(sim)
    xp, yp = sim.data.x_probe.double(), sim.data.y_probe.double()
    H = hessian(sim.model.probe_loss)(real[0][0], xp, yp)
    from dicesim.model.data import batch_ids

    cases = [(0, 0, "all"), (2, 5, "all"), (3, 11, "all"), (1, 7, "one"), (0, 3, "one")]
    for j, t, what in cases:
        if what == "all":
            removal, A = "all", a.batch[t, 0, j]
        else:
            ids = batch_ids(sim.parts[j], sim.run.batch_size, t, sim.run.seed, j)
            removal, A = f"[{int(ids[3])}]", a.sample_value(j, t, np.array([3]))
        cf_sim = Simulation(make_config(
            *base, f"counterfactual.remove=[{{node:{j},step:{t},samples:{removal}}}]"))
        cf = dense_trajectory(cf_sim)
        d = real[-1] - cf[-1]
        G = network_loss(sim, real[-1]) - network_loss(sim, cf[-1])
        curvature = 0.5 * sum(sim.q[k] * float(d[k] @ H @ d[k]) for k in range(sim.run.nodes))
        assert abs(G) > 1e-6
        np.testing.assert_allclose(A - G, curvature, rtol=1e-9, atol=1e-18)
    # the batch is the sum of its samples (a removal keeps the denominator |B|)
    np.testing.assert_allclose(a.samples.sum(2), a.batch[:, 0, :], rtol=1e-10, atol=1e-16)


# ---- the same quantity in the two directions -----------------------------------------------
@pytest.mark.parametrize("optim", [
    ("optim=sgd", "influence.removal=single"),
    ("optim=momentum", "influence.removal=3"),
    ("optim=sgd", "optim.weight_decay=0.01", "optim.schedule=cosine", "influence.removal=5"),
    ("optim=momentum", "optim.gossip_state=true", "influence.removal=2"),
    ("optim=adam", "influence.removal=batch"),
], ids=["sgd", "momentum", "wd-cosine", "gossip-state", "adam-batch"])
def test_adjoint_equals_forward_dice_e_propagated_to_the_end(optim):
    """20 events at t = T − 8: the reverse pass's λ^{t+½}·δ equals Σ_k of DICE-E at hop
    r = T − t (curvature on), to 1e-8 — one quantity, computed backwards and forwards."""
    sim, result = execute(*SMALL_MLP, "nodes=20", "steps=10", "attribution.keep_every=3",
                          "influence.hops=8", "influence.ground_truth=false",
                          "influence.estimators=[dice_e]", "influence.events=20",
                          "influence.step_range=[2,2]", *optim)
    a = result.attribution
    forward: dict[int, float] = {}
    for r in result.influence:
        if r.hop == 8:
            forward[r.event] = forward.get(r.event, 0.0) + r.dice_e
    assert len(sim.events) == 20
    for e in sim.events:
        if e.n_removed == sim.run.batch_size:
            backward = a.batch[e.step, 0, e.source]
        else:
            backward = a.sample_value(e.source, e.step, e.positions)
        np.testing.assert_allclose(backward, forward[e.index], rtol=1e-8)


def test_keep_every_and_targets_do_not_change_the_numbers():
    """K = 1, K = T and the default ⌈√T⌉ give the same values; per_node targets sum to the
    network target; a list of targets picks those rows."""
    base = (*SMALL_MLP, "nodes=4", "steps=9", "optim=momentum", "influence.events=0")
    _, r1 = execute(*base, "attribution.keep_every=1")
    _, rT = execute(*base, "attribution.keep_every=9")
    _, rd = execute(*base, "attribution.target=per_node")
    _, rl = execute(*base, "attribution.target=[3,1]", "attribution.keep_every=4")
    np.testing.assert_allclose(r1.attribution.batch, rT.attribution.batch, rtol=1e-12)
    assert rd.attribution.settings.keep_every == 3
    np.testing.assert_allclose(rd.attribution.batch.sum(1), r1.attribution.batch[:, 0],
                               rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(rl.attribution.batch, rd.attribution.batch[:, [3, 1]],
                               rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(rd.attribution.samples, r1.attribution.samples, rtol=1e-10,
                               atol=1e-16)


# ---- distributed ---------------------------------------------------------------------------
def _attribution_table(out) -> dict[tuple[str, str, str], float]:
    return {(r["source"], r["step"], r["target"]): float(r["value"])
            for r in read_csv(out / "attribution.csv")}


def test_one_two_and_four_ranks_give_the_same_attribution(tmp_path):
    """The reverse exchange runs over the p2p layer (routes transposed): 1, 2 and 4 ranks
    agree to 1e-9 in float64 (per-node targets, momentum with its state gossiped)."""
    overrides = (*SMALL_MLP, "nodes=4", "steps=8", "topology=directed_ring", "optim=momentum",
                 "optim.gossip_state=true", "attribution.target=per_node",
                 "attribution.keep_every=3", "influence.events=0")
    tables, samples = {}, {}
    for ranks in (1, 2, 4):
        out = tmp_path / f"r{ranks}"
        run_dicesim(out, *overrides, ranks=ranks if ranks > 1 else 0)
        tables[ranks] = _attribution_table(out)
        samples[ranks] = {r["sample"]: float(r["value"]) for r in read_csv(out / "samples.csv")}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["attribution"]["keep_every"] == 3
        assert len(summary["attribution"]["node_totals"]) == 4
    assert len(tables[1]) == 8 * 4 * 4
    for ranks in (2, 4):
        assert tables[ranks].keys() == tables[1].keys()
        for key, v in tables[1].items():
            assert abs(tables[ranks][key] - v) <= 1e-9 * max(1.0, abs(v)), (ranks, key)
        for key, v in samples[1].items():
            assert abs(samples[ranks][key] - v) <= 1e-9 * max(1.0, abs(v)), (ranks, key)


def test_outputs_and_plots(tmp_path):
    from dicesim.report.summary import write_all

    sim, result = execute(*SMALL_MLP, "nodes=4", "steps=6", "influence.events=0",
                          "attribution.target=per_node", f"out_dir={tmp_path}")
    summary = write_all(tmp_path, sim, result, plots=True)
    block = summary["attribution"]
    assert set(block["node_totals_by_target"]) == {"0", "1", "2", "3"}
    assert block["cost_ratio"] > 0 and block["memory_bytes"] > 0
    for name in ("attribution.csv", "samples.csv", "attribution_heatmap.png",
                 "attribution_over_time.png"):
        assert (tmp_path / name).is_file(), name
    rows = read_csv(tmp_path / "samples.csv")
    assert {"sample", "node", "count", "value"} <= set(rows[0])
    assert "attribution" in (tmp_path / "report.md").read_text().lower()


def test_resume_keeps_the_trajectory(tmp_path):
    """The kept θ rows are part of every checkpoint: a killed and resumed run attributes the
    same as one that never stopped."""
    overrides = (*SMALL_MLP, "nodes=4", "steps=8", "influence.events=0",
                 "attribution.keep_every=3", "checkpoint.every=2")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_dicesim(full, *overrides)
    cmd = [*dicesim_command(), *overrides, f"out_dir={cut}", "progress=false", "plots=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_FAULT": "kill:0:7"}
    killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env=env)
    assert killed.returncode != 0 and (cut / "checkpoints").is_dir()
    run_dicesim(cut, *overrides, f"resume={cut}")
    a, b = _attribution_table(full), _attribution_table(cut)
    assert a.keys() == b.keys()
    for key, v in a.items():
        assert abs(b[key] - v) <= 1e-12 * max(1.0, abs(v)), key


# ---- against retraining ----------------------------------------------------------------------
def test_against_retraining_few_events():
    """digits, 8 nodes, ring, lr 0.05: 12 random whole-batch removals, each retrained with
    counterfactual.remove; the first-order attribution ranks them as retraining does."""
    base = ("nodes=8", "steps=40", "topology=ring", "optim.lr=0.05", "model.hidden=[16]",
            "dtype=float64", "influence.events=0", "data.probe_size=100", "eval_every=40")
    sim, result = execute(*base, "attribution.enabled=true")
    a = result.attribution
    final = {r.node: r.probe_loss for r in result.metrics if r.step == sim.run.steps}
    with_all = sum(sim.q[k] * final[k] for k in range(8))
    rng = np.random.default_rng(3)
    pairs = [(int(rng.integers(8)), int(t)) for t in rng.choice(40, 12, replace=False)]
    est, truth = [], []
    for j, t in pairs:
        cf_sim, cf = execute(*base, f"counterfactual.remove=[{{node:{j},step:{t},samples:all}}]")
        last = {r.node: r.probe_loss for r in cf.metrics if r.step == sim.run.steps}
        truth.append(with_all - sum(sim.q[k] * last[k] for k in range(8)))
        est.append(a.batch[t, 0, j])
    assert stats.spearmanr(est, truth)[0] >= 0.9
    rel = np.abs(np.array(est) - truth).sum() / np.abs(truth).sum()
    assert rel <= 0.2
