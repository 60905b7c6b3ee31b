"""Ranks, node blocks and the per-step point-to-point exchange.

Each rank owns a contiguous block of nodes. Every step it sends ONE flat buffer
to each peer rank that hosts an out-neighbour of one of its nodes, and receives
one from each rank hosting an in-neighbour. The buffer carries *channels*: the
real parameter rows and the tracker's rows (shadow perturbations δ, linearized
perturbations δ̂, updates for proximal influence). Which rows a channel holds is
known to every rank (it follows from the seed and W^t), so receive sizes are
computed locally and nothing but the rows themselves is ever sent.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dicesim.errors import ConfigError


class PeerError(RuntimeError):
    """A peer rank died or did not answer within the timeout."""


@dataclass(frozen=True)
class Layout:
    """Which rank hosts which nodes: rank r owns nodes [r·m, (r+1)·m), m = nodes_per_rank."""

    nodes: int
    world: int
    rank: int

    @property
    def nodes_per_rank(self) -> int:
        return self.nodes // self.world

    @property
    def local_nodes(self) -> np.ndarray:
        m = self.nodes_per_rank
        return np.arange(self.rank * m, (self.rank + 1) * m)

    def owner(self, node: int | np.ndarray) -> int | np.ndarray:
        return node // self.nodes_per_rank

    def is_local(self, node: int) -> bool:
        return self.owner(node) == self.rank

    def local_index(self, node: int) -> int:
        return node - self.rank * self.nodes_per_rank


def check_layout(nodes: int, world: int) -> None:
    if nodes < 1:
        raise ConfigError(f"nodes={nodes}: needs at least 1 node")
    if nodes % world:
        raise ConfigError(
            f"nodes={nodes} is not divisible over {world} ranks; use a multiple of {world} "
            f"nodes or a number of ranks that divides {nodes}"
        )


@dataclass
class Channel:
    """Rows keyed by global node id. `nodes` is the same sorted array on every rank;
    `rows` holds this rank's rows of it (its nodes in `nodes`, in order)."""

    nodes: np.ndarray
    rows: Tensor  # [len(local part of nodes), width]
    available: Tensor | None = field(default=None, repr=False)  # [len(nodes), width] after exchange

    def local_mask(self, layout: Layout) -> np.ndarray:
        return layout.owner(self.nodes) == layout.rank


class Comm:
    """Process-group set-up and the step exchange. world=1 runs with no process group."""

    def __init__(self, backend: str, timeout_s: float, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.backend = backend
        self.device = device
        self.timeout_s = timeout_s
        self.initialized_here = False
        self.broken = False  # a peer failed: leave without waiting for anyone
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives use the current device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=None
            )
            self.initialized_here = True

    def close(self) -> None:
        """Leave together: a rank tearing gloo down while a peer still talks to it aborts."""
        if self.initialized_here and dist.is_initialized() and not self.broken:
            dist.barrier()
            dist.destroy_process_group()

    # ---- one exchange per step -----------------------------------------------------------
    def exchange(self, layout: Layout, channels: list[Channel], send_to: list[int],
                 recv_from: list[int]) -> None:
        """Fill every channel's `available` with its local rows and the rows of `recv_from`."""
        width_of = [c.rows.shape[1] if c.rows.ndim == 2 else 0 for c in channels]
        for c, wdt in zip(channels, width_of, strict=True):
            c.available = torch.zeros(len(c.nodes), wdt, dtype=c.rows.dtype, device=self.device)
            c.available[torch.as_tensor(c.local_mask(layout), device=self.device)] = c.rows
        if self.world == 1 or not (send_to or recv_from):
            return
        dtype = channels[0].rows.dtype
        send_buf = torch.cat([c.rows.reshape(-1) for c in channels])
        recv_bufs = {}
        for peer in recv_from:
            size = sum(int((layout.owner(c.nodes) == peer).sum()) * w
                       for c, w in zip(channels, width_of, strict=True))
            recv_bufs[peer] = torch.empty(size, dtype=dtype, device=self.device)
        ops = [dist.P2POp(dist.isend, send_buf, peer) for peer in send_to]
        ops += [dist.P2POp(dist.irecv, buf, peer) for peer, buf in recv_bufs.items()]
        try:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        except RuntimeError as err:  # gloo/nccl raise on timeout or a closed connection
            self.broken = True
            raise PeerError(
                f"rank {self.rank}: a peer rank died or did not answer within "
                f"timeout_s={self.timeout_s:g} s during the parameter exchange ({err})"
            ) from err
        for peer, buf in recv_bufs.items():
            offset = 0
            for c, w in zip(channels, width_of, strict=True):
                mask = layout.owner(c.nodes) == peer
                count = int(mask.sum())
                if count:
                    block = buf[offset:offset + count * w].view(count, w)
                    c.available[torch.as_tensor(mask, device=self.device)] = block
                offset += count * w

    # ---- collectives used outside the step loop -----------------------------------------
    def all_sum(self, x: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def gather_to_root(self, obj: object) -> list[object] | None:
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def mix(W: np.ndarray, out_nodes: np.ndarray, channel: Channel) -> Tensor:
    """Gossip: rows Σ_l W[k, l] · v_l for k in out_nodes, l over the channel's nodes.

    Nodes outside `channel.nodes` carry zero (a perturbation that has not reached
    them), so only those columns of W are needed."""
    assert channel.available is not None
    Wsub = W[np.ix_(out_nodes, channel.nodes)]
    Wt = torch.as_tensor(Wsub, dtype=channel.available.dtype, device=channel.available.device)
    return Wt @ channel.available


def peers(W: np.ndarray, layout: Layout) -> tuple[list[int], list[int]]:
    """(ranks to send to, ranks to receive from) under W: a rank sends to every rank that
    hosts an out-neighbour of one of its nodes. Both lists are computed identically on
    every rank, so each send meets its receive."""
    owner = layout.owner(np.arange(layout.nodes))
    edge = (W > 0)  # edge[k, l]: l sends to k
    send_to, recv_from = set(), set()
    mine = owner == layout.rank
    for other in range(layout.world):
        if other == layout.rank:
            continue
        theirs = owner == other
        if edge[np.ix_(theirs, mine)].any():
            send_to.add(other)
        if edge[np.ix_(mine, theirs)].any():
            recv_from.add(other)
    return sorted(send_to), sorted(recv_from)
