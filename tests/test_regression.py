"""Behaviour pinned across restructures: four fixed runs must write the numbers they wrote
when the expected files under tests/data/regression/ were recorded (`python
tests/test_regression.py` records them again; do that only for an intended change, and say
why in the commit).

Compared: every CSV the run writes that the recording has (cell for cell, as text, so
byte-identical values), and every number in summary.json except wall-clock timings and
their ratios.
Renamed columns and keys are mapped through RENAMED.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_dicesim  # noqa: E402

EXPECTED = Path(__file__).resolve().parent / "data" / "regression"
TWO_POINT = "dice_gauss2"  # the two-point (Gauss) rule's estimator name
ESTIMATORS = f"influence.estimators=[dice_e,dice_mid,{TWO_POINT}]"
RENAMED = {"dice_mid2": "dice_gauss2"}  # recorded column or summary key: its name today
# summary keys whose definition changed on purpose since the recording: the reliability
# share ρ = Σ|M − dice_e| / Σ|M| is measured against M = dice_gauss2 (the accurate column)
# where it was dice_mid
REDEFINED = ("reliability.second_order_share.", "reliability.max")
TIMINGS = ("node_steps_per_s", "gossip_share", "gossip_cpu_share", "timings_s", "cost_ratio")


def is_timing(key: str) -> bool:
    return key in TIMINGS or key.endswith("wall_s")

RUNS: dict[str, tuple[int, tuple[str, ...]]] = {  # name: (ranks, overrides)
    "demo": (0, (ESTIMATORS,)),
    "ranks2_proximal_attack": (2, (
        "nodes=8", "steps=40", "influence.proximal=true", "attack=label_flip",
        "influence.events=10", "influence.hops=2", ESTIMATORS)),
    "momentum_cosine_gt": (0, (
        "optim=momentum", "optim.lr=0.05", "optim.schedule=cosine", "nodes=8", "steps=60",
        "influence.events=12", "influence.hops=2", "influence.ground_truth=true", ESTIMATORS)),
    "attribution": (0, ("attribution.enabled=true", "nodes=8", "steps=40",
                        "influence.events=0")),
}
CSVS = ("metrics.csv", "influence.csv", "proximal.csv", "attribution.csv", "samples.csv")


def numbers(tree: object, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON tree by its dotted path, timings left out."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if is_timing(key):
                continue
            out.update(numbers(value, f"{prefix}{RENAMED.get(key, key)}."))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            out.update(numbers(value, f"{prefix}{i}."))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        out[prefix[:-1]] = tree
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [{RENAMED.get(k, k): v for k, v in row.items()} for row in csv.DictReader(f)]


def run(name: str, out: Path) -> Path:
    ranks, overrides = RUNS[name]
    run_dicesim(out, *overrides, ranks=ranks, timeout=300)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_unchanged(name: str, tmp_path: Path) -> None:
    expected = EXPECTED / name
    out = run(name, tmp_path / "run")
    for csv_name in CSVS:
        if not (expected / csv_name).exists():
            continue
        want, got = read_rows(expected / csv_name), read_rows(out / csv_name)
        assert len(got) == len(want), f"{name}/{csv_name}: {len(got)} rows, {len(want)} before"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            missing = [k for k in w if k not in g]
            assert not missing, f"{name}/{csv_name}: columns {missing} are gone"
            diff = {k: (w[k], g[k]) for k in w if w[k] != g[k]}
            assert not diff, f"{name}/{csv_name} row {i}: (before, now) {diff}"
    recorded = json.loads((expected / "summary_numbers.json").read_text())
    want = {".".join(RENAMED.get(p, p) for p in key.split(".")): v for key, v in recorded.items()}
    got = numbers(json.loads((out / "summary.json").read_text()))
    missing = sorted(set(want) - set(got))
    assert not missing, f"{name}/summary.json lost {missing}"
    diff = {k: (want[k], got[k]) for k in want
            if want[k] != got[k] and not k.startswith(REDEFINED)}
    assert not diff, f"{name}/summary.json: (before, now) {diff}"


def record() -> None:
    import tempfile

    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(name, Path(tmp) / "run")
            target = EXPECTED / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for csv_name in CSVS:
                if (out / csv_name).exists():
                    shutil.copy(out / csv_name, target / csv_name)
            summary = numbers(json.loads((out / "summary.json").read_text()))
            (target / "summary_numbers.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"recorded {name}")


if __name__ == "__main__":
    record()
