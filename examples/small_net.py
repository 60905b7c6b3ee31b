"""A user-written node model for dicesim: any torch.nn.Module without buffers or dropout.

Run it (from the repository root, so that `examples.small_net` imports):

    python -m dicesim data=digits data.image=true model=custom \
        model._target_=examples.small_net.SmallNet +model.width=8 steps=3 nodes=4

`+model.width=8` is passed to the constructor; `num_classes` and `input_shape` are filled in
by dicesim because the constructor takes them.
"""

from __future__ import annotations

from torch import Tensor, nn


class SmallNet(nn.Module):
    """conv 3×3 → GroupNorm → ReLU → global average pool → linear."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], width, 3, padding=1)
        self.norm = nn.GroupNorm(1, width)  # GroupNorm has no running statistics (no buffers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.relu(self.norm(self.conv(x)))
        return self.head(h.mean((-2, -1)))
