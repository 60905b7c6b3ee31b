"""Pearson and Spearman correlation in numpy: what every run's alignment table needs,
without importing scipy.stats (about a second of start-up) for two formulas."""

from __future__ import annotations

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
