import signal
import sys


def _early(signum: int, frame: object) -> None:
    # Ctrl-C while Python is still importing torch: one line, not a traceback
    print(f"dicesim: interrupted while starting ({signal.Signals(signum).name})",
          file=sys.stderr, flush=True)
    sys.exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, _early)

from dicesim.cli import main  # noqa: E402 - after the handlers, on purpose

main()
