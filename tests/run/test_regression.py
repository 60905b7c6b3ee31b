"""Behaviour pinned across restructures: four fixed runs must write the numbers they wrote
when the expected files under tests/data/regression/ were recorded.

Compared: every CSV the run writes that the recording has, and every number in summary.json
except wall-clock timings and their ratios. Renamed columns and keys are mapped through
RENAMED.

Float32 sums depend on the CPU's kernels (torch picks them by instruction set and vendor), so
a recording is exact only on the platform it was made on:
- where tests/data/regression/<platform>/ exists (`platform()`, e.g. AVX512-AuthenticAMD),
  every cell must be byte-identical (as text) and every summary number equal;
- elsewhere the reference recording is compared within RTOL of each column's largest value
  (the run's own rounding, amplified over 200 steps, stays below 2e-5 of it; a changed
  formula or order of operations in a float64 run, or a changed row, does not).
`python tests/run/test_regression.py` records this platform's files; record the reference again
only for an intended change, and say why in the commit.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import run_dicesim  # noqa: E402

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "regression"
RTOL = 1e-4  # of a column's (or a summary number's) largest magnitude, off-platform only
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


def platform() -> str:
    """The CPU kernels' family: torch's instruction set level and the CPU vendor."""
    import torch

    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return f"{torch.backends.cpu.get_cpu_capability()}-{vendor}"


def expected_dir() -> tuple[Path, bool]:
    """This platform's recording (exact) or the reference one (within RTOL)."""
    own = RECORDINGS / platform()
    return (own, True) if own.is_dir() else (RECORDINGS / "reference", False)


def as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def scale(rows: list[dict[str, str]], column: str) -> float:
    values = [abs(v) for row in rows if (v := as_number(row[column])) is not None]
    return max(values, default=0.0)


def close(want: str, got: str, column_scale: float) -> bool:
    a, b = as_number(want), as_number(got)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return want == got
    return abs(a - b) <= RTOL * column_scale


def compare_csv(where: str, want: list[dict[str, str]], got: list[dict[str, str]],
                exact: bool) -> None:
    assert len(got) == len(want), f"{where}: {len(got)} rows, {len(want)} before"
    scales = {k: scale(want, k) for k in (want[0] if want else {})}
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        missing = [k for k in w if k not in g]
        assert not missing, f"{where}: columns {missing} are gone"
        diff = {k: (w[k], g[k]) for k in w
                if w[k] != g[k] and (exact or not close(w[k], g[k], scales[k]))}
        assert not diff, f"{where} row {i}: (before, now) {diff}"


def summary_close(key: str, want: float, got: float) -> bool:
    """Off-platform: within RTOL; a relative error of a near-exact estimator (1e-8) is the
    run's rounding itself, so those compare to within 1e-6."""
    return math.isclose(want, got, rel_tol=RTOL,
                        abs_tol=1e-6 if key.endswith("rel_err") else 1e-12)


@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_unchanged(name: str, tmp_path: Path) -> None:
    recording, exact = expected_dir()
    expected = recording / name
    out = run(name, tmp_path / "run")
    for csv_name in CSVS:
        if (expected / csv_name).exists():
            compare_csv(f"{name}/{csv_name}", read_rows(expected / csv_name),
                        read_rows(out / csv_name), exact)
    recorded = json.loads((expected / "summary_numbers.json").read_text())
    want = {".".join(RENAMED.get(p, p) for p in key.split(".")): v for key, v in recorded.items()}
    got = numbers(json.loads((out / "summary.json").read_text()))
    missing = sorted(set(want) - set(got))
    assert not missing, f"{name}/summary.json lost {missing}"
    diff = {k: (want[k], got[k]) for k in want if not k.startswith(REDEFINED) and want[k] != got[k]
            and (exact or not summary_close(k, want[k], got[k]))}
    assert not diff, f"{name}/summary.json: (before, now) {diff}"


def test_off_platform_comparison_catches_a_changed_value() -> None:
    want = [{"step": "0", "value": "0.5"}, {"step": "1", "value": "-2.0"}]
    compare_csv("t", want, [{"step": "0", "value": "0.50001"}, {"step": "1", "value": "-2.0"}],
                exact=False)
    for changed in ([{"step": "0", "value": "0.501"}, want[1]], [want[1], want[0]], want[:1]):
        with pytest.raises(AssertionError):
            compare_csv("t", want, changed, exact=False)
    with pytest.raises(AssertionError):
        compare_csv("t", want, [{"step": "0", "value": "0.50001"}, want[1]], exact=True)


def record() -> None:
    import tempfile

    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(name, Path(tmp) / "run")
            target = RECORDINGS / platform() / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for csv_name in CSVS:
                if (out / csv_name).exists():
                    shutil.copy(out / csv_name, target / csv_name)
            summary = numbers(json.loads((out / "summary.json").read_text()))
            (target / "summary_numbers.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"recorded {name} for {platform()}")


if __name__ == "__main__":
    record()
