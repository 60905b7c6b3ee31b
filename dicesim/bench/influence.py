"""Influence cost: `python -m dicesim.bench.influence [--quick] [--nodes N] [--steps N]`.

Issue acceptance:
- proximal influence on every step costs ≤ 2× the plain training step time (probe set
  the size of a batch): one-process runs, 16 nodes, ring, mlp [64] (and [256]),
  with `influence.proximal=true data.probe_size=32` vs without (both `influence.events=0`);
- the propagated r = 3 estimate of one event is ≥ 10× faster than enumerating walks on a
  16-node exponential graph, and both give the same numbers;
- full-horizon attribution: the reverse pass takes ≤ 3× the training time of the same run
  (`--only-attribution` runs just this), and its memory at T = 2000 stays within the bound
  (⌈T/K⌉ + 1) + 2K + 2 rows of P per node (SGD, K = ⌈√T⌉).

The proximal ratio is given twice: from `wall_s` of fresh processes (as a user sees it,
including torch.func's one-off first-call cost) and from warm runs in this process (the
step time itself, which is what the target is about). The propagated estimate is timed
inside one run by wrapping the tracker's methods and the probe gradients the engine
computes for it; the walk sum (`dicesim.testing.oracle.walk_sum`) is timed on the dense
trajectory, whose computation is not counted. Prints ONE JSON object on stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from contextlib import contextmanager

import numpy as np

from dicesim.bench import (
    CLEAN,
    QUIET,
    attempt_until_clean,
    best_clean,
    emit,
    loadavg,
    run_dicesim,
    run_in_process,
    say,
)

TRACKER_METHODS = ("probe_rows", "at_theta", "local_step", "channels", "after_gossip")


# ---- proximal influence vs plain training --------------------------------------------------
def proximal_overrides(nodes: int, steps: int, hidden: int, proximal: bool,
                       dtype: str) -> list[str]:
    return ["experiment=demo", f"nodes={nodes}", f"steps={steps}", "batch_size=32",
            "topology=ring", "model=mlp", f"model.hidden=[{hidden}]", "data.probe_size=32",
            "influence.events=0", f"influence.proximal={str(proximal).lower()}",
            f"dtype={dtype}", *QUIET]


def proximal_case(nodes: int, steps: int, hidden: int, repeats: int, retries: int,
                  fresh: bool, dtype: str, max_wait_s: float) -> dict:
    plain = proximal_overrides(nodes, steps, hidden, False, dtype)
    prox = proximal_overrides(nodes, steps, hidden, True, dtype)
    label = f"proximal, mlp [{hidden}]"
    out: dict = {"hidden": [hidden], "nodes": nodes, "steps": steps, "probe_size": 32}

    def pair(run) -> dict:  # plain then proximal, back to back on the same machine state
        p_wall, x_wall = run(plain), run(prox)
        return {"plain_wall_s": p_wall, "proximal_wall_s": x_wall, "ratio": x_wall / p_wall}

    def warm(ovr: list[str]) -> float:
        return run_in_process(ovr, repeats=1, warmup=0)[0].wall_s

    run_in_process(prox, repeats=0, warmup=1)  # pays every torch.func first call
    out["warm"] = summarize_pairs(
        attempt_until_clean(lambda: pair(warm), repeats, retries, max_wait_s, label), steps)
    if fresh:
        def fresh_wall(ovr: list[str]) -> float:
            return run_dicesim(ovr)["wall_s"]

        out["fresh_process"] = summarize_pairs(
            attempt_until_clean(lambda: pair(fresh_wall), 1, retries, max_wait_s, label),
            steps)
    say(f"{label}: {out['warm']['ratio']:.2f}x the plain step (warm)"
        + (f", {out['fresh_process']['ratio']:.2f}x in fresh processes" if fresh else ""))
    return out


def summarize_pairs(attempts: list[dict], steps: int) -> dict:
    """Fastest plain and fastest proximal wall time among clean attempts (all, if none)."""
    clean = [a for a in attempts if (a.get("others_cpu_share") or 0) <= CLEAN]
    pool = clean or attempts
    plain = min(a["plain_wall_s"] for a in pool)
    prox = min(a["proximal_wall_s"] for a in pool)
    return {
        "plain_wall_s": plain, "proximal_wall_s": prox,
        "plain_step_ms": 1e3 * plain / steps, "proximal_step_ms": 1e3 * prox / steps,
        "ratio": prox / plain, "clean": bool(clean),
        "attempts": [{k: a[k] if k != "ratio" else round(a[k], 3) for k in
                      ("ratio", "others_cpu_share")} for a in attempts],
    }


# ---- full-horizon attribution: the reverse pass against training ---------------------------
def attribution_case(nodes: int, steps: int, hidden: int, dtype: str, repeats: int,
                     retries: int, max_wait_s: float, memory_steps: int) -> dict:
    """The reverse pass's wall time against the plain training of the same run (no Keeper,
    the overlapped step loop), warm in-process runs; then the peak memory of the pass at
    T = memory_steps against the stated bound (dicesim/influence/attribution.py)."""
    from dicesim.influence.attribution import default_keep_every

    def overrides(t: int, on: bool) -> list[str]:
        return ["experiment=demo", f"nodes={nodes}", f"steps={t}", "topology=ring",
                "model=mlp", f"model.hidden=[{hidden}]", "influence.events=0",
                f"dtype={dtype}", f"attribution.enabled={str(on).lower()}", *QUIET]

    run_in_process(overrides(steps, True), repeats=0, warmup=1)

    def pair() -> dict:
        plain = run_in_process(overrides(steps, False), repeats=1, warmup=0)[0].wall_s
        r = run_in_process(overrides(steps, True), repeats=1, warmup=0)[0]
        return {"plain_wall_s": plain, "attributed_train_wall_s": r.wall_s,
                "reverse_s": r.attribution.wall_s, "ratio": r.attribution.wall_s / plain}

    attempts = attempt_until_clean(pair, repeats, retries, max_wait_s, "attribution")
    clean = [a for a in attempts if (a.get("others_cpu_share") or 0) <= CLEAN]
    best = min(clean or attempts, key=lambda a: a["ratio"])
    out = {"nodes": nodes, "steps": steps, "hidden": [hidden], "dtype": dtype,
           **{k: best[k] for k in ("plain_wall_s", "attributed_train_wall_s", "reverse_s",
                                   "ratio")},
           "clean": bool(clean), "attempts": [round(a["ratio"], 3) for a in attempts]}
    say(f"attribution: reverse pass {best['reverse_s']:.2f} s = {best['ratio']:.2f}x the "
        f"training ({best['plain_wall_s']:.2f} s), T = {steps}")
    if memory_steps:
        r = run_in_process(overrides(memory_steps, True), repeats=1, warmup=0)[0]
        K = default_keep_every(memory_steps)
        P = r.final_params.shape[1]
        itemsize = 8 if dtype == "float64" else 4
        rows = (math.ceil(memory_steps / K) + 1) + 2 * K + 2  # SGD: |s| = 0
        bound = rows * P * nodes * itemsize
        full = (memory_steps + 1) * P * nodes * itemsize
        out["memory"] = {"steps": memory_steps, "keep_every": K, "rows_per_node": rows,
                         "measured_bytes": r.attribution.memory_bytes, "bound_bytes": bound,
                         "whole_trajectory_bytes": full,
                         "reverse_s": r.attribution.wall_s, "train_wall_s": r.wall_s}
        say(f"attribution memory at T = {memory_steps}: {r.attribution.memory_bytes / 2**20:.1f}"
            f" MiB (bound {bound / 2**20:.1f} MiB; whole trajectory {full / 2**20:.0f} MiB)")
    return out


# ---- the midpoint estimator against DICE-E -------------------------------------------------
def midpoint_case(nodes: int, steps: int, hidden: int, events: int, hops: int, dtype: str,
                  repeats: int, retries: int, max_wait_s: float) -> dict:
    """Tracker time of dice_mid alone against dice_e alone (no ground truth), same events:
    the cost per event-hop of one extra probe gradient and one HVP per reached row. The
    probe gradients the trainer takes for DICE-E's rows count as DICE-E's."""
    def overrides(estimator: str) -> list[str]:
        return ["experiment=demo", f"nodes={nodes}", f"steps={steps}", "topology=ring",
                f"model.hidden=[{hidden}]", f"influence.events={events}",
                f"influence.hops={hops}", "influence.ground_truth=false",
                f"influence.estimators=[{estimator}]", f"dtype={dtype}", *QUIET]

    run_in_process(overrides("dice_mid"), repeats=0, warmup=1)  # torch.func's first calls

    def pair() -> dict:
        _, e_s, _ = timed_tracker_run(overrides("dice_e"))
        _, mid_s, _ = timed_tracker_run(overrides("dice_mid"))
        _, gauss2_s, _ = timed_tracker_run(overrides("dice_gauss2"))
        return {"dice_e_s": e_s, "dice_mid_s": mid_s, "dice_gauss2_s": gauss2_s,
                "ratio": mid_s / e_s, "ratio_gauss2": gauss2_s / e_s}

    attempts = attempt_until_clean(pair, repeats, retries, max_wait_s, "dice_mid vs dice_e")
    clean = [a for a in attempts if (a.get("others_cpu_share") or 0) <= CLEAN]
    pool = clean or attempts
    best_e, best_mid = min(a["dice_e_s"] for a in pool), min(a["dice_mid_s"] for a in pool)
    best_gauss2 = min(a["dice_gauss2_s"] for a in pool)
    event_hops = events * hops
    out = {"nodes": nodes, "steps": steps, "hidden": [hidden], "events": events, "hops": hops,
           "dice_e_ms_per_event_hop": 1e3 * best_e / event_hops,
           "dice_mid_ms_per_event_hop": 1e3 * best_mid / event_hops,
           "dice_gauss2_ms_per_event_hop": 1e3 * best_gauss2 / event_hops,
           "ratio": best_mid / best_e, "ratio_gauss2": best_gauss2 / best_e, "clean": bool(clean),
           "attempts": [round(a["ratio"], 3) for a in attempts]}
    say(f"dice_mid: {out['ratio']:.2f}x dice_e per event-hop "
        f"({out['dice_mid_ms_per_event_hop']:.2f} ms vs {out['dice_e_ms_per_event_hop']:.2f} ms);"
        f" dice_gauss2: {out['ratio_gauss2']:.2f}x "
        f"({out['dice_gauss2_ms_per_event_hop']:.2f} ms)")
    return out


# ---- propagated r-hop estimate vs the walk sum ---------------------------------------------
class Stopwatch:
    """Accumulates time spent in wrapped calls; nested wrapped calls count once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0

    @contextmanager
    def timing(self):
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - start
                self.calls += 1

    def wrap(self, fn):
        def timed(*args, **kwargs):
            with self.timing():
                return fn(*args, **kwargs)

        return timed


