"""The CUDA/NCCL path in one go (scripts/gpu_check.sh runs it): one line per check,
`<check>: <ok|FAIL|info|skipped (why)> <detail>`, exit 1 if any check failed.

  environment   torch, CUDA, NCCL, GPUs visible
  parity-1gpu   one GPU against the CPU, float64, momentum, proximal influence, events with
                ground truth, a time-varying topology: metrics, influence, proximal ≤ 1e-9
  host-syncs    synchronizing CUDA calls per step (torch.cuda.set_sync_debug_mode), untracked
                and tracked
  resume-1gpu   a run killed on the GPU and resumed writes the bytes of one never stopped
  parity-nccl   2 ranks over NCCL against one CPU process (a time-varying and a directed
                topology), ≤ 1e-9
  fault-nccl    a rank killed under NCCL: the run ends with one line, exit 3
  speed         node-steps/s of a 1,024-node MLP, GPU against CPU

--quick shrinks every run (the CPU test of this script); --only NAME runs one check.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

TOLERANCE = 1e-9
CHECKS = ("environment", "parity-1gpu", "host-syncs", "resume-1gpu", "parity-nccl",
          "fault-nccl", "speed")
TRACKED = ["nodes=4", "steps=12", "batch_size=8", "model.hidden=[8]", "data.probe_size=40",
           "dtype=float64", "optim=momentum", "influence.proximal=true", "influence.events=4",
           "influence.hops=2", "influence.ground_truth=true", "topology=one_peer_exponential",
           "eval_every=2", "progress=false", "plots=false"]
OUTPUTS = ("metrics.csv", "influence.csv", "proximal.csv")


FAILED: list[str] = []  # the checks that printed FAIL


def say(check: str, status: str, detail: str = "") -> None:
    if status == "FAIL":
        FAILED.append(check)
    print(f"{check}: {status}{' ' + detail if detail else ''}", flush=True)


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def dicesim(out: Path, *overrides: str, ranks: int = 0, launcher: bool = False,
            env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    head = (["-m", "dicesim.launch", "torchrun", "--procs", str(ranks), "--no-preflight", "--"]
            if launcher else
            ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
            if ranks else [])
    cmd = [sys.executable, *head, "-m", "dicesim"] if not launcher else [sys.executable, *head]
    cmd += [*overrides, f"out_dir={out}", "progress=false", "plots=false"]
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)


def largest_difference(a: Path, b: Path) -> float:
    """max |x − y| over the numeric cells of two CSVs with the same rows (inf if they do
    not line up; equal text cells count 0)."""
    with a.open() as fa, b.open() as fb:
        ra, rb = list(csv.reader(fa)), list(csv.reader(fb))
    if len(ra) != len(rb) or ra[:1] != rb[:1]:
        return math.inf
    worst = 0.0
    for row_a, row_b in zip(ra[1:], rb[1:], strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if x == y:
                continue
            try:
                fx, fy = float(x), float(y)
            except ValueError:
                return math.inf
            if math.isnan(fx) and math.isnan(fy):
                continue
            worst = max(worst, abs(fx - fy))
    return worst


def rows_difference(a: list, b: list) -> float:
    """max |x − y| over two lists of result rows (tuples of numbers)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            if isinstance(x, float) or isinstance(y, float):
                if not (math.isnan(x) and math.isnan(y)):
                    worst = max(worst, abs(x - y))
            elif x != y:
                return math.inf
    return worst


def in_process(overrides: list[str], device: torch.device):
    """(Simulation, RunResult) of one process on `device`."""
    from dicesim.comm.exchange import Comm
    from dicesim.config import compose
    from dicesim.run.engine import Simulation, configure_device

    cfg = compose(overrides, quiet=True)
    configure_device(device, cfg.allow_tf32)
    sim = Simulation(cfg)
    backend = "nccl" if device.type == "cuda" else "gloo"
    return sim, sim.execute(Comm(backend, 60, device), log=lambda _: None)


# ---- the checks -------------------------------------------------------------------------------
def environment(quick: bool) -> None:
    nccl = "none"
    if torch.cuda.is_available():
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (RuntimeError, AttributeError):
            pass
    say("environment", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
        f"NCCL {nccl}, GPUs {gpus()}")


def parity_1gpu(quick: bool) -> None:
    if gpus() < 1:
        return say("parity-1gpu", "skipped (no GPU)")
    _, cpu = in_process(TRACKED, torch.device("cpu"))
    _, gpu = in_process(TRACKED, torch.device("cuda", 0))
    worst = {name: rows_difference(getattr(cpu, name), getattr(gpu, name))
             for name in ("metrics", "influence", "proximal")}
    empty = [name for name in worst if not getattr(cpu, name)]
    bad = max(worst.values()) > TOLERANCE or empty
    detail = ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f" (limit {TOLERANCE:g})"
    say("parity-1gpu", "FAIL" if bad else "ok", detail + (f"; no rows: {empty}" if empty else ""))


