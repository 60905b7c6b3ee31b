"""What a run's outputs say about where they came from and how the run was set up: the
versions and git commit (summary.json "provenance"), the resolved optimizer, partition and
topology (summary.json, report.md, the run's first console line) and the per-node class
counts of the partition (partition.csv)."""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicesim.common.writers import write_csv

if TYPE_CHECKING:
    from dicesim.run.engine import Simulation

PACKAGE_DIR = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 3.0
#: topologies whose weights are their own (hub) or the file's, not topology.weights
OWN_WEIGHTS = {"hub": "its own weights", "file": "weights from the file"}


def _git(*args: str) -> str | None:
    """`git -C <dicesim's source directory> args…`'s output, or None when git is missing,
    fails or takes longer than GIT_TIMEOUT_S."""
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout dicesim runs from; (None, None) where the package
    is not a tracked file of a git checkout (an installed wheel, no git). Dirty = a tracked
    file differs from the commit (untracked files do not count)."""
    if not _git("ls-files", "--error-unmatch", "--", "__init__.py"):
        return None, None  # not a checkout, or one that does not track this package
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return commit, None if changes is None else bool(changes)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def provenance() -> dict:
    """summary.json's "provenance" block; git runs once per process (rank 0 only calls it)."""
    import torch

    commit, dirty = git_state()
    return {"dicesim": _version("dicesim"), "git_commit": commit, "git_dirty": dirty,
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def provenance_line(block: dict) -> str:
    """The provenance block as one report.md line."""
    commit = block.get("git_commit")
    where = "not run from a git checkout" if commit is None else (
        f"git commit {commit}" + (" with uncommitted changes" if block.get("git_dirty") else ""))
    return (f"dicesim {block.get('dicesim') or '(version unknown)'}, {where}; torch "
            f"{block.get('torch')}, numpy {block.get('numpy')}, Python {block.get('python')}.")


# ---- the resolved settings -----------------------------------------------------------------
def optimizer_block(sim: Simulation) -> dict:
    """Every field of the resolved local optimizer (dicesim/optimsettings.py)."""
    settings = asdict(sim.optim)
    settings["betas"] = list(settings["betas"])
    return settings


def partition_block(sim: Simulation) -> dict:
    data = sim.cfg.data
    kind = str(data.partition)
    extra = ({"alpha": float(data.alpha)} if kind == "dirichlet" else
             {"classes_per_node": int(data.classes_per_node)} if kind == "label_skew" else {})
    return {"kind": kind, **extra}


def topology_weights(sim: Simulation) -> str:
    from dicesim.graph.topology import is_edge_list

    name = sim.topology.name
    if name == "file" and is_edge_list(Path(str(sim.cfg.topology.path)).expanduser()):
        return f"{sim.cfg.topology.weights} from the edge list"
    return OWN_WEIGHTS.get(name) or str(sim.cfg.topology.weights)


def resolved(sim: Simulation) -> dict:
    """The settings a reader needs to know what was run, as summary.json keys."""
    return {"optimizer": optimizer_block(sim), "partition": partition_block(sim),
            "topology_weights": topology_weights(sim), "batch_size": sim.run.batch_size}


def describe_optimizer(sim: Simulation) -> str:
    """e.g. "sgd lr 0.05 (constant)", "sgd momentum 0.9 (nesterov) lr 0.05 (cosine to 0)",
    "adamw lr 0.001 betas 0.9/0.999 weight decay 0.01 (constant)"."""
    o = sim.optim
    words = [o.name]
    if o.momentum:
        words.append(f"momentum {o.momentum:g}" + (" (nesterov)" if o.nesterov else ""))
    words.append(f"lr {o.lr:g}")
    if o.name != "sgd":
        words.append(f"betas {o.betas[0]:g}/{o.betas[1]:g}")
    if o.weight_decay:
        words.append(f"weight decay {o.weight_decay:g}")
    if o.gossip_state:
        words.append("state gossiped")
    schedule = {
        "constant": "constant",
        "cosine": f"cosine to {o.min_lr:g}",
        "step": f"× {o.gamma:g} every {o.step_size} steps",
        "linear_warmup_cosine": f"{o.warmup_steps} warm-up steps, then cosine to {o.min_lr:g}",
    }.get(o.schedule, o.schedule)
    return " ".join(words) + f" ({schedule})"


def describe_partition(sim: Simulation) -> str:
    block = partition_block(sim)
    if "classes_per_node" in block:
        return f"{block['kind']} c={block['classes_per_node']}"
    return block["kind"] + (f" α={block['alpha']:g}" if "alpha" in block else "")


def headline(sim: Simulation) -> str:
    """The run's first console line (without the "dicesim: " prefix), e.g. "16 nodes, ring
    (uniform), digits iid, sgd lr 0.05 (constant), 200 steps, batch 32"."""
    s = sim.run
    return (f"{s.nodes} nodes, {sim.topology.name} ({topology_weights(sim)}), {sim.data.name} "
            f"{describe_partition(sim)}, {describe_optimizer(sim)}, {s.steps} steps, batch "
            f"{s.batch_size}")


# ---- partition.csv -------------------------------------------------------------------------
def partition_columns(classes: int) -> tuple[str, ...]:
    return ("node", "samples", *(f"class_{c}" for c in range(classes)))


def partition_rows(sim: Simulation) -> list[Sequence[int]]:
    """Per node: its training samples (after any per-node probe hold-out) and, for class
    labels, how many of them are of each class as the data set labels them: before
    data.label_noise and before an attack relabels anything."""
    classes = sim.data.num_classes
    rows: list[Sequence[int]] = []
    for node, ids in enumerate(sim.parts):
        counts = [] if not classes else np.bincount(
            sim.assigned_labels[ids], minlength=classes).tolist()
        rows.append((node, len(ids), *counts))
    return rows


def write_partition(out: Path, sim: Simulation) -> None:
    write_csv(out / "partition.csv", partition_columns(sim.data.num_classes),
              partition_rows(sim))


def stamped(summary: dict) -> dict:
    """An experiment's summary with the provenance block added (rank 0, before writing)."""
    summary["provenance"] = provenance()
    return summary


def provenance_lines(summary: dict) -> list[str]:
    """report.md lines under the title: the provenance line and a blank, if known."""
    block = summary.get("provenance")
    return [provenance_line(block), ""] if block else []
