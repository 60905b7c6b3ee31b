"""The hand-written backprop of dense stacks equals torch.func's gradient."""

import pytest
import torch
from torch.func import grad_and_value, vmap

from dicesim.model import build_model


def _case(name: str, hidden: list[int], activation: str, classes: int, rows: int = 5,
          batch: int = 7, features: tuple[int, ...] = (3, 4)):
    torch.manual_seed(0)
    model = build_model({"name": name, "hidden": hidden, "activation": activation},
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


def test_models_without_a_hand_written_gradient_fall_back_to_torch_func():
    gelu, *_ = _case("mlp", [6], "gelu", 10)
    cnn = build_model({"name": "cnn", "channels": [2]}, (1, 4, 4), 3)
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
