"""Your own torch.nn.Module as the node model, and the shipped resnet and vit, through the
generic torch.func path (docs/models.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_run, execute, make_config, probe_losses, read_csv, run_dicesim
from torch import Tensor, nn

from dicesim.common.errors import ConfigError
from dicesim.config import section
from dicesim.model.models import FlatModel, build_model, check_memory

IMAGES = ("data.image=true", "nodes=4", "batch_size=4", "dtype=float64", "data.probe_size=20",
          "eval_every=1")


class WrappedMLP(nn.Module):
    """The mlp preset's layers inside another module: not a dense stack, so the generic
    torch.func path; the same parameters in the same order as model=mlp."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int]):
        super().__init__()
        widths, layers = [int(np.prod(input_shape)), *hidden], [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], max(num_classes, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WithBatchNorm(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class WithBuffer(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.scale = nn.Linear(64, num_classes)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(x.flatten(1))


class WithDropout(WithBuffer):
    def __init__(self, num_classes: int):
        nn.Module.__init__(self)
        self.scale = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, num_classes))


class WithIntegerParameter(WithBuffer):
    def __init__(self, num_classes: int):
        nn.Module.__init__(self)
        self.scale = nn.Linear(64, num_classes)
        self.count = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)


class WrongOutput(WithBuffer):
    def __init__(self):
        nn.Module.__init__(self)
        self.scale = nn.Linear(64, 7)


def custom(target: str, **kwargs) -> object:
    return section("model", {"name": "custom", "_target_": target, "kwargs": kwargs})


