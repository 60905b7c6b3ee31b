"""The hand-written backprop of dense stacks equals torch.func's gradient and HVP."""

import numpy as np
import pytest
import torch
from conftest import make_config
from torch.func import grad_and_value, vmap

from dicesim.config import Model
from dicesim.model.models import build_model
from dicesim.run.engine import Simulation


def _case(name: str, hidden: list[int], activation: str, classes: int, rows: int = 5,
          batch: int = 7, features: tuple[int, ...] = (3, 4)):
    torch.manual_seed(0)
    model = build_model(Model(name=name, hidden=hidden, activation=activation),
                        features, classes)
    theta = torch.randn(rows, model.P, dtype=torch.float64)
    x = torch.randn(rows, batch, *features, dtype=torch.float64)
    y = (torch.randint(0, classes, (rows, batch)) if classes
         else torch.randn(rows, batch, dtype=torch.float64))
    w = torch.rand(rows, batch, dtype=torch.float64)
    w[0, :3] = 0  # removed samples keep the denominator
    return model, theta, x, y, w


@pytest.mark.parametrize("name,hidden,activation,classes", [
    ("logreg", [], "tanh", 10),
    ("linear", [], "tanh", 0),
    ("mlp", [6], "tanh", 10),
    ("mlp", [6, 5], "relu", 3),
    ("mlp", [4], "sigmoid", 0),
])
def test_dense_grads_match_torch_func(name, hidden, activation, classes):
    model, theta, x, y, w = _case(name, hidden, activation, classes)
    assert model.dense is not None
    fast_grad, fast_loss = model.grads(theta, x, y, w)
    ref_grad, ref_loss = vmap(grad_and_value(model.weighted_loss))(theta, x, y, w)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name,hidden,classes", [("mlp", [6, 5], 10), ("linear", [], 0)])
