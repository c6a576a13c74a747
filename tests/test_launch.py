"""The launch scripts: help, bad input, rendezvous failures that end within RDZV_TIMEOUT, and a real
two-"node" run on one machine (gloo processes, c10d rendezvous on 127.0.0.1)."""

import json
import os
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


def launch(script: str, args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env)
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE") - env.keys():
        full_env.pop(name, None)
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)  # fmt: skip


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
    needed = {"single_node.sh": ["NPROC_PER_NODE"], "multi_node.sh": ["NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"],
              "slurm.sbatch": ["sbatch --nodes", "NCCL_SOCKET_IFNAME"]}[script]  # fmt: skip
    assert all(word in result.stdout for word in needed)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", [([], "missing config"), (["configs/nonexistent.yaml"], "nonexistent.yaml")])
def test_missing_config_exits_2_with_a_message(script, args, message, fake_slurm):
    env = {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1", **fake_slurm}
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
        ("slurm.sbatch", {"SLURM_NTASKS": "4"}, "one task per node"),
    ],
)
def test_wrong_node_or_process_count_exits_2(script, env, message, fake_slurm):
    base = {"MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1", **(fake_slurm if script == "slurm.sbatch" else {})}
    result = launch(script, ["configs/tiny_static.yaml"], {**base, **env}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_slurm_never_takes_a_loopback_address_for_the_head_node(fake_slurm):
    # The fake allocation's first node is "localhost", which resolves only to 127.0.0.1.
    result = launch("slurm.sbatch", ["configs/tiny_static.yaml"], fake_slurm, timeout=60)
    assert result.returncode == 2 and "non-loopback address" in result.stderr, result.stderr


RDZV_TIMEOUT = 8
# Starting torchrun (importing torch) on a loaded 2-core machine takes seconds on top of the wait.
STARTUP_ALLOWANCE = 60


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
