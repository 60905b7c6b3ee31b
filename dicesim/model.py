"""Models as pure functions of one flat parameter vector.

Every node's parameters are a row of a [rows, P] tensor, so a rank's nodes (and
the tracker's shadow and perturbation rows) are stepped together with
`torch.func.vmap` — no per-node Python loop, no materialized Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from dicesim.errors import ConfigError

MODELS = ("logreg", "linear", "mlp", "cnn")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def build_module(cfg: Mapping, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    name = cfg["name"]
    out = max(num_classes, 1)  # regression: one output
    flat_in = math.prod(input_shape)
    act_name = cfg.get("activation", "tanh")
    if act_name not in ACTIVATIONS:
        raise ConfigError(
            f"model.activation={act_name}: unknown activation; choose one of {sorted(ACTIVATIONS)}"
        )
    act = ACTIVATIONS[act_name]
    if name in ("logreg", "linear"):
        return nn.Sequential(nn.Flatten(), nn.Linear(flat_in, out))
    if name == "mlp":
        hidden = list(cfg.get("hidden", [64]))
        if not hidden or any(int(h) <= 0 for h in hidden):
            raise ConfigError(f"model.hidden={hidden}: needs one or more positive layer widths")
        layers: list[nn.Module] = [nn.Flatten()]
        width = flat_in
        for h in hidden:
            layers += [nn.Linear(width, int(h)), act()]
            width = int(h)
        layers.append(nn.Linear(width, out))
        return nn.Sequential(*layers)
    if name == "cnn":
        if len(input_shape) != 3:
            raise ConfigError(
                f"model.name=cnn needs image inputs [C,H,W], got shape {tuple(input_shape)}; "
                "set data.image=true"
            )
        c, h, w = input_shape
        channels = list(cfg.get("channels", [8, 16]))
        layers = []
        for ch in channels:
            layers += [nn.Conv2d(c, int(ch), 3, padding=1), act()]
            c = int(ch)
            if h >= 4 and w >= 4:
                layers.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, out)]
        return nn.Sequential(*layers)
    raise ConfigError(f"model.name={name}: unknown model; choose one of {', '.join(MODELS)}")


class FlatModel:
    """A module evaluated functionally from a flat parameter vector θ ∈ R^P."""

    def __init__(self, module: nn.Module, regression: bool):
        self.module = module
        self.regression = regression
        params = dict(module.named_parameters())
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.P = sum(self.numels)

    def flat_init(self, seed: int, dtype: torch.dtype) -> Tensor:
        torch.manual_seed(seed)
        for m in self.module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).to(dtype)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        chunks = torch.split(theta, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.module, self.unflatten(theta), (x,))

    def sample_losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = self.forward(theta, x)
        if self.regression:
            return (out.squeeze(-1) - y) ** 2
        return nn.functional.cross_entropy(out, y, reduction="none")

    def weighted_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """(1/|B|) Σ_i w_i ℓ_i(θ): removal zeroes w_i but keeps the denominator |B|."""
        return (self.sample_losses(theta, x, y) * w).sum() / w.shape[0]

    # ---- row-vectorized maths over a [rows, P] tensor ---------------------------------------
    def grads(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """∇_θ and value of the weighted batch loss, one row per parameter row."""
        return vmap(grad_and_value(self.weighted_loss))(theta, x, y, w)

    def hvps(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """H(θ) v for the weighted batch loss at θ (forward-over-reverse), one per row."""

        def one(th: Tensor, vv: Tensor, xx: Tensor, yy: Tensor, ww: Tensor) -> Tensor:
            g = grad(self.weighted_loss)
            return jvp(lambda p: g(p, xx, yy, ww), (th,), (vv,))[1]

        return vmap(one)(theta, v, x, y, w)

    def probe_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.sample_losses(theta, x, y).mean()

    # x, y: one probe set for every row, or (per_row=True) one per row, stacked
    def probe_eval(self, theta: Tensor, x: Tensor, y: Tensor,
                   per_row: bool = False) -> tuple[Tensor, Tensor]:
        """Probe loss L'(θ) and accuracy per row."""

        def one(th: Tensor, xx: Tensor, yy: Tensor) -> tuple[Tensor, Tensor]:
            out = self.forward(th, xx)
            if self.regression:
                loss = ((out.squeeze(-1) - yy) ** 2).mean()
                return loss, -loss
            loss = nn.functional.cross_entropy(out, yy)
            return loss, (out.argmax(-1) == yy).to(out.dtype).mean()

        return vmap(one, in_dims=_probe_dims(per_row))(theta, x, y)

    def probe_grads(self, theta: Tensor, x: Tensor, y: Tensor,
                    per_row: bool = False) -> tuple[Tensor, Tensor]:
        """∇L'(θ) and L'(θ) per row."""
        return vmap(grad_and_value(self.probe_loss), in_dims=_probe_dims(per_row))(theta, x, y)

    def grads_and_probe_grads(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor,
                              xp: Tensor, yp: Tensor, per_row: bool = False
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`grads` and `probe_grads` at the same θ rows in one vmapped call (proximal
        influence needs both for every node at every step)."""
        batch_grad = grad_and_value(self.weighted_loss)
        probe_grad = grad_and_value(self.probe_loss)

        def both(th: Tensor, xx: Tensor, yy: Tensor, ww: Tensor, xq: Tensor,
                 yq: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return (*batch_grad(th, xx, yy, ww), *probe_grad(th, xq, yq))

        dims = (0, 0, 0, 0, *_probe_dims(per_row)[1:])
        return vmap(both, in_dims=dims)(theta, x, y, w, xp, yp)

    def probe_losses(self, theta: Tensor, x: Tensor, y: Tensor, per_row: bool = False) -> Tensor:
        return vmap(self.probe_loss, in_dims=_probe_dims(per_row))(theta, x, y)


def _probe_dims(per_row: bool) -> tuple[int, int | None, int | None]:
    return (0, 0, 0) if per_row else (0, None, None)


@dataclass
class Probe:
    """The probe sets Z'_k of a rank's nodes: one shared set (x: [m, ...]) or, with
    per_node, one per local node (x: [local nodes, m, ...])."""

    x: Tensor
    y: Tensor
    per_node: bool = False

    def at(self, rows: Tensor | int) -> tuple[Tensor, Tensor, bool]:
        """(x, y, per_row) for the parameter rows of these local nodes."""
        if not self.per_node:
            return self.x, self.y, False
        if isinstance(rows, int):
            return self.x[rows:rows + 1], self.y[rows:rows + 1], True
        return self.x[rows], self.y[rows], True


def build_model(cfg: Mapping, input_shape: Sequence[int], num_classes: int) -> FlatModel:
    name = cfg["name"]
    if name == "linear" and num_classes > 0:
        raise ConfigError(
            "model.name=linear is linear regression and needs a regression data set; "
            "use data=synthetic_regression, or model=logreg for classification"
        )
    if name == "logreg" and num_classes == 0:
        raise ConfigError("model.name=logreg needs a classification data set; use model=linear")
    return FlatModel(build_module(cfg, input_shape, num_classes), regression=num_classes == 0)
