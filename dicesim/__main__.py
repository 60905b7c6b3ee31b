import signal
import sys


def _early(signum: int, frame: object) -> None:
    # Ctrl-C while Python is still importing torch: one line, not a traceback
    print(f"dicesim: interrupted while starting ({signal.Signals(signum).name})",
          file=sys.stderr, flush=True)
    sys.exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, _early)

from dicesim import composeworker, plotworkers  # noqa: E402 - torch-free

# while torch loads here, one worker composes the config and one imports matplotlib (the
# config's first: the figures' worker must not inherit its pipe)
composeworker.start_early(sys.argv[1:])
plotworkers.start_early(sys.argv[1:])

from dicesim.cli import main  # noqa: E402 - after the handlers, on purpose


def _leave(code: int) -> None:
    """Exit without the interpreter's module teardown, which takes 0.3-0.5 s once torch
    and matplotlib are loaded (their C++ registries and caches, freed object by object).
    Everything is on disk by now: the atexit handlers run, the streams are flushed. Under
    a profiler or a coverage tracer (which write their data after this module returns)
    the interpreter exits the usual way."""
    import atexit
    import os

    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


try:
    main()
except SystemExit as done:  # exit_with(...): the one line is printed already
    code = done.code
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    _leave(code or 0)
_leave(0)
