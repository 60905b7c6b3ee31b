"""A run's figures drawn by a forked worker process.

After the last step a run used to spend ~0.5 s importing matplotlib and ~1 s drawing its
figures one after the other. On Linux one worker is forked instead. `python -m dicesim`
forks it first thing, before this process imports torch (`start_early`), so the worker
imports matplotlib on the other core while torch loads here, then waits for the run's
metrics and influence rows (plain tuples: the worker never imports torch); other runs fork
it when writing their outputs. To draw, the worker forks once more and the two draw their
shares of the figures side by side. Whatever they did not draw (no fork on this platform,
a failure) is drawn in this process afterwards: the same files. Workers leave with
`os._exit`; a worker whose run dies reads end-of-file and leaves. This module and
dicesim.plots import nothing that imports torch."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from dicesim.composeworker import single_plain

if TYPE_CHECKING:
    from dicesim.trainer import RunResult

# the two shares of dicesim.plots.FIGURES drawn side by side, in report.md's order
SHARES = (("training",), ("alignment", "cascade"))
ORDER = tuple(name for share in SHARES for name in share)


EARLY: PlotWorker | None = None  # forked by `start_early`, taken by the run (`take_early`)


def start_early(argv: list[str]) -> None:
    """Fork the worker at the very start of `python -m dicesim`, unless the command line
    shows it will not be needed: Hydra flags (sweeps, --cfg), `plots=false`, a dry run,
    or a rank of a multi-process run (WORLD_SIZE > 1)."""
    global EARLY
    skip = {"plots=false", "dry_run=true"}
    if not single_plain(argv) or any(a.strip().lower() in skip for a in argv):
        return
    EARLY = PlotWorker.start()


def take_early(wanted: bool) -> PlotWorker | None:
    """The early worker if this run draws figures (else it is released)."""
    global EARLY
    worker, EARLY = EARLY, None
    if worker is not None and not wanted:
        worker.close()
        return None
    return worker


class PlotWorker:
    def __init__(self, pid: int | None, requests: int | None, replies: int | None):
        self.pid = pid  # None: no worker (draw here)
        self.requests = requests  # write end: the pickled (out, metrics, fields, rows)
        self.replies = replies  # read end: JSON {figure: file name or null}

    @classmethod
    def start(cls) -> PlotWorker:
        """Fork the worker (on Linux; elsewhere `draw` draws in this process)."""
        if not sys.platform.startswith("linux"):
            return cls(None, None, None)
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            for fd in (requests_r, requests_w, replies_r, replies_w):
                os.close(fd)
            return cls(None, None, None)
        if pid == 0:
            os.close(requests_w)
            os.close(replies_r)
            _serve(requests_r, replies_w)
        os.close(requests_r)
        os.close(replies_w)
        return cls(pid, requests_w, replies_r)

    def draw(self, out: Path, result: RunResult) -> list[str]:
        """Every figure of the run in `out`; the file names in report order."""
        drawn: dict[str, str | None] = {}
        if self.pid is not None:
            rows = result.influence
            fields = list(rows[0]._fields) if rows else []
            plain = (str(out), [tuple(r) for r in result.metrics], fields,
                     [tuple(r) for r in rows])  # builtins only: unpickled without torch
            try:
                with os.fdopen(self.requests, "wb") as pipe:
                    pipe.write(pickle.dumps(plain, pickle.HIGHEST_PROTOCOL))
            except OSError:  # the worker is gone: everything is drawn here
                pass
            with os.fdopen(self.replies, "rb") as pipe:
                reply = pipe.read()
            if _exit_code(self.pid) == 0 and reply:
                drawn = json.loads(reply)
            self.pid = None
        missing = [name for name in ORDER if name not in drawn]
        if missing:
            from dicesim.plots import FIGURES  # matplotlib, in this process

            drawn.update({name: FIGURES[name](out, result) for name in missing})
        return [drawn[name] for name in ORDER if drawn[name]]

    def close(self) -> None:
        """Release a worker that will not be asked to draw (it reads end-of-file)."""
        if self.pid is not None:
            os.close(self.requests)
            os.close(self.replies)
            _exit_code(self.pid)
            self.pid = None


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _serve(requests: int, replies: int) -> None:
    """The worker: import matplotlib now; when the run sends its results, draw the first
    share while a forked helper draws the second; reply with every file drawn."""
    code = 1
    try:
        # Ctrl-C reaches the whole process group: the run decides; the worker leaves when
        # its pipe closes. SIGTERM keeps its default (ends the worker).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.nice(19)
        from dicesim.plots import FIGURES  # the slow import, while the run trains

        with os.fdopen(requests, "rb") as pipe:
            payload = pipe.read()
        if payload:
            out, metrics, fields, rows = pickle.loads(payload)
            row = namedtuple("Row", fields) if fields else None
            result = SimpleNamespace(metrics=metrics,
                                     influence=[row(*r) for r in rows] if row else [])
            helper_r, helper_w = os.pipe()
            helper = os.fork()
            first, second = SHARES
            if helper == 0:
                helper_code = 1
                try:
                    os.close(helper_r)
                    names = {name: FIGURES[name](Path(out), result) for name in second}
                    os.write(helper_w, json.dumps(names).encode())
                    helper_code = 0
                finally:
                    os._exit(helper_code)
            os.close(helper_w)
            names = {name: FIGURES[name](Path(out), result) for name in first}
            with os.fdopen(helper_r, "rb") as pipe:
                reply = pipe.read()
            if _exit_code(helper) == 0 and reply:
                names.update(json.loads(reply))
            os.write(replies, json.dumps(names).encode())
        code = 0
    finally:
        os._exit(code)
