"""Proximal influence (the paper's Definition 4), every step, of every batch on every
out-neighbour: q_k W^{t−1}[k,j] ∇L'_k(θ_k^t)ᵀ Δ_j^{t−1}, k ≠ j, from the updates Δ_j that
k received at t − 1: one dot per edge of this rank's receivers (O(edges · P)). Published
on the Step (`step.proximal`, a sparse [local k, sender j] matrix) for the aggregator."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from dicesim.comm.exchange import Channel, Layout
from dicesim.influence.events import ProximalRow
from dicesim.influence.trackers import Tracker, TrackerContext, register


class Proximal(Tracker):
    def __init__(self, layout: Layout, q: np.ndarray):
        self.layout = layout
        self.q = q
        # Δ_j^{t−1} of the rows this rank held after the exchange: its own and its senders'
        # ([R, P], R = local + received rows), and their node ids
        self.received: Tensor | None = None
        self.received_nodes: np.ndarray | None = None
        # the edges k ← j (k local, j ≠ k) of W^{t−1} as mixed: local row, sender, W[k, j]
        self.edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.rows: list[ProximalRow] = []

    def probe_rows(self, t: int) -> np.ndarray:
        return np.arange(self.layout.nodes_per_rank) if t > 0 else np.array([], dtype=np.int64)

    def at_theta(self, step) -> None:
        if step.t == 0:
            return
        assert self.received is not None and self.edges is not None
        local = self.layout.local_nodes
        i, j, w = self.edges
        dev = step.probe_grad.device
        ti = torch.as_tensor(i, device=dev)
        tj = torch.as_tensor(np.searchsorted(self.received_nodes, j), device=dev)  # j's row
        # one dot per edge: ∇L'_k(θ_k^t)ᵀ Δ_j^{t−1}, O(edges · P)
        dots = (step.probe_grad[ti] * self.received[tj]).sum(1).cpu().numpy()
        values = self.q[local[i]] * w * dots  # q_k W^{t−1}[k, j] ∇L'_kᵀ Δ_j
        # what the aggregator reads: [local k, sender j], one entry per edge
        step.proximal = sparse.csr_array((values, (i, j)), shape=(len(local), self.layout.nodes))
        self.rows += [ProximalRow(step.t - 1, int(jj), int(local[ii]), float(v))
                      for ii, jj, v in zip(i, j, values, strict=True)]

    def channels(self, step) -> list[Channel]:
        return [Channel(np.arange(self.layout.nodes), step.update)]

    def after_gossip(self, step, received: list[Channel]) -> None:
        self.received, self.received_nodes = received[0].available, received[0].available_nodes
        block = step.W[self.layout.local_nodes].tocoo()  # W^t[local, :] as mixed
        local_row, sender, weight = block.row, block.col, block.data
        keep = (weight > 0) & (sender != self.layout.local_nodes[local_row])  # k ≠ j
        order = np.lexsort((sender[keep], local_row[keep]))  # by receiver, then sender
        self.edges = (local_row[keep][order].astype(np.int64),
                      sender[keep][order].astype(np.int64), weight[keep][order])

    def take_proximal(self) -> list[ProximalRow]:
        rows, self.rows = self.rows, []
        return rows

    def state_dict(self) -> dict:
        return {"received": self.received, "received_nodes": self.received_nodes,
                "edges": self.edges, "rows": [tuple(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.received, self.edges = state["received"], state["edges"]
        # a checkpoint written before the compact block held one row per node
        self.received_nodes = (state["received_nodes"] if "received_nodes" in state
                               else None if self.received is None
                               else np.arange(len(self.received)))
        self.rows = [ProximalRow(*r) for r in state["rows"]]


@register("proximal")
def _proximal(ctx: TrackerContext) -> Proximal | None:
    return Proximal(ctx.layout, ctx.q) if ctx.influence.proximal else None
