"""Scale: start-up without unused imports, aggregate plots of many nodes, bench-scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

LOADED = ("matplotlib", "sklearn", "scipy.stats", "scipy.sparse.csgraph", "scipy.sparse.linalg",
          "networkx", "torch", "hydra")


def _modules_after_run(tmp_path: Path, *overrides: str) -> dict[str, bool]:
    """Run `python -m dicesim overrides…` in a fresh interpreter; which modules it loaded."""
    code = (
        "import atexit, json, runpy, sys\n"
        f"atexit.register(lambda: print('MODULES', json.dumps({{m: m in sys.modules "
        f"for m in {LOADED!r}}})))\n"
        "sys.argv = ['dicesim', *sys.argv[1:]]\n"
        "runpy.run_module('dicesim', run_name='__main__')\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, *overrides, f"out_dir={tmp_path / 'run'}",
         "progress=false"], cwd=REPO, capture_output=True, text=True, timeout=240,
        env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES "))
    return json.loads(line.removeprefix("MODULES "))


def test_plots_false_imports_neither_matplotlib_nor_scikit_learn(tmp_path: Path) -> None:
    loaded = _modules_after_run(tmp_path, "nodes=4", "steps=3", "plots=false",
                                "influence.events=0")
    assert loaded["torch"]
    assert not loaded["matplotlib"] and not loaded["sklearn"]
    # W^t is a scipy.sparse matrix (~0.08 s to import); nothing heavier of scipy loads
    assert not any(loaded[m] for m in ("scipy.stats", "scipy.sparse.csgraph",
                                        "scipy.sparse.linalg", "networkx"))
    assert loaded["hydra"]  # the run composes its config itself (hydra.main)
    assert (tmp_path / "run" / "report.md").is_file()
    assert not list((tmp_path / "run").glob("*.png"))


def test_plots_true_draws_and_times_its_phases(tmp_path: Path) -> None:
    loaded = _modules_after_run(tmp_path, "nodes=4", "steps=3", "influence.events=2")
    run = tmp_path / "run"
    assert loaded["matplotlib"]  # the figures are drawn in the run's own process
    report = (run / "report.md").read_text()
    pictures = ["training.png", "alignment.png", "cascade.png"]  # this order, one each
    assert [ln[2:].split("]")[0] for ln in report.splitlines() if ln.startswith("![")] == pictures
    assert all((run / p).stat().st_size > 5_000 for p in pictures)
    timings = json.loads((run / "summary.json").read_text())["timings_s"]
    assert set(timings) == {"startup", "training", "evaluation", "outputs", "plots", "total"}
    assert all(v > 0 for v in timings.values())
    parts = (timings["startup"] + timings["training"] + timings["evaluation"]
             + timings["outputs"] + timings["plots"])
    assert parts <= timings["total"] < parts + 5  # only warm-up and gathering between them


def _influence_rows(hops: int = 3, events: int = 6):
    from dicesim.influence.events import InfluenceRow

    rng = np.random.default_rng(1)
    rows = []
    for e in range(events):
        for hop in range(hops + 1):
            for k in range(hop + 1):
                gt = float(rng.normal() * 10.0 ** -(hop + 3))
                rows.append(InfluenceRow(e, e, 0, 1, hop, k, gt * 1.01, gt, gt * 1.001))
    return rows


def test_a_run_draws_its_figures_in_report_order(tmp_path: Path) -> None:
    """Every figure with something to draw, in report.md's order; none without rows."""
    from dicesim.report.summary import draw_figures

    result = _fake_result(8)
    result.influence = _influence_rows()
    pictures = draw_figures(tmp_path, result)
    assert pictures == ["training.png", "alignment.png", "cascade.png"]
    assert all((tmp_path / p).stat().st_size > 5_000 for p in pictures)
    result.influence = []
    bare = tmp_path / "bare"
    bare.mkdir()
    assert draw_figures(bare, result) == ["training.png"]
    assert sorted(p.name for p in bare.iterdir()) == ["training.png"]


