"""Pearson and Spearman correlation in numpy: what every run's alignment table needs,
without importing scipy.stats (about a second of start-up) for two formulas; the cascade's
per-hop totals."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1 … n, ties sharing the mean of the ranks they span (scipy's "average")."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]  # each run of equal values is [start, end)
    mean_rank = (starts + ends + 1) / 2.0  # mean of start+1 … end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Σ(a − ā)(b − b̄) / √(Σ(a − ā)² Σ(b − b̄)²); nan if either is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of the average ranks."""
    return pearson(average_ranks(a), average_ranks(b))


def hop_totals(rows: Sequence) -> dict[int, dict[str, float]]:
    """Mean over events of |Σ_k value| per hop s and estimator: the cascade's decay.
    `rows`: influence rows (InfluenceRow or anything with the same attributes)."""
    columns = ("dice_e", "dice_gt", "dice_mid", "dice_gauss2")
    per: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros(len(columns)))
    for r in rows:
        per[(r.event, r.hop)] += [math.nan if v is None else v
                                  for v in (getattr(r, c) for c in columns)]
    out: dict[int, dict[str, float]] = {}
    for hop in sorted({h for _, h in per}):
        vals = np.array([v for (_, h), v in per.items() if h == hop])
        means = np.mean(np.abs(vals), axis=0)
        out[hop] = {name: float(m) if np.isfinite(m) else None  # None: column switched off
                    for name, m in zip(("mean_abs_e", "mean_abs_gt", "mean_abs_mid",
                                        "mean_abs_gauss2"), means, strict=True)}
    return out
