"""model=resnet model.norm=batch: a removed sample leaves the loss and the batch statistics;
the running statistics are node state in θ (stepped, gossiped, checkpointed, shadowed)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    dicesim_command,
    events_arg,
    execute,
    make_config,
    probe_losses,
    read_csv,
    run_dicesim,
)
from torch import nn

from dicesim.common.errors import ConfigError
from dicesim.config import section
from dicesim.model.models import build_model
from dicesim.model.nets import WeightedBatchNorm

BN = ("data=digits", "data.image=true", "model=resnet", "model.norm=batch", "model.width=2",
      "nodes=4", "batch_size=4", "dtype=float64", "data.probe_size=20", "steps=5",
      "influence.estimators=[]", "topology=ring")


def test_weighted_batch_norm_is_torchs_batch_norm_of_the_kept_samples():
    """Outputs of the kept samples and the running statistics after the step equal
    torch.nn.BatchNorm2d run on the kept samples alone; eval mode equals torch's too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0, 1, 1, 0, 1], dtype=torch.float64)
    kept = w.bool()
    ours = WeightedBatchNorm(3).double()
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        scale, shift = torch.randn(3, generator=g), torch.randn(3, generator=g)
        for layer in (ours, ref):
            layer.weight.copy_(scale)
            layer.bias.copy_(shift)
        ours.running_mean.copy_(torch.randn(3, generator=g))
        ours.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        ref.running_mean.copy_(ours.running_mean)
        ref.running_var.copy_(ours.running_var)
    ours.sample_weights = w
    y = ours(x)
    y_ref = ref.train()(x[kept])
    torch.testing.assert_close(y[kept], y_ref, rtol=0, atol=1e-13)
    assert ours.updated is not None
    torch.testing.assert_close(ours.updated[0], ref.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(ours.updated[1], ref.running_var, rtol=0, atol=1e-14)
    ours.sample_weights = None
    with torch.no_grad():
        ours.running_mean.copy_(ref.running_mean)
        ours.running_var.copy_(ref.running_var)
    torch.testing.assert_close(ours(x), ref.eval()(x), rtol=0, atol=1e-13)


def _resnet():
    model = build_model(section("model", {"name": "resnet", "norm": "batch", "width": 2}),
                        (1, 8, 8), 3)
    g = torch.Generator().manual_seed(1)
    theta = model.flat_init(0, torch.float64)
    theta = (theta + 0.2 * torch.randn(2, model.P, generator=g, dtype=torch.float64))
    cols = model.running_columns
    theta[:, cols] = theta[:, cols].abs() + 0.5  # running variances stay positive
    x = torch.randn(2, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 6), generator=g)
    return model, theta, x, y


def test_a_removed_sample_is_absent_from_the_step_of_the_resnet():
    """∇ of (1/|B|) Σ w_i ℓ_i with w = 0 on the removed samples equals |kept|/|B| times ∇ of
    the kept samples alone as a batch; the running statistics after the step equal theirs;
    the gradient has no running-statistics columns. A batch removed whole moves nothing."""
    model, theta, x, y = _resnet()
    cols = model.running_columns
    w = torch.tensor([1.0, 0, 1, 1, 0, 1], dtype=torch.float64).expand(2, 6)
    kept = w[0].bool()
    ones = torch.ones(2, int(kept.sum()), dtype=torch.float64)
    g, loss = model.grads(theta, x, y, w)
    g_kept, loss_kept = model.grads(theta, x[:, kept], y[:, kept], ones)
    torch.testing.assert_close(g, g_kept * 4 / 6, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_kept * 4 / 6, rtol=1e-12, atol=1e-14)
    assert g[:, cols].abs().max() == 0
    new = model.running_stats(theta, x, w)
    torch.testing.assert_close(new, model.running_stats(theta, x[:, kept], ones),
                               rtol=1e-12, atol=1e-14)
    assert (new - theta[:, cols]).abs().max() > 1e-3  # they did move
    zero = torch.zeros_like(w)
    assert model.grads(theta, x, y, zero)[0].abs().max() == 0
    torch.testing.assert_close(model.running_stats(theta, x, zero), theta[:, cols],
                               rtol=0, atol=0)