# ---- plots of many nodes ------------------------------------------------------------------
def _fake_result(nodes: int, steps: int = 40):
    from dicesim.run.engine import RunResult

    rng = np.random.default_rng(0)
    result = RunResult()
    rate = rng.lognormal(0, 0.3, nodes)
    for t in range(0, steps + 1, 10):
        for k in range(nodes):
            loss = 2.3 * np.exp(-t / 20 * rate[k]) + 0.1
            result.metrics.append((t, k, float("nan"), loss, 1 - loss / 2.5, 1e-3 * (1 + t)))
    return result


@pytest.mark.parametrize("nodes, aggregate", [(8, False), (33, True), (500, True)])
def test_training_curves_aggregate_many_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              nodes: int, aggregate: bool) -> None:
    from dicesim.report import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    assert plots.training_curves(tmp_path, _fake_result(nodes)) == "training.png"
    assert (tmp_path / "training.png").stat().st_size > 10_000
    lines = figures[0].axes[0].get_lines()
    if aggregate:  # mean, median and three highlighted nodes, not one line per node
        labels = [ln.get_label() for ln in lines]
        assert len(lines) == 5 and "mean over nodes" in labels and "median" in labels
        assert sum("highest final loss" in lb or "lowest final loss" in lb
                   for lb in labels) == 2
    else:
        assert len(lines) == nodes + 1
    plots.plt.close("all")


def test_metric_grid_and_highlighted_nodes() -> None:
    from dicesim.report.plots import highlighted, metric_grid

    rows = [(0, 1, 0.0, 2.0, 0.1, 0.5), (0, 0, 0.0, 1.0, 0.2, 0.4), (10, 1, 0.0, 3.0, 0.3, 0.6)]
    steps, nodes, grid = metric_grid(rows)
    assert steps.tolist() == [0, 10] and nodes.tolist() == [0, 1]
    assert grid[0].tolist()[0] == [1.0, 2.0] and np.isnan(grid[0, 1, 0])
    marked = highlighted(np.array([4, 7, 9]), np.array([0.5, np.nan, 0.1]))
    assert list(marked) == [9, 4, 7] and "lowest" in marked[9] and "highest" in marked[7]


# ---- bench-scale ------------------------------------------------------------------------------
def test_bench_scale_runs_a_subset_and_reports_skips(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from dicesim.bench import scale

    monkeypatch.setattr(scale, "mem_available", lambda: 2**30)  # 1 GB: 4,096 nodes won't fit
    scale.main(["--nodes", "16,4096", "--topologies", "ring", "--steps", "3",
                "--max-seconds", "200"])
    out = json.loads(capsys.readouterr().out)
    small, big = out["rows"]
    assert small["status"] == "ok" and small["nodes"] == 16 and small["topology"] == "ring"
    for key in ("node_steps_per_s", "peak_rss_mb", "setup_s", "time_to_first_step_s",
                "graph_s", "validation_s", "spectral_gap_s", "data_s"):
        assert small[key] > 0, key
    assert big["status"] == "skipped" and "estimated" in big["reason"]


def test_bench_scale_timeout_skips_larger_sizes(capsys: pytest.CaptureFixture) -> None:
    from dicesim.bench import scale

    scale.main(["--nodes", "16,32", "--topologies", "exponential", "--steps", "2",
                "--max-seconds", "0.05"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["status"] for r in rows] == ["timeout", "skipped"]
    assert "16 nodes already did not finish" in rows[1]["reason"]


@pytest.mark.parametrize(("nodes", "targets"), [(16, 1), (5000, 1), (200, 200)])
def test_attribution_figures_stay_a_readable_size(tmp_path: Path, nodes: int,
                                                  targets: int) -> None:
    """One cell or point per source node, in a figure of at most 12 × 8 inches (it grew
    0.35 inch a node: 631,004 pixels wide at 16,384 nodes)."""
    from types import SimpleNamespace

    import matplotlib.image

    from dicesim.report.attribution import attribution_plots

    batch = np.random.default_rng(0).normal(size=(5, targets, nodes))
    names = ["network"] if targets == 1 else [f"node {k}" for k in range(targets)]
    a = SimpleNamespace(batch=batch, node_totals=batch.sum(0),
                        settings=SimpleNamespace(target_names=names, plot_node=None))
    assert attribution_plots(tmp_path, a) == ["attribution_heatmap.png",
                                              "attribution_over_time.png"]
    height, width, _ = matplotlib.image.imread(tmp_path / "attribution_heatmap.png").shape
    assert width <= 12 * 110 and height <= 8 * 110
