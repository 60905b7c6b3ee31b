"""The CUDA/NCCL path, checked on the CPU where it can be (docs/running.md, "GPUs"): every
loaded state on the rank's device, refused device/backend pairings, the GPU of each local
rank, NCCL's blocking wait and device_id, the exchange's cached indices and send buffers,
the step clock's synchronization, TF32 off. The `gpu`-marked tests need a CUDA device."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_config

from dicesim.comm import exchange as comm_module
from dicesim.comm.exchange import Channel, Comm, Layout, route
from dicesim.common.errors import ConfigError
from dicesim.common.stopping import SIGNALS
from dicesim.run.checkpoint import Checkpoints, complete
from dicesim.run.engine import Simulation, build_trainer, configure_device, gpu_index
from dicesim.run.trainer import StepClock

# momentum (optimizer state), proximal influence (its received updates), events with ground
# truth and both estimators (tracker rows), attribution (the keeper's θ^t), a defense with
# state, and a time-varying topology
TRACKED = ("nodes=4", "steps=6", "batch_size=8", "model.hidden=[8]", "data.probe_size=40",
           "dtype=float64", "optim=momentum", "influence.proximal=true", "influence.events=3",
           "influence.hops=2", "influence.ground_truth=true", "attribution.enabled=true",
           "topology=one_peer_exponential",
           "progress=false", "plots=false", "eval_every=1")


# ---- device and backend -----------------------------------------------------------------------
@pytest.mark.parametrize(("pair", "named"), [(("device=cuda", "backend=gloo"), "backend=gloo"),
                                             (("device=cpu", "backend=nccl"), "backend=nccl")])
def test_a_device_the_backend_cannot_carry_is_one_line(pair, named):
    with pytest.raises(ConfigError) as err:
        make_config(*pair)
    assert "\n" not in str(err.value) and named in str(err.value)


def test_each_local_rank_gets_its_gpu():
    assert [gpu_index(r, 4, visible="") for r in range(4)] == [0, 1, 2, 3]
    # srun --gpus-per-task=1: each rank sees one device, its own, as device 0
    assert gpu_index(3, 1, visible="5") == 0
    with pytest.raises(ConfigError, match="local rank 1 has no GPU"):
        gpu_index(1, 1, visible="0,1")  # one GPU for two ranks: refused
    with pytest.raises(ConfigError, match="local rank 2 has no GPU"):
        gpu_index(2, 2, visible="")


def test_tf32_is_off_on_cuda_unless_allowed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
        configure_device(torch.device("cuda", 0), allow_tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
        configure_device(torch.device("cuda", 0), allow_tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


# ---- the process group ------------------------------------------------------------------------
def test_nccl_waits_block_and_the_group_knows_its_gpu(monkeypatch):
    """Under NCCL a dead peer must raise in wait() (blocking wait), not hang the host until
    the watchdog's SIGABRT; device_id binds the group to the rank's GPU."""
    calls = {}
    # the group below is never closed: its signal agreement must not outlive the test
    monkeypatch.setattr(SIGNALS, "agree", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for key in comm_module.NCCL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(comm_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(comm_module.dist, "init_process_group",
                        lambda **kw: calls.update(kw, env={k: os.environ.get(k) for k in
                                                           comm_module.NCCL_ENV}))
    monkeypatch.setattr(comm_module.dist, "new_group", lambda *a: "group")
    monkeypatch.setattr(comm_module.dist, "all_gather_object", lambda out, obj, group: None)
    Comm("nccl", 60, torch.device("cuda", 0))
    assert calls["device_id"] == torch.device("cuda", 0)
    assert calls["env"]["TORCH_NCCL_BLOCKING_WAIT"] == "1"


# ---- the exchange -----------------------------------------------------------------------------
class FakeWork:
    def wait(self) -> None:
        pass


def test_exchange_indices_are_cached_and_send_buffers_live_until_wait(monkeypatch):
    """Two ranks of a directed ring of 8 nodes, rank 0's side, the peer's buffer made by
    hand: `available` equals the boolean-mask assembly's own and received rows, a channel
    over every node reuses its index tensors from step to step, and each send buffer is
    held until wait()."""
    n, world = 8, 2
    W = make_config("nodes=8", "topology=directed_ring")  # for its topology settings
    from dicesim.graph.topology import build_topology

    Wt = build_topology(W.topology, n, 0).W_sparse(0)
    lay = Layout(n, world, 0)
    r = route(Wt, lay)
    ops = []
    monkeypatch.setattr(comm_module.dist, "P2POp",
                        lambda op, tensor, peer, group: SimpleNamespace(op=op, tensor=tensor,
                                                                        peer=peer))
    monkeypatch.setattr(comm_module.dist, "batch_isend_irecv",
                        lambda batch: ops.extend(batch) or [FakeWork() for _ in batch])
    comm = Comm.__new__(Comm)
    comm.world, comm.rank, comm.device, comm.group = world, 0, torch.device("cpu"), None
    comm.exchanges = 0
    comm.guard = SimpleNamespace()
    every = np.arange(n)
    some = np.array([1, 3, 6, 7])  # a tracker's channel over some nodes
    rows = torch.arange(4 * 3, dtype=torch.float64).view(4, 3) + 1
    few = torch.tensor([[10.0, 20.0], [30.0, 40.0]], dtype=torch.float64)  # nodes 1, 3
    channels = [Channel(every, rows.clone()), Channel(some, few.clone())]
    pending = comm.post(lay, channels, r)
    sends = [op for op in ops if op.op is comm_module.dist.isend]
    assert sends and all(any(op.tensor is b for b in pending.sent) for op in sends)
    index_before = dict(r.indices)
    for peer, buf in pending.received.items():  # the peer's rows: 100 + node id
        mask_every, mask_some = r.recv[peer][every], r.recv[peer][some]
        parts = [torch.full((int(mask_every.sum()), 3), 0.0, dtype=torch.float64)
                 + 100 + torch.as_tensor(every[mask_every])[:, None],
                 torch.full((int(mask_some.sum()), 2), 0.0, dtype=torch.float64)
                 + 100 + torch.as_tensor(some[mask_some])[:, None]]
        buf.copy_(torch.cat([p.reshape(-1) for p in parts]))
    pending.wait()
    assert pending.sent == []
    for c, width, local_rows in ((channels[0], 3, rows), (channels[1], 2, few)):
        expected = torch.zeros(len(c.nodes), width, dtype=torch.float64)
        mine = c.local_mask(lay)
        held = mine.copy()
        expected[torch.as_tensor(mine)] = local_rows
        for mask in r.recv.values():
            hit = mask[c.nodes]
            held |= hit
            expected[torch.as_tensor(hit)] = 100.0 + torch.as_tensor(
                c.nodes[hit], dtype=torch.float64)[:, None]
        # the compact block: only the own and received rows, in node order
        assert np.array_equal(c.available_nodes, c.nodes[held])
        assert torch.equal(c.available, expected[torch.as_tensor(held)])
    # the next step's channel over every node takes the same index tensors
    assert index_before and all(key[0] in ("send", "recv", "own") for key in r.indices)
    again = r.index("recv", 1, every, channels[0].local_mask(lay), torch.device("cpu"))
    assert again is r.indices[("recv", 1)]
    fresh = r.index("recv", 1, some, channels[1].local_mask(lay), torch.device("cpu"))
    assert fresh is not r.index("recv", 1, some, channels[1].local_mask(lay),
                                torch.device("cpu"))


# ---- the step clock ---------------------------------------------------------------------------
def test_the_step_clock_waits_for_the_gpu_before_reading_the_time(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(1))
    clock = StepClock(False, torch.device("cuda", 0))
    assert len(synced) == 1  # the warm-up's launches are done before the clock starts
    clock.elapsed()
    assert len(synced) == 2
    StepClock(False, torch.device("cpu")).elapsed()
    assert len(synced) == 2


# ---- resume: every tensor of the loaded state on the rank's device ----------------------------
def tensors(obj: object, where: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(where, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in tensors(v, f"{where}.{k}")]
    if isinstance(obj, list | tuple):
        return [t for i, v in enumerate(obj) for t in tensors(v, f"{where}[{i}]")]
    return []


def test_resume_puts_every_piece_of_state_on_the_ranks_device(tmp_path):
    """A checkpoint written on the CPU, loaded by a rank whose device is `meta` (a stand-in
    for cuda: a tensor left behind on the CPU shows up): θ, the optimizer's momentum, every
    tracker's rows, Proximal's received updates and the keeper's θ^t all land on it; only
    the last training losses stay on the host, by design."""
    cfg = make_config(*TRACKED, "checkpoint.every=2")
    sim = Simulation(cfg)
    sim.execute(Comm("gloo", 60, torch.device("cpu")),
                checkpoints=Checkpoints(tmp_path, 2, 1, cfg, 1))
    latest = complete(tmp_path)[-1]
    sim = Simulation(cfg)
    trainer = build_trainer(sim, Comm("gloo", 60, torch.device("meta")))
    Checkpoints(tmp_path, 2, 1, cfg, 1, resume_from=latest).attach(trainer)
    loaded = tensors(trainer.state_dict())
    names = {w for w, _ in loaded}
    assert {".position.theta", ".optimizer.state.momentum"} <= names, names
    assert any(w.startswith(".tracking.trackers") and "received" in w for w in names), names
    assert any(w.startswith(".tracking.trackers") and "kept" in w for w in names), names
    assert any(w.startswith(".tracking.trackers") and ".rows." in w for w in names), names
    off = [w for w, t in loaded if t.device.type != "meta" and w != ".metrics.train_loss"]
    assert not off, f"left on the CPU: {off}"
    assert trainer.metrics.train_loss.device.type == "cpu"


# ---- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_one_gpu_run_matches_the_cpu_run():
    import subprocess

    from conftest import REPO

    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--only", "parity-1gpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parity-1gpu: ok" in proc.stdout, proc.stdout


# ---- scripts/gpu_check.sh ---------------------------------------------------------------------
LINE = re.compile(r"^(?P<check>[a-z0-9-]+): (?P<status>ok|FAIL|info|skipped \([^)]+\))( .+)?$")


def test_gpu_check_prints_one_line_per_check(tmp_path):
    """The script a lent machine runs: one line per check, in order, each of the form
    `<check>: <status> <detail>`; here (no GPU) each GPU check is skipped, saying why."""
    import subprocess

    from conftest import REPO

    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stdout.strip().splitlines()
    matched = [LINE.match(line) for line in lines]
    assert all(matched), lines
    checks = gpu_check().CHECKS
    assert [m["check"] for m in matched] == list(checks), lines
    assert proc.returncode == (1 if any(m["status"] == "FAIL" for m in matched) else 0)
    assert proc.stderr == ""
    assert lines[0].startswith("environment: ok torch ")
    if not torch.cuda.is_available():
        assert proc.returncode == 0
        assert all(m["status"] == "skipped (no GPU)" for m in matched[1:]), lines


def gpu_check():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_checks_compare_numbers_not_text(tmp_path):
    """The parity checks' measure: the largest |x − y| over numeric cells (NaN equal to NaN),
    infinite when the rows do not line up."""
    check = gpu_check()
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("step,node,loss\n0,1,0.5\n1,1,nan\n")
    b.write_text("step,node,loss\n0,1,0.5000000001\n1,1,nan\n")
    c.write_text("step,node,loss\n0,1,0.5\n")
    assert check.largest_difference(a, b) == pytest.approx(1e-10, rel=1e-3)
    assert check.largest_difference(a, a) == 0.0
    assert check.largest_difference(a, c) == float("inf")
    assert check.rows_difference([(0, 1, 0.5)], [(0, 1, 0.25)]) == 0.25
    assert check.rows_difference([(0, 1, 0.5)], [(0, 2, 0.5)]) == float("inf")
