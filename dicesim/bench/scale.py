"""Scaling with the number of nodes: `python -m dicesim.bench.scale` (`make bench-scale`).

One process, one thread, synthetic data (64 training samples per node, the whole 20 %
test split unless --max-test), mlp[64], batch 32, 50 steps, no influence tracking, the
default evaluation budget (eval.budget; --eval-budget to change it); for each topology and
node count, in a fresh subprocess: node-steps/s of the step loop, the seconds of the test
evaluation after it (`evaluation_s`) and of writing the run's outputs (`outputs_s`:
metrics.csv, partition.csv, summary.json, report.md, and the figures with --plots), their
sum's share of the step loop (`post_training_share`), the peak RSS (`getrusage` maxrss)
and the set-up time before the first step, split into its parts (imports, config, graph builders, W
validation, spectral gap, data, partition, the rest of `Simulation`, and `execute` up to
the end of step 0, which includes the warm-up). Prints ONE JSON object on stdout; progress
goes to stderr. Each row records how busy the CPUs were before it (`cpu_busy_before`) and
the share of CPU other processes used while it ran (`others_cpu_share`): on a shared
machine those rows measure the neighbours as much as dicesim.

    python -m dicesim.bench.scale --nodes 16,256 --topologies ring --max-seconds 120
    python -m dicesim.bench.scale --startup 5    # start-up of `python -m dicesim …`

A size whose estimated memory would not fit is skipped with the reason,
a run past --max-seconds is stopped and reported as a timeout, and once a size fails
or times out the larger sizes of that topology are skipped. This is not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

from dicesim.bench import CpuWatch, cpu_busy, emit, loadavg, say, wait_quiet

NODES = (16, 256, 1024, 4096, 16384)
TOPOLOGIES = ("ring", "exponential", "one_peer_exponential")
SAMPLES_PER_NODE = 64
PROBE = 200
# peak RSS ≈ BASE + nodes · PER_NODE: W^t is sparse (O(edges)), so a run's memory is the
# interpreter and libraries plus, per node, its data, θ and the step's copies of it
# (measured 0.47 GB at 1,024 and 0.86 GB at 4,096 nodes, mlp[64], 64 samples per node)
BASE_BYTES = 350 * 2**20
BYTES_PER_NODE = 160 * 2**10
MEMORY_SHARE = 0.4  # skip a size whose estimate exceeds this share of the available memory


def overrides(nodes: int, topology: str, steps: int, eval_every: int,
              max_test: int | None = None, eval_budget: str | None = None) -> list[str]:
    samples = math.ceil((nodes * SAMPLES_PER_NODE + PROBE) / 0.8) + 1  # test_size 0.2
    return [
        "experiment=demo", f"nodes={nodes}", f"steps={steps}", "batch_size=32",
        f"topology={topology}", "data=synthetic", f"data.n_samples={samples}",
        f"data.probe_size={PROBE}", "model=mlp", "model.hidden=[64]", "influence.events=0",
        "plots=false", "progress=true", f"eval_every={eval_every}", "device=cpu",
        *([f"data.max_test={max_test}"] if max_test is not None else []),
        *([f"eval.budget={eval_budget}"] if eval_budget is not None else []),
    ]


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------ child
def child(spec: dict) -> dict:
    """One measured run in this (fresh) process; returns the row."""
    started = time.perf_counter()
    import torch

    # imported here, so that imports_s counts them; the steps below find them loaded
    import dicesim.bench  # noqa: F401
    import dicesim.comm.exchange  # noqa: F401
    import dicesim.graph.topology  # noqa: F401
    import dicesim.run.engine  # noqa: F401

    torch.set_num_threads(1)
    phases: dict[str, float] = {"imports_s": time.perf_counter() - started}
    sim, gap, how = _build_timed(spec, phases)
    partial(phases)
    result, first_log, t_exec, done = _execute_timed(sim, phases, started)
    phases["execute_to_first_step_s"] = (first_log[0] if first_log else done) - t_exec
    first_step = (first_log[0] if first_log else done) - started
    row = {
        "node_steps_per_s": spec["nodes"] * spec["steps"] / max(result.wall_s, 1e-12),
        "step_loop_s": result.wall_s,
        "setup_s": phases["config_s"] + phases["simulation_s"] + phases["spectral_gap_s"],
        "time_to_first_step_s": first_step,
        # warm-up, tensors to the device, the final evaluation and test accuracy
        "execute_outside_loop_s": (done - t_exec) - result.wall_s,
        "evaluation_s": result.eval_s,
        "spectral_gap": gap, "spectral_gap_how": how,
        "test_acc": (sum(result.test_acc) / len(result.test_acc)) if result.test_acc else None,
        "consensus_test_acc": result.consensus_test_acc,
        "evaluated": sim.evaluation.describe(),
        **{k: round(v, 4) for k, v in phases.items()},
    }
    _time_outputs(row, sim, result, bool(spec.get("plots")), started)
    row["total_s"] = time.perf_counter() - started
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _time_calls(phases: dict[str, float], module: object, name: str, key: str) -> None:
    """Replace module.name by a wrapper that adds each call's seconds to phases[key]."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - t

    setattr(module, name, wrapper)


