"""Smoke tests of the benchmarks (`make bench`, `make bench-influence`) at toy sizes.

They check the one-JSON-object-on-stdout contract and its fields, not speed; the
influence bench also checks a real property: the propagated r-hop estimate equals the
explicit walk sum (float64). Children run with one thread: on a small shared machine
that is as fast for these sizes and immune to OpenMP's spin-waiting under contention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_FIELDS = ("node_steps_per_s", "wall_s", "gossip_share", "gossip_cpu_share", "threads")


def bench(module: str, *args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # the whole of stdout is one JSON object


def test_engine_bench_quick():
    out = bench("dicesim.bench.engine", "--quick", "--steps", "5", "--nodes", "4",
                "--hidden", "32", "--max-wait-s", "0")
    assert out["bench"] == "engine"
    for key in ("one_process", "ranks_2x8"):
        run = out[key]
        for field in RUN_FIELDS:
            assert isinstance(run[field], int | float), (key, field)
        assert run["node_steps_per_s"] > 0 and 0 <= run["gossip_share"] <= 1
        assert 0 <= run["gossip_cpu_share"] <= 1
    assert out["one_process"]["ranks"] == 1 and out["ranks_2x8"]["ranks"] == 2
    assert out["ranks_2x8"]["nodes_per_rank"] == 2
    assert out["ranks_2x8"]["threads"] == 1  # what torchrun gives each rank
    assert out["ranks_16x1"] is None  # --quick skips it
    assert out["dense_vmap_baseline"]["node_steps_per_s"] > 0
    assert out["one_process_warm"]["node_steps_per_s"] > 0
    ratios = out["ratios"]
    assert ratios["speedup_2_ranks"] == pytest.approx(
        out["ranks_2x8"]["node_steps_per_s"] / out["one_process"]["node_steps_per_s"])
    assert ratios["one_process_vs_dense"] == pytest.approx(
        out["one_process"]["node_steps_per_s"] / out["dense_vmap_baseline"]["node_steps_per_s"])
    targets = out["targets"]
    assert set(targets) == {"speedup_2_ranks_ge_1.5", "one_process_within_10pct_of_dense",
                            "gossip_share_16_ranks_le_0.25",
                            "gossip_cpu_share_16_ranks_le_0.25"}
    assert isinstance(targets["speedup_2_ranks_ge_1.5"], bool)
    assert targets["gossip_share_16_ranks_le_0.25"] is None
    assert out["settings"]["nodes"] == 4 and out["settings"]["steps"] == 5


def test_influence_bench_quick_walk_sum_matches():
    out = bench("dicesim.bench.influence", "--quick", "--nodes", "4", "--steps", "5",
                "--hidden", "16", "--walk-hidden", "8", "--event-step", "1", "--hops", "2",
                "--dtype", "float64", "--max-wait-s", "0")
    assert out["bench"] == "influence"
    prox = out["proximal"]["mlp_16"]
    assert prox["warm"]["plain_wall_s"] > 0 and prox["warm"]["proximal_wall_s"] > 0
    assert prox["warm"]["ratio"] == pytest.approx(
        prox["warm"]["proximal_wall_s"] / prox["warm"]["plain_wall_s"])
    assert "fresh_process" not in prox  # --quick: in-process runs only
    walks = out["propagated_vs_walks"]
    assert walks["hops"] == 2 and walks["nodes"] == 4
    # 4-node exponential graph: each node sends to itself and 2 others
    assert walks["walks_per_hop"] == [3, 9] and walks["walks"] == 12
    assert walks["reached_per_hop"][0] == 1
    assert walks["propagated_s"] > 0 and walks["walk_sum_s"] > 0
    assert walks["speedup"] == pytest.approx(walks["walk_sum_s"] / walks["propagated_s"])
    # the real property: propagating δ̂ once equals summing over every walk
    assert walks["max_abs_estimate"] > 0
    assert walks["max_rel_diff"] <= 1e-6
    totals = walks["per_hop_totals"]
    assert totals["propagated"] == pytest.approx(totals["walk_sum"], rel=1e-6, abs=1e-12)
    assert out["targets"]["propagated_equals_walk_sum_rel_1e-06"] is True


@pytest.mark.slow
def test_engine_bench_sixteen_ranks_small():
    out = bench("dicesim.bench.engine", "--steps", "10", "--nodes", "4", "--hidden", "32",
                "--max-wait-s", "0", timeout=900)
    assert out["ranks_16x1"]["ranks"] == 4 and out["ranks_16x1"]["nodes_per_rank"] == 1
    assert isinstance(out["targets"]["gossip_share_16_ranks_le_0.25"], bool)
    assert out["one_process_1thread"]["threads"] == 1
    alone = out["one_rank_alone"]
    assert alone["ranks"] == 1 and alone["nodes_per_rank"] == 2 and alone["threads"] == 1
    assert out["ratios"]["speedup_2_ranks_bound"] == pytest.approx(
        2 * alone["node_steps_per_s"] / out["one_process"]["node_steps_per_s"])
    assert out["dense_loop_engine_gradient"]["node_steps_per_s"] > 0


@pytest.mark.slow
def test_influence_bench_fresh_processes_small():
    out = bench("dicesim.bench.influence", "--nodes", "4", "--steps", "10", "--hidden", "16",
                "--walk-hidden", "8", "--event-step", "1", "--hops", "2", "--repeats", "1",
                "--max-wait-s", "0", timeout=900)
    fresh = out["proximal"]["mlp_16"]["fresh_process"]
    assert fresh["ratio"] == pytest.approx(fresh["proximal_wall_s"] / fresh["plain_wall_s"])
    # float32: the two estimates agree to rounding
    assert out["propagated_vs_walks"]["max_rel_diff"] <= 1e-4
