"""`make alignment`: the config composes and a tiny case aligns DICE-E with DICE-GT."""

from __future__ import annotations

import json

from conftest import make_config

from dicesim.cli import open_session
from dicesim.experiments import alignment

TINY = ("experiment=alignment", "nodes=6", "steps=12", "batch_size=8", "model.hidden=[16]",
        "data.probe_size=60", "influence.events=20", "alignment.precision.events=6",
        "alignment.precision.hops=3", "alignment.min_spearman=0.95",
        "alignment.core=[{topology:ring,lr:0.05,hops:2,removal:batch,check:true},"
        "{topology:ring,lr:0.05,hops:2,removal:single,check:true},"
        "{topology:ring,lr:0.05,hops:2,removal:batch,curvature:false}]",
        "alignment.hard=[{topology:ring,lr:0.3,hops:2,removal:batch}]",
        "alignment.mid_min_spearman=[{lr:0.2,min:0.9}]")


def test_config_composes_with_the_issue_3_cases():
    cfg = make_config("experiment=alignment")
    assert cfg.driver == "alignment" and cfg.nodes == 16 and cfg.batch_size == 32
    assert cfg.dtype == "float32" and cfg.influence.events == 200
    assert list(cfg.model.hidden) == [64] and cfg.model.activation == "tanh"
    labels = [c.label for c in alignment.cases_of(cfg, "core")]
    assert "exponential/lr0.2/r8/batch/no-curvature" in labels
    assert len(alignment.cases_of(cfg, "sweep")) == 5 * 2 * 2 * 2 * 2


def test_tiny_alignment_run(tmp_path):
    cfg = make_config(*TINY)
    session = open_session(cfg)
    session.out = tmp_path
    summary = alignment.run(session)
    batch, single, no_curv, hard = summary["cases"]
    for case in (batch, single):
        assert case["alignment"]["hop_1"]["spearman"] >= 0.95
        assert case["alignment"]["hop_1"]["rel_err"] < 0.05
        # the midpoint rule is never worse than the first-order estimator here
        for view, block in case["alignment_mid"].items():
            assert block["rel_err"] <= case["alignment"][view]["rel_err"]
    assert hard["set"] == "hard" and hard["lr"] == 0.3
    assert hard["alignment_mid"]["all"]["rel_err"] < hard["alignment"]["all"]["rel_err"]
    assert set(summary["targets"]["midpoint"]) == {batch["label"], single["label"],
                                                   hard["label"], hard["label"] + " (dice_gauss2)"}
    # the two-point rule on the hard case: closer to G than the midpoint in every view
    for view, block in hard["alignment_gauss2"].items():
        assert block["rel_err"] < hard["alignment_mid"][view]["rel_err"], view
    assert summary["targets"]["all_pass"], summary["targets"]
    assert summary["calibration"]["n"] > 10
    assert no_curv["label"] in summary["targets"]["curvature_gap"]
    # hop 0 and hop 1 do not depend on the curvature factor: identical numbers
    assert no_curv["alignment"]["hop_1"] == batch["alignment"]["hop_1"]
    # float32 ground truth agrees with float64's far better than E agrees with G
    for hop in summary["precision"]["by_hop"].values():
        assert hop["gt_noise"] < 0.1 * hop["rel_err_float64"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["targets"] == summary["targets"]
    for name in ("alignment.csv", "report.md", "scatter.png", "spearman_vs_hop.png",
                 "calibration.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "cases" / "ring__lr0.05__r2__single" / "influence.csv").is_file()


def test_optimizer_cases_carry_the_state_and_the_ablation_loses_it(tmp_path):
    """alignment.sweep=optimizers: momentum with its state perturbation tracks GT; the
    ablation that drops δ̂s is measurably worse beyond hop 0 (and equal at hop 0)."""
    cfg = make_config(*TINY, "alignment.sweep=optimizers", "plots=false",
                      "alignment.optimizers=[{label:momentum,optim:{momentum:0.9},"
                      "topology:ring,lr:0.05,hops:3,check:true},"
                      "{label:adamw,optim:{name:adamw,weight_decay:0.01},topology:ring,"
                      "lr:0.001,hops:2}]")
    session = open_session(cfg)
    session.out = tmp_path
    summary = alignment.run(session)
    momentum, adamw = summary["cases"]
    assert momentum["set"] == adamw["set"] == "optimizers"
    assert summary["targets"]["checked"][momentum["label"]]["pass"]
    for case in (momentum, adamw):
        e, nostate = case["alignment"], case["alignment_nostate"]
        assert nostate["hop_0"] == e["hop_0"]
        assert nostate["all"]["rel_err"] > 5 * e["all"]["rel_err"]
    report = (tmp_path / "report.md").read_text()
    assert "## Stateful optimizers" in report and "momentum/ring/lr0.05/r3/batch" in report


def test_one_parser_reads_every_set_as_the_preset_means_it():
    cfg = make_config("experiment=alignment", "alignment.sweep=full")
    (hard, *_) = alignment.cases_of(cfg, "hard")
    assert hard == alignment.Case("fashion_mnist/ring/lr0.2/r3/batch", "ring", 0.2, 32, 16,
                                  "batch", 3, True, 200, 80, "float32", False, "hard",
                                  "fashion_mnist")
    (momentum, *_) = alignment.cases_of(cfg, "optimizers")
    assert momentum.label == "momentum/ring/lr0.05/r3/batch" and momentum.check
    assert momentum.optim == {"momentum": 0.9}
    sweep = alignment.cases_of(cfg, "sweep")
    assert sweep[0] == alignment.Case("ring/lr0.1/b16/n16/r3/batch/curvature", "ring", 0.1, 16,
                                      16, "batch", 3, True, 100, 60, "float32", False, "sweep")
    assert sweep[1].label == "ring/lr0.1/b16/n16/r3/batch/no-curvature"
    f32, f64 = alignment.cases_of(cfg, "precision")
    assert f32 == alignment.Case("precision/ring/lr0.05/r8/single/float32", "ring", 0.05, 32,
                                 16, "single", 8, True, 200, 80, "float32", False, "precision")
    assert f64.label.endswith("/float64") and f64.dtype == "float64"
    assert all(c.optim is None for c in [hard, *sweep, f32, f64])
    assert alignment.cases_of(make_config("experiment=alignment",
                                          "alignment.precision.enabled=false"), "precision") == []


def test_every_list_honours_the_keys_a_case_gives():
    cfg = make_config("experiment=alignment", "alignment.hard=[{topology:ring,lr:0.3,hops:2,"
                      "dtype:float64,curvature:false,check:true,label:x,steps:5}]",
                      "alignment.core=[{topology:hub,lr:0.1,hops:1,optim:{momentum:0.5}}]")
    (hard,) = alignment.cases_of(cfg, "hard")
    assert (hard.label, hard.dtype, hard.curvature, hard.check) == (
        "x/ring/lr0.3/r2/batch", "float64", False, True)
    assert hard.steps == 5 and hard.optim is None
    (core,) = alignment.cases_of(cfg, "core")
    assert core.label == "hub/lr0.1/r1/batch" and core.optim == {"momentum": 0.5}
    assert "dice_e_nostate" in alignment.case_config(cfg, core).influence.estimators
