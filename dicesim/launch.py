"""Render (and optionally run) the commands that start dicesim on one or many machines.

Everything here is a pure function of a :class:`LaunchSpec`, so the rendered commands and
SLURM scripts can be tested without a cluster. The CLI wraps them::

    python -m dicesim.launch torchrun --procs 4 -- nodes=16 steps=200
    python -m dicesim.launch sbatch --machines 2 --gpus 8 --time 02:00:00 -- nodes=64
    python -m dicesim.launch sbatch --machines 2 --procs 16 --submit -- experiment=alignment

`torchrun` checks the configuration once, in its own process (a bad setting is one line,
exit 2, before any rank starts), then runs ``python -m dicesim.torchrun`` (torchrun
that keeps quiet and returns the failing rank's exit code) and supervises it: a signal is
passed on once (a second one ends everything at once), a rank that failed, died or stopped
answering gets its peers and torchrun ended within a few seconds (no process is left
behind), and the run ends with ONE line and the run's exit code (0, 2 bad input,
3 a peer failed, 4 diverged, 130/143 interrupted). ``--print`` prints the plain torchrun
command instead. `sbatch` prints the batch script, or with ``--submit`` pipes it to
``sbatch``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODULE = "dicesim"
TORCHRUN = ("-m", "torch.distributed.run")
QUIET_TORCHRUN = ("-m", "dicesim.torchrun")  # same arguments; see dicesim/torchrun.py
STATUS_ENV = "DICESIM_STATUS_DIR"  # where ranks leave their pid and exit line (stopping.py)
GRACE_S = 1.0  # after a rank failed: how long its peers get to leave before being killed

__all__ = [
    "LaunchError",
    "LaunchSpec",
    "main",
    "render_sbatch",
    "rendezvous_endpoint",
    "torchrun_command",
]


class LaunchError(ValueError):
    """An impossible launch request; the message is one line that says how to fix it."""


@dataclass
class LaunchSpec:
    """How many machines and processes to start, and what to pass to ``python -m dicesim``.

    ``procs_per_machine`` left as ``None`` means one rank per GPU when
    ``gpus_per_machine > 0`` (NCCL refuses two ranks on one GPU) and one rank otherwise.
    ``rdzv_endpoint`` is ``host`` or ``host:port`` of the rendezvous (machine 0); it is only
    needed for a multi-machine :func:`torchrun_command` -- on SLURM the batch script picks
    the first host of the allocation itself.
    """

    machines: int = 1
    procs_per_machine: int | None = None
    gpus_per_machine: int = 0
    port: int = 29500
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_id: str = "dicesim"
    python: str = "python"
    overrides: list[str] = field(default_factory=list)

    @property
    def procs(self) -> int:
        """Ranks started on each machine."""
        if self.procs_per_machine is not None:
            return self.procs_per_machine
        return self.gpus_per_machine if self.gpus_per_machine > 0 else 1

    @property
    def world_size(self) -> int:
        return self.machines * self.procs

    def validate(self) -> None:
        """Raise :class:`LaunchError` (one line) for a request that cannot work."""
        if self.machines < 1:
            raise LaunchError(f"machines must be >= 1 (got {self.machines})")
        if self.procs < 1:
            raise LaunchError(f"processes per machine must be >= 1 (got {self.procs})")
        if self.gpus_per_machine < 0:
            raise LaunchError(f"GPUs per machine must be >= 0 (got {self.gpus_per_machine})")
        if 0 < self.gpus_per_machine < self.procs:
            raise LaunchError(
                f"{self.procs} processes per machine but only {self.gpus_per_machine} GPUs: "
                "NCCL needs one GPU per rank; lower --procs (a rank can host several nodes) "
                "or drop --gpus and add backend=gloo to run on CPU"
            )
        if not 1 <= self.port <= 65535:
            raise LaunchError(f"port must be in 1..65535 (got {self.port})")
        if not self.python:
            raise LaunchError("python executable must not be empty")

    def effective_overrides(self) -> list[str]:
        """The overrides, plus ``device=cuda`` on GPUs unless the user chose a device or a
        backend (``backend=gloo`` keeps the CPU path: gloo does not carry CUDA tensors)."""
        overrides = list(self.overrides)
        chosen = {_key(o) for o in overrides}
        if self.gpus_per_machine > 0 and not chosen & {"device", "backend"}:
            overrides.append("device=cuda")
        return overrides


def _key(override: str) -> str:
    """The config key an override sets: ``++device=cpu`` -> ``device``."""
    return override.split("=", 1)[0].lstrip("+~")


def rendezvous_endpoint(spec: LaunchSpec) -> str:
    """``host:port`` of the rendezvous; ``spec.port`` is used when the endpoint has none."""
    endpoint = spec.rdzv_endpoint
    if not endpoint:
        raise LaunchError(
            f"a {spec.machines}-machine launch needs the rendezvous host: pass "
            "--rdzv-endpoint HOST[:PORT] (machine 0), the same on every machine"
        )
    # host:port, [v6addr]:port; a bare host or a bare IPv6 address gets spec.port.
    if re.fullmatch(r"(\[[^\]]+\]|[^:]+):\d+", endpoint):
        return endpoint
    if ":" in endpoint and not endpoint.startswith("["):
        endpoint = f"[{endpoint}]"
    return f"{endpoint}:{spec.port}"


def torchrun_command(spec: LaunchSpec) -> list[str]:
    """The argv that starts ``spec.procs`` ranks of dicesim on this machine.

    One machine uses ``--standalone`` (torchrun picks a free local port); several machines
    use a c10d rendezvous at ``spec.rdzv_endpoint``, and the same command is run on each.
    The torchrun module is started with ``spec.python`` so that the right environment runs.
    """
    spec.validate()
    cmd = [spec.python, *TORCHRUN]
    if spec.machines == 1:
        cmd += ["--standalone", f"--nproc_per_node={spec.procs}"]
    else:
        cmd += [
            f"--nnodes={spec.machines}",
            f"--nproc_per_node={spec.procs}",
            f"--rdzv_backend={spec.rdzv_backend}",
            f"--rdzv_endpoint={rendezvous_endpoint(spec)}",
            f"--rdzv_id={spec.rdzv_id}",
        ]
    return [*cmd, "-m", MODULE, *spec.effective_overrides()]


def _control_free(name: str, value: str) -> None:
    """Refuse newlines and other control characters: in a batch script they would start
    a new line, i.e. a new command or directive."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise LaunchError(f"{name} {value!r} contains a newline or another control "
                          "character; it would become its own line of the batch script")


