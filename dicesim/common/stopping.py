"""How a run stops early: signals, diverged losses, and the one line it ends with.

- Signals: SIGINT and SIGTERM only set a flag (:class:`Signals`); the step loop stops at a
  step every rank agrees on (see :class:`Guard`), flushes the finished influence rows,
  runs the :data:`on_signal` hooks (a checkpoint writer can register one) and exits
  130 / 143 with one line. A second signal exits at once.
- Divergence: :class:`Guard` watches every node's training loss (each step) and probe loss
  (each evaluation). A loss that is not finite, or larger than ``divergence_factor`` times
  the node's first positive training loss (normally step 0's; a node whose whole batch is
  removed has loss 0 until it trains), stops the run with exit 4 when
  ``abort_on_nonfinite`` is true.
- Agreement: with several ranks the flags travel with the metrics ``all_reduce`` that every
  rank makes at the same steps (``eval_every``): each rank writes its own slots of a small
  vector appended to that reduction, so after it every rank knows every rank's flags and all
  stop at the same step. One process checks its flags every step.
- Phases after (or between) training steps — the final evaluation, the attribution reverse
  pass, writing outputs and figures, a checkpoint's files, an experiment's next run — call
  ``SIGNALS.check(phase)`` at their iteration points: the first signal not yet answered
  raises :class:`Interrupted` there (within one iteration), and the caller turns it into
  the same one line and exit 130/143.
- Phases with collectives on several ranks (the final evaluation, the reverse pass, an
  experiment's next run): a rank that raised alone would leave its peers waiting in the
  next gather until timeout_s (exit 3). While a process group is live (``SIGNALS.agree``
  set by the Comm) a rank's own ``check`` raises nothing; the check points that every rank
  reaches in the same order call ``check_together``: one tiny ``all_reduce(max)`` of "a
  signal is pending", after which every rank raises :class:`Interrupted` at the same point
  with the same signal. :class:`PhaseChecks` makes a few of a phase's n check points agreed
  ones (the first and every ⌈n / AGREED_PER_PASS⌉-th), so a phase costs a handful of
  collectives and answers within about 1/AGREED_PER_PASS of its length.
- ``DICESIM_TEST_PAUSE=<phase>[@N]:<marker file>`` (tests only) pauses at that phase's N-th
  check until a signal arrives (:func:`pause_for_test`); with several ranks each rank writes
  ``<marker>.<rank>`` and also goes on when the test removes that file.
- Exit: :func:`exit_with` prints the one line (in a multi-rank run rank 0 prints, unless
  ``everyone``), or, under ``python -m dicesim.launch`` (``DICESIM_STATUS_DIR`` set), leaves it
  in a status file for the launcher, which prints exactly one line for the whole run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXIT_CONFIG, EXIT_PEER, EXIT_DIVERGED = 2, 3, 4
STATUS_ENV = "DICESIM_STATUS_DIR"
PAUSE_ENV = "DICESIM_TEST_PAUSE"
SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

#: Called as hook(signum, step) on every rank when a run stops for a signal, after the
#: finished rows are flushed and before the process exits (e.g. to write a checkpoint).
on_signal: list[Callable[[int, int], None]] = []


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def status_dir() -> Path | None:
    value = os.environ.get(STATUS_ENV)
    return Path(value) if value else None


def record_pid() -> None:
    """Under the launcher: leave this rank's pid so that it can reap a hung rank."""
    where = status_dir()
    if where is None:
        return
    rank, _ = _rank_world()
    try:
        (where / f"pid.{rank}").write_text(str(os.getpid()))
    except OSError:
        pass


def record_status(code: int, line: str) -> bool:
    """Under the launcher: leave this rank's exit code and line for it. False if not."""
    where = status_dir()
    if where is None:
        return False
    rank, _ = _rank_world()
    tmp = where / f".status.{rank}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"rank": rank, "code": code, "line": line,
                                   "time": time.time()}))
        os.replace(tmp, where / f"status.{rank}")
    except OSError:
        return False
    return True


def exit_with(message: str, code: int, everyone: bool = False, prefix: str = "error: ") -> None:
    """End this process with one line and `code`. In a multi-rank run only rank 0 prints
    unless `everyone` (a rank's own view of a failure); under the launcher the line goes to
    the status directory and the launcher prints one line for the run."""
    rank, world = _rank_world()
    line = f"dicesim: {prefix}{message}"
    if record_status(code, line):  # under the launcher, which prints one line for the run
        pass
    elif world == 1 or rank == 0 or everyone:
        print(line, file=sys.stderr, flush=True)
    if world > 1 or code in SIGNAL_CODES.values():
        # gloo's threads can abort the interpreter's finalization, and after a signal its
        # second or so (torch, gloo) is time a preempted job does not have: every file is
        # written and closed by now, so leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ---- signals ---------------------------------------------------------------------------------
