"""The shipped image networks (model=resnet, model=vit): plain torch.nn.Modules without
buffers (norm=batch keeps its running statistics as untrained parameters), run through the
generic torch.func path of dicesim/model/models.py like a user's own."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return WeightedBatchNorm(channels)
    return nn.GroupNorm(groups, channels) if kind == "group" else nn.Identity()


class BasicBlock(nn.Module):
    """y = act(x' + F(x)), F = conv3 → norm → act → conv3 → norm; x' = x, or a strided 1×1
    projection where the width or the resolution changes."""

    def __init__(self, inp: int, out: int, stride: int, norm: str, groups: int,
                 act: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=norm == "none")
        self.norm1 = _norm(norm, out, groups)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=norm == "none")
        self.norm2 = _norm(norm, out, groups)
        self.act = act()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=norm == "none"),
                                          _norm(norm, out, groups))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(self.shortcut(x) + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2): depth 6n + 2, three stages of n blocks."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 8,
                 width: int = 4, norm: str = "group", groups: int = 2,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=norm == "none"),
                                  _norm(norm, width, groups), act())
        layers, inp = [], width
        for stage in range(3):
            out = width << stage
            for b in range(blocks):
                layers.append(BasicBlock(inp, out, 2 if stage and not b else 1, norm, groups, act))
                inp = out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(inp, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean((-2, -1)))  # global average pool


class Attention(nn.Module):
    """Multi-head self-attention written with matmuls (every op has torch.func rules for
    vmap and forward-over-reverse)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        *lead, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(*lead, tokens, 3, self.heads, dim // self.heads).unbind(-3)
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # [..., heads, tokens, d_h]
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)  # QKᵀ / √d_h
        mixed = torch.softmax(scores, -1) @ v
        return self.out(mixed.transpose(-3, -2).reshape(*lead, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, act: type[nn.Module]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), act(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches → linear embedding + learned positions → pre-LayerNorm blocks → LayerNorm →
    mean over tokens → linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch: int = 4,
                 dim: int = 16, depth: int = 1, heads: int = 2, mlp_dim: int = 32,
                 act: type[nn.Module] = nn.GELU):
        super().__init__()
        channels, height, width = input_shape
        tokens = (height // patch) * (width // patch)
        self.embed = nn.Conv2d(channels, dim, patch, patch)  # one linear map per patch
        self.position = nn.Parameter(torch.zeros(tokens, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim, act)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(-2).transpose(-2, -1) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(-2))


# ---- BatchNorm with per-sample weights (the building block of model.norm=batch) -------------
@dataclass(frozen=True)
class BatchStats:
    mean: Tensor  # μ_c [channels]
    var: Tensor  # σ²_c, biased: the one that normalizes the batch
    unbiased_var: Tensor  # σ²_c · n / (n − 1): the one the running variance averages
    observed: Tensor  # 1 when some sample has weight, else 0 (the batch was removed whole)


def weighted_batch_stats(x: Tensor, w: Tensor) -> BatchStats:
    """Per-channel statistics of x [B, C, ...] over the samples weighted by w [B]:
    n = Σ_i w_i · |spatial|, μ_c = Σ_i w_i Σ_s x_ics / n, σ²_c = Σ_i w_i Σ_s (x_ics − μ_c)² / n.
    With w ∈ {0, 1} these are exactly torch's batch statistics of the kept samples alone
    (a removed sample, w_i = 0, enters nothing). A batch removed whole (n = 0) has μ = σ² = 0
    and `observed` 0, so its running statistics stay as they were."""
    spatial = math.prod(x.shape[2:])
    weight = w.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    n = w.to(x.dtype).sum() * spatial
    observed = (n > 0).to(x.dtype)
    n_safe = torch.where(n > 0, n, torch.ones_like(n))  # no 0/0 on either branch
    reduce = [0, *range(2, x.dim())]
    mean = (weight * x).sum(reduce) / n_safe
    centred = x - mean.reshape(1, -1, *[1] * (x.dim() - 2))
    var = (weight * centred * centred).sum(reduce) / n_safe
    bessel = torch.where(n > 1, n / torch.where(n > 1, n - 1, torch.ones_like(n)),
                         torch.ones_like(n))  # n / (n − 1)
    return BatchStats(mean, var, var * bessel, observed)


def normalize(x: Tensor, mean: Tensor, var: Tensor, scale: Tensor, shift: Tensor,
              eps: float) -> Tensor:
    """y = γ (x − μ) / √(σ² + ε) + β, per channel (dimension 1)."""
    shape = (1, -1, *[1] * (x.dim() - 2))
    inv = torch.rsqrt(var + eps).reshape(shape)
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + shift.reshape(shape)


def running_update(running_mean: Tensor, running_var: Tensor, stats: BatchStats,
                   momentum: float) -> tuple[Tensor, Tensor]:
    """r ← (1 − m) r + m μ_B and v ← (1 − m) v + m σ²_B (unbiased), torch's rule, pure;
    unchanged after a batch with no sample left (m → 0)."""
    m = momentum * stats.observed
    return ((1 - m) * running_mean + m * stats.mean,
            (1 - m) * running_var + m * stats.unbiased_var)


class WeightedBatchNorm(nn.Module):
    """BatchNorm whose training-mode statistics are weighted by the per-sample weights of
    the loss, so removing a sample (w = 0) removes it from the normalization too.

    It has no buffers: γ, β and the running statistics are all parameters, so the running
    statistics are entries of the flat θ row of a node (dicesim/model/models.py keeps their
    gradient out and steps them by `running_update` instead). FlatModel sets
    `sample_weights` [B] for a training-mode forward; with it None the layer normalizes by
    its running statistics (eval mode). A training forward leaves the updated running
    statistics in `updated` for FlatModel to collect."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.running_mean = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.running_var = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.sample_weights: Tensor | None = None
        self.updated: tuple[Tensor, Tensor] | None = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.sample_weights is None:
            return normalize(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.eps)
        stats = weighted_batch_stats(x, self.sample_weights)
        self.updated = running_update(self.running_mean, self.running_var, stats,
                                      self.momentum)
        return normalize(x, stats.mean, stats.var, self.weight, self.bias, self.eps)
