"""influence.estimators: the default [dice_e, dice_gauss2], the old name dice_mid2 (mapped to
dice_gauss2 with one line), and the reliability warning naming the accurate column."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import execute, make_config, read_csv, run_dicesim

from dicesim import config
from dicesim.influence.events import InfluenceRow
from dicesim.report.summary import reliability
from dicesim.run.engine import DEFAULT_ESTIMATORS

SMALL = ("data=synthetic_regression", "model=linear", "dtype=float64", "nodes=4",
         "batch_size=8", "steps=6", "optim.lr=0.05", "data.probe_size=50", "influence.hops=3",
         "influence.events=[{node:0,step:1},{node:2,step:2,samples:3}]")
NOTE = ("dicesim: influence.estimators: dice_mid2 is now dice_gauss2 (the old name is "
        "accepted until the next release)")


def test_the_default_is_dice_e_and_the_two_point_rule():
    want = ["dice_e", "dice_gauss2"]
    assert config.Influence().estimators == want
    assert list(make_config().influence.estimators) == want  # configs/influence/default.yaml
    assert list(DEFAULT_ESTIMATORS) == want
    _, result = execute(*SMALL)
    assert all(r.dice_e is not None and r.dice_gauss2 is not None and r.dice_mid is None
               for r in result.influence)


def test_the_old_name_runs_the_two_point_rule_and_says_so_once(tmp_path):
    proc = run_dicesim(tmp_path, *SMALL, "influence.estimators=[dice_e,dice_mid2]")
    assert [line for line in proc.stderr.splitlines() if "dice_mid2" in line] == [NOTE]
    assert "dice_mid2" not in proc.stdout
    rows = read_csv(tmp_path / "influence.csv")
    assert "dice_mid2" not in rows[0] and "dice_mid2" not in (tmp_path / "config.yaml").read_text()
    _, new = execute(*SMALL, "influence.estimators=[dice_e,dice_gauss2]")
    by_key = {(r.event, r.hop, r.node): r.dice_gauss2 for r in new.influence}
    assert len(rows) == len(by_key) > 10
    for row in rows:
        key = (int(row["event"]), int(row["hop"]), int(row["node"]))
        np.testing.assert_allclose(float(row["dice_gauss2"]), by_key[key], rtol=1e-9, atol=0)


@pytest.fixture
def fresh_notes(monkeypatch):
    monkeypatch.setattr(config, "_ANNOUNCED_RENAMES", set())


def test_the_rename_is_said_once_per_process_and_only_on_rank_0(fresh_notes, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("RANK", "1")
    assert config.renamed_estimators(["dice_mid2", "dice_e"]) == ["dice_gauss2", "dice_e"]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(config, "_ANNOUNCED_RENAMES", set())
    monkeypatch.setenv("RANK", "0")
    for _ in range(2):
        assert config.renamed_estimators(["dice_mid2"]) == ["dice_gauss2"]
    assert capsys.readouterr().err == NOTE + "\n"
    assert config.renamed_estimators(["dice_mid", "dice_e"]) == ["dice_mid", "dice_e"]


def test_the_old_name_is_accepted_by_the_validated_config(fresh_notes):
    cfg = make_config("influence.estimators=[dice_mid2,dice_e]")  # composed and loaded
    assert list(cfg.influence.estimators) == ["dice_gauss2", "dice_e"]


def _rows(e: list[float], accurate: list[float], column: str) -> list[InfluenceRow]:
    return [InfluenceRow(0, 0, 0, 1, hop, hop, ve, None, **{column: va})
            for hop, (ve, va) in enumerate(zip(e, accurate, strict=True))]


@pytest.mark.parametrize("column", ["dice_gauss2", "dice_mid"])
def test_the_warning_judges_and_names_the_accurate_column(column):
    """ρ = Σ|A − E| / Σ|A| per view with A the accurate column; one view at 0.2 warns."""
    rel = reliability(_rows([1.0, 0.8], [1.0, 1.0], column))
    assert rel["accurate"] == column
    assert rel["second_order_share"]["hop_1"] == pytest.approx(0.2)
    assert rel["second_order_share"]["all"] == pytest.approx(0.1)
    assert f"use the {column} column" in rel["warning"]


def test_dice_gauss2_is_preferred_over_dice_mid():
    rows = [r._replace(dice_mid=2 * r.dice_gauss2)
            for r in _rows([1.0, 1.0], [1.0, 1.0], "dice_gauss2")]
    rel = reliability(rows)  # against dice_gauss2: no gap; against dice_mid it would be ½
    assert rel["accurate"] == "dice_gauss2" and rel["max"] == 0 and rel["warning"] is None


def test_a_run_written_under_the_old_name_has_the_same_result_settings():
    from dicesim.run.checkpoint import result_settings

    old = result_settings({"influence": {"estimators": ["dice_e", "dice_mid2"], "hops": 2}})
    new = result_settings({"influence": {"estimators": ["dice_e", "dice_gauss2"], "hops": 2}})
    assert old == new
    assert old != result_settings({"influence": {"estimators": ["dice_e", "dice_mid"],
                                                 "hops": 2}})