def test_dense_grads_in_row_chunks_equal_one_pass(monkeypatch, name, hidden, classes):
    """Large blocks go through dense_grads in chunks of rows (cache-sized): the same
    gradients and losses as one pass, including a last chunk shorter than the others."""
    import dicesim.model.models as model_module

    model, theta, x, y, w = _case(name, hidden, "tanh", classes, rows=37)
    one_grad, one_loss = model.grads(theta, x, y, w)
    per_row = model.P + 7 * sum(layer.out + layer.inp for layer in model.dense)
    calls = []
    backprop = model._dense_backprop
    monkeypatch.setattr(model_module, "GRAD_BUDGET", 16 * per_row)  # 16 rows a chunk
    monkeypatch.setattr(model, "_dense_backprop", lambda th, *a: calls.append(len(th))
                        or backprop(th, *a))
    grad, loss = model.grads(theta, x, y, w)
    assert calls == [16, 16, 5]
    torch.testing.assert_close(grad, one_grad, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(loss, one_loss, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("per_row", [False, True])
def test_dense_probe_losses_equal_torch_func(per_row):
    """probe_losses (the ground truth's loss gaps) streams dense stacks through probe_eval
    instead of vmapping cross_entropy: the same L'(θ) per row."""
    model, theta, x, y, _ = _case("mlp", [6], "tanh", 10)
    xp, yp = (x, y) if per_row else (x[0], y[0])
    reference = vmap(model.probe_loss, in_dims=(0, 0, 0) if per_row else (0, None, None))
    torch.testing.assert_close(model.probe_losses(theta, xp, yp, per_row),
                               reference(theta, xp, yp), rtol=1e-13, atol=1e-14)


def test_models_without_a_hand_written_gradient_fall_back_to_torch_func():
    gelu, *_ = _case("mlp", [6], "gelu", 10)
    cnn = build_model(Model(name="cnn", channels=[2]), (1, 4, 4), 3)
    assert gelu.dense is None and cnn.dense is None


@pytest.mark.parametrize("per_row", [False, True])
def test_dense_probe_gradients_match_torch_func(per_row):
    model, theta, x, y, w = _case("mlp", [6], "tanh", 10)
    xp, yp = (x, y) if per_row else (x[0], y[0])
    fast = model.grads_and_probe_grads(theta, x, y, w, xp, yp, per_row)
    dims = (0, 0, 0) if per_row else (0, None, None)
    ref_probe = vmap(grad_and_value(model.probe_loss), in_dims=dims)(theta, xp, yp)
    ref_batch = vmap(grad_and_value(model.weighted_loss))(theta, x, y, w)
    for got, want in zip(fast, (*ref_batch, *ref_probe), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


# ---- evaluation in bounded memory ----------------------------------------------------------
def _reference_probe_eval(model, theta, x, y, per_row):
    """The one-pass evaluation probe_eval replaced: vmap over rows, every sample at once."""
    def one(th, xx, yy):
        out = model.forward(th, xx)
        if model.regression:
            loss = ((out.squeeze(-1) - yy) ** 2).mean()
            return loss, -loss
        loss = torch.nn.functional.cross_entropy(out, yy)
        return loss, (out.argmax(-1) == yy).to(out.dtype).mean()

    return vmap(one, in_dims=(0, 0, 0) if per_row else (0, None, None))(theta, x, y)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("name,hidden,classes,features", [
    ("logreg", [], 10, (3, 4)),
    ("linear", [], 0, (5,)),
    ("mlp", [6, 5], 3, (3, 4)),
    ("cnn", [], 4, (1, 6, 6)),
])
def test_chunked_probe_eval_equals_one_pass(name, hidden, classes, features, per_row):
    torch.manual_seed(1)
    model = build_model(Model(name=name, hidden=hidden, channels=[2, 3]), features, classes)
    rows, m = 7, 53
    theta = torch.randn(rows, model.P, dtype=torch.float64)
    lead = (rows, m) if per_row else (m,)
    x = torch.randn(*lead, *features, dtype=torch.float64)
    y = torch.randint(0, classes, lead) if classes else torch.randn(*lead, dtype=torch.float64)
    ref_loss, ref_acc = _reference_probe_eval(model, theta, x, y, per_row)
    width = model._eval_width(features)
    for budget in (1, width * 5, width * 2 * m, 1 << 40):  # 1 row × 1 sample … one pass
        loss, acc = model.probe_eval(theta, x, y, per_row, budget=budget)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        if classes:
            assert torch.equal(acc, ref_acc)
        else:
            torch.testing.assert_close(acc, ref_acc, rtol=0, atol=1e-12)


def test_probe_eval_memory_is_bounded():
    """Many rows on a large test set: the peak memory grows by about the chunk budget, not
    by rows × samples × width (here 512 × 2000 × 64 floats, 260 MB per activation)."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from dicesim.model.models import build_model\n"
        "from dicesim.config import Model\n"
        "m = build_model(Model(name='mlp', hidden=[64]), (256,), 10)\n"
        "theta = torch.randn(512, m.P)\n"
        "x, y = torch.randn(2000, 256), torch.randint(0, 10, (2000,))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m.probe_eval(theta, x, y, budget=1 << 20)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout
    assert int(out) < 64, f"probe_eval grew the peak RSS by {out} MB"


@pytest.mark.parametrize(("data", "model"), [
    ("data=digits", "model.activation=tanh"), ("data=digits", "model.activation=sigmoid"),
    ("data=digits", "model.activation=relu"), ("data=synthetic_regression", "model=linear"),
    ("data=synthetic_regression", "model.activation=tanh")])
def test_dense_hvps_and_slopes_match_torch_func(data, model):
    """The hand-written dense forward-over-reverse pass (what hvps uses for logreg, linear
    and mlp) = torch.func's jvp of grad, HVPs and per-sample slopes."""
    import copy

    hidden = () if model == "model=linear" else ("model.hidden=[7,5]",)
    sim = Simulation(make_config(data, model, "dtype=float64", *hidden, "nodes=2",
                                 "batch_size=6"))
    m = sim.model
    assert m.dense is not None
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, m.P, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(3, m.P, generator=g, dtype=torch.float64)
    x = sim.data.x_train[:18].double().view(3, 6, -1)
    y = sim.data.y_train[:18].view(3, 6)
    y = y.double() if m.regression else y
    w = torch.ones(3, 6, dtype=torch.float64)
    w[1, 2] = 0.0
    reference = copy.copy(m)
    reference.dense = None  # the torch.func path
    hv, slopes = m.hvps_and_slopes(theta, v, x, y, w)
    hv_ref, slopes_ref = reference.hvps_and_slopes(theta, v, x, y, w)
    torch.testing.assert_close(m.hvps(theta, v, x, y, w), hv_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reference.hvps(theta, v, x, y, w), hv_ref, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(hv, hv_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(slopes, slopes_ref, rtol=1e-10, atol=1e-12)


def test_numpy_correlations_equal_scipy():
    """dicesim.report.stats (what every run's alignment uses) against scipy.stats, ties included."""
    from scipy import stats as scipy_stats

    from dicesim.report.stats import average_ranks, pearson, spearman

    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 500):
        a = rng.normal(size=n)
        b = a + rng.normal(size=n)
        tied = np.round(b, 1)  # many ties
        assert pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0], abs=1e-12)
        assert spearman(a, tied) == pytest.approx(scipy_stats.spearmanr(a, tied)[0], abs=1e-12)
        np.testing.assert_allclose(average_ranks(tied), scipy_stats.rankdata(tied))
    assert np.isnan(pearson(np.ones(4), np.arange(4)))
