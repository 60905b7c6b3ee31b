"""Benchmarks: `python -m dicesim.bench.engine` and `python -m dicesim.bench.influence`.

Each prints ONE JSON object on stdout (progress goes to stderr). The helpers here run
dicesim the way a user does — `python -m dicesim` for one process, `torch.distributed.run`
for P ranks — and read back the run's `summary.json`; in-process runs (warm, repeated)
compose the same Hydra config and call the engine directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
QUIET = ["progress=false", "plots=false", "eval_every=1000000"]
RUN_TIMEOUT_S = 900


def say(message: str) -> None:
    """Progress for a person: stderr, so stdout stays one JSON object."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine makes every number here worse."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_threads() -> int:
    """Threads torch uses in a fresh process started with this process's environment."""
    code = "import torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=os.environ.copy())
    return int(out.stdout.strip())


def run_dicesim(overrides: Sequence[str], ranks: int = 1, threads: int | None = None,
                timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """Run dicesim as a user would and return its summary.json (plus `threads`, `ranks`).

    ranks == 1: `python -m dicesim`; ranks > 1: `python -m torch.distributed.run
    --standalone` (c10d rendezvous on a port the OS picks, so concurrent runs never clash).
    `threads` sets OMP_NUM_THREADS for the children (None: inherit; torchrun then sets 1
    per rank itself when ranks > 1, as it does for any user).
    """
    env = os.environ.copy()
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="dicesim-bench-") as tmp:
        out_dir = Path(tmp) / "run"
        if ranks == 1:
            cmd = [sys.executable, "-m", "dicesim"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", "-m", "dicesim"]
        cmd += [*overrides, f"out_dir={out_dir}"]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"{' '.join(cmd)}: no result within {timeout_s:g} s") from err
        elapsed = time.perf_counter() - started
        summary_path = out_dir / "summary.json"
        if proc.returncode != 0 or not summary_path.is_file():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
        summary = json.loads(summary_path.read_text())
        influence_csv = out_dir / "influence.csv"
        if influence_csv.is_file():
            summary["_influence_csv"] = influence_csv.read_text()
    summary["process_s"] = elapsed
    summary["ranks"] = ranks
    if threads is not None:
        summary["threads"] = threads
    elif ranks > 1:
        summary["threads"] = int(env.get("OMP_NUM_THREADS", 1))
    return summary


def compose(overrides: Sequence[str]):
    """The Hydra config `python -m dicesim overrides…` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_in_process(overrides: Sequence[str], repeats: int = 2, warmup: int = 1,
                   observe=None) -> list:
    """Run the one-process engine `warmup + repeats` times in this process and return the
    RunResults of the measured repeats. Warm-up runs pay torch.func's first-call cost
    (≈1 s on CPU), so these measure the steady-state step loop only.

    `observe(sim)` may wrap the Simulation before each measured run (timing hooks)."""
    import torch

    from dicesim.comm import Comm
    from dicesim.engine import Simulation

    cfg = compose(overrides)
    results = []
    for i in range(warmup + repeats):
        sim = Simulation(cfg, 1, 0)
        if observe is not None and i >= warmup:
            observe(sim)
        comm = Comm("gloo", float(cfg.get("timeout_s", 60)), torch.device("cpu"))
        try:
            result = sim.execute(comm, log=lambda *a, **k: None)
        finally:
            comm.close()
        if i >= warmup:
            results.append(result)
    return results


def rate(nodes: int, steps: int, wall_s: float) -> float:
    return nodes * steps / max(wall_s, 1e-12)


def pick(summary: dict, *keys: str) -> dict:
    return {k: summary[k] for k in keys if k in summary}