def _sbatch_line(option: str) -> str:
    option = option.strip()
    if option.startswith("#SBATCH"):
        return option
    if not option.startswith("-"):
        option = "--" + option
    return f"#SBATCH {option}"


def render_sbatch(
    spec: LaunchSpec,
    job_name: str = "dicesim",
    time: str = "01:00:00",
    partition: str | None = None,
    account: str | None = None,
    extra_sbatch: Sequence[str] = (),
    cpus_per_proc: int | None = None,
    resumable: bool = True,
    checkpoint_every: int = 100,
    port: int | None = None,
    mem_per_proc_gb: int = 8,
) -> str:
    """A complete SLURM batch script: one task per machine, each a torchrun of ``spec.procs``.

    The rendezvous host is the first host of the allocation, the rendezvous id the job id,
    so the script needs no editing per job; the rendezvous port is ``port``, or, when None,
    20000 + job id mod 10000 (below Linux's ephemeral ports), so two jobs whose first host
    is the same machine do not collide. ``extra_sbatch`` entries become further ``#SBATCH``
    lines (``"--mem=0"``, ``"constraint=a100"`` or a full ``"#SBATCH ..."``); a ``--mem`` there
    replaces the one asked for (``mem_per_proc_gb`` per rank). ``cpus_per_proc`` (None: 2 per
    GPU rank, 1 per CPU rank) CPU cores are reserved per rank. A requeued job appends to its
    log (``--open-mode=append``). ``device=cuda`` (on GPUs) comes before the user's overrides,
    and is left out when they choose a device.

    ``resumable`` (default): the job is requeue-able and continues where it stopped. SLURM
    sends SIGTERM 120 s before the time limit (``--signal=TERM@120``); the ranks stop at the
    next step they agree on and write a checkpoint; the script then requeues the job
    (exit 143), and the restarted job, with the same job id and so the same run directory
    (``$RUN_DIR``, default ``outputs/<job name>-<job id>``), continues with ``resume=auto``.
    A pre-empted job is requeued by SLURM itself and resumes the same way. Overrides the
    user gives for ``out_dir``, ``resume`` or ``checkpoint.every`` win.
    """
    spec.validate()
    if cpus_per_proc is None:
        cpus_per_proc = 2 if spec.gpus_per_machine > 0 else 1
    _check_sbatch(spec, job_name, time, partition, account, extra_sbatch, cpus_per_proc,
                  checkpoint_every, port, mem_per_proc_gb)
    head = _sbatch_header(spec, job_name, time, partition, account, extra_sbatch,
                          cpus_per_proc, resumable, mem_per_proc_gb)
    srun = _srun_command(spec, resumable, checkpoint_every)
    return "\n".join(head + _script_body(spec, job_name, port, resumable, srun))


