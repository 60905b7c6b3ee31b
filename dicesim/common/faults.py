"""Test hook: DICESIM_FAULT=KIND:RANK:N[:PHASE] makes rank RANK fail on purpose.

KIND: ``die`` (exit 1), ``kill`` (SIGKILL itself), ``stop`` (SIGSTOP itself: hung, alive),
``hang`` (sleep forever), ``term`` (SIGTERM itself, as SLURM does before a time limit, and
go on: the run stops where its ranks next agree). PHASE and N:

- ``step`` (default): at the start of step N, so peers fail in that step's exchange;
- ``exchange``: just before this rank posts the exchange of step N;
- ``metrics``: in the metrics all_reduce of the evaluation at step N;
- ``gather``: at this rank's N-th gather to rank 0 (0-based: metrics rows, influence
  flushes, the final parameters, in the order the run makes them);
- ``barrier``: at the closing barrier (N is ignored);
- ``checkpoint``: while rank 0 writes the checkpoint of step N (after the first rank file).

With DICESIM_FAULT_MARK=FILE the rank writes the time of the fault (time.time()) there
first, so a test can measure how long the others take to stop.
"""

from __future__ import annotations

import os
import signal
import time


def inject(rank: int, n: int, phase: str = "step") -> None:
    spec = os.environ.get("DICESIM_FAULT")
    if not spec:
        return
    kind, fault_rank, step, *rest = spec.split(":")
    want = rest[0] if rest else "step"
    if want != phase or int(fault_rank) != rank or (phase != "barrier" and int(step) != n):
        return
    mark = os.environ.get("DICESIM_FAULT_MARK")
    if mark:
        with open(mark, "w") as f:
            f.write(repr(time.time()))
    if kind == "die":
        os._exit(1)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    time.sleep(10**6)
