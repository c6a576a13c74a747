import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bltdist.config import load_config
from bltdist.metrics import TRAIN_KEYS
from bltdist.training.optim import lr_factor
from processes import launcher, side_by_side

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a few steps take seconds on one CPU core.
SMALL = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.encoder_layers=1",
    "--model.blt.decoder_layers=1", "--model.blt.global_dim=64", "--model.blt.global_heads=2",
    "--model.blt.global_layers=1", "--model.blt.hash_vocab=64", "--model.blt.local_window=32",
    "--model.blt.hash_ngram_sizes=[3,4]",
    "--train.seq_len=64", "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.steps=3",
    "--train.val_batches=1", "--train.val_interval=0", "--logging.interval=1", "--optim.warmup_steps=1",
]  # fmt: skip


def run_trainer(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, *launcher(nproc), "-m", "bltdist.train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def run_trainers_together(runs: list[tuple[list[str], int]], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Independent trainer runs, (args, nproc) each, at the same time: a one-process run uses one of
    the few cores, so side by side they end sooner than one after the other. The threads only wait."""
    return side_by_side(run_trainer, *((args, nproc, timeout) for args, nproc in runs))


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def odd_corpus(tmp_path: Path) -> Path:
    """Documents that must train fine: non-UTF-8 bytes, an empty file, ordinary text."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "latin1.txt").write_bytes("café naïve résumé ".encode("latin-1") * 40)
    (corpus / "random.bin.txt").write_bytes(bytes(range(1, 256)) * 4)
    (corpus / "empty.txt").write_bytes(b"")
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog\n" * 20)
    return corpus


def test_single_process_run_writes_metrics_config_and_checkpoint(tmp_path, odd_corpus):
    out = tmp_path / "run"
    result = run_trainer([*SMALL, f"--data.path={odd_corpus}", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr
    assert "step      3/3" in result.stdout and "MFU -" in result.stdout
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for record in train_records:
        assert set(TRAIN_KEYS) <= set(record)
        assert math.isfinite(record["loss"]) and record["mfu"] is None and record["avg_patch_len"] > 1
    assert [r["step"] for r in val_records] == [0, 3]
    assert load_config(str(out / "config.yaml"), []).data.path == str(odd_corpus)
    weights = load_file(out / "model" / "model.safetensors")
    assert "encoder.hash_embedding.weight" in weights


def test_configured_peak_gives_an_mfu_on_cpu(tmp_path, odd_corpus):
    out = tmp_path / "run"
    args = [*SMALL, "--train.steps=1", f"--data.path={odd_corpus}", f"--output_dir={out}", "--logging.peak_tflops=0.5"]
    result = run_trainer(args)
    assert result.returncode == 0, result.stderr
    record = next(r for r in read_metrics(out) if "mfu" in r)
    assert record["mfu"] == pytest.approx(record["tflops"] / 0.5)


BAD_INPUT = [
    (["--optim.lrr=1e-3"], "optim.lrr"),
    (["--train.steps=ten"], "train.steps"),
    (["--optim.lr=-1e-3"], "optim.lr"),
    (["--data.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--patching.mode=entropy", "--patching.entropy_model=/nonexistent/em"], "patching.entropy_model"),
    (["--checkpoint.init_from=/nonexistent/model"], "checkpoint.init_from"),
    (["--checkpoint.resume=/nonexistent/checkpoint"], "checkpoint.resume"),
]


@pytest.fixture(scope="module")
def bad_input_runs() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every bad-input run at once: each is mostly interpreter start-up and imports on one core."""
    results = run_trainers_together([(args, 1) for args, _ in BAD_INPUT])
    return {tuple(args): result for (args, _), result in zip(BAD_INPUT, results)}


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_exits_2_with_a_clear_message(args, message, bad_input_runs):
    result = bad_input_runs[tuple(args)]
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_empty_file_and_unreadable_directory_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    result = run_trainer([f"--data.path={empty}"])
    assert result.returncode == 2 and str(empty) in result.stderr
    hollow = tmp_path / "hollow"
    (hollow / "sub").mkdir(parents=True)
    result = run_trainer([f"--data.path={hollow}"])
    assert result.returncode == 2 and str(hollow) in result.stderr


def test_learning_rate_schedules():
    cfg = load_config(None, ["--train.steps=100", "--optim.warmup_steps=10", "--optim.min_lr_ratio=0.1"])
    assert lr_factor(0, cfg.optim, 100) == pytest.approx(0.1) and lr_factor(9, cfg.optim, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg.optim, 100) == pytest.approx(1.0) and lr_factor(100, cfg.optim, 100) == pytest.approx(0.1)
    assert lr_factor(10, cfg.optim, 100) > lr_factor(50, cfg.optim, 100) > lr_factor(90, cfg.optim, 100)
    wsd = load_config(None, ["--train.steps=100", "--optim.warmup_steps=10", "--optim.schedule=wsd",
                             "--optim.decay_fraction=0.2", "--optim.min_lr_ratio=0.0"])  # fmt: skip
    assert lr_factor(79, wsd.optim, 100) == 1.0 and lr_factor(90, wsd.optim, 100) == pytest.approx(0.5) and lr_factor(100, wsd.optim, 100) == 0.0


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path, odd_corpus):
    """Same seed, same global batch: the loss curve and the final weights match a single process."""
    args = [*SMALL, "--train.steps=4", f"--data.path={odd_corpus}", "--optim.grad_clip=0.5"]
    single, double = tmp_path / "single", tmp_path / "double"
    runs = [([*args, f"--output_dir={single}"], 1), ([*args, f"--output_dir={double}"], 2)]
    for result in run_trainers_together(runs):
        assert result.returncode == 0, result.stderr
    for one, two in zip(read_metrics(single), read_metrics(double), strict=True):
        for key in ("loss", "grad_norm", "val_bpb"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-5), key
    one_weights = load_file(single / "model" / "model.safetensors")
    two_weights = load_file(double / "model" / "model.safetensors")
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_entropy_model_trains_and_drives_entropy_patching(tmp_path, odd_corpus):
    entropy_dir = tmp_path / "entropy"
    entropy_args = [
        "--model.arch=entropy", "--model.entropy.dim=32", "--model.entropy.layers=1", "--model.entropy.heads=2",
        "--model.entropy.ffn_dim=64", "--model.entropy.window=32", "--train.seq_len=64", "--train.steps=2",
        "--train.micro_batch_size=2", "--train.global_batch_size=2", "--train.val_batches=1",
        f"--data.path={odd_corpus}", f"--output_dir={entropy_dir}", "--optim.warmup_steps=1",
    ]  # fmt: skip
    result = run_trainer(entropy_args)
    assert result.returncode == 0, result.stderr
    entropy_model = entropy_dir / "model"
    out = tmp_path / "blt"
    result = run_trainer([*SMALL, "--train.steps=2", f"--data.path={odd_corpus}", f"--output_dir={out}",
                          "--patching.mode=entropy", f"--patching.entropy_model={entropy_model}",
                          "--patching.threshold=4.0", "--patching.max_patch_length=8"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = next(r for r in read_metrics(out) if "avg_patch_len" in r)
    assert 1.0 <= record["avg_patch_len"] <= 8.0


def run_poisoned(first: int, last: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = str(REPO / "tests" / "workers" / "nonfinite.py")
    return subprocess.run([sys.executable, worker, str(first), str(last), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)  # fmt: skip


def checkpoint_weights_are_finite(checkpoint: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for f in checkpoint.glob("*.safetensors") for t in load_file(f).values())


def test_divergence_stops_the_run_without_saving_or_exporting_nonfinite_weights(tmp_path):
    out = tmp_path / "run"
    result = run_trainer([*SMALL, "--train.steps=6", "--optim.lr=1e4", "--optim.warmup_steps=0",
                          "--checkpoint.interval=1", f"--output_dir={out}"])  # fmt: skip
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    failed_step = int(message.split("step ")[1].split(":")[0])
    assert "non-finite loss or gradients, first in the" in message and "optim.lr" in message, message
    assert not (out / "model").exists()
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.name.split("_")[1]) < failed_step
    assert all(checkpoint_weights_are_finite(c) for c in (out / "checkpoints").glob("step_*"))
    assert read_metrics(out)[-1] == {"step": failed_step, "event": "nonfinite", "message": message.split("error: ")[1]}


def test_skip_policy_steps_over_a_bad_step_and_stops_after_too_many_in_a_row(tmp_path):
    out = tmp_path / "skip"
    skip = [*SMALL, "--train.steps=5", "--train.nonfinite=skip", "--train.max_skipped_steps=2"]
    result = run_poisoned(3, 3, [*skip, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr
    lines = [r for r in read_metrics(out) if "loss" in r]
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1, 1, 1]
    assert lines[2]["loss"] is None and all(math.isfinite(r["loss"]) for r in lines if r["step"] != 3)
    assert (out / "model" / "model.safetensors").is_file() and "skipped 1" in result.stdout
    many = run_poisoned(2, 5, [*skip, f"--output_dir={tmp_path / 'many'}"])
    assert many.returncode == 1 and "step 4: non-finite" in many.stderr and "3 steps in a row" in many.stderr
    assert "first in the loss on rank 0" in many.stderr
