"""The shipped image networks (model=resnet, model=vit): plain torch.nn.Modules without
buffers, run through the generic torch.func path of dicesim/model/models.py like a user's own."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
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
