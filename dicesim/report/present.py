"""What every experiment's report is made of: numbers for a reader, markdown tables, the
head and foot of report.md, and figure helpers (matplotlib is imported only when a figure
is drawn: `dicesim.report.plots` picks the Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicesim.run.provenance import provenance_lines

if TYPE_CHECKING:
    from dicesim.graph.topology import Topology


# ---- numbers and markdown --------------------------------------------------------------------
def fmt(value: object, spec: str = ".4g") -> str:
    """A number for a report: '–' for None and NaN, floats by `spec`, the rest as str."""
    if value is None:
        return "–"
    if isinstance(value, Real) and not isinstance(value, int):
        return "–" if math.isnan(value) else format(value, spec)
    return str(value)


def marks(flags: Mapping[str, bool], met: str = "met", missed: str = "missed") -> list[str]:
    """Markdown list lines for named targets."""
    return [f"- {name}: **{met if ok else missed}**" for name, ok in flags.items()]


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table: the header, its rule, one line per row (each cell as str; an
    empty cell is written `| |`)."""
    def line(cells: Iterable[object]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [line(header), "|---" * len(header) + "|", *map(line, rows)]


def report_head(title: str, summary: Mapping, *intro: str) -> list[str]:
    """The start of a report.md: its title, the provenance line, then `intro` lines."""
    return [f"# {title}", "", *provenance_lines(summary), *intro]


def footer(pictures: list[str], files: str) -> list[str]:
    """The end of every report.md: the pictures, then a line naming the run's files."""
    return [line for pic in pictures for line in (f"![{pic}]({pic})", "")] + [files, ""]


# ---- figures ---------------------------------------------------------------------------------
def save_figure(fig: Any, out: Path, name: str, dpi: int = 110) -> str:
    """Lay out, write out/<name> and free the figure; its name for the report."""
    from dicesim.report.plots import plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=dpi)
    plt.close(fig)
    return name


def grouped_bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
                 width: float = 0.8) -> None:
    """One bar per (group, series) side by side within `width`; None draws no bar."""
    step = width / len(series)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * step,
               [np.nan if v is None else v for v in values], step, label=label)
    ax.set_xticks(x, groups, fontsize=8)


def roc_curves(ax: Any, scores: Mapping[str, np.ndarray], positive: np.ndarray) -> None:
    """The ROC curve of each score (higher = more likely positive) and the chance line."""
    for name, score in scores.items():
        order = np.argsort(-score)
        tp = np.cumsum(positive[order]) / max(1, positive.sum())
        fp = np.cumsum(~positive[order]) / max(1, (~positive).sum())
        ax.plot(fp, tp, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate")


def graph_layout(topology: Topology) -> dict[int, tuple[float, float]]:
    """Node positions: circle for rings and exponential graphs, grid for the torus, hub in
    the middle."""
    import networkx as nx

    n = topology.n
    if topology.name == "hub":
        hub = int(np.argmax([topology.W(0)[:, k].sum() for k in range(n)]))
        leaves = [k for k in range(n) if k != hub]
        return nx.shell_layout(nx.empty_graph(n), [[hub], leaves])
    if topology.name == "torus":
        union = topology.support()
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        rows = next((d for d in divisors if _is_torus(union, d, n // d)), 1)
        cols = n // rows
        return {k: (k % cols, -(k // cols)) for k in range(n)}
    return nx.circular_layout(nx.empty_graph(n))


def _is_torus(union: np.ndarray, rows: int, cols: int) -> bool:
    """Whether node 0's neighbours are those of a rows × cols torus."""
    want = {(0 + 1) % cols, (cols - 1) % cols, cols % (rows * cols),
            ((rows - 1) * cols) % (rows * cols)} - {0}
    return set(np.flatnonzero(union[:, 0])) - {0} == want


def node_values_graph(fig: Any, ax: Any, topology: Topology, values: np.ndarray,
                      source: int | None, label: str) -> None:
    """The graph (union of its edges over time) with every node coloured by its value on a
    log scale (values ≤ 0 get the smallest colour); `source` ringed in red."""
    import networkx as nx
    from matplotlib.colors import LogNorm

    g = nx.Graph()
    g.add_nodes_from(range(topology.n))
    g.add_edges_from((int(a), int(b)) for a, b in zip(*np.nonzero(topology.support()),
                                                      strict=True) if a != b)
    pos = graph_layout(topology)
    positive = values[values > 0]
    lo = float(positive.min()) if len(positive) else 1e-12
    hi = float(values.max()) if len(positive) else 1.0
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.25, width=0.7)
    nodes = nx.draw_networkx_nodes(g, pos, ax=ax, node_color=np.where(values > 0, values, lo),
                                   cmap="viridis", node_size=260)
    nodes.set_norm(LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)))
    if source is not None:
        nx.draw_networkx_nodes(g, pos, nodelist=[source], ax=ax, node_color="none",
                               edgecolors="red", linewidths=2.5, node_size=420)
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=7, font_color="white")
    fig.colorbar(nodes, ax=ax, shrink=0.8, label=label)
    ax.axis("off")