def _removal(e: dict) -> str:
    samples = e.get("samples", "all")
    samples = f"[{','.join(map(str, samples))}]" if isinstance(samples, list) else samples
    return f"counterfactual.remove=[{{node:{e['node']},step:{e['step']},samples:{samples}}}]"


EVENTS = [{"node": 2, "step": 1}, {"node": 0, "step": 2, "samples": [816, 982]}]


def test_ground_truth_equals_two_separate_runs_with_batch_norm():
    """G[e,s,k] from the shadows = q_k (L'_k of the real run − L'_k of the run with the
    removal from the start) to 1e-10; L'_k is evaluated with node k's running statistics,
    which the shadows carry (whole batch and two samples of a batch removed)."""
    sim, result = execute(*BN, "influence.hops=3", events_arg(EVENTS))
    real = probe_losses(result)
    final = result.final_params[:, sim.model.running_columns]
    assert (final - sim.model.flat_init(0, torch.float64)[sim.model.running_columns]
            ).abs().min() > 0  # every running statistic moved
    checked = 0
    for index, e in enumerate(EVENTS):
        _, cf_result = execute(*BN, "influence.events=0", _removal(e))
        cf = probe_losses(cf_result)
        for r in result.influence:
            if r.event != index or r.hop == 0:
                continue
            step = e["step"] + r.hop
            want = sim.q[r.node] * (real[step, r.node] - cf[step, r.node])
            assert abs(r.dice_gt - want) <= 1e-10
            assert abs(want) > 1e-6  # the removal changed something
            checked += 1
    assert checked >= 18


def test_batch_norm_runs_the_same_on_one_and_two_ranks(tmp_path):
    run = (*BN, "eval_every=1", "influence.hops=3", events_arg(EVENTS))
    _, result = execute(*run)
    single = {(r.event, r.hop, r.node): r.dice_gt for r in result.influence}
    run_dicesim(tmp_path, *run, ranks=2)
    got = {(int(r["event"]), int(r["hop"]), int(r["node"])): float(r["dice_gt"])
           for r in read_csv(tmp_path / "influence.csv")}
    assert set(got) == set(single)
    for key, value in single.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-15)
    metrics = {(int(r["step"]), int(r["node"])): float(r["probe_loss"])
               for r in read_csv(tmp_path / "metrics.csv")}
    for r in result.metrics:
        np.testing.assert_allclose(metrics[(r.step, r.node)], r.probe_loss, rtol=1e-9)


def test_batch_norm_resumes_to_the_same_bytes(tmp_path):
    """A run killed after its step-8 checkpoint and resumed writes the bytes of one that
    never stopped: the running statistics (in θ and in the shadows) are in the checkpoint."""
    run = (*BN, "steps=10", "eval_every=1", "influence.events=3", "influence.hops=2",
           "checkpoint.every=4")
    run_dicesim(tmp_path / "whole", *run)
    cut = tmp_path / "cut"
    killed = subprocess.run(
        [*dicesim_command(), *run, f"out_dir={cut}", "timeout_s=10", "progress=false",
         "plots=false"], cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DICESIM_FAULT": "kill:0:9"})
    assert killed.returncode != 0
    resumed = run_dicesim(cut, *run, f"resume={cut}")
    assert "step_000008" in resumed.stdout
    for name in ("metrics.csv", "influence.csv"):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize(("extra", "first"), [
    (("influence.events=2",), "model.norm=batch: influence.estimators=[dice_e, dice_gauss2] "
     "is not yet supported with BatchNorm"),
    (("influence.estimators=[]", "influence.proximal=true"),
     "model.norm=batch: influence.proximal=true is not yet supported"),
])
def test_estimators_that_linearize_the_step_are_refused_with_batch_norm(extra, first):
    with pytest.raises(ConfigError) as err:
        make_config("data.image=true", "model=resnet", "model.norm=batch", *extra)
    assert str(err.value).startswith(first) and "\n" not in str(err.value)


def test_batch_norm_with_ground_truth_alone_is_accepted():
    cfg = make_config("data.image=true", "model=resnet", "model.norm=batch",
                      "influence.estimators=[]")
    assert cfg.influence.events and cfg.influence.ground_truth
