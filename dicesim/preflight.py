"""`python -m dicesim.preflight WORLD PROCS [overrides]`: check a launch in one process.

dicesim's launcher runs this before it starts torchrun, so that a bad setting is one
line and exit 2 instead of one failure per rank and torchrun's report. It checks what a
rank checks at start (config, simulation for WORLD ranks, the device of local rank
PROCS − 1, the run directory) and writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dicesim import cli


def main() -> None:
    try:
        world, procs = int(sys.argv[1]), int(sys.argv[2])
    except (IndexError, ValueError):
        print("usage: python -m dicesim.preflight WORLD PROCS [overrides]", file=sys.stderr)
        sys.exit(2)
    cli.PREFLIGHT = (world, procs)
    overrides = sys.argv[3:]
    sys.argv = [sys.argv[0], *overrides]
    # Hydra creates hydra.run.dir before dicesim runs; a check must not leave it behind
    made = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "hydra.run.dir" and value and "$" not in value:
            p = Path(value).absolute()
            while not p.exists() and p.parent != p:
                made.append(p)
                p = p.parent
    try:
        cli.main()
    finally:
        for p in made:  # deepest first, and only while empty
            try:
                p.rmdir()
            except OSError:
                break


if __name__ == "__main__":
    main()
