"""Models as pure functions of one flat parameter vector.

Every node's parameters are a row of a [rows, P] tensor, so a rank's nodes (and
the tracker's shadow and perturbation rows) are stepped together with
`torch.func.vmap` — no per-node Python loop, no materialized Hessian.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from dicesim.common.errors import ConfigError
from dicesim.common.stopping import PhaseChecks
from dicesim.config import MODELS as MODELS  # re-exported
from dicesim.config import CustomModel, Model, ResNetModel, VitModel
from dicesim.model.nets import ResNet, ViT, WeightedBatchNorm

# activation elements one evaluation chunk may hold (16 MiB in float32, 32 MiB in float64)
EVAL_BUDGET = 1 << 22
GRAD_BUDGET = 1 << 22  # elements (θ rows and activations) per chunk of `dense_grads`
# parameter rows a node holds at least (θ, its gradient, the gossip buffer, one optimizer
# or shadow row): the floor of the memory estimate `check_memory` refuses a model with
ROWS_PER_NODE = 4
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def build_module(cfg: Model, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    name = cfg.name
    out = max(num_classes, 1)  # regression: one output
    flat_in = math.prod(input_shape)
    act = ACTIVATIONS[cfg.activation]
    if name in ("logreg", "linear"):
        return nn.Sequential(nn.Flatten(), nn.Linear(flat_in, out))
    if name == "mlp":
        hidden = list(cfg.hidden)
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
        channels = list(cfg.channels)
        layers = []
        for ch in channels:
            layers += [nn.Conv2d(c, int(ch), 3, padding=1), act()]
            c = int(ch)
            if h >= 4 and w >= 4:
                layers.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, out)]
        return nn.Sequential(*layers)
    if isinstance(cfg, ResNetModel | VitModel):
        return _image_network(cfg, tuple(input_shape), out, act)
    if isinstance(cfg, CustomModel):
        return _custom_module(cfg, tuple(input_shape), out)
    raise AssertionError(name)  # the schema's ModelName has no other member


def _image_network(cfg: ResNetModel | VitModel, shape: tuple[int, ...], out: int,
                   act: type[nn.Module]) -> nn.Module:
    if len(shape) != 3:
        raise ConfigError(f"model.name={cfg.name} needs image inputs [C,H,W], got shape "
                          f"{shape}; set data.image=true")
    if isinstance(cfg, ResNetModel):
        return ResNet(shape, out, cfg.depth, cfg.width, str(cfg.norm), cfg.groups, act)
    if shape[1] % cfg.patch or shape[2] % cfg.patch:
        raise ConfigError(f"model.patch={cfg.patch}: must divide the image's height and width "
                          f"{shape[1]}×{shape[2]}")
    return ViT(shape, out, cfg.patch, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim, act)


def _custom_module(cfg: CustomModel, shape: tuple[int, ...], out: int) -> nn.Module:
    """`model._target_` imported and called with model.kwargs (and num_classes, input_shape
    where its signature takes them and kwargs does not say)."""
    target = str(cfg._target_)
    where = f"model._target_={target}"
    path, _, attr = target.rpartition(".")
    if not path:
        raise ConfigError(f"{where}: give a dotted import path, module.Class, e.g. "
                          "mypkg.nets.SmallNet")
    try:
        found = getattr(importlib.import_module(path), attr)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import {path} ({err}); run from the directory "
                          "that holds the package or add it to PYTHONPATH") from None
    except AttributeError:
        raise ConfigError(f"{where}: module {path} has no {attr}") from None
    except Exception as err:  # the user's module fails while importing
        raise ConfigError(f"{where}: importing {path} raised {type(err).__name__}: "
                          f"{_one_line(err)}") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"{where}: {target} is not a torch.nn.Module class "
                          f"(it is {type(found).__name__})")
    kwargs = dict(cfg.kwargs)
    params = inspect.signature(found).parameters
    for key, value in (("num_classes", out), ("input_shape", shape)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        return found(**kwargs)
    except Exception as err:
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"{where}: {attr}({call}) raised {type(err).__name__}: "
                          f"{_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def check_module(module: nn.Module, where: str, input_shape: Sequence[int],
                 num_classes: int) -> None:
    """What the functional path cannot run, refused with one line naming the layer: buffers
    (running statistics would be state outside θ), dropout (randomness per call), parameters
    that are not floating point, an output that is not [batch, classes]."""
    for name, layer in module.named_modules():
        label = f"layer {name or '(root)'} ({type(layer).__name__})"
        if isinstance(layer, nn.modules.batchnorm._NormBase):
            raise ConfigError(f"{where}: {label}: torch's BatchNorm is not supported (its running "
                              "statistics are buffers outside θ); use model=resnet "
                              "model.norm=batch (a BatchNorm removal reaches exactly), or "
                              "GroupNorm, LayerNorm or no normalization")
        if isinstance(layer, nn.modules.dropout._DropoutNd | nn.AlphaDropout):
            raise ConfigError(f"{where}: {label}: dropout is not supported (a random mask on "
                              "every call breaks the exact replay of a step); remove it")
        buffers = [b for b, _ in layer.named_buffers(recurse=False)]
        if buffers:
            raise ConfigError(f"{where}: {label} has buffers ({', '.join(buffers)}): not yet "
                              "supported; use norm=group|none and keep state in parameters")
        for p_name, p in layer.named_parameters(recurse=False):
            if not p.is_floating_point():
                raise ConfigError(f"{where}: {label}: parameter {p_name} is {p.dtype}, not "
                                  "floating point; only float parameters can be trained")
    if not any(True for _ in module.parameters()):
        raise ConfigError(f"{where}: the module has no parameters to train")
    want = (2, max(num_classes, 1))
    try:
        with torch.no_grad():
            got = tuple(module(torch.zeros(2, *input_shape)).shape)
    except Exception as err:
        raise ConfigError(f"{where}: a batch of inputs {[2, *input_shape]} raised "
                          f"{type(err).__name__}: {_one_line(err)}") from None
    if got != want:
        what = f"{num_classes} classes" if num_classes else "one regression output"
        raise ConfigError(f"{where}: the output of a batch of 2 is {list(got)}, but the data "
                          f"has {what}; return [batch, {want[1]}]")


def check_memory(P: int, nodes: int, dtype: torch.dtype, where: str,
                 available: int | None = None) -> None:
    """Refuse a model whose parameter rows alone (P × nodes × bytes × ROWS_PER_NODE) exceed
    the memory available (the GPU's free memory where CUDA is visible, else the host's)."""
    need = P * nodes * torch.tensor([], dtype=dtype).element_size() * ROWS_PER_NODE
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise ConfigError(f"{where}: {P:,} parameters × {nodes} nodes × "
                          f"{torch.tensor([], dtype=dtype).element_size()} bytes × "
                          f"{ROWS_PER_NODE} rows ≈ {need / 2**30:.1f} GiB, more than the "
                          f"{available / 2**30:.1f} GiB available; use fewer nodes per rank, "
                          "a smaller model or dtype=float32")


def available_memory() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(pages)


# σ'(z) written in terms of a = σ(z) (and z where a alone does not determine it)
_ACTIVATION_SLOPES = {
    nn.Tanh: lambda a, z: 1 - a * a,
    nn.Sigmoid: lambda a, z: a * (1 - a),
    nn.ReLU: lambda a, z: (z > 0).to(a.dtype),
}
# σ''(z) in the same terms: the dense HVP's second derivative of each activation
_ACTIVATION_CURVES = {
    nn.Tanh: lambda a, z: -2 * a * (1 - a * a),
    nn.Sigmoid: lambda a, z: a * (1 - a) * (1 - 2 * a),
    nn.ReLU: lambda a, z: torch.zeros_like(a),
}


@dataclass(frozen=True)
class DenseLayer:
    """y = act(x Wᵀ + b) with W = θ[w_at : w_at + out·inp] viewed [out, inp], b after it."""

    w_at: int
    out: int
    inp: int
    act: type[nn.Module] | None

    def weights(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(W [rows, out, inp], b [rows, out]) of every parameter row of theta [rows, P]
        (views; the same split of a tangent v gives (dW, db))."""
        b_at = self.w_at + self.out * self.inp
        return (theta[:, self.w_at:b_at].view(len(theta), self.out, self.inp),
                theta[:, b_at:b_at + self.out])


