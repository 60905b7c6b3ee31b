"""Graph files a user gives (`topology=file`): where they are, whether one is an edge list,
its edges, and how many nodes it holds. dicesim.graph.topology builds W from them; the config
reads the node count when the user did not set nodes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from dicesim.common.errors import ConfigError

if TYPE_CHECKING:
    from dicesim.config import FileTopology

EDGE_SUFFIXES = (".txt", ".edges")  # always edge lists; a .csv is one when it has a header


def file_path(cfg: FileTopology) -> tuple[Path, str]:
    raw = cfg.path
    if raw is None or str(raw) in ("", "???"):
        raise ConfigError("topology.path is not set; pass topology.path=/path/to/W.npy "
                          "(a matrix) or an edge list (.txt)")
    path = Path(str(raw)).expanduser()
    where = f"topology.path={path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; pass the path of an existing .npy or .csv "
                          "matrix, or a .txt edge list")
    return path, where


def is_edge_list(path: Path) -> bool:
    """.txt/.edges files, and a .csv whose first line is a `src,dst[,weight]` header."""
    suffix = path.suffix.lower()
    if suffix in EDGE_SUFFIXES:
        return True
    if suffix != ".csv":
        return False
    try:
        with path.open(errors="replace") as f:
            first = next((line for line in f if line.strip() and not line.startswith("#")), "")
    except OSError:
        return False  # reading it as a matrix says why
    return first.strip().lower().startswith("src")


def file_nodes(cfg: FileTopology) -> int | None:
    """The node count a file topology gives (its matrix's size, or the largest node id of an
    edge list + 1); None when the file cannot be read (building it then says why)."""
    try:
        path, _ = file_path(cfg)
        if is_edge_list(path):
            edges, _ = read_edges(path, "")
            return int(edges.max()) + 1 if edges.size else None
        suffix = path.suffix.lower()
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        elif suffix == ".npz":
            shape = sparse.load_npz(path).shape
        elif suffix == ".csv":
            with path.open() as f:
                shape = (sum(1 for line in f if line.strip()),)
        else:
            return None
        return int(shape[-1]) if shape and shape[-1] > 0 else None
    except (ConfigError, ValueError, OSError, EOFError):
        return None


def infer_nodes(cfg: Any, overrides: Iterable[str]) -> None:
    """`topology=file` without `nodes=` on the command line: nodes is the file's size."""
    if cfg.topology.name != "file" or any(
            o.lstrip("+~").partition("=")[0] == "nodes" for o in overrides):
        return
    n = file_nodes(cfg.topology)
    if n is not None:
        cfg.nodes = n


def read_edges(path: Path, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(edges [E, 2] of (src, dst), weights [E] or None) from `src dst [weight]` lines
    (whitespace or commas; `#` comments and a `src,dst[,weight]` header skipped)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the edge list ({err.strerror})") from None
    pairs, weights = [], []
    width = 0  # 2 or 3 columns: every line as the first
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].replace(",", " ").split()
        if not text or (not pairs and text[0].lower() == "src"):
            continue
        width = width or len(text)
        try:
            if len(text) != width or width not in (2, 3):
                raise ValueError
            src, dst = int(text[0]), int(text[1])
            if src < 0 or dst < 0:
                raise ValueError
            if len(text) == 3:
                weights.append(float(text[2]))
        except ValueError:
            raise ConfigError(f"{where}: line {number} ({line.strip()[:40]!r}) is not "
                              "`src dst [weight]` with node ids >= 0 (every line with a "
                              "weight or none)") from None
        pairs.append((src, dst))
    edges = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return edges, (np.array(weights, dtype=np.float64) if weights else None)
