"""``train.activation_checkpointing``: recomputing each transformer block in the backward pass gives
the losses and gradients of the run without it, and holds fewer activations (``bltdist.memtrack``);
``train.activation_checkpointing_interval`` checkpoints every n-th block, and holds an amount in between."""

import json
import os
import subprocess
import sys

import pytest
import torch

from test_parallel import MODEL, REPO, run_gradients, train_lines
from test_train import run_trainers_together
from processes import side_by_side

CHECKPOINTING = "--train.activation_checkpointing=true"
EVERY_SECOND = "--train.activation_checkpointing_interval=2"


@pytest.mark.parametrize("layout, nproc, data_parallel, parallel_args, interval_args", [
    ("1 process", 1, 1, [], []),
    ("1 process, every second block", 1, 1, [], [EVERY_SECOND]),
    pytest.param("dp_shard=2", 2, 2, ["--parallel.dp_shard=2"], [], marks=pytest.mark.slow),
    pytest.param("pp=2, every second block", 2, 1, ["--parallel.pp=2"], [EVERY_SECOND], marks=pytest.mark.slow),
])  # fmt: skip
def test_gradients_equal_the_run_without_checkpointing(layout, nproc, data_parallel, parallel_args, interval_args,
                                                       tmp_path):  # fmt: skip
    plain = run_gradients(tmp_path / "plain.pt", parallel_args, nproc, data_parallel)
    checkpointed = run_gradients(tmp_path / "checkpointed.pt", [*parallel_args, CHECKPOINTING, *interval_args],
                                 nproc, data_parallel)  # fmt: skip
    assert checkpointed.keys() == plain.keys()
    for name, expected in plain.items():
        # The recomputation repeats the same operations on the same inputs.
        torch.testing.assert_close(checkpointed[name], expected, rtol=1e-6, atol=0, msg=lambda m: f"{layout} {name}: {m}")


@pytest.mark.slow
def test_losses_equal_the_run_without_checkpointing(tmp_path):
    args = [*MODEL, "--train.seq_len=64", "--train.global_batch_size=4", "--train.micro_batch_size=2",
            "--train.steps=3", "--logging.interval=1", "--train.val_interval=0", "--train.val_batches=1",
            "--checkpoint.interval=0"]  # fmt: skip
    runs = {"plain": [], "checkpointed": [CHECKPOINTING]}
    results = run_trainers_together([([*args, *extra, f"--output_dir={tmp_path / name}"], 1)
                                     for name, extra in runs.items()])  # fmt: skip
    lines = {}
    for name, result in zip(runs, results):
        assert result.returncode == 0, result.stderr[-4000:]
        lines[name] = train_lines(tmp_path / name)
    assert len(lines["plain"]) == 3
    for a, b in zip(lines["plain"], lines["checkpointed"]):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), f"{key} at step {a['step']}"


def peak_bytes(out, extra: list[str]) -> int:
    args = [*MODEL, "--train.seq_len=512", "--train.global_batch_size=2", "--train.micro_batch_size=2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO / "tests" / "workers" / "memory.py"), str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())["peak_bytes_per_rank"][0]


@pytest.mark.slow
def test_checkpointing_lowers_the_peak_tensor_memory(tmp_path):
    # Side by side: each process counts only its own tensors.
    plain, every_second, checkpointed = side_by_side(
        peak_bytes, (tmp_path / "plain.json", []), (tmp_path / "every_second.json", [CHECKPOINTING, EVERY_SECOND]),
        (tmp_path / "checkpointed.json", [CHECKPOINTING]),
    )  # fmt: skip
    print(f"peak tensor memory: {plain / 2**20:.2f} MiB without, {every_second / 2**20:.2f} MiB checkpointing every "
          f"second block, {checkpointed / 2**20:.2f} MiB checkpointing all")  # fmt: skip
    # Seven blocks each keep their input instead of about a dozen activations of the same size; every
    # second block is four of the seven (the first of each stack).
    assert checkpointed < 0.8 * plain
    assert checkpointed < every_second < plain