class Signals:
    """SIGINT/SIGTERM set `received`; a second one ends the process at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.answered = False  # a stop for `received` is under way: check() raises no more
        self.previous: dict[int, object] = {}
        # while several ranks share a live process group: (pending signal or 0, phase) →
        # the largest over all ranks (Comm.agree_signal); None: this process stops alone
        self.agree: Callable[[int, str], int] | None = None

    @property
    def pending(self) -> int:
        return self.received if self.received is not None and not self.answered else 0

    def check(self, phase: str) -> None:
        """A rank's own check point: raise Interrupted if a signal arrived that no stop has
        answered yet — unless peers share a live group (`agree`): then only the agreed check
        points answer it, a peer may be waiting for this rank in a collective."""
        pause_for_test(phase)
        signum = self.pending
        if self.agree is None and signum:
            self.answered = True
            raise Interrupted(signum, phase)

    def check_together(self, phase: str) -> None:
        """A check point that every rank reaches in the same order: with several ranks, all
        raise Interrupted here if any has a signal pending (the largest signal number: SIGTERM
        over SIGINT); one process: the same as check."""
        if self.agree is None:
            self.check(phase)
            return
        pause_for_test(phase)
        agreed = self.agree(self.pending, phase)
        if agreed:
            self.answered = True
            raise Interrupted(agreed, phase)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNAL_CODES:
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            name = signal.Signals(signum).name
            exit_with(f"{name} again: stopping now without flushing; rows flushed so far "
                      "are kept", SIGNAL_CODES[signum], prefix="")
        self.received = signum


SIGNALS = Signals()


class Interrupted(Exception):  # noqa: N818 - not an error: a requested stop
    """A signal answered at a phase's check (outside the step loop's agreed stops)."""

    def __init__(self, signum: int, phase: str):
        super().__init__(phase)
        self.signum, self.phase = signum, phase

    @property
    def code(self) -> int:
        return SIGNAL_CODES.get(self.signum, 130)


#: with several ranks, the agreed check points of a phase of n check points (PhaseChecks)
AGREED_PER_PASS = 8


class PhaseChecks:
    """The n check points of one pass of `phase`, called in order. `together` (every rank
    runs the same pass, the same n): the first, every ⌈n / AGREED_PER_PASS⌉-th and `end()`
    are agreed (check_together), the others a rank's own; otherwise all are a rank's own
    (a pass that rank 0 makes alone)."""

    def __init__(self, phase: str, n: int, together: bool = True):
        self.phase, self.together = phase, together
        self.stride = max(1, -(-n // AGREED_PER_PASS))
        self.seen = 0

    def __call__(self) -> None:
        i, self.seen = self.seen, self.seen + 1
        if self.together and i % self.stride == 0:
            SIGNALS.check_together(self.phase)
        else:
            SIGNALS.check(self.phase)

    def end(self) -> None:
        """After the pass's last piece: a signal that came during it is answered here."""
        if self.together:
            SIGNALS.check_together(self.phase)
        else:
            SIGNALS.check(self.phase)


_checks_seen: dict[str, int] = {}
PAUSE_S = 120  # tests start several runs at once on a small machine


def pause_for_test(phase: str) -> None:
    """Tests only: with DICESIM_TEST_PAUSE=<phase>[@N]:<marker>, at the N-th (default first)
    check of `phase` write the marker file (with several ranks: <marker>.<rank>) and wait
    (at most PAUSE_S) for a signal, or for the test to remove the marker."""
    name, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    name, _, nth = name.partition("@")
    if name != phase or not marker:
        return
    _checks_seen[phase] = _checks_seen.get(phase, 0) + 1
    if _checks_seen[phase] != int(nth or 1):
        return
    rank, world = _rank_world()
    path = Path(f"{marker}.{rank}" if world > 1 else marker)
    path.write_text(str(os.getpid()))
    deadline = time.monotonic() + PAUSE_S
    while SIGNALS.received is None and time.monotonic() < deadline and path.exists():
        time.sleep(0.01)


# ---- divergence and the agreed stop ----------------------------------------------------------
@dataclass
class Finding:
    step: int
    node: int
    what: str  # "training" | "probe"
    value: float

    def describe(self) -> str:
        kind = "non-finite" if not math.isfinite(self.value) else "exploding"
        return f"{kind} {self.what} loss ({self.value:.4g}) at step {self.step} on node {self.node}"


