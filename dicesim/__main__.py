"""`python -m dicesim [overrides]`: dicesim/cli.py's main."""

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Ctrl-C or SIGTERM while Python still imports torch and Hydra: one line, not a
    # traceback. cli.main replaces this handler with the run's own (dicesim/common/stopping.py).
    # os._exit: a SystemExit raised while the import machinery holds a module lock is
    # printed and ignored, and the start would carry on; nothing is written yet.
    print(f"dicesim: interrupted while starting ({signal.Signals(signum).name})",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, _interrupted_while_starting)

from dicesim.cli import main  # noqa: E402 - after the handlers, on purpose

main()
