"""Benchmarks: `python -m dicesim.bench.engine` and `python -m dicesim.bench.influence`.

Each prints ONE JSON object on stdout (progress goes to stderr). The helpers here run
dicesim the way a user does — `python -m dicesim` for one process, `torch.distributed.run`
for P ranks — and read back the run's `summary.json`; in-process runs (warm, repeated)
compose the same Hydra config and call the engine directly.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def _cpu_jiffies() -> tuple[int, int]:
    """(total, busy) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), sum(fields) - idle


def cpu_busy(interval_s: float = 0.5) -> float | None:
    """Share of all CPUs busy over `interval_s`; None where /proc/stat is unavailable.
    Called while this process idles, it measures what everyone else is running."""
    try:
        total0, busy0 = _cpu_jiffies()
        time.sleep(interval_s)
        total1, busy1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1)


def _our_cpu_s() -> float:
    """CPU seconds of this process and of every finished, waited-for descendant."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuWatch:
    """`with CpuWatch() as w: …` then `w.others_share`: the share of all CPUs that
    *other* processes used meanwhile (machine-wide busy time minus ours). A measurement
    taken while a neighbour ran is not a measurement of dicesim; callers retry those."""

    def __init__(self) -> None:
        self.others_share: float | None = None

    def __enter__(self) -> CpuWatch:
        try:
            self._start = (_cpu_jiffies(), _our_cpu_s())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        try:
            (total1, busy1), ours1 = _cpu_jiffies(), _our_cpu_s()
        except (OSError, ValueError, IndexError):
            return
        (total0, busy0), ours0 = self._start
        tick = os.sysconf("SC_CLK_TCK")
        others = (busy1 - busy0) - (ours1 - ours0) * tick
        self.others_share = round(max(0.0, others) / max(total1 - total0, 1), 3)


def wait_quiet(max_wait_s: float, threshold: float = 0.2) -> float | None:
    """Wait (up to max_wait_s) until other processes leave the CPUs mostly idle: on a
    shared 2-core machine a neighbour's job can slow an OpenMP run many times over.
    Returns the busy share seen last (reported next to each measurement)."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy(0.3)
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        say(f"CPUs {100 * busy:.0f} % busy with other work; waiting "
            f"(up to {max(0.0, deadline - time.monotonic()):.0f} s more)")
        time.sleep(2.0)
        busy = cpu_busy(0.5)
    return None if busy is None else round(busy, 3)


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
    summary["process_s"] = elapsed
    summary["ranks"] = ranks
    if threads is not None:
        summary["threads"] = threads
    elif ranks > 1:
        summary["threads"] = int(env.get("OMP_NUM_THREADS", 1))
    return summary


def compose(overrides: Sequence[str]):
    """The typed settings `python -m dicesim overrides…` would run with."""
    from dicesim.config import compose as compose_settings

    return compose_settings(overrides, quiet=True)


def run_in_process(overrides: Sequence[str], repeats: int = 2, warmup: int = 1,
                   observe=None) -> list:
    """Run the one-process engine `warmup + repeats` times in this process and return the
    RunResults of the measured repeats. Warm-up runs pay torch.func's first-call cost
    (≈1 s on CPU), so these measure the steady-state step loop only.

    `observe(sim)` may wrap the Simulation before each measured run (timing hooks)."""
    import torch

    from dicesim.comm.exchange import Comm
    from dicesim.run.engine import Simulation

    cfg = compose(overrides)
    results = []
    for i in range(warmup + repeats):
        sim = Simulation(cfg, 1, 0)
        if observe is not None and i >= warmup:
            observe(sim)
        comm = Comm("gloo", cfg.timeout_s, torch.device("cpu"))
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


CLEAN = 0.1  # a measurement is clean when other processes used under 10 % of the CPUs


def best_clean(attempts: list[dict], key: str = "node_steps_per_s",
               higher: bool = True) -> dict:
    """The best attempt among the clean ones (others_cpu_share ≤ CLEAN), else the best of
    all, marked `clean: false`; every attempt's value is kept for the record."""
    def is_clean(a: dict) -> bool:
        share = a.get("others_cpu_share")
        return share is None or share <= CLEAN

    pool = [a for a in attempts if is_clean(a)] or attempts
    chosen = dict((max if higher else min)(pool, key=lambda a: a[key]))
    chosen["clean"] = is_clean(chosen)
    if len(attempts) > 1:
        chosen["attempts"] = [{key: round(a[key], 4), "others_cpu_share": a.get(
            "others_cpu_share")} for a in attempts]
    return chosen


def attempt_until_clean(once, repeats: int, retries: int, max_wait_s: float,
                        label: str) -> list[dict]:
    """Call `once()` (→ dict) `repeats` times, then up to `retries` more times while none
    was clean; each call first waits for quiet CPUs and is watched by CpuWatch."""
    attempts: list[dict] = []
    for i in range(repeats + retries):
        if i >= repeats and any((a.get("others_cpu_share") or 0) <= CLEAN for a in attempts):
            break
        busy = wait_quiet(max_wait_s)
        with CpuWatch() as watch:
            result = once()
        result = {**result, "cpu_busy_before": busy, "others_cpu_share": watch.others_share}
        attempts.append(result)
        if watch.others_share is not None and watch.others_share > CLEAN:
            say(f"{label}: other processes used {100 * watch.others_share:.0f} % of the CPUs "
                "during this run" + ("; trying again" if i + 1 < repeats + retries else ""))
    return attempts