def timed_tracker_run(overrides: list[str]) -> tuple[object, float, float]:
    """One warm run with the tracker's work timed: (RunResult, tracker_s, wall_s).

    Counted: every tracker method (source gradient, HVPs, mixing δ̂, recording) and the
    probe gradients the engine computes for the tracker's rows. Not counted: copying the
    δ̂ rows into the step's exchange buffers (part of the gossip)."""
    watch = Stopwatch()

    def time_trackers(parts) -> None:
        for tracker in parts.trackers:
            for name in TRACKER_METHODS:
                if hasattr(tracker, name):
                    setattr(tracker, name, watch.wrap(getattr(tracker, name)))
        parts.sources = watch.wrap(parts.sources)

    def observe(sim) -> None:
        sim.model.probe_grads = watch.wrap(sim.model.probe_grads)
        sim.on_parts.append(time_trackers)

    result = run_in_process(overrides, repeats=1, warmup=0, observe=observe)[0]
    return result, watch.seconds, result.wall_s


def walk_counts(topology, source: int, step: int, hops: int) -> dict:
    """Walks j → k_1 → … → k_s with nonzero weight, s = 1..hops (self-loops included), and
    the HVPs the walk sum evaluates (s − 1 per walk of length s)."""
    n = topology.n
    v = np.zeros(n)
    v[source] = 1.0
    per_hop = []
    for s in range(hops):
        v = (topology.W_sparse(step + s) > 0).astype(float) @ v
        per_hop.append(int(round(v.sum())))
    return {"walks_per_hop": per_hop, "walks": sum(per_hop),
            "tuples_checked": sum(n ** s for s in range(1, hops + 1)),
            "walk_hvps": sum(c * s for s, c in enumerate(per_hop))}