@dataclass
class Guard:
    """This rank's stop flags (signal, first diverged loss) and the agreed decision."""

    world: int = 1
    rank: int = 0
    abort_on_nonfinite: bool = True
    divergence_factor: float | None = 1e3
    t: int = -1  # the step of the latest observation (the metrics pass sets it)
    first: Finding | None = None  # this rank's first diverged loss
    initial: dict[int, float] = field(default_factory=dict)  # node → first positive loss
    agreed: tuple[str, object] | None = None  # ("signal", signum) | ("diverged", Finding)

    def observe(self, t: int, nodes, losses: torch.Tensor, what: str) -> None:
        """Check this rank's losses of step t (`nodes` are their global ids)."""
        self.t = t
        values = losses.detach().double().cpu().tolist()
        if what == "training":  # the reference: a node's first positive, finite loss
            for k, v in zip(nodes, values, strict=True):
                if int(k) not in self.initial and math.isfinite(v) and v > 0:
                    self.initial[int(k)] = v
        if self.first is not None:
            return
        for k, v in zip(nodes, values, strict=True):
            limit = None
            if self.divergence_factor is not None and int(k) in self.initial:
                limit = self.divergence_factor * self.initial[int(k)]
            if not math.isfinite(v) or (limit is not None and v > limit):
                self.first = Finding(t, int(k), what, v)
                return

    # the slots each rank adds to the metrics all_reduce, per rank:
    # [signal, step + 1, node + 1, kind (1 training, 2 probe), loss]
    WIDTH = 5

    def slots(self, like: torch.Tensor) -> torch.Tensor:
        out = like.new_zeros(self.WIDTH * self.world)
        base = self.WIDTH * self.rank
        if SIGNALS.received is not None:
            out[base] = float(SIGNALS.received)
        if self.first is not None and self.abort_on_nonfinite:
            f = self.first
            out[base + 1:base + 5] = torch.tensor(
                [f.step + 1, f.node + 1, 1 if f.what == "training" else 2, f.value],
                dtype=out.dtype)
        return out

    def agree(self, reduced: torch.Tensor) -> None:
        """Read every rank's slots after the reduction; all ranks decide the same."""
        flags = reduced.detach().double().cpu().view(self.world, self.WIDTH).tolist()
        for _sig, step, node, kind, value in flags:
            if step > 0:
                self.agreed = ("diverged", Finding(int(step) - 1, int(node) - 1,
                                                   "training" if kind == 1 else "probe", value))
                return
        for sig, *_ in flags:
            if sig > 0:
                self.agreed = ("signal", int(sig))
                return

    def stop_here(self) -> bool:
        if self.world == 1:  # one process: look at the flags every step
            if self.first is not None and self.abort_on_nonfinite:
                self.agreed = ("diverged", self.first)
            elif SIGNALS.received is not None:
                self.agreed = ("signal", SIGNALS.received)
        return self.agreed is not None


class Stopped(Exception):  # noqa: N818 - not an error: a requested stop
    """Raised on every rank at the same step when the run stops early."""

    def __init__(self, reason: str, step: int, detail: object, result: object,
                 phase: str | None = None):
        super().__init__(reason)
        self.reason = reason  # "signal" | "diverged"
        self.step = step
        self.detail = detail  # the signal number, or the diverged loss's Finding
        self.result = result  # the RunResult so far (rank 0 holds the gathered rows)
        self.phase = phase  # None: the step loop; else where a signal was answered

    @classmethod
    def after(cls, interrupted: Interrupted, step: int, result: object) -> Stopped:
        """A signal answered in a phase after step `step`'s training (with several ranks at
        an agreed check point: on every rank)."""
        return cls("signal", step, interrupted.signum, result, phase=interrupted.phase)

    @property
    def code(self) -> int:
        if self.reason == "signal":
            return SIGNAL_CODES.get(self.detail, 130)
        return EXIT_DIVERGED

    def message(self, out: Path | None) -> str:
        where = f"; finished rows are in {out}" if out is not None else ""
        if self.reason == "signal":
            name = signal.Signals(self.detail).name
            if self.phase is not None:
                return f"interrupted in the {self.phase} phase at step {self.step} ({name}){where}"
            return f"interrupted at step {self.step} ({name}){where}"
        return (f"{self.detail.describe()}; run stopped (abort_on_nonfinite=true; lower "
                f"optim.lr, or set abort_on_nonfinite=false to continue){where}")
