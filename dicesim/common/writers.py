"""Files written whole or not at all: a temporary name beside the target, then a rename."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def temp_path(path: Path) -> Path:
    """A temporary name next to `path`, unique to this process (.NAME.PID.tmp)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    tmp = temp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def strict(value: object, where: str = "", found: list[str] | None = None) -> object:
    """`value` with every NaN/±Infinity float replaced by None; their JSON paths are
    appended to `found` (e.g. "final.probe_loss", "alignment.all.pearson")."""
    if isinstance(value, dict):
        return {k: strict(v, f"{where}.{k}" if where else str(k), found)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        if found is not None:
            found.append(where)
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: Path, obj: dict) -> dict:
    """Write strictly valid JSON (no bare NaN/Infinity): non-finite numbers become null
    and, if there were any, their paths are listed under "nonfinite". Returns what was
    written."""
    found: list[str] = []
    clean = strict(obj, "", found)
    if found:
        clean["nonfinite"] = sorted(set(clean.get("nonfinite") or []) | set(found))
    write_atomic(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return clean


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    tmp = temp_path(path)
    with tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(columns)
        for row in rows:
            out.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v))
                          else f"{v:.10g}" if isinstance(v, float) else v for v in row])
    os.replace(tmp, path)