def timed_walk_sum(sim, source: int, event_step: int, hops: int, repeats: int, retries: int,
                   max_wait_s: float, label: str) -> tuple[np.ndarray, dict]:
    """Theorem 1's explicit sum over walks for the simulation's first event, [hop, node],
    and its best clean timing (the dense trajectory it reads is not timed)."""
    from dicesim.testing.oracle import dense_trajectory, walk_sum

    trajectory = dense_trajectory(sim)
    positions = sim.events[0].positions
    kept: dict = {}

    def walk_once() -> dict:
        start = time.perf_counter()
        kept["walks"] = walk_sum(sim, trajectory, source, event_step, positions, hops=hops)
        return {"walk_sum_s": time.perf_counter() - start}

    runs = attempt_until_clean(walk_once, repeats, retries, max_wait_s, label)
    return kept["walks"], best_clean(runs, "walk_sum_s", higher=False)


def event_values(influence: list, event: int, like: np.ndarray) -> np.ndarray:
    """DICE-E of one event as [hop, node] (the shape and dtype of `like`) from influence
    rows."""
    from dicesim.influence.events import INFLUENCE_COLUMNS

    col = {c: i for i, c in enumerate(INFLUENCE_COLUMNS)}
    values = np.zeros_like(like)
    for row in influence:
        if row[col["event"]] == event:
            values[row[col["hop"]], row[col["node"]]] += row[col["dice_e"]]
    return values


