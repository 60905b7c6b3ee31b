"""Engine throughput: `python -m dicesim.bench.engine [--steps N] [--nodes N] [--quick]`.

Issue acceptance: 16 nodes, `mlp` with one hidden layer of 256 on `digits`, batch 32,
ring, 200 steps — node-steps/s for one process, 2 ranks × 8 nodes and 16 ranks × 1 node,
the share of the step loop spent in gossip, and a minimal dense vmap loop over the same
model as the reference for the one-process engine. Targets (2-core machine):
2 ranks ≥ 1.5× one process; one process ≥ 0.9× the dense loop; gossip ≤ 25 % at 16 ranks.

Prints ONE JSON object on stdout; progress on stderr. Extra rows that explain the
numbers: `one_process_warm` (the same run in this process after a warm-up run, i.e.
without the one-off first-call costs that `wall_s` of a fresh process includes),
`one_process_1thread` (one process restricted to one thread, as each torchrun rank is),
`one_rank_alone` (half the nodes in one process on one thread: one rank of the 2-rank run
with nobody to talk to, so 2× its rate bounds the 2-rank rate) and
`dense_loop_engine_gradient` (the dense loop taking the engine's own gradient).
Each run reports its gossip (exchange + mixing) share of the wall time and of the CPU time.

The machine may be shared: before each measurement the bench waits (up to --max-wait-s)
for idle CPUs, records `others_cpu_share` (CPU other processes used meanwhile) and runs a
configuration again (up to --retries) while that share exceeded 10 %; `clean` says
whether the reported run was undisturbed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from dicesim.bench import (
    QUIET,
    attempt_until_clean,
    best_clean,
    emit,
    loadavg,
    pick,
    rate,
    run_dicesim,
    run_in_process,
    say,
)

FIELDS = ("node_steps_per_s", "wall_s", "gossip_share", "gossip_cpu_share", "threads", "ranks",
          "nodes_per_rank")


def overrides(nodes: int, steps: int, batch_size: int, hidden: int, topology: str) -> list[str]:
    return ["experiment=demo", f"nodes={nodes}", f"steps={steps}", f"batch_size={batch_size}",
            "model=mlp", f"model.hidden=[{hidden}]", f"topology={topology}",
            "influence.events=0", *QUIET]


def measure(label: str, ovr: list[str], ranks: int, threads: int, repeats: int,
            retries: int, max_wait_s: float) -> dict:
    def once() -> dict:
        summary = run_dicesim(ovr, ranks=ranks, threads=threads)
        summary["threads"] = threads
        say(f"{label}: {summary['node_steps_per_s']:.0f} node-steps/s, gossip "
            f"{100 * summary['gossip_share']:.1f} % of the wall, "
            f"{100 * summary['gossip_cpu_share']:.1f} % of the CPU")
        return pick(summary, *FIELDS)

    say(f"{label} ({ranks} rank(s), {threads} thread(s) each)")
    return best_clean(attempt_until_clean(once, repeats, retries, max_wait_s, label))


def dense_vmap_baseline(ovr: list[str], threads: int, repeats: int, retries: int,
                        max_wait_s: float, warmup_steps: int = 20,
                        engine_gradient: bool = False) -> dict:
    """The same dynamics as a bare loop: θ [n, P]; per step gather the batches (ids
    precomputed), g = vmap(grad(mean batch loss)), θ ← W^t (θ − η g).

    engine_gradient: take g with the engine's own `FlatModel.grads` (the hand-written
    backprop for mlp) instead, so the ratio isolates what the engine adds around it."""
    import numpy as np
    import torch
    from torch.func import grad, vmap

    from dicesim.bench import compose
    from dicesim.model.data import batch_ids
    from dicesim.run.engine import Simulation

    torch.set_num_threads(threads)
    sim = Simulation(compose(ovr), 1, 0)
    s, model = sim.run, sim.model
    n, T, B = s.nodes, s.steps, s.batch_size
    x_train = sim.data.x_train.to(s.dtype)
    y_train = sim.data.y_train
    ids = torch.as_tensor(np.stack([
        np.stack([batch_ids(sim.parts[k], B, t, s.seed, k) for k in range(n)])
        for t in range(max(T, warmup_steps))]))
    Ws = [torch.tensor(np.array(sim.topology.W(t)), dtype=s.dtype)
          for t in range(sim.topology.period)]
    period = len(Ws)

    def loss(theta, x, y):
        return model.sample_losses(theta, x, y).mean()

    step_grad = vmap(grad(loss))
    if engine_gradient:
        ones = torch.ones(n, B, dtype=s.dtype)

        def step_grad(theta, x, y):
            return model.grads(theta, x, y, ones)[0]

    theta0 = model.flat_init(s.seed, s.dtype).repeat(n, 1)

    def loop(steps: int) -> torch.Tensor:
        theta = theta0
        for t in range(steps):
            ti = ids[t]
            g = step_grad(theta, x_train[ti], y_train[ti])
            theta = Ws[t % period] @ (theta - sim.optim.lr * g)
        return theta

    def once() -> dict:
        t0 = time.perf_counter()
        loop(T)
        wall = time.perf_counter() - t0
        return {"node_steps_per_s": rate(n, T, wall), "wall_s": wall, "threads": threads}

    loop(warmup_steps)
    return best_clean(attempt_until_clean(once, repeats, retries, max_wait_s, "dense loop"))


def engine_warm(ovr: list[str], threads: int, repeats: int, retries: int,
                max_wait_s: float) -> dict:
    """The one-process engine in this process, after one warm-up run: the step loop
    without torch.func's one-off first-call cost."""
    import torch

    torch.set_num_threads(threads)
    nodes = int(next(o for o in ovr if o.startswith("nodes=")).split("=")[1])
    steps = int(next(o for o in ovr if o.startswith("steps=")).split("=")[1])
    run_in_process(ovr, repeats=0, warmup=1)

    def once() -> dict:
        r = run_in_process(ovr, repeats=1, warmup=0)[0]
        return {"node_steps_per_s": rate(nodes, steps, r.wall_s), "wall_s": r.wall_s,
                "gossip_share": r.gossip_s / max(r.wall_s, 1e-12),
                "gossip_cpu_share": r.gossip_cpu_s / max(r.cpu_s, 1e-12), "threads": threads}

    return best_clean(attempt_until_clean(once, repeats, retries, max_wait_s,
                                          "one process, warm"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dicesim.bench.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--topology", default="ring")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh-process runs per configuration (the fastest is reported)")
    p.add_argument("--retries", type=int, default=4,
                   help="extra runs of a configuration while none ran without other "
                        "processes taking over 10 %% of the CPUs")
    p.add_argument("--rank-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each torchrun rank (default: what torchrun "
                        "itself sets, 1, unless OMP_NUM_THREADS is already set)")
    p.add_argument("--max-wait-s", type=float, default=60.0,
                   help="before each measurement wait up to this long for other processes "
                        "to leave the CPUs idle (0: never wait)")
    p.add_argument("--quick", action="store_true",
                   help="skip the nodes-ranks × 1 node configuration and the diagnostic rows")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    a = p.parse_args(argv)
    if a.nodes % 2:
        p.error(f"--nodes={a.nodes}: needs an even number (the 2-rank configuration)")

    ovr = overrides(a.nodes, a.steps, a.batch_size, a.hidden, a.topology)
    import torch

    load_before = loadavg()
    # what a fresh `python -m dicesim` with this environment uses (nobody set it here yet)
    one_threads = torch.get_num_threads()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    rank_threads = a.rank_threads or (int(env_threads) if env_threads else 1)
    say(f"{a.nodes} nodes, mlp [{a.hidden}], {a.topology}, {a.steps} steps; "
        f"{os.cpu_count()} CPUs, load {load_before}")
    retries = 0 if a.quick else a.retries
    out: dict = {"bench": "engine", **measurements(a, ovr, one_threads, rank_threads, retries)}
    out["ratios"] = ratios(out)
    out["targets"] = targets(out)
    out["all_measurements_clean"] = all(
        v.get("clean", True) for v in out.values() if isinstance(v, dict) and "clean" in v)
    out["settings"] = {
        "nodes": a.nodes, "steps": a.steps, "batch_size": a.batch_size, "model": "mlp",
        "hidden": [a.hidden], "data": "digits", "topology": a.topology,
        "repeats": a.repeats, "retries": retries, "quick": a.quick, "max_wait_s": a.max_wait_s,
        "cpus": os.cpu_count(),
        "torch_threads_default": one_threads, "rank_threads": rank_threads,
        "python": platform.python_version(), "torch": _torch_version(),
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "overrides": ovr,
    }
    emit(out)
    return out


def measurements(a: argparse.Namespace, ovr: list[str], one_threads: int, rank_threads: int,
                 retries: int) -> dict:
    """Every configuration's measurement, in the order they run."""
    out: dict = {}

    def run(label: str, ranks: int, threads: int, repeats: int = a.repeats) -> dict:
        return measure(label, ovr, ranks, threads, repeats, retries, a.max_wait_s)

    out["one_process"] = run("one process", 1, one_threads)
    out["ranks_2x8"] = run(f"2 ranks x {a.nodes // 2}", 2, rank_threads)
    out["ranks_16x1"] = None
    if not a.quick:
        out["ranks_16x1"] = run(f"{a.nodes} ranks x 1", a.nodes, rank_threads, repeats=1)
    say("dense vmap baseline (in this process)")
    in_process_repeats = 1 if a.quick else 3
    out["dense_vmap_baseline"] = dense_vmap_baseline(ovr, one_threads, in_process_repeats,
                                                     retries, a.max_wait_s)
    if not a.quick:
        say("dense loop with the engine's gradient (in this process)")
        out["dense_loop_engine_gradient"] = dense_vmap_baseline(
            ovr, one_threads, in_process_repeats, retries, a.max_wait_s, engine_gradient=True)
    say("one process, warm (in this process)")
    out["one_process_warm"] = engine_warm(ovr, one_threads, in_process_repeats, retries,
                                          a.max_wait_s)
    if not a.quick:
        out["one_process_1thread"] = run("one process, 1 thread", 1, 1)
        # one rank's share of the 2-rank run with nobody to talk to: 2× its rate bounds
        # what 2 ranks can reach when communication were free
        half = overrides(a.nodes // 2, a.steps, a.batch_size, a.hidden, a.topology)
        out["one_rank_alone"] = measure(f"{a.nodes // 2} nodes alone, {rank_threads} thread",
                                        half, 1, rank_threads, a.repeats, retries, a.max_wait_s)
    return out


def ratios(out: dict) -> dict:
    one = out["one_process"]["node_steps_per_s"]
    dense = out["dense_vmap_baseline"]["node_steps_per_s"]
    two = out["ranks_2x8"]["node_steps_per_s"]
    found = {
        "speedup_2_ranks": two / one,
        "one_process_vs_dense": one / dense,
        "one_process_warm_vs_dense": out["one_process_warm"]["node_steps_per_s"] / dense,
    }
    if "one_process_1thread" in out:
        found["speedup_2_ranks_vs_1thread"] = two / out["one_process_1thread"][
            "node_steps_per_s"]
        found["speedup_2_ranks_bound"] = 2 * out["one_rank_alone"]["node_steps_per_s"] / one
        found["one_process_vs_dense_engine_gradient"] = one / out[
            "dense_loop_engine_gradient"]["node_steps_per_s"]
    return found


def targets(out: dict) -> dict:
    r, sixteen = out["ratios"], out["ranks_16x1"]
    return {
        "speedup_2_ranks_ge_1.5": r["speedup_2_ranks"] >= 1.5,
        "one_process_within_10pct_of_dense": r["one_process_vs_dense"] >= 0.9,
        "gossip_share_16_ranks_le_0.25": (None if sixteen is None
                                          else sixteen["gossip_share"] <= 0.25),
        "gossip_cpu_share_16_ranks_le_0.25": (None if sixteen is None
                                              else sixteen["gossip_cpu_share"] <= 0.25),
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