def _check_sbatch(spec: LaunchSpec, job_name: str, time: str, partition: str | None,
                  account: str | None, extra_sbatch: Sequence[str], cpus_per_proc: int,
                  checkpoint_every: int, port: int | None, mem_per_proc_gb: int) -> None:
    if cpus_per_proc < 1:
        raise LaunchError(f"CPUs per process must be >= 1 (got {cpus_per_proc})")
    if checkpoint_every < 1:
        raise LaunchError(f"--checkpoint-every must be >= 1 (got {checkpoint_every})")
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(f"port must be in 1..65535 (got {port})")
    if mem_per_proc_gb < 1:
        raise LaunchError(f"memory per process must be >= 1 GB (got {mem_per_proc_gb})")
    for name, value in (("job name", job_name), ("time", time), ("partition", partition),
                        ("account", account), ("python", spec.python),
                        ("rendezvous backend", spec.rdzv_backend),
                        *(("--sbatch option", o) for o in extra_sbatch),
                        *(("override", o) for o in spec.overrides)):
        if value is not None:
            _control_free(name, value)
    for name, value in (("job name", job_name), ("time", time), ("partition", partition),
                        ("account", account)):
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise LaunchError(f"{name} must be a non-empty word without spaces (got {value!r})")


def _sbatch_header(spec: LaunchSpec, job_name: str, time: str, partition: str | None,
                   account: str | None, extra_sbatch: Sequence[str], cpus_per_proc: int,
                   resumable: bool, mem_per_proc_gb: int) -> list[str]:
    """The shebang and the #SBATCH lines."""
    head = [
        "#!/bin/bash",
        f"# Rendered by `python -m dicesim.launch sbatch`: {spec.machines} machine(s) x "
        f"{spec.procs} rank(s) = {spec.world_size} ranks.",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={spec.machines}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={spec.procs * cpus_per_proc}",
    ]
    if spec.gpus_per_machine > 0:
        head.append(f"#SBATCH --gpus-per-node={spec.gpus_per_machine}")
    if not any(_sbatch_line(o).split()[1].startswith(("--mem=", "--mem-per"))
               for o in extra_sbatch if _sbatch_line(o).split()[1:]):
        head.append(f"#SBATCH --mem={spec.procs * mem_per_proc_gb}G")
    head.append(f"#SBATCH --time={time}")
    if partition:
        head.append(f"#SBATCH --partition={partition}")
    if account:
        head.append(f"#SBATCH --account={account}")
    if resumable:
        head += ["#SBATCH --requeue", "#SBATCH --signal=TERM@120"]
    head += [_sbatch_line(o) for o in extra_sbatch]
    return head + ["#SBATCH --output=%x-%j.out", "#SBATCH --open-mode=append"]  # a requeue appends


def _srun_command(spec: LaunchSpec, resumable: bool, checkpoint_every: int) -> list[str]:
    """srun of torchrun of dicesim: the script's overrides first, the user's after (theirs
    win where they set the same key)."""
    q = shlex.quote
    given = {_key(o) for o in spec.overrides}
    first = ["device=cuda"] if spec.gpus_per_machine > 0 and "device" not in given else []
    resume = []
    if resumable:
        resume += ['"out_dir=$RUN_DIR"'] if "out_dir" not in given else []
        resume += ["resume=auto"] if "resume" not in given else []
        resume += [f"checkpoint.every={checkpoint_every}"] if "checkpoint.every" not in given \
            else []
    srun = [
        "srun", "--kill-on-bad-exit=1",
        q(spec.python), *TORCHRUN,
        '--nnodes="$SLURM_NNODES"',
        f"--nproc_per_node={spec.procs}",
        f"--rdzv_backend={q(spec.rdzv_backend)}",
        '--rdzv_endpoint="$HEAD:$PORT"',
        '--rdzv_id="$SLURM_JOB_ID"',
        "-m", MODULE, *first, *resume, *(q(o) for o in spec.overrides),
    ]
    return srun + (["|| code=$?"] if resumable else [])


