"""`make attribution` and `make cleansing`: the drivers run end to end on tiny settings."""

from __future__ import annotations

import json

from conftest import make_config

from dicesim.cli import open_session
from dicesim.experiments import attribution, cleansing

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