def propagation_case(nodes: int, hops: int, event_step: int, hidden: int, dtype: str,
                     repeats: int, retries: int, max_wait_s: float) -> dict:
    from dicesim.bench import compose
    from dicesim.influence.events import reach_sets
    from dicesim.run.engine import Simulation

    steps = event_step + hops
    source = 0
    common = ["experiment=demo", f"nodes={nodes}", f"steps={steps}", "batch_size=32",
              "topology=exponential", "model=mlp", f"model.hidden=[{hidden}]",
              f"influence.hops={hops}", "influence.ground_truth=false", f"dtype={dtype}",
              *QUIET]
    tracked = [*common, f"influence.events=[{{node:{source},step:{event_step}}}]"]
    plain = [*common, "influence.events=0"]
    label = "propagated vs walks"
    run_in_process(tracked, repeats=0, warmup=1)  # first calls of grad, HVP, probe grads
    kept: dict = {}

    def tracked_once() -> dict:
        result, tracker_s, wall_s = timed_tracker_run(tracked)
        kept.setdefault("result", result)
        return {"propagated_s": tracker_s, "wall_s": wall_s}

    def plain_once() -> dict:
        return {"wall_s": run_in_process(plain, repeats=1, warmup=0)[0].wall_s}

    tracked_runs = attempt_until_clean(tracked_once, repeats, retries, max_wait_s, label)
    plain_runs = attempt_until_clean(plain_once, repeats, retries, max_wait_s, label)
    prop_timing = best_clean(tracked_runs, "propagated_s", higher=False)
    tracked_wall = best_clean(tracked_runs, "wall_s", higher=False)["wall_s"]
    plain_wall = best_clean(plain_runs, "wall_s", higher=False)["wall_s"]
    result = kept["result"]

    sim = Simulation(compose(tracked), 1, 0)
    event = sim.events[0]
    walks, walk = timed_walk_sum(sim, source, event_step, hops, min(repeats, 2), retries,
                                 max_wait_s, label)
    walk_s, tracker_s = walk["walk_sum_s"], prop_timing["propagated_s"]
    propagated = event_values(result.influence, 0, walks)
    diff = float(np.abs(propagated - walks).max())
    scale = float(np.abs(walks).max())
    reach = reach_sets(sim.topology, source, event_step, hops)
    counts = walk_counts(sim.topology, source, event_step, hops)
    out = {
        "topology": "exponential", "nodes": nodes, "hops": hops, "event": {
            "node": source, "step": event_step, "n_removed": int(event.n_removed)},
        "hidden": [hidden], "dtype": dtype, "steps": steps, "repeats": repeats,
        "propagated_s": tracker_s,
        "propagated_s_by_run_difference": tracked_wall - plain_wall,
        "walk_sum_s": walk_s,
        "clean": bool(prop_timing["clean"] and walk["clean"]),
        "others_cpu_share": {"propagated": prop_timing.get("others_cpu_share"),
                             "walk_sum": walk.get("others_cpu_share")},
        "speedup": walk_s / max(tracker_s, 1e-12),
        "reached_per_hop": [len(r) for r in reach],
        "propagated_hvps": sum(len(r) for r in reach[1:hops]),
        **counts,
        "max_abs_diff": diff,
        "max_abs_estimate": scale,
        "max_rel_diff": diff / max(scale, 1e-300),
        "per_hop_totals": {"propagated": propagated.sum(1).tolist(),
                           "walk_sum": walks.sum(1).tolist()},
    }
    say(f"r={hops} on {nodes}-node exponential: propagated {1e3 * tracker_s:.1f} ms, "
        f"walks {1e3 * walk_s:.0f} ms ({counts['walks']} walks) -> {out['speedup']:.0f}x; "
        f"max |diff| {diff:.2e} (rel {out['max_rel_diff']:.2e})")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dicesim.bench.influence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--steps", type=int, default=200, help="steps of the proximal runs")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 256],
                   help="mlp widths of the proximal runs (the first one sets the target)")
    p.add_argument("--hops", type=int, default=3)
    p.add_argument("--event-step", type=int, default=10)
    p.add_argument("--walk-hidden", type=int, default=64, help="mlp width of the walk case")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--repeats", type=int, default=3, help="warm repeats (fastest reported)")
    p.add_argument("--retries", type=int, default=4,
                   help="extra attempts while none ran without other processes taking over "
                        "10 %% of the CPUs")
    p.add_argument("--max-wait-s", type=float, default=60.0,
                   help="wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--attribution-memory-steps", type=int, default=2000,
                   help="T of the attribution memory check (0: skip)")
    p.add_argument("--only-attribution", action="store_true",
                   help="run only the attribution case")
    p.add_argument("--quick", action="store_true",
                   help="warm in-process runs only (no fresh-process proximal runs), 1 repeat")
    a = p.parse_args(argv)
    repeats = 1 if a.quick else a.repeats
    retries = 0 if a.quick else a.retries

    import torch

    load_before = loadavg()
    say(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load {load_before}")
    out: dict = {"bench": "influence", "proximal": {}}
    if a.only_attribution:
        out["attribution"] = attribution_case(a.nodes, a.steps, a.hidden[0], a.dtype, repeats,
                                              retries, a.max_wait_s, a.attribution_memory_steps)
        att = out["attribution"]
        out["targets"] = {"attribution_le_3x_training": att["ratio"] <= 3.0}
        if "memory" in att:
            out["targets"]["attribution_memory_within_bound"] = (
                att["memory"]["measured_bytes"] <= att["memory"]["bound_bytes"])
        emit(out)
        return out
    for hidden in a.hidden:
        out["proximal"][f"mlp_{hidden}"] = proximal_case(
            a.nodes, a.steps, hidden, repeats, retries, fresh=not a.quick, dtype=a.dtype,
            max_wait_s=a.max_wait_s)
    out["midpoint"] = midpoint_case(a.nodes, 60, a.hidden[0], 40, 3, a.dtype, repeats,
                                    retries, a.max_wait_s)
    out["attribution"] = attribution_case(a.nodes, a.steps, a.hidden[0], a.dtype, repeats,
                                          retries, a.max_wait_s, a.attribution_memory_steps)
    out["propagated_vs_walks"] = propagation_case(
        a.nodes, a.hops, a.event_step, a.walk_hidden, a.dtype, repeats, retries,
        a.max_wait_s)

    first = out["proximal"][f"mlp_{a.hidden[0]}"]
    walks = out["propagated_vs_walks"]
    tol = 1e-6 if a.dtype == "float64" else 1e-4
    out["targets"] = {
        f"proximal_step_le_2x_plain_mlp_{a.hidden[0]}": first["warm"]["ratio"] <= 2.0,
        **{f"proximal_step_le_2x_plain_mlp_{h}": out["proximal"][f"mlp_{h}"]["warm"]["ratio"]
           <= 2.0 for h in a.hidden[1:]},
        "propagated_ge_10x_faster_than_walks": walks["speedup"] >= 10.0,
        "dice_mid_le_1.6x_dice_e_per_event_hop": out["midpoint"]["ratio"] <= 1.6,
        f"propagated_equals_walk_sum_rel_{tol:g}": walks["max_rel_diff"] <= tol,
        "attribution_le_3x_training": out["attribution"]["ratio"] <= 3.0,
    }
    if "memory" in out["attribution"]:
        mem = out["attribution"]["memory"]
        out["targets"]["attribution_memory_within_bound"] = (
            mem["measured_bytes"] <= mem["bound_bytes"])
    out["settings"] = {
        "nodes": a.nodes, "steps": a.steps, "hidden": a.hidden, "hops": a.hops,
        "event_step": a.event_step, "dtype": a.dtype, "repeats": repeats,
        "retries": retries, "quick": a.quick,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    emit(out)
    return out


if __name__ == "__main__":
    main()
