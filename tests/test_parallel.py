"""Every parallel layout is proven by numbers: real gloo processes on CPU, compared with one process
running the same model, seed and global batch (fp32)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bltdist.config import load_config
from bltdist.errors import ConfigError
from bltdist.parallel import ParallelDims
from bltdist.training.checkpoint import consolidate
from bltdist.training.optim import lr_factor
from bltdist.training.parallelize import build_model
from test_train import run_trainer
from processes import launcher, v_schedule_on_gloo

REPO = Path(__file__).resolve().parents[1]

# Widths divisible by 2 everywhere, so every dimension can be 2. Several documents per sequence
# come from the corpus below; static patches of 3 put patch edges at varied byte offsets.
MODEL = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.encoder_layers=1",
    "--model.blt.decoder_layers=2", "--model.blt.global_dim=64", "--model.blt.global_heads=2",
    "--model.blt.global_layers=4", "--model.blt.hash_vocab=64", "--model.blt.local_window=16",
    "--model.blt.hash_ngram_sizes=[3,4]", "--model.blt.encoder_ffn_dim=64", "--model.blt.decoder_ffn_dim=64",
    "--model.blt.global_ffn_dim=128", "--patching.patch_size=3",
]  # fmt: skip
TRAIN = [
    "--train.seq_len=64", "--train.global_batch_size=8", "--train.steps=5", "--train.val_batches=1",
    "--train.val_interval=0", "--logging.interval=1", "--optim.warmup_steps=2", "--optim.grad_clip=0.5",
    "--checkpoint.interval=1", "--checkpoint.keep_last=0",
]  # fmt: skip


def run(args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """The trainer under ``nproc`` processes (test_train's launcher), with room for many processes."""
    return run_trainer(args, nproc, timeout)


def train_lines(output_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def weights_at(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    model_dir = consolidate(output_dir / "checkpoints" / f"step_{step}", output_dir / f"model_step_{step}")
    return load_file(model_dir / "model.safetensors")


def write_corpus(root: Path, documents: int) -> Path:
    """``documents`` text files of growing length, in one small vocabulary."""
    for i in range(documents):
        words = " ".join(f"w{(i * 7 + j * 3) % 23}" for j in range(20 + 9 * i))
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: {words}\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 12)


def assert_matches_reference(reference: Path, out: Path) -> None:
    expected, got = train_lines(reference), train_lines(out)
    assert len(got) == len(expected) == 5
    for a, b in zip(expected, got):
        # Adam hides a wrongly scaled gradient in the weights; the global gradient norm does not.
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), f"{key} at step {a['step']}: {b[key]} vs {a[key]}"
    assert_first_step_weights_match(reference, out)


def assert_first_step_weights_match(reference: Path, out: Path) -> None:
    """Weights after step 1 of a run against its single-process ``reference`` run."""
    single, parallel = weights_at(reference, 1), weights_at(out, 1)
    assert parallel.keys() == single.keys()
    # Adam's first update is lr * g / (|g| + eps), about lr * sign(g): where |g| is near eps the
    # summation order of any machine flips it. Where the update saturated (|g| >> eps) it is well
    # conditioned and compared tightly; elsewhere a step can differ by at most twice the lr.
    cfg = load_config(str(reference / "config.yaml"), [])
    initial = build_model(cfg.model, cfg.train.seed, None, torch.device("cpu")).state_dict()
    lr = cfg.optim.lr * lr_factor(0, cfg.optim, cfg.train.steps)
    compared = 0
    for name, tensor in single.items():
        decayed = initial[name] * (1 - lr * cfg.optim.weight_decay) if tensor.ndim >= 2 else initial[name]
        well_conditioned = ((decayed - tensor) / lr).abs() > 0.999
        compared += int(well_conditioned.sum())
        torch.testing.assert_close(parallel[name][well_conditioned], tensor[well_conditioned], rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name} where its first step is well conditioned: {m}")  # fmt: skip
        torch.testing.assert_close(parallel[name], tensor, rtol=0, atol=2.01 * lr, msg=lambda m: f"{name}: {m}")
    assert compared > 0.5 * sum(t.numel() for t in single.values())


LAYOUTS = {
    "dp_shard=2": (2, ["--parallel.dp_shard=2"]),
    "cp=2": (2, ["--parallel.cp=2", "--parallel.dp_shard=1"]),
    "dp_shard=2 x cp=2": (4, ["--parallel.cp=2", "--parallel.dp_shard=2"]),
    "dp_replicate=2 x dp_shard=2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    "dp_replicate=2 x cp=2": (4, ["--parallel.dp_replicate=2", "--parallel.cp=2", "--parallel.dp_shard=1"]),
    "tp=2": (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "dp_shard=2 x tp=2": (4, ["--parallel.tp=2", "--parallel.dp_shard=2"]),
    "pp=2 GPipe": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=GPipe"]),
    "pp=2 1F1B": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=1F1B"]),
    "pp=2 Interleaved1F1B": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=Interleaved1F1B"]),
    "pp=2 ZBVZeroBubble": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=ZBVZeroBubble"]),
    "tp=2 x pp=2": (4, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1"]),
    "dp_shard=2 x tp=2 x pp=2": (8, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=2"]),
    "pp=2 x cp=2": (4, ["--parallel.cp=2", "--parallel.pp=2", "--parallel.dp_shard=1"]),
    "dp_shard=2 x cp=2 x tp=2 x pp=2": (
        16, ["--parallel.cp=2", "--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=2"],
    ),
}  # fmt: skip
LAYOUT_PARAMS = [pytest.param(name, marks=v_schedule_on_gloo) if "ZBV" in name else name for name in LAYOUTS]


def timeout_for(nproc: int) -> int:
    # 16 processes share the few CPU cores of a CI machine: minutes of start-up and gloo traffic.
    return 900 if nproc > 8 else 600


def data_parallel_size(layout: str, nproc: int) -> int:
    return nproc // math.prod(2 for dim in ("tp=2", "cp=2", "pp=2") if dim in layout)


def gradients_command(out: Path, parallel_args: list[str], nproc: int, data_parallel: int) -> list[str]:
    """tests/workers/gradients.py: one batch's gathered gradients, saved to ``out``."""
    micro = 4 // data_parallel  # one micro-batch per rank: a pipeline splits it into microbatches
    args = [*MODEL, "--train.seq_len=64", "--train.global_batch_size=4", f"--train.micro_batch_size={micro}",
            *parallel_args]  # fmt: skip
    return [sys.executable, *launcher(nproc), str(REPO / "tests" / "workers" / "gradients.py"), str(out), *args]


def run_gradients(out: Path, parallel_args: list[str], nproc: int, data_parallel: int) -> dict[str, torch.Tensor]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = gradients_command(out, parallel_args, nproc, data_parallel)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_for(nproc), env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


REFERENCE = "1 process"


@pytest.fixture(scope="module")
def launched(corpus, tmp_path_factory):
    """Each layout (and the one-process reference) launched once for both of its tests: the worker
    saves one batch's gathered gradients (grads.pt), then the same processes train 5 steps (run/).
    Start-up is most of a launch of up to 16 processes on a few cores; it is paid once."""
    results = {}

    def launched_layout(layout: str) -> Path:
        if layout not in results:
            nproc, parallel_args = LAYOUTS[layout] if layout != REFERENCE else (1, [])
            data_parallel = data_parallel_size(layout, nproc)
            out = tmp_path_factory.mktemp("layout")
            train = [*MODEL, *TRAIN, f"--train.micro_batch_size={8 // data_parallel // 2}", *parallel_args,
                     f"--data.path={corpus}", f"--output_dir={out / 'run'}"]  # fmt: skip
            command = [*gradients_command(out / "grads.pt", parallel_args, nproc, data_parallel), "train", *train]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            results[layout] = out, subprocess.run(command, capture_output=True, text=True,
                                                  timeout=2 * timeout_for(nproc), env=env, cwd=REPO)  # fmt: skip
        out, result = results[layout]
        assert result.returncode == 0, result.stderr[-4000:]
        # Every rank's warnings reach the user's terminal: no layout prints one.
        assert "Warning:" not in result.stderr, result.stderr[-4000:]
        return out

    return launched_layout


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_layout_matches_single_process(layout, launched):
    assert_matches_reference(launched(REFERENCE) / "run", launched(layout) / "run")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_layout_gradients_match_single_process(layout, launched):
    """Every parameter's gradient of one global batch, gathered, against one process."""
    reference_gradients = torch.load(launched(REFERENCE) / "grads.pt")
    grads = torch.load(launched(layout) / "grads.pt")
    assert grads.keys() == reference_gradients.keys()
    for name, expected in reference_gradients.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def one_big_micro_batch(corpus, tmp_path_factory) -> Path:
    """One process, the whole global batch of 8 sequences in one micro-step."""
    out = tmp_path_factory.mktemp("big")
    result = run([*MODEL, *TRAIN, "--train.micro_batch_size=8", f"--data.path={corpus}", f"--output_dir={out}"], 1)
    assert result.returncode == 0, result.stderr
    return out


ACCUMULATION = {
    "1 process": (1, ["--train.micro_batch_size=2"]),
    "dp_shard=2 x tp=2 x pp=2": (8, ["--train.micro_batch_size=1", "--parallel.dp_shard=2", "--parallel.tp=2",
                                     "--parallel.pp=2", "--parallel.pp_schedule=GPipe"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(ACCUMULATION))
def test_four_micro_steps_equal_one_step_with_the_4x_batch(layout, corpus, one_big_micro_batch, tmp_path):
    """4 accumulated micro-steps per rank (2 sequences each in one process; 1 sequence on each of 2
    data-parallel ranks in the 8-process layout) against one micro-step of all 8 sequences."""
    nproc, args = ACCUMULATION[layout]
    result = run([*MODEL, *TRAIN, *args, f"--data.path={corpus}", f"--output_dir={tmp_path}"], nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "4 accumulation step(s)" in result.stdout
    assert_matches_reference(one_big_micro_batch, tmp_path)


@pytest.mark.slow
def test_exception_on_one_rank_stops_every_rank_with_its_message(corpus, tmp_path):
    """Rank 1 fails mid-training while rank 0 waits in a collective: no hang, rank 1's message,
    whether the failure is a crash or bad input (a DataError, which rank 1 alone sees)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for kind, code in (("crash", None), ("data", 2)):
        # A collective timeout far above the bound below: only a stopped rank 0 meets the bound.
        command = [sys.executable, *launcher(2), str(REPO / "tests" / "workers" / "fail_on_rank.py"), kind, *MODEL, *TRAIN,
                   "--train.micro_batch_size=4", "--parallel.timeout_seconds=900", f"--data.path={corpus}",
                   f"--output_dir={tmp_path / kind}"]  # fmt: skip
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=800, env=env, cwd=REPO)
        assert result.returncode != 0
        assert time.monotonic() - start < 450, "the surviving rank should be stopped, not left to time out"
        assert "simulated read failure on rank 1" in result.stderr
        if code is None:
            assert "rank      : 1" in result.stderr or "rank: 1" in result.stderr
        else:
            assert "bltdist-train: error: [rank 1] simulated read failure on rank 1" in result.stderr


@pytest.mark.slow
def test_bad_layout_exits_2_before_starting(tmp_path):
    """Rank 0 starts last (tests/workers/slow_rank_0.py): its message must not be lost when rank 1,
    which prints nothing, fails first and torchrun stops the node."""
    command = [sys.executable, *launcher(2), str(REPO / "tests" / "workers" / "slow_rank_0.py"), *MODEL,
               "--parallel.tp=4", "--parallel.dp_shard=1", f"--output_dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode != 0  # each worker exits 2; torchrun reports the failed workers
    assert "bltdist-train: error: [rank 0] invalid config" in result.stderr and "2 process(es)" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["--parallel.tp=2", "--parallel.dp_shard=2"], 6, "6 process(es)"),
        (["--parallel.dp_shard=-1", "--parallel.tp=4"], 6, "not divisible"),
        (["--parallel.tp=3", "--parallel.dp_shard=1", "--model.blt.global_heads=8"], 3, "global_heads"),
        (["--parallel.cp=4", "--parallel.dp_shard=1", "--train.seq_len=6"], 4, "train.seq_len"),
    ],
)
def test_bad_layouts_fail_before_any_process_group(overrides, world_size, message):
    cfg = load_config(None, [*MODEL, "--train.global_batch_size=12", "--train.micro_batch_size=1", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims.from_config(cfg, world_size)