def dense_layers(module: nn.Module) -> list[DenseLayer] | None:
    """The layer list of a Flatten → (Linear → activation)* → Linear stack with
    activations whose slope `_ACTIVATION_SLOPES` knows, else None."""
    if not isinstance(module, nn.Sequential) or not isinstance(module[0], nn.Flatten):
        return None
    layers, at, mods = [], 0, list(module)[1:]
    while mods:
        lin = mods.pop(0)
        if not isinstance(lin, nn.Linear) or lin.bias is None:
            return None
        act = None
        if mods:
            act = type(mods.pop(0))
            if act not in _ACTIVATION_SLOPES:
                return None
        layers.append(DenseLayer(at, lin.out_features, lin.in_features, act))
        at += lin.weight.numel() + lin.out_features
    return layers if layers[-1].act is None and all(l.act for l in layers[:-1]) else None


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
        # logreg, linear and mlp take their batch gradients by hand-written backprop over
        # batched matmuls (about 2× faster than vmap(grad) for the engine's small rows)
        self.dense = dense_layers(module)
        # model.norm=batch: the running statistics are entries of θ, not trained (their
        # gradient is zero: a training forward reads only batch statistics) but set each local
        # step by `with_running_stats`; their columns in θ, in the order of `self.names`
        self.norms = {name: m for name, m in module.named_modules()
                      if isinstance(m, WeightedBatchNorm)}
        self.running_names = [f"{name}.{stat}" for name in self.norms
                              for stat in ("running_mean", "running_var")]
        starts = dict(zip(self.names, np.cumsum([0, *self.numels[:-1]]).tolist(), strict=True))
        self.running_columns = torch.tensor(
            sorted(c for n in self.running_names
                   for c in range(starts[n], starts[n] + self.numels[self.names.index(n)])),
            dtype=torch.long)
        self._widths: dict[tuple[int, ...], int] = {}  # evaluation memory per sample shape

    def flat_init(self, seed: int, dtype: torch.dtype) -> Tensor:
        torch.manual_seed(seed)
        for m in self.module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).to(dtype)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        chunks = torch.split(theta, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    @property
    def has_running_stats(self) -> bool:
        return bool(self.norms)

    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """Evaluation mode: BatchNorm normalizes by the running statistics in θ."""
        return functional_call(self.module, self.unflatten(theta), (x,))

    def train_forward(self, theta: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """Training mode: BatchNorm normalizes by the batch statistics weighted by w (a
        removed sample, w_i = 0, enters neither the loss nor the statistics)."""
        if not self.norms:
            return self.forward(theta, x)
        for norm in self.norms.values():
            norm.sample_weights = w
        try:
            return self.forward(theta, x)
        finally:
            for norm in self.norms.values():
                norm.sample_weights = None

    def sample_losses(self, theta: Tensor, x: Tensor, y: Tensor,
                      w: Tensor | None = None) -> Tensor:
        """ℓ_i(θ) in evaluation mode, or with the batch's weights w in training mode."""
        out = self.forward(theta, x) if w is None else self.train_forward(theta, x, w)
        if self.regression:
            return (out.squeeze(-1) - y) ** 2
        return nn.functional.cross_entropy(out, y, reduction="none")

    def weighted_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """(1/|B|) Σ_i w_i ℓ_i(θ): removal zeroes w_i but keeps the denominator |B|."""
        return (self.sample_losses(theta, x, y, w) * w).sum() / w.shape[0]

    def running_stats(self, theta: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """The running statistics after a training forward on the batch, one row per θ row
        [rows, len(running_columns)]: r ← (1 − m) r + m μ_B(w), v ← (1 − m) v + m σ²_B(w)."""
        def one(th: Tensor, xx: Tensor, ww: Tensor) -> Tensor:
            self.train_forward(th, xx, ww)
            updated = {}
            for name, norm in self.norms.items():
                assert norm.updated is not None
                updated[f"{name}.running_mean"], updated[f"{name}.running_var"] = norm.updated
                norm.updated = None
            return torch.cat([updated[n].reshape(-1) for n in self.names if n in updated])

        with torch.no_grad():
            return vmap(one)(theta, x, w)

    def with_running_stats(self, update: Tensor, theta: Tensor, x: Tensor, w: Tensor
                           ) -> Tensor:
        """The local step's Δ with its running-statistics columns replaced by the momentum
        update of the weighted batch statistics (the optimizer's Δ there is discarded), so
        θ + Δ carries the new running statistics; Δ itself when the model has none."""
        if not self.norms:
            return update
        columns = self.running_columns.to(theta.device)
        new = self.running_stats(theta, x, w)
        return update.index_copy(1, columns, new - theta.index_select(1, columns))

    # ---- row-vectorized maths over a [rows, P] tensor ---------------------------------------
    def grads(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """∇_θ and value of the weighted batch loss, one row per parameter row."""
        if self.dense is not None:
            return self.dense_grads(theta, x, y, w)
        return vmap(grad_and_value(self.weighted_loss))(theta, x, y, w)

    def dense_grads(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """`grads` for a `dense_layers` stack: forward and backward by batched matmuls.

        theta [R, P], x [R, B, ...], y [R, B], w [R, B]; per row the loss is
        (1/B) Σ_i w_i ℓ_i with ℓ the squared error or the cross-entropy. Rows go through in
        chunks of about GRAD_BUDGET elements of parameters and activations: a block of
        thousands of rows leaves the caches (at 16,384 rows one pass took 2.1× the time of
        chunks of 64–1,024 rows)."""
        rows, count = y.shape
        chunk = self.rows_per_chunk(count)
        if rows <= chunk:
            return self._dense_backprop(theta, x, y, w / count, [count])[0]
        grad, loss = theta.new_empty(rows, self.P), theta.new_empty(rows)
        for r0 in range(0, rows, chunk):
            r = slice(r0, r0 + chunk)
            grad[r], loss[r] = self._dense_backprop(theta[r], x[r], y[r], w[r] / count, [count])[0]
        return grad, loss

    def rows_per_chunk(self, batch: int) -> int:
        """Parameter rows whose batch gradient (θ rows and activations of `batch` samples)
        fits in about GRAD_BUDGET elements; models without hand-written backprop: all."""
        if self.dense is None:
            return 1 << 62
        per_row = self.P + batch * sum(layer.out + layer.inp for layer in self.dense)
        return max(16, GRAD_BUDGET // per_row)

    def _dense_backprop(self, theta: Tensor, x: Tensor, y: Tensor, scale: Tensor,
                        sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
        """∇_θ and value of Σ_i scale_i ℓ_i(θ) over each consecutive group of `sizes`
        samples: one forward and one backward through the layers for all samples, with
        the weight gradients reduced per group. x [R, Σsizes, ...], scale [R, Σsizes]."""
        rows, count = y.shape
        h = x.reshape(rows, count, -1)
        inputs, weights, outputs = [], [], []  # per layer: its input, W [R, out, inp], act(z)
        for layer in self.dense:
            W, b = layer.weights(theta)
            inputs.append(h)
            weights.append(W)
            z = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))  # z = h Wᵀ + b
            h = layer.act()(z) if layer.act else z
            outputs.append((h, z))
        if self.regression:
            err = h.squeeze(-1) - y
            losses = err * err
            dz = 2 * err.unsqueeze(-1)  # ∂ℓ/∂z for ℓ = (z − y)²
        else:
            log_p = torch.log_softmax(h, -1)
            losses = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            dz = log_p.exp()  # ∂ℓ/∂z = softmax(z) − onehot(y)
            dz.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(losses, -1.0).unsqueeze(-1))
        dz = dz * scale.unsqueeze(-1)
        groups = [slice(a, a + n) for a, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)]
        pieces: list[list[Tensor]] = [[] for _ in groups]
        for i in reversed(range(len(self.dense))):
            if i < len(self.dense) - 1:
                a, z = outputs[i]
                dz = dz * _ACTIVATION_SLOPES[self.dense[i].act](a, z)
            for part, g in zip(pieces, groups, strict=True):  # ∂b, ∂W of each group
                part += [dz[:, g].sum(1), torch.bmm(dz[:, g].transpose(1, 2),
                                                    inputs[i][:, g]).flatten(1)]
            if i:
                dz = torch.bmm(dz, weights[i])  # ∂/∂(layer input), every sample
        weighted = losses * scale
        return [(torch.cat(part[::-1], 1), weighted[:, g].sum(1))
                for part, g in zip(pieces, groups, strict=True)]

    def hvps(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """H(θ) v for the weighted batch loss at θ (forward-over-reverse), one per row."""
        if self.dense is not None:
            return self.dense_hvps_and_slopes(theta, v, x, y, w)[0]

        def one(th: Tensor, vv: Tensor, xx: Tensor, yy: Tensor, ww: Tensor) -> Tensor:
            g = grad(self.weighted_loss)
            return jvp(lambda p: g(p, xx, yy, ww), (th,), (vv,))[1]

        return vmap(one)(theta, v, x, y, w)

    def hvps_and_slopes(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor, w: Tensor
                        ) -> tuple[Tensor, Tensor]:
        """H(θ)v of the weighted batch loss and every sample's slope ∇ℓ_i(θ)·v, one row
        each, in one forward-over-reverse pass: theta, v [R, P]; x [R, B, ...]; → [R, P],
        [R, B] (by hand for a dense stack, else torch.func)."""
        if self.dense is not None:
            return self.dense_hvps_and_slopes(theta, v, x, y, w)

        def one(th: Tensor, vv: Tensor, xx: Tensor, yy: Tensor, ww: Tensor):
            def loss(p: Tensor):
                per_sample = self.sample_losses(p, xx, yy, ww)
                return (per_sample * ww).sum() / ww.shape[0], per_sample

            _, (hv, slopes) = jvp(grad(loss, has_aux=True), (th,), (vv,))
            return hv, slopes

        return vmap(one)(theta, v, x, y, w)

    def dense_hvps_and_slopes(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor, w: Tensor
                              ) -> tuple[Tensor, Tensor]:
        """`hvps_and_slopes` for a `dense_layers` stack by hand: the forward pass with its
        tangent along v, then the backward pass with its tangent, by batched matmuls (as
        `dense_grads`); checked against torch.func in tests/model/test_model.py."""
        rows, count = y.shape
        h, dh = x.reshape(rows, count, -1), None
        inputs, acts = [], []  # per layer (h, dh, W, dW); per hidden layer (σ', σ'', dz)
        z = dz = None
        for layer in self.dense:
            (W, b), (dW, db) = layer.weights(theta), layer.weights(v)
            inputs.append((h, dh, W, dW))
            z = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))  # z = h Wᵀ + b
            dz = torch.baddbmm(db.unsqueeze(1), h, dW.transpose(1, 2))  # its tangent
            if dh is not None:
                dz = dz + torch.bmm(dh, W.transpose(1, 2))
            if layer.act is None:
                break
            a = layer.act()(z)
            slope = _ACTIVATION_SLOPES[layer.act](a, z)
            acts.append((slope, _ACTIVATION_CURVES[layer.act](a, z), dz))
            h, dh = a, slope * dz
        scale = (w / count).unsqueeze(-1)
        if self.regression:
            err = z.squeeze(-1) - y
            slopes = 2 * err * dz.squeeze(-1)  # dℓ_i = 2 (z − y) dz
            e, de = 2 * err.unsqueeze(-1) * scale, 2 * dz * scale
        else:
            p = torch.softmax(z, -1)
            e = p.clone()
            e.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(p[..., :1], -1.0))  # p − e_y
            slopes = (e * dz).sum(-1)
            pdz = p * dz
            e, de = e * scale, (pdz - p * pdz.sum(-1, keepdim=True)) * scale
        pieces: list[Tensor] = []
        for i in reversed(range(len(self.dense))):
            h_in, dh_in, W, dW = inputs[i]
            dgW = torch.bmm(de.transpose(1, 2), h_in)
            if dh_in is not None:
                dgW = dgW + torch.bmm(e.transpose(1, 2), dh_in)
            pieces = [dgW.flatten(1), de.sum(1)] + pieces
            if i:
                slope, curve, dz_prev = acts[i - 1]
                u = torch.bmm(e, W)
                du = torch.bmm(de, W) + torch.bmm(e, dW)
                e, de = u * slope, du * slope + u * curve * dz_prev
        return torch.cat(pieces, 1), slopes

    def probe_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.sample_losses(theta, x, y).mean()

    # x, y: one probe set for every row, or (per_row=True) one per row, stacked
    def probe_eval(self, theta: Tensor, x: Tensor, y: Tensor, per_row: bool = False,
                   budget: int = EVAL_BUDGET, accuracy: bool = True,
                   interruptible: bool = False, together: bool = True
                   ) -> tuple[Tensor, Tensor]:
        """Probe loss L'(θ) and accuracy per row (for regression the "accuracy" is −loss).
        `interruptible`: a signal raises Interrupted between chunks (the test pass after
        training; not the step loop's probes, which stop at an agreed step); `together`:
        every rank makes this pass with the same shapes, so some of those checks are agreed
        ones (stopping.PhaseChecks); False: a pass that rank 0 makes alone.

        Streams over chunks of rows and of samples so that no chunk holds more than about
        `budget` activation elements, whatever the number of rows and samples: the same
        values as one pass up to float summation order, the accuracies exactly (counts)."""
        rows, m = theta.shape[0], y.shape[-1]
        width = self._eval_width(tuple(x.shape[2:] if per_row else x.shape[1:]))
        samples = max(1, min(m, budget // width))
        step = max(1, min(rows, budget // (width * samples)))
        loss = theta.new_zeros(rows)
        correct = torch.zeros(rows, dtype=torch.long, device=theta.device)
        chunks = -(-rows // step) * -(-m // samples)
        check = PhaseChecks("evaluation", chunks, together) if interruptible else None
        with torch.no_grad():
            for r0 in range(0, rows, step):
                r = slice(r0, min(rows, r0 + step))
                for s0 in range(0, m, samples):
                    if check is not None:
                        check()
                    s = slice(s0, min(m, s0 + samples))
                    xs, ys = (x[r, s], y[r, s]) if per_row else (x[s], y[s])
                    out = self._forward_rows(theta[r], xs, per_row)  # [rows, samples, out]
                    if self.regression:
                        loss[r] += ((out.squeeze(-1) - ys) ** 2).sum(-1)
                        continue
                    ys = ys.expand(out.shape[:2])
                    loss[r] += nn.functional.cross_entropy(
                        out.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).sum(1)
                    if accuracy:
                        correct[r] += (out.argmax(-1) == ys).sum(1)
        if check is not None:
            check.end()
        loss = loss / m
        return loss, -loss if self.regression else correct.to(theta.dtype) / m

    def _forward_rows(self, theta: Tensor, x: Tensor, per_row: bool) -> Tensor:
        """Outputs [rows, samples, out] of every parameter row on x ([samples, ...] shared,
        or [rows, samples, ...]); dense stacks by batched matmuls, others by vmap."""
        if self.dense is None:
            return vmap(self.forward, in_dims=(0, 0 if per_row else None))(theta, x)
        rows = theta.shape[0]
        h = x.reshape(rows, x.shape[1], -1) if per_row else x.reshape(x.shape[0], -1)
        for layer in self.dense:
            W, b = layer.weights(theta)
            b = b.unsqueeze(1)
            if h.dim() == 2:  # a shared input: one GEMM against every row's weights
                z = (h @ W.reshape(rows * layer.out, layer.inp).T).view(
                    h.shape[0], rows, layer.out).transpose(0, 1) + b
            else:
                z = torch.baddbmm(b, h, W.transpose(1, 2))
            h = layer.act()(z) if layer.act else z
        return h

    def _eval_width(self, sample_shape: tuple[int, ...]) -> int:
        """Activation elements one sample needs in a forward pass (the widest layer)."""
        if self.dense is not None:
            return max(max(layer.inp, layer.out) for layer in self.dense)
        if sample_shape not in self._widths:
            sizes = [math.prod(sample_shape)]
            hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(o.numel()))
                     for m in self.module.modules() if m is not self.module]
            try:
                with torch.no_grad():
                    self.module(torch.zeros(1, *sample_shape))
            finally:
                for hook in hooks:
                    hook.remove()
            self._widths[sample_shape] = max(sizes)
        return self._widths[sample_shape]

    def probe_grads(self, theta: Tensor, x: Tensor, y: Tensor,
                    per_row: bool = False) -> tuple[Tensor, Tensor]:
        """∇L'(θ) and L'(θ) per row."""
        if self.dense is not None:
            x, y = _per_row(len(theta), x, y, per_row)
            return self.dense_grads(theta, x, y, torch.ones(y.shape, dtype=theta.dtype,
                                                           device=theta.device))
        return vmap(grad_and_value(self.probe_loss), in_dims=_probe_dims(per_row))(theta, x, y)

    def grads_and_probe_grads(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor,
                              xp: Tensor, yp: Tensor, per_row: bool = False
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`grads` and `probe_grads` at the same θ rows in one vmapped call (proximal
        influence needs both for every node at every step)."""
        if self.dense is not None:  # one pass over the batch and the probe samples together
            xp, yp = _per_row(len(theta), xp, yp, per_row)
            B, m = y.shape[1], yp.shape[1]
            (g, loss), (pg, probe_loss) = self._dense_backprop(
                theta, torch.cat([x, xp], 1), torch.cat([y, yp], 1),
                torch.cat([w / B, w.new_full((len(theta), m), 1 / m)], 1), [B, m])
            return g, loss, pg, probe_loss
        batch_grad = grad_and_value(self.weighted_loss)
        probe_grad = grad_and_value(self.probe_loss)

        def both(th: Tensor, xx: Tensor, yy: Tensor, ww: Tensor, xq: Tensor,
                 yq: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return (*batch_grad(th, xx, yy, ww), *probe_grad(th, xq, yq))

        dims = (0, 0, 0, 0, *_probe_dims(per_row)[1:])
        return vmap(both, in_dims=dims)(theta, x, y, w, xp, yp)

    def probe_losses(self, theta: Tensor, x: Tensor, y: Tensor, per_row: bool = False) -> Tensor:
        """L'(θ) per row, no gradient: dense stacks stream through `probe_eval` (vmap of
        cross_entropy runs torch's Python decomposition, ~6 ms a call)."""
        if self.dense is not None:
            return self.probe_eval(theta, x, y, per_row, accuracy=False)[0]
        return vmap(self.probe_loss, in_dims=_probe_dims(per_row))(theta, x, y)


def _per_row(rows: int, x: Tensor, y: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    """A probe set as one per parameter row: shared ones are expanded (a view)."""
    return (x, y) if per_row else (x.expand(rows, *x.shape), y.expand(rows, *y.shape))


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


def build_model(cfg: Model, input_shape: Sequence[int], num_classes: int,
                nodes: int = 1, dtype: torch.dtype = torch.float32) -> FlatModel:
    """The node model; `nodes` (this rank's) and `dtype` size the memory check."""
    name = cfg.name
    if name == "linear" and num_classes > 0:
        raise ConfigError(
            "model.name=linear is linear regression and needs a regression data set; "
            "use data=synthetic_regression, or model=logreg for classification"
        )
    if name == "logreg" and num_classes == 0:
        raise ConfigError("model.name=logreg needs a classification data set; use model=linear")
    module = build_module(cfg, input_shape, num_classes)
    where = f"model._target_={cfg._target_}" if isinstance(cfg, CustomModel) else (
        f"model={name}")
    check_module(module, where, input_shape, num_classes)
    flat = FlatModel(module, regression=num_classes == 0)
    check_memory(flat.P, nodes, dtype, where)
    return flat
