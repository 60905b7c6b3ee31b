"""Provenance and the resolved settings in a run's outputs: summary.json's added keys,
partition.csv, report.md's header and the run's first console line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, execute, make_config, read_csv

from dicesim.report.summary import write_all
from dicesim.run.engine import Simulation
from dicesim.run.provenance import (
    describe_partition,
    headline,
    partition_block,
    partition_columns,
    partition_rows,
)
from dicesim.run.rundir import outputs_in

#: the run whose outputs tests/data/outputs_a32d8f6 holds, written by commit a32d8f6
#: (before provenance existed) with the same overrides
GOLDEN = REPO / "tests" / "data" / "outputs_a32d8f6"
OVERRIDES = ("nodes=4", "steps=6", "batch_size=8", "dtype=float64", "model.hidden=[8]",
             "data.probe_size=40", "influence.events=3", "influence.hops=2", "optim=momentum",
             "data.partition=dirichlet", "data.alpha=0.5",
             "influence.estimators=[dice_e,dice_mid]")  # the default when it was written
ADDED_KEYS = {"provenance", "optimizer", "partition", "topology_weights", "batch_size",
              "evaluation"}
TIMINGS = {"wall_s", "node_steps_per_s", "gossip_share", "gossip_cpu_share", "timings_s"}
HEX40 = re.compile(r"[0-9a-f]{40}")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(Simulation, output directory) of the golden run, written now."""
    out = tmp_path_factory.mktemp("run")
    sim, result = execute(*OVERRIDES)
    write_all(out, sim, result, plots=False)
    return sim, out


def same(a: object, b: object, where: str = "") -> None:
    """a == b, floats to 1e-9 relative (the golden run was written on another machine);
    b may have keys that a lacks below the top level."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) <= set(b), where  # keys may be added inside
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_numbers_and_old_keys_unchanged(written):
    _, out = written
    golden = json.loads((GOLDEN / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) - set(golden) - TIMINGS == ADDED_KEYS
    for key, value in golden.items():
        same(value, summary[key], key)
    for name in ("metrics.csv", "influence.csv"):
        old, new = read_csv(GOLDEN / name), read_csv(out / name)
        assert len(old) == len(new) > 0
        for before, now in zip(old, new, strict=True):  # every column the old run filled
            for column, value in before.items():
                if value:
                    same(float(value), float(now[column]), f"{name}:{column}")


def test_provenance_and_resolved_settings(written):
    sim, out = written
    summary = json.loads((out / "summary.json").read_text())
    p = summary["provenance"]
    assert set(p) == {"dicesim", "git_commit", "git_dirty", "torch", "numpy", "python"}
    assert p["dicesim"] == "0.1.0"
    assert all(isinstance(p[k], str) and p[k] for k in ("torch", "numpy", "python"))
    checkout = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
    if checkout.returncode == 0:  # run from this checkout: its commit
        assert HEX40.fullmatch(p["git_commit"]) and p["git_commit"] == checkout.stdout.strip()
        assert isinstance(p["git_dirty"], bool)
    else:
        assert p["git_commit"] is None and p["git_dirty"] is None
    assert summary["optimizer"]["name"] == "sgd" and summary["optimizer"]["momentum"] == 0.9
    assert summary["optimizer"]["lr"] == sim.optim.lr
    assert summary["partition"] == {"kind": "dirichlet", "alpha": 0.5}
    assert summary["topology_weights"] == "uniform" and summary["batch_size"] == 8
    report = (out / "report.md").read_text()
    assert f"git commit {p['git_commit']}" in report or p["git_commit"] is None
    assert f"sgd momentum 0.9 lr {sim.optim.lr:g} (constant)" in report
    assert "dirichlet α=0.5 partition" in report
    assert "hop r = r gossip rounds after the event (not graph distance)" in report
    assert "§" not in report and "issue" not in report


def test_partition_csv_counts_every_training_sample(written):
    sim, out = written
    rows = read_csv(out / "partition.csv")
    classes = sim.data.num_classes
    assert list(rows[0]) == ["node", "samples", *(f"class_{c}" for c in range(classes))]
    counts = np.array([[int(r[f"class_{c}"]) for c in range(classes)] for r in rows])
    samples = np.array([int(r["samples"]) for r in rows])
    assert [int(r["node"]) for r in rows] == list(range(sim.run.nodes))
    assert (counts.sum(axis=1) == samples).all()
    assert (samples == [len(p) for p in sim.parts]).all()
    labels = sim.data.y_train.numpy()
    assert (counts.sum(axis=0) == np.bincount(labels, minlength=classes)).all()
    assert counts.std(axis=0).sum() > 0  # dirichlet α=0.5: the nodes' mixes differ
    assert out / "partition.csv" in outputs_in(out)  # overwrite=true removes it too


def test_partition_is_before_label_noise_and_has_no_classes_for_regression():
    noisy = Simulation(make_config("nodes=4", "data.label_noise=[0,0.5,0,0.5]"))
    clean = Simulation(make_config("nodes=4"))
    assert not np.array_equal(noisy.data.y_train.numpy(), clean.data.y_train.numpy())
    assert partition_rows(noisy) == partition_rows(clean)
    regression = Simulation(make_config("nodes=4", "data=synthetic_regression", "model=linear"))
    assert partition_columns(regression.data.num_classes) == ("node", "samples")
    assert partition_rows(regression) == [(k, len(p)) for k, p in enumerate(regression.parts)]


def test_first_line_names_the_resolved_optimizer():
    args = ("optim=adam", "nodes=4", "steps=20", "influence.events=2", "topology=torus")
    proc = subprocess.run([sys.executable, "-m", "dicesim", *args, "dry_run=true"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lr = make_config(*args).optim.lr  # what the composed config gives adam
    first = proc.stdout.splitlines()[0]
    assert first == (f"dicesim: 4 nodes, torus (uniform), digits iid, adam lr {lr:g} betas "
                     "0.9/0.999 (constant), 20 steps, batch 32")
    sim = Simulation(make_config("optim=adamw", "optim.lr=0.003", "optim.schedule=cosine",
                                 "optim.min_lr=0.001", "topology=hub", "nodes=4"))
    assert headline(sim) == ("4 nodes, hub (its own weights), digits iid, adamw lr 0.003 betas "
                             "0.9/0.999 weight decay 0.01 (cosine to 0.001), 200 steps, batch 32")


def test_no_commit_outside_a_checkout(tmp_path, monkeypatch):
    from dicesim.run import provenance as prov

    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path)  # e.g. an installed wheel
    assert prov.git_state() == (None, None)
    line = prov.provenance_line({"dicesim": "0.1.0", "git_commit": None, "torch": "2",
                                 "numpy": "2", "python": "3"})
    assert "not run from a git checkout" in line


def test_label_skew_partition_rows_and_block():
    """data.partition=label_skew: each node's row of partition.csv counts 3 classes, every
    class and every training sample is counted once; summary names c."""
    sim = Simulation(make_config("nodes=5", "data.partition=label_skew",
                                 "data.classes_per_node=3"))
    counts = np.array([row[2:] for row in partition_rows(sim)])
    assert ((counts > 0).sum(axis=1) == 3).all()
    assert (counts.sum(axis=0) == np.bincount(sim.data.y_train.numpy(), minlength=10)).all()
    assert partition_block(sim) == {"kind": "label_skew", "classes_per_node": 3}
    assert describe_partition(sim) == "label_skew c=3"
