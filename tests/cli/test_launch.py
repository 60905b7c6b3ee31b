"""Launchers: rendered torchrun commands and SLURM scripts, checked without a cluster.

SLURM's tools are replaced by small fake executables on PATH (`scontrol` prints host names,
`srun`/`sbatch` record what they were given), so the scripts are really run by bash.
"""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicesim.launch import LaunchError, LaunchSpec, main, render_sbatch, torchrun_command

ROOT = Path(__file__).resolve().parents[2]
SLURM_SCRIPT = ROOT / "launch" / "slurm.sbatch"
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
TORCHRUN = ["-m", "torch.distributed.run"]

# Overrides a shell would mangle if quoting were wrong.
TRICKY = ["nodes=8", "+note=it's a \"test\"", "tags=[a, b]", "name=$HOME*", "x=a;b|c"]


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin dir with fake scontrol/srun/sbatch; returns (bin, env, read_argv)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv"
    _exe(bindir / "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
    _exe(bindir / "srun", f'printf "%s\\0" "$@" > {shlex.quote(str(record))}\n')
    _exe(bindir / "sbatch", f'cat > {shlex.quote(str(tmp_path / "submitted"))}\n'
                            'echo "Submitted batch job 42"\n')
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "1234",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    for key in ("SLURM_GPUS_PER_NODE", "GPUS_PER_NODE", "PROCS_PER_NODE", "PORT", "PYTHON"):
        env.pop(key, None)

    def read_argv() -> list[str]:
        return record.read_text().split("\0")[:-1]

    return bindir, env, read_argv


def _srun_line(script: str) -> str:
    """The srun command of a rendered script, without its `|| code=$?` tail."""
    (line,) = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    return line.removesuffix(" || code=$?")


RESUME = ["out_dir=outputs/dicesim-1234", "resume=auto", "checkpoint.every=100"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicesim.launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------- torchrun_command


def test_torchrun_one_machine_is_standalone():
    cmd = torchrun_command(LaunchSpec(procs_per_machine=4, python="py", overrides=["nodes=8"]))
    assert cmd == ["py", *TORCHRUN, "--standalone", "--nproc_per_node=4", "-m", "dicesim",
                   "nodes=8"]


def test_torchrun_multi_machine_uses_rendezvous():
    spec = LaunchSpec(machines=3, procs_per_machine=2, rdzv_endpoint="head", port=1234,
                      rdzv_id="exp1", overrides=["steps=5"])
    cmd = torchrun_command(spec)
    assert cmd[:3] == ["python", *TORCHRUN]
    assert "--standalone" not in cmd
    for flag in ("--nnodes=3", "--nproc_per_node=2", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=head:1234", "--rdzv_id=exp1"):
        assert flag in cmd
    assert cmd[-3:] == ["-m", "dicesim", "steps=5"]
    spec.rdzv_endpoint = "head:777"  # an explicit port wins over spec.port
    assert "--rdzv_endpoint=head:777" in torchrun_command(spec)


def test_torchrun_multi_machine_needs_endpoint():
    with pytest.raises(LaunchError, match="rdzv-endpoint"):
        torchrun_command(LaunchSpec(machines=2))


def test_gpus_mean_one_rank_per_gpu_and_cuda():
    spec = LaunchSpec(gpus_per_machine=4)
    cmd = torchrun_command(spec)
    assert "--nproc_per_node=4" in cmd and cmd[-1] == "device=cuda"
    # The user's own device choice is kept, not doubled.
    spec.overrides = ["device=cuda:1"]
    assert torchrun_command(spec).count("device=cuda") == 0
    with pytest.raises(LaunchError, match="one GPU per rank"):
        torchrun_command(LaunchSpec(gpus_per_machine=2, procs_per_machine=4))


@pytest.mark.parametrize("chosen", ["backend=gloo", "++backend=gloo", "device=cpu",
                                    "backend=nccl"])
def test_gpus_keep_the_users_device_or_backend(chosen):
    """`--gpus 2 -- backend=gloo` is the CPU path: device=cuda added to it would send CUDA
    tensors through gloo (which the config refuses)."""
    spec = LaunchSpec(gpus_per_machine=2, overrides=["nodes=8", chosen])
    assert spec.effective_overrides() == ["nodes=8", chosen]
    assert "device=cuda" not in torchrun_command(spec)


@pytest.mark.parametrize("bad", [dict(machines=0), dict(procs_per_machine=0),
                                 dict(gpus_per_machine=-1), dict(port=70000)])
def test_invalid_specs_are_refused(bad):
    with pytest.raises(LaunchError):
        torchrun_command(LaunchSpec(**bad))


# ------------------------------------------------------------------------------ render_sbatch


def test_sbatch_one_machine_four_procs():
    script = render_sbatch(LaunchSpec(procs_per_machine=4, overrides=["nodes=8"]),
                           job_name="j", time="00:10:00")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --time=00:10:00",
                 "#SBATCH --job-name=j", "set -euo pipefail", "#SBATCH --mem=32G",
                 "#SBATCH --open-mode=append", "PORT=$((20000 + SLURM_JOB_ID % 10000))"):
        assert line in lines
    assert not any("gpus" in ln or "partition" in ln or "account" in ln for ln in lines)
    srun = shlex.split(_srun_line(script))
    assert "--nproc_per_node=4" in srun and srun[-6:] == [
        "-m", "dicesim", "out_dir=$RUN_DIR", "resume=auto", "checkpoint.every=100", "nodes=8"]
    assert "device=cuda" not in srun
    assert "#SBATCH --requeue" in lines and "#SBATCH --signal=TERM@120" in lines
    plain = render_sbatch(LaunchSpec(procs_per_machine=4, overrides=["nodes=8"]),
                          resumable=False)
    assert "requeue" not in plain and shlex.split(_srun_line(plain))[-3:] == [
        "-m", "dicesim", "nodes=8"]


def test_sbatch_two_machines_eight_gpus():
    script = render_sbatch(
        LaunchSpec(machines=2, gpus_per_machine=8, overrides=["nodes=64"]), port=29611,
        time="02:00:00", partition="gpu", account="proj", extra_sbatch=["--mem=0", "exclusive"])
    lines = script.splitlines()
    assert "PORT=29611" in lines
    assert [ln for ln in lines if "--mem" in ln] == ["#SBATCH --mem=0"]  # the user's only
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --mem=0",
                 "#SBATCH --exclusive"):
        assert line in lines
    first_host = "HOSTS=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\"); HEAD=${HOSTS%%$'\\n'*}"
    assert first_host in lines
    srun = shlex.split(_srun_line(script))
    for flag in ("--nnodes=$SLURM_NNODES", "--nproc_per_node=8", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=$HEAD:$PORT", "--rdzv_id=$SLURM_JOB_ID"):
        assert flag in srun
    # device=cuda first: whatever the user adds after it wins
    assert srun[srun.index("dicesim") + 1] == "device=cuda" and srun[-1] == "nodes=64"
    chosen = render_sbatch(LaunchSpec(gpus_per_machine=2, overrides=["device=cuda:1"]))
    assert shlex.split(_srun_line(chosen)).count("device=cuda") == 0


def test_sbatch_cpus_and_memory_scale_with_the_ranks():
    gpu = render_sbatch(LaunchSpec(gpus_per_machine=8)).splitlines()
    assert "#SBATCH --cpus-per-task=16" in gpu and "#SBATCH --mem=64G" in gpu
    cpu = render_sbatch(LaunchSpec(procs_per_machine=6), cpus_per_proc=3,
                        mem_per_proc_gb=2).splitlines()
    assert "#SBATCH --cpus-per-task=18" in cpu and "#SBATCH --mem=12G" in cpu
    with pytest.raises(LaunchError):
        render_sbatch(LaunchSpec(), mem_per_proc_gb=0)
    with pytest.raises(LaunchError):
        render_sbatch(LaunchSpec(), port=70000)


def test_sbatch_overrides_survive_shlex_round_trip():
    script = render_sbatch(LaunchSpec(procs_per_machine=2, python="/opt/my env/python",
                                      overrides=TRICKY))
    srun = shlex.split(_srun_line(script))
    assert srun[-len(TRICKY):] == TRICKY
    assert srun[srun.index("--kill-on-bad-exit=1") + 1] == "/opt/my env/python"


def test_sbatch_rejects_bad_fields():
    with pytest.raises(LaunchError):
        render_sbatch(LaunchSpec(), time="1 hour")
    with pytest.raises(LaunchError):
        render_sbatch(LaunchSpec(), cpus_per_proc=0)


@pytest.mark.parametrize("field", ["sbatch", "override", "python"])
def test_sbatch_refuses_control_characters(field):
    """A newline in any value would become its own line (a command) of the batch script."""
    kwargs, spec = {}, LaunchSpec()
    if field == "sbatch":
        kwargs["extra_sbatch"] = ["--mem=0\necho X"]
    elif field == "override":
        spec.overrides = ["name=a\rb"]
    else:
        spec.python = "py\x1b"
    with pytest.raises(LaunchError, match="control character"):
        render_sbatch(spec, **kwargs)


def test_cli_sbatch_newline_is_one_line_exit_2():
    run = _cli("sbatch", "--sbatch=--mem=0\necho X")
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and "control character" in run.stderr


def test_rendered_script_runs_under_bash(tmp_path, fake_slurm):
    """bash really runs it: $HEAD expands to the first host, the overrides arrive verbatim."""
    _, env, read_argv = fake_slurm
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(LaunchSpec(machines=2, gpus_per_machine=4, python="py",
                                               overrides=TRICKY)))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_argv() == [
        "--kill-on-bad-exit=1", "py", *TORCHRUN, "--nnodes=2", "--nproc_per_node=4",
        "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-node-07:21234", "--rdzv_id=1234",
        "-m", "dicesim", "device=cuda", *RESUME, *TRICKY,
    ]


@pytest.mark.parametrize("static", [False, True], ids=["rendered", "static"])
def test_two_jobs_on_one_head_node_get_different_ports(tmp_path, fake_slurm, static):
    _, env, read_argv = fake_slurm
    script = SLURM_SCRIPT
    if not static:
        script = tmp_path / "job.sbatch"
        script.write_text(render_sbatch(LaunchSpec(machines=2, python="py")))
    endpoints = []
    for job in ("1234", "1235"):
        run = subprocess.run(["bash", str(script)], env={**env, "SLURM_JOB_ID": job},
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        (endpoint,) = [a for a in read_argv() if a.startswith("--rdzv_endpoint=")]
        endpoints.append(endpoint)
    assert endpoints == ["--rdzv_endpoint=gpu-node-07:21234",
                         "--rdzv_endpoint=gpu-node-07:21235"]


@pytest.mark.parametrize("static", [False, True], ids=["rendered", "static"])
def test_a_requeued_job_appends_to_its_log(tmp_path, static):
    text = SLURM_SCRIPT.read_text() if static else render_sbatch(LaunchSpec())
    assert "#SBATCH --open-mode=append" in text.splitlines()


@pytest.mark.parametrize("static", [False, True], ids=["rendered", "static"])
def test_an_interrupted_job_requeues_itself_and_a_failed_one_does_not(tmp_path, fake_slurm,
                                                                      static):
    """srun fails (torchrun exits 1 when a rank stops); the job is requeued only when the run
    wrote summary.json with status interrupted (SIGTERM before the time limit)."""
    bindir, env, _ = fake_slurm
    requeued = tmp_path / "requeued"
    _exe(bindir / "srun", "exit 1\n")
    _exe(bindir / "scontrol", f'if [ "$1" = requeue ]; then echo "$2" > {requeued}; '
                              'else printf "gpu-node-07\\n"; fi\n')
    script = SLURM_SCRIPT
    if not static:
        script = tmp_path / "job.sbatch"
        script.write_text(render_sbatch(LaunchSpec(machines=2, python="py")))
    env["RUN_DIR"] = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 1 and not requeued.exists()
    (tmp_path / "run" / "summary.json").write_text('{\n  "status": "interrupted"\n}\n')
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 1 and requeued.read_text().strip() == "1234", run.stderr


# ---------------------------------------------------------------------- static shell scripts


@pytest.mark.parametrize("path", [SLURM_SCRIPT, TORCHRUN_SH], ids=lambda p: p.name)
def test_static_scripts_parse(path):
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_slurm_script_on_cpus(fake_slurm):
    _, env, read_argv = fake_slurm
    env["PORT"] = "30001"
    run = subprocess.run(["bash", str(SLURM_SCRIPT), *TRICKY], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    argv = read_argv()
    assert argv[1] == "python"  # no .venv in the (fake) submit dir
    assert argv[2:] == [
        *TORCHRUN, "--nnodes=2", "--nproc_per_node=6", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-node-07:30001", "--rdzv_id=1234", "-m", "dicesim", *RESUME,
        *TRICKY,
    ]


def test_slurm_script_on_gpus(fake_slurm, tmp_path):
    _, env, read_argv = fake_slurm
    env["SLURM_GPUS_PER_NODE"] = "h100:4"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)  # the submit dir has a venv: it is used
    venv_python = _exe(tmp_path / ".venv" / "bin" / "python", "")
    run = subprocess.run(["bash", str(SLURM_SCRIPT), "nodes=64", "device=cuda:0"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    argv = read_argv()
    assert argv[1] == str(venv_python)
    assert "--nproc_per_node=4" in argv
    # device=cuda and the resume settings come first, so the user's own values win in Hydra.
    assert argv[-6:] == ["device=cuda", *RESUME, "nodes=64", "device=cuda:0"]

    env["PROCS_PER_NODE"] = "8"
    run = subprocess.run(["bash", str(SLURM_SCRIPT)], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "one GPU per rank" in run.stderr


def test_torchrun_sh(tmp_path):
    """The script goes through dicesim's launcher (pre-flight check, supervision)."""
    record = tmp_path / "argv"
    fake = _exe(tmp_path / "python", f'printf "%s\\0" "$@" > {shlex.quote(str(record))}\n')
    env = {**os.environ, "PYTHON": str(fake)}
    run = subprocess.run([str(TORCHRUN_SH), "3", *TRICKY], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert record.read_text().split("\0")[:-1] == [
        "-m", "dicesim.launch", "torchrun", "--procs", "3", "--python", str(fake), "--",
        *TRICKY]
    for bad in ([], ["zero"], ["0"]):
        run = subprocess.run([str(TORCHRUN_SH), *bad], env=env, capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.startswith("usage:")


# ------------------------------------------------------------------------------------- CLI


def test_cli_prints_sbatch_script():
    run = _cli("sbatch", "--machines", "2", "--procs", "4", "--", "nodes=8")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2" in run.stdout
    srun = shlex.split(_srun_line(run.stdout))
    assert srun[1:3] == ["--kill-on-bad-exit=1", sys.executable]
    assert "--nproc_per_node=4" in srun and srun[-1] == "nodes=8"


def test_cli_submit_without_sbatch_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    run = _cli("sbatch", "--machines", "2", "--submit", "--", "nodes=8", env=env)
    assert run.returncode == 2
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and "sbatch not found" in run.stderr


def test_cli_submit_pipes_script_to_sbatch(fake_slurm, tmp_path):
    _, env, _ = fake_slurm
    run = _cli("sbatch", "--machines", "2", "--gpus", "2", "--submit", "--", "nodes=8", env=env)
    assert run.returncode == 0, run.stderr
    assert "Submitted batch job 42" in run.stdout
    submitted = (tmp_path / "submitted").read_text()
    assert "#SBATCH --gpus-per-node=2" in submitted and "device=cuda" in submitted


def test_cli_torchrun_print_and_exec(tmp_path, capsys):
    assert main(["torchrun", "--procs", "2", "--python", "py", "--print", "--", "a=1 2"]) == 0
    assert capsys.readouterr().out.strip() == (
        "py -m torch.distributed.run --standalone --nproc_per_node=2 -m dicesim 'a=1 2'")
    # Without --print: the check (in the launcher's process), then the quiet torchrun
    # under supervision: the only command started.
    record = tmp_path / "argv"
    fake = _exe(tmp_path / "python",
                f'printf "%s\\0" "$@" >> {shlex.quote(str(record))}; printf "\\n" >> '
                f'{shlex.quote(str(record))}\n')
    run = _cli("torchrun", "--machines", "2", "--rdzv-endpoint", "10.0.0.1", "--python",
               str(fake), "--", "nodes=4")
    assert run.returncode == 0, run.stderr
    [torchrun] = [line.split("\0")[:-1] for line in record.read_text().splitlines()]
    assert torchrun == [
        "-m", "dicesim.torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:29500", "--rdzv_id=dicesim", "-m", "dicesim", "nodes=4"]


@pytest.mark.parametrize("args, needle", [
    (["sbatch", "--gpus", "2", "--procs", "4"], "one GPU per rank"),
    (["torchrun", "--machines", "2", "--print"], "--rdzv-endpoint"),
    (["torchrun", "--python", "/nonexistent/python"], "cannot run"),
])
def test_cli_errors_are_one_line(args, needle):
    run = _cli(*args)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and needle in run.stderr


# --------------------------------------------------------------- real torchrun (stand-in module)


def _stand_in(tmp_path: Path) -> dict:
    """A `dicesim` package that shadows the real one and records each rank's view."""
    pkg = tmp_path / "shadow" / "dicesim"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import os, sys, pathlib\n"
        "out = pathlib.Path(os.environ['RANKS_OUT'])\n"
        "(out / os.environ['RANK']).write_text(os.environ['WORLD_SIZE'] + ' ' + "
        "' '.join(sys.argv[1:]))\n")
    out = tmp_path / "ranks"
    out.mkdir()
    return {**os.environ, "PYTHONPATH": str(pkg.parent), "RANKS_OUT": str(out)}


def test_real_torchrun_standalone_and_rendezvous(tmp_path):
    """torch.distributed.run accepts the rendered flags: 1 machine x 2, and 2 'machines' x 1."""
    env = _stand_in(tmp_path)
    out = Path(env["RANKS_OUT"])
    cmd = torchrun_command(LaunchSpec(procs_per_machine=2, python=sys.executable,
                                      overrides=["a=1 2"]))
    # cwd: `-m` puts the working directory ahead of PYTHONPATH, so run away from the repo.
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, timeout=120, capture_output=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"0": "2 a=1 2", "1": "2 a=1 2"}

    for p in out.iterdir():
        p.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = LaunchSpec(machines=2, python=sys.executable, rdzv_endpoint="127.0.0.1", port=port,
                      overrides=["b=3"])
    procs = [subprocess.Popen(torchrun_command(spec), env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert {p.name: p.read_text() for p in out.iterdir()} == {"0": "2 b=3", "1": "2 b=3"}
