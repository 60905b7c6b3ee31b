from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dicesim.config import compose

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


# the CPU path, pinned wherever a test means it: with device=auto a GPU host would put
# rank 0 on its GPU and refuse rank 1 ("local rank 1 has no GPU") or, with two GPUs, run
# NCCL where the test expects gloo's messages
CPU_PATH = ("device=cpu", "backend=gloo")


def pytest_collection_modifyitems(config, items) -> None:
    """`@pytest.mark.gpu` (or `gpu(2)`: that many GPUs) tests skip, saying why, on a host
    without enough CUDA devices."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = marker.args[0] if marker.args else 1
        if visible < needed:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {needed} CUDA GPU(s), {visible} visible"))


def make_config(*overrides: str):
    """The typed settings, composed as `python -m dicesim <overrides>` would."""
    return compose(overrides, quiet=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicesim_command(ranks: int = 0) -> list[str]:
    """`python -m dicesim` (ranks=0) or plain torchrun with `ranks` local processes, on the
    CPU path (a later device=/backend= override wins)."""
    if ranks:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                f"--nproc_per_node={ranks}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "dicesim", *CPU_PATH]
    return [sys.executable, "-m", "dicesim", *CPU_PATH]


def run_dicesim(out: Path, *overrides: str, ranks: int = 0, timeout: float = 240,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dicesim` (ranks=0) or torchrun with `ranks` processes, writing to out."""
    cmd = [*dicesim_command(ranks), *overrides, f"out_dir={out}", "progress=false",
           "plots=false"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def execute(*overrides: str):
    """(Simulation, RunResult) of the real config in this process, metrics every step."""
    import torch

    from dicesim.comm.exchange import Comm
    from dicesim.run.engine import Simulation

    sim = Simulation(make_config(*overrides, "progress=false", "eval_every=1"))
    return sim, sim.execute(Comm("gloo", 60, torch.device("cpu")))


def events_arg(events: list[dict]) -> str:
    """influence.events=[...] from {node, step, samples: all | k | [ids]} dicts."""
    items = []
    for e in events:
        samples = e.get("samples", "all")
        samples = f"[{','.join(map(str, samples))}]" if isinstance(samples, list) else samples
        items.append(f"{{node:{e['node']},step:{e['step']},samples:{samples}}}")
    return "influence.events=[" + ",".join(items) + "]"


def probe_losses(result):
    """L'_k(θ_k^t) of a RunResult's metrics as a [steps + 1, nodes] array."""
    import numpy as np

    steps = max(r.step for r in result.metrics) + 1
    nodes = max(r.node for r in result.metrics) + 1
    out = np.zeros((steps, nodes))
    for r in result.metrics:
        out[r.step, r.node] = r.probe_loss
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tiny() -> tuple[str, ...]:
    """Overrides of a fast float64 run used across tests."""
    return ("nodes=4", "steps=6", "batch_size=8", "dtype=float64", "model.hidden=[8]",
            "data.probe_size=40", "eval_every=1", "influence.events=0")


def assert_same_run(out: Path, single, columns: tuple[str, ...] = ("dice_e", "dice_gt"),
                    rows_rtol: float = 1e-9) -> None:
    """The run written to `out` (another number of ranks, save_params=true) equals the
    in-process RunResult `single` (float64 runs): probe losses and final θ to 1e-9, proximal
    rows and the influence columns to rows_rtol."""
    rtol = 1e-9
    import numpy as np
    import torch

    losses = {(int(r["step"]), int(r["node"])): float(r["probe_loss"])
              for r in read_csv(out / "metrics.csv")}
    assert len(losses) == len(single.metrics)
    for step, node, _, probe_loss, *_ in single.metrics:
        np.testing.assert_allclose(losses[(step, node)], probe_loss, rtol=rtol)
    torch.testing.assert_close(torch.load(out / "params.pt"), single.final_params,
                               rtol=rtol, atol=1e-12)
    if (out / "proximal.csv").exists():
        prox = {(int(r["step"]), int(r["sender"]), int(r["receiver"])): float(r["value"])
                for r in read_csv(out / "proximal.csv")}
        assert len(prox) == len(single.proximal)
        for row in single.proximal:
            np.testing.assert_allclose(prox[(row.step, row.sender, row.receiver)], row.value,
                                       rtol=rows_rtol, atol=1e-15)
    got = {(int(r["event"]), int(r["hop"]), int(r["node"])): [float(r[c]) for c in columns]
           for r in read_csv(out / "influence.csv")}
    assert len(got) == len(single.influence) > 0
    for row in single.influence:
        np.testing.assert_allclose(got[(row.event, row.hop, row.node)],
                                   [getattr(row, c) for c in columns], rtol=rows_rtol,
                                   atol=1e-15)
