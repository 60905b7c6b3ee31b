"""numpy index helpers shared by the components that read CSR rows and flat blocks."""

from __future__ import annotations

import numpy as np


def spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions start_i, …, start_i + length_i − 1 of every span i, concatenated (the
    entries of CSR rows i from indptr[i] and their counts, or nodes' slices of a flat array)."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total)