def _build_timed(spec: dict, phases: dict[str, float]) -> tuple[object, float | None, str]:
    """Compose and build the Simulation, its phases timed; the spectral gap and how it was
    found."""
    from dicesim.bench import compose
    from dicesim.graph import topology
    from dicesim.run import engine

    _time_calls(phases, topology, "_validate", "validation_s")  # inside build_topology
    _time_calls(phases, engine, "build_topology", "graph_s")
    _time_calls(phases, engine, "load_dataset", "data_s")
    _time_calls(phases, engine, "partition", "partition_s")
    t = time.perf_counter()
    cfg = compose(overrides(spec["nodes"], spec["topology"], spec["steps"], spec["eval_every"],
                            spec.get("max_test"), spec.get("eval_budget")))
    phases["config_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sim = engine.Simulation(cfg, 1, 0)
    phases["simulation_s"] = time.perf_counter() - t
    phases["graph_s"] -= phases.get("validation_s", 0.0)  # builders only
    phases["simulation_other_s"] = phases["simulation_s"] - sum(
        phases.get(k, 0.0) for k in ("graph_s", "validation_s", "data_s", "partition_s"))
    t = time.perf_counter()
    gap, how = sim.topology.spectral_gap_info()
    phases["spectral_gap_s"] = time.perf_counter() - t
    return sim, gap, how


def _execute_timed(sim, phases: dict[str, float], started: float
                   ) -> tuple[object, list[float], float, float]:
    """Run the simulation on one gloo rank: the result, when each progress line came, when
    execute started and when it returned (the first line reports the time to it)."""
    import torch

    from dicesim.comm.exchange import Comm

    first_log: list[float] = []

    def log(*_: object) -> None:
        first_log.append(time.perf_counter())
        if len(first_log) == 1:
            partial({**phases, "time_to_first_step_s": first_log[0] - started})

    comm = Comm("gloo", 600.0, torch.device("cpu"))
    t_exec = time.perf_counter()
    try:
        result = sim.execute(comm, log=log)
    finally:
        comm.close()
    return result, first_log, t_exec, time.perf_counter()


def _time_outputs(row: dict, sim, result, plots: bool, started: float) -> None:
    """Write the run's files as a run does (with `plots`, every figure) into a scratch
    directory; their time and the post-training share go into the row."""
    import tempfile
    from pathlib import Path

    from dicesim.report.summary import write_all

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        timings = write_all(Path(tmp), sim, result, plots=plots)["timings_s"]
    row["outputs_s"] = time.perf_counter() - t
    row["post_training_share"] = (result.eval_s + row["outputs_s"]) / max(result.wall_s, 1e-12)
    if plots:
        row["plot_s"] = timings["plots"]
        row["plot_share_of_run"] = row["plot_s"] / (time.perf_counter() - started)


def partial(phases: dict) -> None:
    """What a run has measured so far, on stderr: a run stopped at --max-seconds still
    reports how far it got."""
    print("PARTIAL " + json.dumps({k: round(v, 3) for k, v in phases.items()}),
          file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- parent
def measure(nodes: int, topology: str, args: argparse.Namespace) -> dict:
    row: dict = {"nodes": nodes, "topology": topology}
    estimate = BASE_BYTES + BYTES_PER_NODE * nodes
    row["memory_estimate_gb"] = round(estimate / 2**30, 2)
    available = mem_available()
    if available is not None and estimate > MEMORY_SHARE * available:
        row["status"] = "skipped"
        row["reason"] = (f"the run would take ~{estimate / 2**30:.1f} GB (estimated), over "
                         f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GB available")
        return row
    spec = {"nodes": nodes, "topology": topology, "steps": args.steps,
            "eval_every": 10 if args.plots else args.steps, "plots": args.plots,
            "max_test": args.max_test, "eval_budget": args.eval_budget}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "dicesim.bench.scale", "--child", json.dumps(spec)]
    row["cpu_busy_before"] = wait_quiet(args.max_wait_s) if args.max_wait_s else cpu_busy(0.3)
    started = time.perf_counter()
    try:
        with CpuWatch() as watch:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=args.max_seconds)
    except subprocess.TimeoutExpired as err:
        row.update(status="timeout", reason=f"no result within --max-seconds={args.max_seconds:g}")
        text = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        reached = [ln for ln in text.splitlines() if ln.startswith("PARTIAL ")]
        if reached:  # the set-up phases it finished (and when step 1 ended, if it did)
            row["reached"] = json.loads(reached[-1].removeprefix("PARTIAL "))
        return row
    row["process_s"] = round(time.perf_counter() - started, 3)
    row["others_cpu_share"] = watch.others_share  # CPU that other processes used meanwhile
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (
            tail[-1] if tail else "no output")
        row.update(status="failed", reason=f"exit {proc.returncode}: {why}")
        return row
    row.update(status="ok", **json.loads(lines[-1]))
    return row


STARTUP_CASES = {  # label: the command line's overrides
    "nodes=16 steps=32 plots=false": ["nodes=16", "steps=32", "plots=false"],
    "nodes=16 steps=32 (plots)": ["nodes=16", "steps=32"],
    "demo (plots)": [],
}


def startup(repeats: int) -> dict:
    """Whole-process wall time of `python -m dicesim …` and the time until it prints the
    end of step 1 (progress line), `repeats` fresh processes per case: min and median."""
    import statistics
    import tempfile

    out: dict = {}
    for label, ovr in STARTUP_CASES.items():
        runs = []
        for i in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-u", "-m", "dicesim", *ovr, f"out_dir={tmp}/run"]
                busy = cpu_busy(0.3)
                kids = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                first = None
                with CpuWatch() as watch, subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as p:
                    for line in p.stdout:
                        if first is None and line.startswith("step "):
                            first = time.perf_counter() - started
                    rc = p.wait()
                wall = time.perf_counter() - started
                done = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU seconds of the process (user + system): what the wall time would be on
            # idle CPUs for a mostly one-threaded start-up, much less disturbed by neighbours
            cpu = (done.ru_utime + done.ru_stime) - (kids.ru_utime + kids.ru_stime)
            runs.append({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                         "first_step_s": first and round(first, 3),
                         "rc": rc, "cpu_busy_before": busy,
                         "others_cpu_share": watch.others_share})
            say(f"{label} #{i + 1}: {wall:.2f} s ({cpu:.2f} s CPU), first step at "
                f"{first or float('nan'):.2f} s")
        walls = [r["wall_s"] for r in runs]
        firsts = [r["first_step_s"] for r in runs if r["first_step_s"] is not None]
        cpus = [r["cpu_s"] for r in runs]
        out[label] = {"wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
                      "cpu_s_min": min(cpus), "cpu_s_median": statistics.median(cpus),
                      "first_step_s_min": min(firsts, default=None),
                      "first_step_s_median": statistics.median(firsts) if firsts else None,
                      "runs": runs}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default=",".join(map(str, NODES)),
                   help="comma-separated node counts (default: %(default)s)")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help="comma-separated topologies (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="wall-clock limit of one run (default: %(default)s)")
    p.add_argument("--max-wait-s", type=float, default=0.0,
                   help="wait up to this long for idle CPUs before each run (shared machine)")
    p.add_argument("--plots", action="store_true",
                   help="evaluate every 10 steps and time the training plot too")
    p.add_argument("--max-test", type=int, default=None,
                   help="cap the test split (default: the whole 20 %% split)")
    p.add_argument("--eval-budget", default=None,
                   help="eval.budget of the runs (default: the config's; null: everything)")
    p.add_argument("--startup", type=int, metavar="N", default=0,
                   help="instead: time N fresh `python -m dicesim` processes per start-up case")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.startup:
        emit({"bench": "startup", "loadavg_start": loadavg(), **startup(args.startup),
              "loadavg_end": loadavg()})
        return
    nodes = [int(v) for v in args.nodes.split(",") if v]
    topologies = [v for v in args.topologies.split(",") if v]
    rows = []
    for topo in topologies:
        stop = None
        for n in sorted(nodes):
            if stop:
                rows.append({"nodes": n, "topology": topo, "status": "skipped",
                             "reason": f"{stop} nodes already did not finish"})
                continue
            say(f"{topo}, {n} nodes")
            row = measure(n, topo, args)
            say(f"  {row['status']}: " + (
                f"{row['node_steps_per_s']:.0f} node-steps/s, set-up {row['setup_s']:.2f} s, "
                f"evaluation {row['evaluation_s']:.2f} s, outputs {row['outputs_s']:.2f} s "
                f"({100 * row['post_training_share']:.1f} % of the loop), "
                f"peak RSS {row['peak_rss_mb']:.0f} MB" if row["status"] == "ok"
                else row.get("reason", "")))
            rows.append(row)
            if row["status"] in ("timeout", "failed"):
                stop = n
    emit({
        "bench": "scale", "steps": args.steps, "threads": 1, "processes": 1,
        "model": "mlp[64]", "batch_size": 32, "data": f"synthetic, {SAMPLES_PER_NODE} "
        f"training samples per node, test split: {args.max_test or 'all (20 %)'}",
        "eval_budget": args.eval_budget or "default",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_end": loadavg()},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