@pytest.mark.parametrize("classes", [3, 0])
def test_generic_path_equals_the_hand_written_dense_path(classes):
    """The same MLP built as model=mlp (hand-written batched backprop) and as a custom
    module (torch.func): losses, gradients, HVPs, slopes and probe values equal to 1e-10
    (float64)."""
    dense = build_model(section("model", {"name": "mlp", "hidden": [5, 4]}), (1, 8, 8), classes)
    generic = build_model(custom("test_custom_model.WrappedMLP", hidden=[5, 4]), (1, 8, 8),
                          classes)
    assert dense.dense is not None and generic.dense is None and generic.P == dense.P
    theta = dense.flat_init(0, torch.float64)
    torch.testing.assert_close(generic.flat_init(0, torch.float64), theta, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    rows, batch = 3, 6
    theta = theta + 0.3 * torch.randn(rows, dense.P, generator=g, dtype=torch.float64)
    v = torch.randn(rows, dense.P, generator=g, dtype=torch.float64)
    x = torch.randn(rows, batch, 1, 8, 8, generator=g, dtype=torch.float64)
    y = (torch.randint(0, classes, (rows, batch), generator=g) if classes
         else torch.randn(rows, batch, generator=g, dtype=torch.float64))
    w = torch.tensor([1.0, 0, 1, 1, 0, 1], dtype=torch.float64).expand(rows, batch)
    xp, yp = x[0], y[0]

    def same(a, b):
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

    same(dense.grads(theta, x, y, w), generic.grads(theta, x, y, w))
    same([dense.hvps(theta, v, x, y, w)], [generic.hvps(theta, v, x, y, w)])
    same(dense.hvps_and_slopes(theta, v, x, y, w), generic.hvps_and_slopes(theta, v, x, y, w))
    same(dense.probe_grads(theta, xp, yp), generic.probe_grads(theta, xp, yp))
    same(dense.probe_eval(theta, xp, yp), generic.probe_eval(theta, xp, yp))
    same([dense.probe_losses(theta, x, y, per_row=True)],
         [generic.probe_losses(theta, x, y, per_row=True)])
    same(dense.grads_and_probe_grads(theta, x, y, w, xp, yp),
         generic.grads_and_probe_grads(theta, x, y, w, xp, yp))


@pytest.mark.parametrize(("target", "kwargs", "message"), [
    ("test_custom_model.WithBatchNorm", {}, "model._target_=test_custom_model.WithBatchNorm: "
     "layer features.2 (BatchNorm1d): torch's BatchNorm is not supported (its running "
     "statistics are buffers outside θ); use model=resnet model.norm=batch"),
    ("test_custom_model.WithBuffer", {}, "layer (root) (WithBuffer) has buffers (calls): not "
     "yet supported"),
    ("test_custom_model.WithDropout", {}, "layer scale.0 (Dropout): dropout is not supported"),
    ("test_custom_model.WithIntegerParameter", {}, "layer (root) (WithIntegerParameter): "
     "parameter count is torch.int64, not floating point"),
    ("test_custom_model.WrongOutput", {}, "the output of a batch of 2 is [2, 7], but the data "
     "has 10 classes; return [batch, 10]"),
    ("no_such_package.nets.Net", {}, "cannot import no_such_package.nets (No module named "
     "'no_such_package')"),
    ("test_custom_model.Missing", {}, "module test_custom_model has no Missing"),
    ("test_custom_model.custom", {}, "test_custom_model.custom is not a torch.nn.Module class"),
    ("SmallNet", {}, "give a dotted import path"),
    ("test_custom_model.WrappedMLP", {"hidden": [4], "depth": 2}, "WrappedMLP(hidden=[4], "
     "depth=2, num_classes=10, input_shape=(1, 8, 8)) raised TypeError: "),
])
def test_unsupported_modules_are_refused_with_one_line_naming_the_layer(target, kwargs, message):
    with pytest.raises(ConfigError) as err:
        build_model(custom(target, **kwargs), (1, 8, 8), 10)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_too_large_for_the_memory_is_refused_with_the_estimate():
    check_memory(1000, 8, torch.float64, "model=resnet", available=1000 * 8 * 8 * 4)
    with pytest.raises(ConfigError, match=r"model=resnet: 1,000 parameters × 8 nodes × 8 bytes "
                                          r"× 4 rows ≈ 0.0 GiB, more than the 0.0 GiB"):
        check_memory(1000, 8, torch.float64, "model=resnet", available=1000 * 8 * 8 * 4 - 1)
    with pytest.raises(ConfigError, match=r"× 1000000 nodes × 8 bytes × 4 rows ≈ \d+\.\d GiB"):
        build_model(section("model", {"name": "mlp", "hidden": [4096]}), (1024,), 10,
                    nodes=10**6, dtype=torch.float64)


def test_plus_keys_are_constructor_arguments_only_for_a_custom_model():
    cfg = make_config("model=custom", "model._target_=examples.small_net.SmallNet",
                      "+model.width=3", "+model.kwargs.bias=false")
    assert cfg.model.kwargs == {"width": 3, "bias": False}
    for overrides, line in [
        (("model=mlp", "+model.widht=3"), "model.widht: unknown key in model"),
        (("model=resnet", "+model.widht=3"), "model.widht: unknown key in model; did you mean "
         "model.width?"),
        (("model=resnet", "model.depth=10"), "model.depth=10: a CIFAR-style ResNet has depth "
         "6n + 2 (8, 14, 20, 32, …); set e.g. model.depth=8"),
        (("model=vit", "model.heads=3"), "model.heads=3: must divide model.dim=16"),
        (("model.name=resnet",), "model.name=resnet: choose this model with model=resnet"),
        (("model=custom",), "model._target_ is not set"),
    ]:
        with pytest.raises(ConfigError) as err:
            make_config("data.image=true", *overrides)
        assert str(err.value).startswith(line), str(err.value)


def test_the_example_module_runs_three_steps(tmp_path):
    run_dicesim(tmp_path, "data=digits", "data.image=true", "model=custom",
                "model._target_=examples.small_net.SmallNet", "+model.width=4", "steps=3",
                "nodes=4", "influence.events=2", "influence.hops=1")
    steps = {int(r["step"]) for r in read_csv(tmp_path / "metrics.csv")}
    assert max(steps) == 3


def test_resnet_ground_truth_equals_two_separate_runs():
    """DICE-GT for model=resnet norm=group (float64): the shadow rows' G[e,s,k] equals
    q_k (L'_k of the real run − L'_k of a counterfactual run with the removal) to 1e-10."""
    base = (*IMAGES, "model=resnet", "model.width=2", "model.groups=1", "steps=4")
    overrides = (*base, "influence.hops=2", "influence.events=[{node:1,step:1}]",
                 "influence.estimators=[dice_e]")
    sim, result = execute(*overrides)
    assert isinstance(sim.model, FlatModel) and sim.model.dense is None
    _, cf_result = execute(*base, "influence.events=0",
                           "counterfactual.remove=[{node:1,step:1,samples:all}]")
    real, cf = probe_losses(result), probe_losses(cf_result)
    checked = 0
    for row in result.influence:
        if row.hop == 0:
            continue
        step = 1 + row.hop
        want = sim.q[row.node] * (real[step, row.node] - cf[step, row.node])
        assert abs(row.dice_gt - want) <= 1e-10 * max(1.0, abs(want))
        checked += 1
    assert checked >= 4 and np.abs(real - cf).max() > 1e-6  # the removal moved the run


def test_vit_on_two_ranks_equals_one_rank(tmp_path):
    overrides = (*IMAGES, "model=vit", "model.patch=4", "model.dim=8", "steps=3",
                 "influence.hops=1", "influence.events=[{node:0,step:1},{node:3,step:0}]",
                 "save_params=true")
    _, single = execute(*overrides)
    run_dicesim(tmp_path, *overrides, ranks=2)
    assert_same_run(tmp_path, single, columns=("dice_gt",))
