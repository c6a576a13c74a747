"""``train.dtype bfloat16`` on CPU: autocast in one process, FSDP's mixed-precision policy (bf16
parameters, fp32 gradient reduction) under gloo with dp_shard = 2; the tiny quickstart learns as
well as in fp32."""

import json

import pytest

from test_parallel import MODEL, train_lines, write_corpus
from test_train import run_trainers_together

ARGS = [*MODEL, "--train.seq_len=64", "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.steps=3",
        "--logging.interval=1", "--train.val_interval=0", "--train.val_batches=1", "--checkpoint.interval=0"]  # fmt: skip
# Each test trains both side by side (run_trainers_together).
DTYPES = ("float32", "bfloat16")


@pytest.mark.parametrize("layout, nproc, parallel_args", [
    pytest.param("1 process (autocast)", 1, [], marks=pytest.mark.slow),
    ("dp_shard=2 (FSDP mixed precision)", 2, ["--parallel.dp_shard=2", "--train.micro_batch_size=1"]),
])  # fmt: skip
def test_bf16_training_runs_close_to_fp32_and_not_identical(layout, nproc, parallel_args, tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus", 6)
    runs = [([*ARGS, *parallel_args, f"--train.dtype={dtype}", f"--data.path={corpus}",
              f"--output_dir={tmp_path / dtype}"], nproc) for dtype in DTYPES]  # fmt: skip
    lines = {}
    for dtype, result in zip(DTYPES, run_trainers_together(runs)):
        assert result.returncode == 0, result.stderr[-4000:]
        lines[dtype] = train_lines(tmp_path / dtype)
    for fp32, bf16 in zip(lines["float32"], lines["bfloat16"]):
        # bf16 keeps 8 bits of mantissa: the losses differ (proof that bf16 ran), by well under 1%.
        assert bf16["loss"] != fp32["loss"], f"{layout}: bf16 gave the fp32 loss bit for bit"
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2), f"{layout} step {fp32['step']}"


@pytest.mark.slow
def test_tiny_quickstart_in_bf16_reaches_the_fp32_held_out_bpb(tmp_path):
    """configs/tiny_static.yaml, shortened to 60 steps on 2 processes (FSDP): held-out bpb within 3%."""
    runs = [(["configs/tiny_static.yaml", "--train.steps=60", "--optim.warmup_steps=6", "--train.val_interval=0",
              f"--train.dtype={dtype}", f"--output_dir={tmp_path / dtype}"], 2) for dtype in DTYPES]  # fmt: skip
    bpb = {}
    for dtype, result in zip(DTYPES, run_trainers_together(runs, 2400)):
        assert result.returncode == 0, result.stderr[-4000:]
        records = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        bpb[dtype] = [r["val_bpb"] for r in records if "val_bpb" in r][-1]
    assert bpb["bfloat16"] == pytest.approx(bpb["float32"], rel=0.03), bpb