def _script_body(spec: LaunchSpec, job_name: str, port: int | None, resumable: bool,
                 srun: list[str]) -> list[str]:
    """The shell: rendezvous host and port, the run directory, srun, the requeue."""
    body = [
        "",
        "set -euo pipefail",
        "# Rendezvous on the first host of the allocation; the job id keeps jobs apart.",
        "HOSTS=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\"); HEAD=${HOSTS%%$'\\n'*}",
        "# The port too: two jobs whose first host is one machine must not share it.",
        f"PORT={port}" if port is not None else "PORT=$((20000 + SLURM_JOB_ID % 10000))",
        "# Recent SLURM no longer passes --cpus-per-task from sbatch on to srun.",
        'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"',
        f'echo "dicesim: $SLURM_NNODES machine(s) x {spec.procs} rank(s),'
        ' rendezvous $HEAD:$PORT" >&2',
    ]
    if resumable:
        body += [f'RUN_DIR="${{RUN_DIR:-outputs/{job_name}-$SLURM_JOB_ID}}"  # kept by a requeue',
                 "code=0"]
    body += [" ".join(srun)]
    if resumable:
        body += ["# SIGTERM before the time limit stopped the run with a checkpoint (summary.json",
                 "# says interrupted; torchrun itself exits 1): queue the job again to resume.",
                 "# scancel signals this shell too, so a cancelled job is not requeued.",
                 'if [ "$code" -ne 0 ] && grep -qs \'"status": "interrupted"\' '
                 '"$RUN_DIR/summary.json"; then',
                 '    echo "dicesim: stopped before the time limit; requeueing to resume" >&2',
                 '    scontrol requeue "$SLURM_JOB_ID"',
                 "fi",
                 'exit "$code"']
    return body + [""]


# ---------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicesim.launch",
        description="Render or run the commands that start dicesim on one or many machines. "
        "Hydra overrides for dicesim go after `--`.",
    )
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{torchrun,sbatch}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--machines", type=int, default=1, help="machines (SLURM nodes)")
    common.add_argument("--procs", type=int, default=None,
                        help="ranks per machine (default: one per GPU, else 1)")
    common.add_argument("--gpus", type=int, default=0, help="GPUs per machine (default 0)")
    common.add_argument("--port", type=int, default=None,
                        help="rendezvous port (default: torchrun 29500; sbatch 20000 + job id "
                             "mod 10000)")
    common.add_argument("--rdzv-backend", default="c10d")
    common.add_argument("--rdzv-id", default="dicesim",
                        help="rendezvous id (torchrun only; sbatch uses the job id)")
    common.add_argument("--python", default=sys.executable,
                        help="python that runs dicesim (default: this one, %(default)s)")

    tr = sub.add_parser("torchrun", parents=[common],
                        help="run (or --print) the torchrun command for this machine")
    tr.add_argument("--rdzv-endpoint", default=None,
                    help="HOST[:PORT] of machine 0; needed when --machines > 1")
    tr.add_argument("--print", action="store_true", dest="print_only",
                    help="print the plain torchrun command instead of running it")
    tr.add_argument("--no-preflight", action="store_true",
                    help="skip the one-process check of the configuration before torchrun")

    sb = sub.add_parser("sbatch", parents=[common],
                        help="print a SLURM batch script (or --submit it)")
    sb.add_argument("--job-name", default="dicesim")
    sb.add_argument("--time", default="01:00:00", help="wall-clock limit (default %(default)s)")
    sb.add_argument("--partition", default=None)
    sb.add_argument("--account", default=None)
    sb.add_argument("--cpus-per-proc", type=int, default=None,
                    help="CPU cores reserved per rank (default 2 per GPU rank, else 1)")
    sb.add_argument("--mem-per-proc", type=int, default=8, metavar="GB",
                    help="memory asked for per rank, in GB (default %(default)s; an "
                         "--sbatch=--mem=... replaces it)")
    sb.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="extra #SBATCH option, e.g. --sbatch=--mem=0 (repeatable)")
    sb.add_argument("--checkpoint-every", type=int, default=100,
                    help="steps between checkpoints of the requeue-able job (default 100)")
    sb.add_argument("--no-requeue", action="store_true",
                    help="a plain job: no --requeue, no SIGTERM before the time limit, no "
                         "resume")
    sb.add_argument("--submit", action="store_true", help="pipe the script to sbatch")
    return parser


