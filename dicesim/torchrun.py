"""`python -m dicesim.torchrun [torchrun arguments]`: torchrun as dicesim's launcher runs it.

The same agent as ``python -m torch.distributed.run`` (same arguments), but

- it prints no report of its own (no log lines, no ChildFailedError traceback): the ranks'
  one-line messages are what a person reads, and ``dicesim.launch`` prints one line for the
  whole run;
- it exits with the first failing rank's exit code (raw torchrun exits 1 whatever the rank
  returned), or 128 + N when a rank or the agent itself was ended by signal N;
- with ``DICESIM_STATUS_DIR`` set it leaves the failures it saw (rank → exit code, negative
  for a signal) in ``agent.json`` there, for the launcher.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def _quiet() -> None:
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _quiet()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _quiet()
    try:
        run(args)
    except ChildFailedError as err:
        failures = {int(rank): f.exitcode for rank, f in err.failures.items()}
        where = os.environ.get("DICESIM_STATUS_DIR")
        if where:
            try:
                (Path(where) / "agent.json").write_text(json.dumps({"failures": failures}))
            except OSError:
                pass
        _, first = err.get_first_failure()
        code = first.exitcode
        return code if code > 0 else 128 - code if code < 0 else 1
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