def host_syncs(quick: bool) -> None:
    if gpus() < 1:
        return say("host-syncs", "skipped (no GPU)")
    steps = 6 if quick else 40
    counts = {}
    for name, extra in (("untracked", ["influence.events=0", "influence.proximal=false",
                                       "influence.ground_truth=false"]),
                        ("tracked", [])):
        overrides = [*TRACKED, *extra, f"steps={steps}", "dtype=float32", f"eval_every={steps}"]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                in_process(overrides, torch.device("cuda", 0))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts[name] = sum("synchroniz" in str(w.message) for w in caught) / steps
    say("host-syncs", "info", ", ".join(f"{k} {v:.1f} per step" for k, v in counts.items())
        + " (whole run, set-up and evaluation included, over its steps)")


def resume_1gpu(quick: bool) -> None:
    if gpus() < 1:
        return say("resume-1gpu", "skipped (no GPU)")
    run = [*TRACKED, "device=cuda", "steps=14", "checkpoint.every=4"]
    with tempfile.TemporaryDirectory() as tmp:
        whole, cut = Path(tmp) / "whole", Path(tmp) / "cut"
        first = dicesim(whole, *run)
        killed = dicesim(cut, *run, env={"DICESIM_FAULT": "kill:0:9"})
        resumed = dicesim(cut, *run, f"resume={cut}")
        if first.returncode or killed.returncode == 0 or resumed.returncode:
            tail = (resumed.stderr or killed.stderr or first.stderr).strip()[-300:]
            return say("resume-1gpu", "FAIL", f"exits {first.returncode}/{killed.returncode}/"
                       f"{resumed.returncode}: {tail}")
        differ = [n for n in OUTPUTS if (whole / n).read_bytes() != (cut / n).read_bytes()]
        say("resume-1gpu", "FAIL" if differ else "ok",
            f"differ: {differ}" if differ else "killed at step 9, resumed from step 8: "
            "metrics, influence, proximal byte-identical")


def parity_nccl(quick: bool) -> None:
    if gpus() < 2:
        return say("parity-nccl", "skipped (needs 2 GPUs)" if gpus() else "skipped (no GPU)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for topology in ("one_peer_exponential", "directed_ring"):
            run = [*TRACKED, f"topology={topology}"]
            cpu, gpu = Path(tmp) / f"cpu-{topology}", Path(tmp) / f"nccl-{topology}"
            a = dicesim(cpu, *run, "device=cpu", "backend=gloo")
            b = dicesim(gpu, *run, "device=cuda", "backend=nccl", ranks=2)
            if a.returncode or b.returncode:
                return say("parity-nccl", "FAIL", f"{topology}: exits {a.returncode}/"
                           f"{b.returncode}: {(b.stderr or a.stderr).strip()[-300:]}")
            results.append((topology, max(largest_difference(cpu / n, gpu / n)
                                          for n in OUTPUTS)))
    bad = any(d > TOLERANCE for _, d in results)
    say("parity-nccl", "FAIL" if bad else "ok",
        ", ".join(f"{t} {d:.1e}" for t, d in results) + f" (2 ranks vs CPU, limit {TOLERANCE:g})")


def fault_nccl(quick: bool) -> None:
    if gpus() < 2:
        return say("fault-nccl", "skipped (needs 2 GPUs)" if gpus() else "skipped (no GPU)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = dicesim(Path(tmp) / "run", *TRACKED, "device=cuda", "steps=40", "timeout_s=20",
                       ranks=2, launcher=True, env={"DICESIM_FAULT": "kill:1:3"}, timeout=300)
    lines = proc.stderr.strip().splitlines()
    ok = proc.returncode == 3 and len(lines) == 1
    say("fault-nccl", "ok" if ok else "FAIL",
        f"exit {proc.returncode}, {len(lines)} line(s): {' | '.join(lines)[:300]}")


def node_steps_per_s(device: str, nodes: int, steps: int) -> float:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        proc = dicesim(Path(tmp) / "run", f"nodes={nodes}", f"steps={steps}", "batch_size=8",
                       "influence.events=0", "influence.ground_truth=false",
                       f"eval_every={steps}", "topology=ring", f"device={device}",
                       "eval.budget=100000")
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip()[-300:])
        return json.loads((Path(tmp) / "run" / "summary.json").read_text())["node_steps_per_s"]


def speed(quick: bool) -> None:
    nodes, steps = (32, 3) if quick else (1024, 20)
    if gpus() < 1:
        return say("speed", "skipped (no GPU)")
    try:
        cpu, gpu = node_steps_per_s("cpu", nodes, steps), node_steps_per_s("cuda", nodes, steps)
    except RuntimeError as err:
        return say("speed", "FAIL", str(err))
    say("speed", "info", f"{nodes} nodes, MLP: GPU {gpu:,.0f} node-steps/s, CPU {cpu:,.0f} "
        f"(×{gpu / max(cpu, 1e-9):.1f})")


RUNS: dict[str, Callable[[bool], None]] = {
    "environment": environment, "parity-1gpu": parity_1gpu, "host-syncs": host_syncs,
    "resume-1gpu": resume_1gpu, "parity-nccl": parity_nccl, "fault-nccl": fault_nccl,
    "speed": speed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small runs (a test on CPU)")
    parser.add_argument("--only", choices=CHECKS, action="append",
                        help="run this check only (repeatable)")
    args = parser.parse_args(argv)
    for name in args.only or CHECKS:
        try:
            RUNS[name](args.quick)
        except Exception as err:  # one line per check, whatever went wrong in it
            say(name, "FAIL", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