def _fail(message: str) -> int:
    print(f"dicesim.launch: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)

    spec = LaunchSpec(
        machines=args.machines,
        procs_per_machine=args.procs,
        gpus_per_machine=args.gpus,
        port=29500 if args.port is None else args.port,
        rdzv_backend=args.rdzv_backend,
        rdzv_endpoint=getattr(args, "rdzv_endpoint", None),
        rdzv_id=args.rdzv_id,
        python=args.python,
        overrides=overrides,
    )
    try:
        if args.mode == "torchrun":
            cmd = torchrun_command(spec)
        else:
            script = render_sbatch(
                spec, job_name=args.job_name, time=args.time, partition=args.partition,
                account=args.account, extra_sbatch=args.sbatch, cpus_per_proc=args.cpus_per_proc,
                resumable=not args.no_requeue, checkpoint_every=args.checkpoint_every,
                port=args.port, mem_per_proc_gb=args.mem_per_proc,
            )
    except LaunchError as err:
        return _fail(str(err))

    if args.mode == "torchrun":
        if args.print_only:
            print(shlex.join(cmd))
            return 0
        try:
            if not args.no_preflight:
                try:
                    code = preflight(spec)
                except KeyboardInterrupt:
                    _fail("interrupted (SIGINT) while checking the configuration; nothing was "
                          "started")
                    return 130
                if code:
                    return code
            quiet = [spec.python, *QUIET_TORCHRUN, *cmd[1 + len(TORCHRUN):]]
            return Supervisor(quiet).run()
        except OSError as err:
            return _fail(f"cannot run {spec.python!r}: {err.strerror}; pass --python PATH")

    if not args.submit:
        sys.stdout.write(script)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return _fail("sbatch not found on PATH; run this on a SLURM login node, "
                     "or drop --submit to print the script")
    return subprocess.run([sbatch], input=script, text=True, check=False).returncode


# ------------------------------------------------------------------- pre-flight and supervision


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", STATUS_ENV):
        env.pop(key, None)
    return env


def preflight(spec: LaunchSpec) -> int:
    """Check the configuration here, once, for the launch's world size: the composed and
    validated config, the nodes' split over the ranks, and the checkpoint `resume=DIR`
    names. A bad setting is one line on stderr and 2; 0: go ahead. What only a rank can
    see (its device, the data files of its machine, the run directory) a rank checks."""
    overrides = spec.effective_overrides()
    if any(o.startswith("-") for o in overrides):  # Hydra's flags: the ranks' Hydra decides
        return 0
    from dicesim.comm.exchange import check_layout
    from dicesim.common.errors import ConfigError
    from dicesim.config import compose_checked
    from dicesim.run.checkpoint import find_resume

    try:
        [cfg] = compose_checked([overrides])
        if not cfg.driver:  # a driver picks its own node counts per run
            check_layout(cfg.nodes, spec.world_size)
        if cfg.resume not in (None, "auto"):
            find_resume(Path(cfg.resume), cfg, spec.world_size, explicit=True)
    except ConfigError as err:
        print(f"dicesim: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def _end_with_parent() -> None:
    """In the torchrun child: SIGTERM it when the launcher dies (even by SIGKILL), so that
    it stops its ranks instead of running on unsupervised (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


class Supervisor:
    """Runs the quiet torchrun in its own session and watches the status directory that
    every rank writes to (stopping.py): pid.R at start, status.R (exit code, line) at the
    end, and agent.json (failures seen by torchrun)."""

    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.status = Path(tempfile.mkdtemp(prefix="dicesim-launch-"))
        self.forwarded: int | None = None
        self.proc: subprocess.Popen | None = None
        self.failed_at: float | None = None

    # ---- what the ranks left
    def _pids(self) -> dict[int, int]:
        out = {}
        for p in self.status.glob("pid.*"):
            try:
                out[int(p.name.split(".")[1])] = int(p.read_text())
            except (OSError, ValueError):
                pass
        return out

    def _statuses(self) -> dict[int, dict]:
        out = {}
        for p in self.status.glob("status.*"):
            try:
                out[int(p.name.split(".")[1])] = json.loads(p.read_text())
            except (OSError, ValueError):
                pass
        return out

    def _agent_failures(self) -> dict[int, int]:
        try:
            data = json.loads((self.status / "agent.json").read_text())
            return {int(k): int(v) for k, v in data["failures"].items()}
        except (OSError, ValueError, KeyError):
            return {}

    def _kill_ranks(self) -> None:
        for pid in self._pids().values():
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) rank
                except OSError:
                    pass

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            pass

    def _on_signal(self, signum: int, frame: object) -> None:
        assert self.proc is not None
        if self.forwarded is None:
            self.forwarded = signum
            try:
                os.killpg(self.proc.pid, signum)  # torchrun passes it on to every rank
            except OSError:
                pass
            return
        self._kill_ranks()  # a second signal: end everything now
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def _failure_seen(self) -> bool:
        """A rank failed (exit 2/3, or gone without leaving a status)."""
        statuses = self._statuses()
        if any(s.get("code") not in (0, 4, 130, 143) for s in statuses.values()):
            return True
        return any(r not in statuses and not _alive(pid) for r, pid in self._pids().items())

    def run(self) -> int:
        env = {**_clean_env(), STATUS_ENV: str(self.status)}
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.proc = subprocess.Popen(self.cmd, env=env, start_new_session=True,
                                         preexec_fn=_end_with_parent)
            while True:
                try:
                    self.proc.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.failed_at is None and self._failure_seen():
                    self.failed_at = time.monotonic()
                elif self.failed_at is not None:
                    waited = time.monotonic() - self.failed_at
                    if waited > GRACE_S:
                        self._kill_ranks()  # a hung or stopped rank would keep torchrun 30 s
                    if waited > GRACE_S + 2:  # torchrun itself lingering: end it too
                        self._signal_group(signal.SIGKILL if waited > GRACE_S + 4
                                           else signal.SIGTERM)
            self._kill_ranks()  # nothing outlives the launch
            code, line = self._outcome(self.proc.returncode)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.status, ignore_errors=True)
        if line:
            print(line, file=sys.stderr, flush=True)
        return code

    def _outcome(self, torchrun_code: int) -> tuple[int, str]:
        """The run's exit code and its one line (empty when the run succeeded)."""
        statuses = self._statuses()
        failing = {r: s for r, s in statuses.items() if s.get("code")}
        if self.forwarded is not None:
            code = 128 + self.forwarded
            name = signal.Signals(self.forwarded).name
            mine = [s for _, s in sorted(failing.items()) if s["code"] == code]
            if 0 in failing and failing[0]["code"] in (code, 4):
                return failing[0]["code"], failing[0]["line"]
            if mine:
                return code, mine[0]["line"]
            if failing:
                r, s = min(failing.items())
                return s["code"], s["line"]
            return code, f"dicesim: interrupted ({name}) before the ranks could stop in step"
        for wanted in (4, 2, 3, 130, 143):
            hits = sorted(r for r, s in failing.items() if s["code"] == wanted)
            if hits and wanted == 3:  # the first rank to see a peer fail saw it most directly
                hits.sort(key=lambda r: failing[r].get("time", 0.0))
            if hits:
                return wanted, failing[hits[0]]["line"]
        if failing:
            r, s = min(failing.items())
            return s["code"], s["line"] or f"dicesim: error: rank {r} exited with {s['code']}"
        agent = {r: c for r, c in self._agent_failures().items() if c != 0}
        if agent:
            r, c = min(agent.items())
            if c < 0:
                return 3, (f"dicesim: error: rank {r} was ended by "
                           f"{signal.Signals(-c).name}; its peers stopped")
            return c, f"dicesim: error: rank {r} failed with exit code {c} (its output is above)"
        if torchrun_code != 0:
            return torchrun_code, f"dicesim: error: torchrun exited with code {torchrun_code}"
        return 0, ""


if __name__ == "__main__":
    sys.exit(main())
