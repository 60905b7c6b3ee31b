"""Ranks, node blocks and the per-step point-to-point exchange.

Each rank owns a contiguous block of nodes. Every step it sends ONE flat buffer
to each peer rank that hosts an out-neighbour of one of its nodes, and receives
one from each rank hosting an in-neighbour. The buffer carries *channels*: the
real parameter rows and the tracker's rows (shadow perturbations δ, linearized
perturbations δ̂, updates for proximal influence). Which rows a channel holds is
known to every rank (it follows from the seed and W^t), so receive sizes are
computed locally and nothing but the rows themselves is ever sent.

After the exchange a channel holds only the rows this rank has: its own and those it
received, in node order, as one compact [R, width] block (`Channel.available`, the rows of
`Channel.available_nodes`), R = local + received rows, never one row per node of the
graph. Mixing reads W's columns of those nodes only (`mix`, `block_tensor`): the same
stored entries in the same order, hence the same sums as over a zero-filled [n, width].
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dicesim.common.arrays import spans
from dicesim.common.errors import ConfigError
from dicesim.common.faults import inject
from dicesim.common.stopping import SIGNALS, Guard, Stopped

if TYPE_CHECKING:
    from scipy import sparse

STARTUP_TIMEOUT_S = 300  # the longest wait for every rank to arrive (or timeout_s if longer)

# NCCL's work.wait() and all_reduce return at once by default (the GPU stream waits, not
# the host), and a dead peer ends in the watchdog's SIGABRT with a dump. Blocking wait makes
# every wait block the host and raise a RuntimeError after the group's timeout, which takes
# the same one-line exit 3 path as gloo's; with it, async error handling is off. A value
# the user set is kept.
NCCL_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


def index_tensor(index: np.ndarray, device: torch.device) -> Tensor:
    """An int64 index on `device` without a host sync: a boolean mask would need one
    (nonzero), and a blocking host-to-device copy waits for the stream."""
    host = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


class PeerError(RuntimeError):
    """A peer rank closed its connection (it died) or did not answer within timeout_s.
    Every collective and the exchange raise it; the CLI ends the rank with exit 3."""


def failure_cause(err: BaseException) -> str:
    """"timeout" or "closed" (connection closed/reset: the peer died), from the backend's
    message; "error" when it says neither."""
    text = str(err).lower()
    if "timed out" in text or "timeout" in text or "deadline" in text:
        return "timeout"
    if any(w in text for w in ("closed", "reset", "broken pipe", "refused", "eof",
                               "connection", "socket", "remote process exited",
                               "ncclremoteerror")):
        return "closed"
    return "error"


def process_state(pid: int) -> str | None:
    """'exited', 'stopped' or 'running' for a pid on this machine (None: cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "exited"
    except (OSError, IndexError):
        return None
    return {"Z": "exited", "X": "exited", "T": "stopped", "t": "stopped"}.get(state, "running")


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
    def first(self) -> int:
        """The first node of this rank's block: node k is local row k − first."""
        return self.rank * self.nodes_per_rank

    @property
    def local_nodes(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.nodes_per_rank)

    def owner(self, node: int | np.ndarray) -> int | np.ndarray:
        return node // self.nodes_per_rank

    def is_local(self, node: int) -> bool:
        return self.owner(node) == self.rank

    def local_index(self, node: int) -> int:
        return node - self.first


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
    `rows` holds this rank's rows of it (its nodes in `nodes`, in order). After the
    exchange, `available` holds the rows of `available_nodes` (sorted, a subset of `nodes`:
    this rank's and those it received); every other node of `nodes` carries zero."""

    nodes: np.ndarray
    rows: Tensor  # [len(local part of nodes), width]
    available: Tensor | None = field(default=None, repr=False)  # [R, width] after exchange
    available_nodes: np.ndarray | None = field(default=None, repr=False)  # [R] node ids

    def local_mask(self, layout: Layout) -> np.ndarray:
        return layout.owner(self.nodes) == layout.rank

    def positions(self, nodes: np.ndarray | list[int], device: torch.device) -> Tensor:
        """The rows of `available` that hold these nodes (each must be held)."""
        assert self.available_nodes is not None
        nodes = np.asarray(nodes, dtype=np.int64)
        at = np.searchsorted(self.available_nodes, nodes)
        assert np.all(at < len(self.available_nodes)) and np.array_equal(
            self.available_nodes[np.minimum(at, len(self.available_nodes) - 1)], nodes), \
            "a node whose row this rank neither owns nor received"
        return index_tensor(at, device)


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
        self.guard = Guard(self.world, self.rank)  # stop flags; the CLI sets one per run
        self.exchanges = 0  # exchanges posted so far (= the step of the next one)
        self.gathers = 0
        self.peers: list[tuple[str, int]] = []  # (host, pid) of every rank
        self.group = None  # the run's process group (timeout_s); None: the default one
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives use the current device
        if backend == "nccl":
            for key, value in NCCL_ENV.items():
                os.environ.setdefault(key, value)
        if self.world > 1 and not dist.is_initialized():
            try:
                # ranks reach this after loading data and model, which can take a while on
                # a busy machine: forming the group waits longer than a step may. device_id
                # binds the group to this rank's GPU (else its first barrier warns that the
                # device is unknown, a second line)
                dist.init_process_group(
                    backend=backend, device_id=device if device.type == "cuda" else None,
                    timeout=datetime.timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
            except RuntimeError as err:
                raise self._peer_error(err, "start-up (forming the process group)",
                                       limit=max(timeout_s, STARTUP_TIMEOUT_S)) from err
            self.initialized_here = True
        if self.world > 1:
            # every operation of the run goes through a group with timeout_s as its limit
            self.group = self._collective(
                dist.new_group, None, datetime.timedelta(seconds=timeout_s), backend,
                phase="start-up (forming the process group)")
            peers: list = [None] * self.world
            self._collective(dist.all_gather_object, peers, (socket.gethostname(), os.getpid()),
                             self.group, phase="start-up")
            self.peers = peers
            SIGNALS.agree = self.agree_signal  # phases after training stop together

    def close(self) -> None:
        """Leave together: a rank tearing gloo down while a peer still talks to it aborts."""
        if self.initialized_here and dist.is_initialized() and not self.broken:
            inject(self.rank, 0, "barrier")
            self._collective(dist.barrier, self.group, phase="closing barrier")
            dist.destroy_process_group()
        if SIGNALS.agree == self.agree_signal:
            SIGNALS.agree = None  # no peer waits for this rank any more: its checks answer

    def let_rank0_leave_first(self, limit_s: float = 2.0) -> None:
        """After a stop every rank agreed on, a rank other than 0 (on rank 0's machine) waits
        until rank 0 has exited: rank 0 prints the run's line, and torchrun sends SIGTERM to
        the ranks still running once one has exited — to rank 0, after a signal of its own,
        that would be a second one (exit at once, a second line)."""
        if self.rank == 0 or not self.peers or self.peers[0][0] != socket.gethostname():
            return
        deadline = time.monotonic() + limit_s
        while process_state(self.peers[0][1]) != "exited" and time.monotonic() < deadline:
            time.sleep(0.01)

    def agree_signal(self, pending: int, phase: str) -> int:
        """max over ranks of `pending` (a signal number, 0: none): every rank learns whether
        any has a signal to answer at this check point (stopping.Signals.check_together)."""
        flag = torch.tensor([float(pending)], device=self.device)
        self._collective(dist.all_reduce, flag, dist.ReduceOp.MAX, self.group,
                         phase=f"signal check of the {phase} phase")
        return int(flag.item())

    def stop(self, t: int, result: object) -> None:
        """Raise Stopped on every rank (the guard's agreed reason) at step t."""
        assert self.guard.agreed is not None
        reason, detail = self.guard.agreed
        raise Stopped(reason, t, detail, result)

    def stop_here(self) -> bool:
        """Whether every rank stops at this step (a signal or a diverged loss)."""
        return self.guard.stop_here()

    # ---- the one failure path ------------------------------------------------------------
    def _collective(self, fn: Callable, *args: object, phase: str) -> object:
        try:
            return fn(*args)
        except RuntimeError as err:  # gloo, and nccl under blocking wait (NCCL_ENV), raise
            # on a timeout or a closed connection
            raise self._peer_error(err, phase) from err

    def _suspects(self) -> dict[int, str]:
        """Ranks on this machine that have exited or are stopped."""
        host = socket.gethostname()
        out = {}
        for r, (h, pid) in enumerate(self.peers):
            if r != self.rank and h == host:
                state = process_state(pid)
                if state in ("exited", "stopped"):
                    out[r] = state
        return out

    # ---- one exchange per step -----------------------------------------------------------
    def exchange(self, layout: Layout, channels: list[Channel], route: Route) -> None:
        """Fill every channel's `available` (and `available_nodes`): its local rows, and
        from each peer the rows of the peer's nodes that this rank's nodes receive from
        (`route`), in node order."""
        self.post(layout, channels, route).wait()

    def post(self, layout: Layout, channels: list[Channel], route: Route) -> PendingExchange:
        """Start the exchange: the rows `route` sends leave now, so only those rows of
        each channel need their values yet; the others may still be written until
        `wait()`, which fills `available` (the engine computes interior nodes meanwhile)."""
        owned = [c.local_mask(layout) for c in channels]
        pending = PendingExchange(self, channels, owned, route, step=self.exchanges)
        inject(self.rank, self.exchanges, "exchange")
        self.exchanges += 1
        if self.world == 1 or not (route.send or route.recv):
            return pending
        ops = []
        for peer in route.send:
            parts = [c.rows[route.index("send", peer, c.nodes, mine, self.device)].reshape(-1)
                     for c, mine in zip(channels, owned, strict=True)]
            buf = torch.cat(parts)
            pending.sent.append(buf)  # NCCL reads it on its stream: held until wait()
            ops.append(dist.P2POp(dist.isend, buf, peer, self.group))
        for peer, wanted in route.recv.items():
            size = sum(int(wanted[c.nodes].sum()) * c.rows.shape[1] for c in channels)
            pending.received[peer] = torch.empty(size, dtype=channels[0].rows.dtype,
                                                 device=self.device)
            ops.append(dist.P2POp(dist.irecv, pending.received[peer], peer, self.group))
        pending.peers = [op.peer for op in ops]
        try:
            pending.works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:
            raise self._peer_error(err, f"exchange of step {pending.step}") from err
        return pending

    def _peer_error(self, err: BaseException, phase: str, peer: int | None = None,
                    limit: float | None = None) -> PeerError:
        """One line: this rank, the peer if known, the true cause, the phase."""
        self.broken = True
        cause = failure_cause(err)
        suspects = self._suspects() if self.peers else {}
        deadline = time.monotonic() + 1.0
        while cause == "closed" and self.peers and "exited" not in suspects.values() \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # a killed peer's sockets close a moment before it is gone
            suspects = self._suspects()
        if peer is None and len(suspects) == 1:
            (r, state), = suspects.items()
            # a closed connection comes from a rank that exited, a timeout from a silent one
            if (cause, state) in (("closed", "exited"), ("timeout", "stopped")):
                peer = r
        who = f"rank {peer}" if peer is not None else "a peer rank"
        if cause == "timeout":
            what = (f"no answer from {who} within timeout_s={self.timeout_s:g} s" if limit is None
                    else f"no answer from {who} within {limit:g} s")
        elif cause == "closed":
            what = f"{who} closed the connection (connection closed or reset)"
        else:
            what = f"communication with {who} failed"
        notes = [f"rank {r} has exited" if s == "exited" else f"rank {r} is stopped (SIGSTOP?)"
                 for r, s in sorted(suspects.items())]
        detail = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", " ".join(str(err).split()))
        detail = detail.split(". This is typically")[0]
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        note = f"; {', '.join(notes)}" if notes else ""
        return PeerError(f"rank {self.rank}: {what} during the {phase}{note} [{detail}]")

    # ---- collectives used outside the step loop -----------------------------------------
    def all_sum(self, x: Tensor) -> Tensor:
        """Σ over ranks of x. The guard's stop flags travel with it (stopping.Guard): after
        it every rank knows whether all stop at this step."""
        inject(self.rank, self.guard.t, "metrics")
        if self.world == 1:
            return x
        flat = torch.cat([x.reshape(-1), self.guard.slots(x)])
        self._collective(dist.all_reduce, flat, dist.ReduceOp.SUM, self.group,
                         phase=f"metrics all_reduce at step "
                                                      f"{self.guard.t}")
        self.guard.agree(flat[x.numel():])
        x.copy_(flat[:x.numel()].view_as(x))
        return x

    def gather_to_root(self, obj: object) -> list[object] | None:
        inject(self.rank, self.gathers, "gather")
        self.gathers += 1
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self._collective(dist.gather_object, obj, out, 0, self.group,
                         phase="gather to rank 0 (metrics rows, "
                         "influence rows or final parameters)")
        return out

    def broadcast_from_root(self, obj: object) -> object:
        """Rank 0's picklable `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, 0, self.group,
                         phase="broadcast from rank 0")
        return box[0]


@dataclass
class PendingExchange:
    """An exchange in flight (`Comm.post`)."""

    comm: Comm
    channels: list[Channel]
    owned: list[np.ndarray]  # per channel: which of its nodes are this rank's
    route: Route
    step: int = 0
    works: list = field(default_factory=list)
    received: dict[int, Tensor] = field(default_factory=dict)  # peer → its flat buffer
    peers: list[int] = field(default_factory=list)  # the peer of each work, in order
    sent: list[Tensor] = field(default_factory=list)  # the send buffers, alive until wait()

    def wait(self) -> None:
        device, route = self.comm.device, self.route
        peer = None
        try:
            for i, work in enumerate(self.works):
                peer = self.peers[i] if len(self.peers) == len(self.works) else None
                work.wait()
        except RuntimeError as err:  # gloo, and nccl under blocking wait, raise on a
            # timeout or a closed connection
            raise self.comm._peer_error(err, f"exchange of step {self.step}", peer) from err
        self.sent = []
        for c, local in zip(self.channels, self.owned, strict=True):
            if local.all():  # nothing to receive into: use the rows as they are
                c.available, c.available_nodes = c.rows, c.nodes
                continue
            # [R, width], R = own + received rows: each is written below, none stays empty
            c.available_nodes = route.held(c.nodes, local)
            c.available = c.rows.new_empty(len(c.available_nodes), c.rows.shape[1])
            c.available[route.index("own", self.comm.rank, c.nodes, local, device)] = c.rows
        for peer, buf in self.received.items():
            offset = 0
            for c, local in zip(self.channels, self.owned, strict=True):
                at = route.index("recv", peer, c.nodes, local, device)
                count, width = len(at), c.rows.shape[1]
                if count:
                    block = buf[offset:offset + count * width].view(count, width)
                    c.available[at] = block
                offset += count * width


def mix(W: sparse.csr_array, out_nodes: np.ndarray, channel: Channel,
        weights: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Gossip: rows Σ_l W[k, l] · v_l for k in out_nodes, l over the rows this rank holds.

    Nodes it does not hold carry zero (a perturbation that has not reached them, a node
    no local node hears from), so only W's columns of `channel.available_nodes` are
    needed, remapped to the compact rows in the same order: each sum has the same terms
    in the same order as over every node. `weights`, if given, is that block
    W[out_nodes][:, available_nodes] already as a tensor (the engine caches it per step
    of the topology's period). `out`, if given, receives the rows (its contents are
    ignored). Costs O(edges of out_nodes · P)."""
    assert channel.available is not None and channel.available_nodes is not None
    if weights is None:
        weights = block_tensor(W, out_nodes, channel.available_nodes, channel.available.dtype,
                               channel.available.device)
    if out is None:
        out = channel.available.new_empty(weights.shape[0], channel.available.shape[1])
    # into `out` (beta=0: its contents are ignored, NaN included): `weights @ rows` would
    # hold a second [out, P] temporary at its peak
    return torch.addmm(out, weights, channel.available, beta=0.0, out=out)


def local_block(W: sparse.csr_array, way: Route, layout: Layout, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """W[local nodes][:, held nodes] as a tensor: the block `mix` takes for a channel over
    every node after the exchange of `way` (its columns remapped to the compact rows)."""
    every = np.arange(layout.nodes)
    held = way.held(every, layout.owner(every) == layout.rank)
    block = W[layout.local_nodes]
    return sparse_tensor(block if len(held) == layout.nodes else block[:, held], dtype, device)


DIRECT_BLOCK = 20_000  # stored entries up to which block_tensor reads W's arrays itself


def block_tensor(W: sparse.csr_array, rows: np.ndarray, cols: np.ndarray, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """sparse_tensor(W[rows][:, cols]): the same stored entries in the same order, read
    straight from W's CSR arrays (scipy's two fancy-indexing steps cost ~0.3 ms a call,
    and the trackers mix their rows with a new block every step); a block of more than
    DIRECT_BLOCK stored entries goes through scipy, faster there. `cols` distinct."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    starts = W.indptr[rows].astype(np.int64)
    counts = W.indptr[rows + 1] - starts
    if counts.sum() > DIRECT_BLOCK:
        return sparse_tensor(W[rows][:, cols], dtype, device)
    at = spans(starts, counts)  # the rows' entries, concatenated
    column = np.full(W.shape[1], -1, dtype=np.int64)
    column[cols] = np.arange(len(cols))
    new_col = column[W.indices[at]]
    kept = new_col >= 0
    row = np.repeat(np.arange(len(rows)), counts)[kept]
    new_col, values = new_col[kept], W.data[at][kept]
    if not (W.has_sorted_indices and np.all(cols[1:] > cols[:-1])):
        order = np.lexsort((new_col, row))  # columns ascending within each row
        new_col, values = new_col[order], values[order]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(rows)), out=indptr[1:])
    with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.as_tensor(indptr, device=device),
            torch.as_tensor(new_col, device=device),
            torch.as_tensor(values, dtype=dtype, device=device),
            size=(len(rows), len(cols)), check_invariants=False)


def sparse_tensor(block: sparse.csr_array, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A CSR block of W as a torch sparse CSR tensor: block @ rows sums only the stored
    entries of each row, in column order."""
    block = block.tocsr()
    block.sort_indices()
    with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.as_tensor(block.indptr, dtype=torch.int64, device=device),
            torch.as_tensor(block.indices, dtype=torch.int64, device=device),
            torch.as_tensor(block.data, dtype=dtype, device=device),
            size=block.shape, check_invariants=False)


@dataclass(frozen=True)
class Route:
    """Who sends what under one W, as masks over all nodes. send[peer]: this rank's nodes
    that some node on `peer` receives from; recv[peer]: the peer's nodes that some node
    here receives from. Both sides compute them from the same W, so each send meets its
    receive and only rows that are mixed travel (a ring of blocks sends its edge rows)."""

    send: dict[int, np.ndarray]
    recv: dict[int, np.ndarray]
    nodes: int = 0  # n, the length of every mask
    # device index tensors of channels over every node (the parameters', the optimizer
    # state's, the updates'), made once per route: the engine keeps a route per step of the
    # topology's period. Channels over fewer nodes (the trackers' rows) make theirs anew.
    indices: dict[tuple[str, int], Tensor] = field(default_factory=dict, compare=False,
                                                   repr=False)
    every_node_held: list[np.ndarray] = field(default_factory=list, compare=False,
                                              repr=False)  # held() of every node, once

    def held_mask(self, nodes: np.ndarray, owned: np.ndarray) -> np.ndarray:
        """Which of `nodes` this rank holds after the exchange: its own and those it
        receives from some peer."""
        mask = owned.copy()
        for wanted in self.recv.values():
            mask |= wanted[nodes]
        return mask

    def held(self, nodes: np.ndarray, owned: np.ndarray) -> np.ndarray:
        """The nodes of a channel over `nodes` whose rows this rank holds after the
        exchange (sorted): the rows of its compact `available` block."""
        every_node = len(nodes) == self.nodes
        if every_node and self.every_node_held:
            return self.every_node_held[0]
        found = nodes[self.held_mask(nodes, owned)]
        if every_node:
            self.every_node_held.append(found)
        return found

    def index(self, kind: str, peer: int, nodes: np.ndarray, owned: np.ndarray,
              device: torch.device) -> Tensor:
        """Row positions in a channel over `nodes` (`owned`: which of them are this rank's):
        "send": among this rank's rows, those `peer` receives; "recv": among the rows held
        after the exchange (`held`), the rows from `peer`; "own": among those, this rank's."""
        key, every_node = (kind, peer), len(nodes) == self.nodes
        if every_node and key in self.indices:
            return self.indices[key]
        if kind == "send":
            positions = np.flatnonzero(self.send[peer][nodes[owned]])
        elif kind == "recv":
            positions = np.flatnonzero(self.recv[peer][self.held(nodes, owned)])
        else:
            positions = np.flatnonzero(owned[self.held_mask(nodes, owned)])
        found = index_tensor(positions, device)
        if every_node:
            self.indices[key] = found
        return found


def send_first(route: Route, layout: Layout) -> list[np.ndarray]:
    """This rank's local rows in the order to compute them: [rows some peer receives,
    the rest], or one group when either part is empty (nothing to overlap)."""
    sent = np.zeros(layout.nodes, dtype=bool)
    for mask in route.send.values():
        sent |= mask
    boundary = sent[layout.local_nodes]
    if boundary.all() or not boundary.any():
        return [np.arange(layout.nodes_per_rank)]
    return [np.flatnonzero(boundary), np.flatnonzero(~boundary)]


def route(W: sparse.csr_array, layout: Layout) -> Route:
    """The Route of W from its edges l → k (W[k, l] > 0): O(edges · ranks)."""
    edges = W.tocoo()
    k, l = edges.row[edges.data > 0], edges.col[edges.data > 0]  # l sends to k
    owner = layout.owner(np.arange(layout.nodes))
    to_rank, from_rank = owner[k], owner[l]
    heard_here = np.zeros(layout.nodes, dtype=bool)  # senders that my nodes receive from
    heard_here[l[to_rank == layout.rank]] = True
    send, recv = {}, {}
    for other in range(layout.world):
        if other == layout.rank:
            continue
        to_them = np.zeros(layout.nodes, dtype=bool)  # my nodes some node of `other` hears
        to_them[l[(to_rank == other) & (from_rank == layout.rank)]] = True
        if to_them.any():
            send[other] = to_them
        from_them = heard_here & (owner == other)
        if from_them.any():
            recv[other] = from_them
    return Route(send, recv, layout.nodes)
