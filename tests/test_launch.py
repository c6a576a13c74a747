"""The launch scripts: help, bad input, rendezvous failures that end within RDZV_TIMEOUT, a real
two-"node" run on one machine (gloo processes, c10d rendezvous on 127.0.0.1), and stop signals
(SIGTERM, SIGUSR1) that end a run with a checkpoint and exit code 0. slurm.sbatch runs under a real
Slurm in tests/test_slurm.py; the stand-ins for srun and scontrol here show what one node cannot:
a two-node allocation."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("single_node.sh", "multi_node.sh", "slurm.sbatch")
# A non-routable documentation address (RFC 5737): nothing ever answers there.
UNREACHABLE = "192.0.2.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Read by the scripts: taken from the test's env only, never from the environment pytest runs in.
SCRIPT_SETTINGS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "BLTDIST_SHUTDOWN_GRACE")


def launch_env(env: dict[str, str]) -> dict[str, str]:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env)
    for name in SCRIPT_SETTINGS - env.keys():
        full_env.pop(name, None)
    return full_env


def launch(script: str, args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=launch_env(env), cwd=REPO)  # fmt: skip


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, str]:
    """scontrol and srun stand-ins: a 2-node allocation of which srun starts only node 0 here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\necho othernode\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost,othernode", "SLURM_SUBMIT_DIR": str(REPO)}  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_each_script_needs(script):
    result = launch(script, ["--help"], {})
    assert result.returncode == 0 and "usage:" in result.stdout and "CONFIG.yaml" in result.stdout
    needed = {"single_node.sh": ["NPROC_PER_NODE", "BLTDIST_SHUTDOWN_GRACE", "SIGUSR1"],
              "multi_node.sh": ["NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "BLTDIST_SHUTDOWN_GRACE"],
              "slurm.sbatch": ["sbatch --nodes", "NCCL_SOCKET_IFNAME", "--signal=B:USR1@", "--requeue", "COMPLETED",
                               "BLTDIST_REQUEUE_ON_SIGNAL", "KillWait"]}[script]  # fmt: skip
    assert all(word in result.stdout for word in needed)


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
@pytest.mark.parametrize("args, message", [([], "missing config"), (["configs/nonexistent.yaml"], "nonexistent.yaml")])
def test_missing_config_exits_2_with_a_message(script, args, message):
    env = {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1"}
    result = launch(script, args, env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "script, env, message",
    [
        ("multi_node.sh", {"NNODES": "0", "NODE_RANK": "0"}, "NNODES must be >= 1"),
        ("multi_node.sh", {"NNODES": "two", "NODE_RANK": "0"}, "NNODES must be a whole number"),
        ("multi_node.sh", {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK must be <= 1"),
        ("multi_node.sh", {"NODE_RANK": "0"}, "NNODES is not set"),
        ("single_node.sh", {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be >= 1"),
    ],
)
def test_wrong_node_or_process_count_exits_2(script, env, message):
    base = {"MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1"}
    result = launch(script, ["configs/tiny_static.yaml"], {**base, **env}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("grace", ["ten", "0"])
def test_bad_shutdown_grace_exits_2_before_starting(grace):
    env = {"NPROC_PER_NODE": "1", "BLTDIST_SHUTDOWN_GRACE": grace}
    result = launch("single_node.sh", ["configs/tiny_static.yaml"], env, timeout=60)
    assert result.returncode == 2 and "BLTDIST_SHUTDOWN_GRACE" in result.stderr, result.stderr


def test_slurm_never_takes_a_loopback_address_for_the_head_node(fake_slurm):
    # The fake allocation's first node is "localhost", which resolves only to 127.0.0.1.
    result = launch("slurm.sbatch", ["configs/tiny_static.yaml"], fake_slurm, timeout=60)
    assert result.returncode == 2 and "non-loopback address" in result.stderr, result.stderr


RDZV_TIMEOUT = 4  # short: each case waits it out (twice for an unreachable node 0)
# Starting torchrun (importing torch) on a loaded 2-core machine can take a minute or more on top of
# the wait; a rendezvous that ignored RDZV_TIMEOUT would wait torchrun's default, 600 s or more.
STARTUP_ALLOWANCE = 240


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, env",
    [
        # Node 0 alone of two: waits for a node that never comes.
        ("multi_node.sh", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
        # Node 1 of two whose node 0 cannot be reached.
        ("multi_node.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": UNREACHABLE}),
        # A two-node allocation in which only one node's task starts.
        ("slurm.sbatch", {"MASTER_ADDR": "127.0.0.1"}),
    ],
    ids=["missing-node", "unreachable", "slurm-missing-node"],
)
def test_failed_rendezvous_exits_3_within_the_timeout(script, env, fake_slurm):
    env = {**env, "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1", "RDZV_TIMEOUT": str(RDZV_TIMEOUT)}
    if script == "slurm.sbatch":
        env = {**fake_slurm, **env}
    start = time.monotonic()
    result = launch(script, ["configs/tiny_static.yaml"], env, timeout=RDZV_TIMEOUT + STARTUP_ALLOWANCE)
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"did not complete within {RDZV_TIMEOUT} s" in result.stderr
    assert "NNODES=2 nodes were started" in result.stderr
    assert time.monotonic() - start < RDZV_TIMEOUT + STARTUP_ALLOWANCE


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_the_tiny_config(tmp_path):
    """launch/multi_node.sh twice on this machine: 4 ranks as dp_replicate=2 x dp_shard=2 (HSDP)."""
    out = tmp_path / "run"
    overrides = ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--train.micro_batch_size=2",
                 "--train.steps=2", "--train.val_batches=1", "--logging.interval=1", f"--output_dir={out}"]  # fmt: skip
    env = {"NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RDZV_TIMEOUT": "120"}  # fmt: skip
    full_env = [dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, NODE_RANK=str(r), **env) for r in (0, 1)]
    command = ["bash", str(REPO / "launch" / "multi_node.sh"), "configs/tiny_static.yaml", *overrides]
    nodes = [subprocess.Popen(command, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e in full_env]  # fmt: skip
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-4000:]
    stdout = "".join(stdout for stdout, _ in outputs)
    assert "4 process(es)" in stdout and "dp_replicate=2 x dp_shard=2" in stdout
    train_lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_lines if "loss" in r] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["layout"]["dp_replicate"] == 2
    assert len(summary["peak_memory_gb_per_rank"]) == 4 and all(gb > 0 for gb in summary["peak_memory_gb_per_rank"])
    assert summary["mfu"] == {"median": None, "best": None}  # CPU without logging.peak_tflops


# Stop signals. The machine is loaded: starting two trainer processes and reaching a step can take a
# minute, a step plus a save some seconds; every wait is bounded.
TRAINING_TIMEOUT = 300  # until the first metrics line
STOP_TIMEOUT = 300  # from the signal to the script's exit
# Many steps, so that only a signal ends the run; a metrics line every step.
LONG_RUN = ["configs/tiny_static.yaml", "--train.steps=100000", "--train.val_interval=0", "--train.val_batches=1",
            "--logging.interval=1"]  # fmt: skip


def run_processes(marker: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of the live processes whose command line contains marker."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if marker in cmdline and fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), cmdline)
    return found


def trainer_processes(marker: str) -> list[int]:
    """The trainer processes torchrun started (not torchrun itself, whose arguments name the module too)."""
    return [pid for pid, (_, cmd) in run_processes(marker).items()
            if "-m bltdist.train" in cmd and "torch.distributed.run" not in cmd]  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """The output_dir of a run; whatever of the run a failed test leaves running is killed afterwards
    (torchrun runs in a session of its own, so the script's process group does not hold it)."""
    out = tmp_path / "run"
    yield out
    for pid in run_processes(str(out)):
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def start(script: str, args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    """The script in the background, its output in files beside out (pipes could fill up)."""
    command = ["bash", str(REPO / "launch" / script), *args, f"--output_dir={out}"]
    with open(out.parent / "stdout.txt", "w") as stdout, open(out.parent / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command, env=launch_env(env), cwd=REPO, stdout=stdout, stderr=stderr)


def output(out: Path) -> tuple[str, str]:
    return (out.parent / "stdout.txt").read_text(), (out.parent / "stderr.txt").read_text()


def wait_until(condition, proc: subprocess.Popen, out: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the script exited with {proc.returncode} before {what}:\n{output(out)[1][-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s:\n{output(out)[1][-4000:]}")
        time.sleep(0.5)


def wait_until_training(proc: subprocess.Popen, out: Path) -> None:
    metrics = out / "metrics.jsonl"

    def trained_a_step() -> bool:
        return metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines())

    wait_until(trained_a_step, proc, out, "metrics line", TRAINING_TIMEOUT)


def wait_for_exit(proc: subprocess.Popen, out: Path) -> None:
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script did not exit within {STOP_TIMEOUT} s of the signal:\n{output(out)[1][-4000:]}")


def stop_and_check_the_checkpoint(proc: subprocess.Popen, out: Path, sig: int) -> str:
    """Sends sig to the script; it must exit 0 with a checkpoint that latest names and nothing left running."""
    proc.send_signal(sig)
    wait_for_exit(proc, out)
    stdout, stderr = output(out)
    assert proc.returncode == 0, stderr[-4000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert re.fullmatch(r"step_\d+", latest), latest
    step = int(latest.removeprefix("step_"))
    metadata = json.loads((out / "checkpoints" / latest / "metadata.json").read_text())
    assert metadata["step"] == step and 1 <= step < 100000
    assert f"stopping on a signal: checkpoint of step {step} written" in stdout
    assert run_processes(str(out)) == {}, "processes of the run are left running"
    return stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_to_single_node_saves_a_checkpoint_and_exits_0(sig, run_dir):
    """What a container runtime (SIGTERM to its first process) or a scheduler's warning (SIGUSR1) does."""
    proc = start("single_node.sh", LONG_RUN, {"NPROC_PER_NODE": "2"}, run_dir)
    wait_until_training(proc, run_dir)
    stderr = stop_and_check_the_checkpoint(proc, run_dir, sig)
    name = signal.Signals(sig).name
    assert f"got {name}: asking the trainer processes" in stderr and "saved a checkpoint and exited" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["grace-over", "second-signal"])
def test_a_trainer_that_does_not_stop_is_ended_and_the_script_exits_non_zero(how, run_dir):
    """Trainer processes that cannot finish their step (stopped here with SIGSTOP) are ended when
    BLTDIST_SHUTDOWN_GRACE runs out or on a second signal: torchrun gets SIGTERM, its SIGKILL follows
    (30 s later by default; after 1 s here, where torch >= 2.12 reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    since the stopped processes cannot exit sooner anyway), the script exits non-zero, no checkpoint,
    nothing left running."""
    env = {"NPROC_PER_NODE": "2", "BLTDIST_SHUTDOWN_GRACE": "3" if how == "grace-over" else "600",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}  # fmt: skip
    proc = start("single_node.sh", LONG_RUN, env, run_dir)
    wait_until(lambda: len(trainer_processes(str(run_dir))) == 2, proc, run_dir, "trainer processes", TRAINING_TIMEOUT)
    for pid in trainer_processes(str(run_dir)):
        os.kill(pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    if how == "second-signal":
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
    wait_for_exit(proc, run_dir)
    stderr = output(run_dir)[1]
    assert proc.returncode != 0, stderr[-4000:]
    reason = {"grace-over": "did not exit within BLTDIST_SHUTDOWN_GRACE=3 s",
              "second-signal": "got a second signal (SIGTERM)"}[how]  # fmt: skip
    assert f"{reason}: stopping torchrun" in stderr, stderr[-4000:]
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert run_processes(str(run_dir)) == {}, "processes of the run are left running"
