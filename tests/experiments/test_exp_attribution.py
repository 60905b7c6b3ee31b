"""`make attribution` and `make cleansing`: the drivers run end to end on tiny settings."""

from __future__ import annotations

import csv
import json

import numpy as np
from conftest import make_config

from dicesim.cli import open_session
from dicesim.experiments import attribution, cleansing
from dicesim.influence.attribution import Attribution

TINY = ("nodes=4", "steps=20", "batch_size=8", "model.hidden=[8]", "data.probe_size=60")


def test_attribution_experiment_agrees_with_retraining(tmp_path):
    session = open_session(make_config("experiment=attribution", *TINY, "retrain.batches=5",
                                       "retrain.samples=5"))
    session.out = tmp_path
    summary = attribution.run(session)
    for kind in ("batch", "sample"):
        assert summary["retrain"][kind]["n"] == 5
        assert summary["retrain"][kind]["spearman"] >= 0.8
        assert summary["retrain"][kind]["rel_err"] <= 0.1
    for name in ("attribution.csv", "samples.csv", "retrain.csv", "report.md", "retrain.png"):
        assert (tmp_path / name).is_file(), name
    assert "retrain" in json.loads((tmp_path / "summary.json").read_text())


def test_cleansing_experiment_finds_flipped_samples(tmp_path):
    session = open_session(make_config("experiment=cleansing", *TINY, "steps=40",
                                       "cleansing.noisy_nodes=1", "cleansing.flip=0.5",
                                       "cleansing.baseline_events=40", "cleansing.remove=[0.05]"))
    session.out = tmp_path
    summary = cleansing.run(session)
    assert summary["flipped"] > 0
    assert summary["auc"]["full_horizon"] > 0.7
    assert [r["method"] for r in summary["removal"]] == ["none", "top", "random"]
    for name in ("scores.csv", "removal.csv", "summary.json", "report.md", "cleansing.png"):
        assert (tmp_path / name).is_file(), name
    # the diagnostics describe the same scores the csv holds
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    helpful = sum(r["flipped"] == "True" and float(r["full_horizon"]) < 0 for r in rows)
    d = summary["diagnostics"]
    assert d["flipped_helpful"] == helpful
    assert sum(d["top_flipped_count"].values()) == summary["flipped"]
    assert [q["steps"] for q in d["quarters"]] == [[0, 10], [10, 20], [20, 30], [30, 40]]
    assert "Diagnostics" in (tmp_path / "report.md").read_text()


def test_quarter_totals_add_up_to_the_sample_totals():
    rng = np.random.default_rng(0)
    T, n, B = 10, 3, 4
    ids = np.stack([np.stack([rng.choice(np.arange(k * 6, k * 6 + 6), B, replace=False)
                              for k in range(n)]) for _ in range(T)])
    a = Attribution(settings=None, batch=np.zeros((T, 1, n)), samples=rng.normal(size=(T, n, B)),
                    sample_ids=ids, weights=np.ones((T, n, B)))
    uniq, _, _, value = a.sample_totals()
    parts = cleansing.quarter_totals(a)
    assert [(lo, hi) for lo, hi, _ in parts] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    np.testing.assert_allclose(sum(v for _, _, v in parts), value, rtol=1e-12, atol=1e-12)
    lo, hi, v = parts[1]  # one window alone: only the occurrences at steps 2, 3, 4
    mask = np.zeros((T, n, B), bool)
    mask[2:5] = True
    want = {int(i): 0.0 for i in uniq}
    for i, x in zip(ids[mask], a.samples[mask], strict=True):
        want[int(i)] += float(x)
    np.testing.assert_allclose(v, [want[int(i)] for i in uniq], rtol=1e-12, atol=1e-12)
