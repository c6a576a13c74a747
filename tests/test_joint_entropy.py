"""Entropy models that keep learning: fine-tuning one on new data (model.arch entropy with
checkpoint.init_from), and joint training alongside the BLT (patching.entropy_model_training:
joint): boundaries from the current entropy model, both models and optimizers in checkpoints,
exact resume after SIGKILL, parallel layouts equal to one process. Real trainer processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_parallel import write_corpus

from bltdist.config import load_config
from bltdist.errors import ConfigError
from processes import launcher

REPO = Path(__file__).resolve().parents[1]

ENTROPY_MODEL = [
    "--model.arch=entropy", "--model.entropy.dim=32", "--model.entropy.layers=1", "--model.entropy.heads=2",
    "--model.entropy.ffn_dim=64", "--model.entropy.window=32", "--train.seq_len=64", "--train.micro_batch_size=4",
    "--train.global_batch_size=4", "--train.val_batches=1", "--train.val_interval=0", "--logging.interval=1",
    "--optim.lr=4e-3", "--optim.warmup_steps=2",
]  # fmt: skip
BLT = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.encoder_layers=1",
    "--model.blt.decoder_layers=1", "--model.blt.global_dim=64", "--model.blt.global_heads=2",
    "--model.blt.global_layers=2", "--model.blt.hash_vocab=64", "--model.blt.local_window=16",
    "--model.blt.hash_ngram_sizes=[3,4]", "--model.blt.encoder_ffn_dim=64", "--model.blt.decoder_ffn_dim=64",
    "--model.blt.global_ffn_dim=128", "--train.seq_len=64", "--train.global_batch_size=8", "--train.steps=6",
    "--train.val_batches=1", "--train.val_interval=0", "--logging.interval=1", "--optim.warmup_steps=2",
    "--checkpoint.interval=3", "--patching.mode=entropy", "--patching.threshold=4.8",
]  # fmt: skip
JOINT = ["--patching.entropy_model_training=joint", "--patching.entropy_lr=1e-3"]


def run(args: list[str], nproc: int = 1, program: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher(nproc), *(program or ["-m", "bltdist.train"]), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def train_records(output_dir: Path) -> dict[int, dict]:
    """Each step's metrics line; a step logged twice (before a crash and after resuming) keeps its last."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 12)


@pytest.fixture(scope="session")
def entropy_run(corpus, tmp_path_factory) -> Path:
    """A tiny entropy model trained for 30 steps: its output_dir/model places patches."""
    out = tmp_path_factory.mktemp("entropy_run")
    result = run([*ENTROPY_MODEL, "--train.steps=30", f"--data.path={corpus}", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def blt_args(entropy_run: Path, corpus: Path, out: Path) -> list[str]:
    return [*BLT, f"--patching.entropy_model={entropy_run / 'model'}", f"--data.path={corpus}", f"--output_dir={out}"]


def test_fine_tuning_an_entropy_model_starts_from_its_loss_not_from_scratch(entropy_run, corpus, tmp_path):
    """model.arch entropy with checkpoint.init_from: the first step's loss is the loaded model's, not ln(260)."""
    trained_loss = train_records(entropy_run)[30]["loss"]
    fine_tuned = tmp_path / "fine_tuned"
    result = run([*ENTROPY_MODEL, "--train.steps=2", f"--checkpoint.init_from={entropy_run / 'model'}",
                  f"--data.path={corpus}", f"--output_dir={fine_tuned}"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    scratch = tmp_path / "scratch"
    result = run([*ENTROPY_MODEL, "--train.steps=1", f"--data.path={corpus}", f"--output_dir={scratch}"])
    assert result.returncode == 0, result.stderr[-4000:]
    first, untrained = train_records(fine_tuned)[1]["loss"], train_records(scratch)[1]["loss"]
    assert untrained > 5.0 and first < trained_loss + 0.5 < untrained - 1.0, (first, trained_loss, untrained)


@pytest.mark.slow
def test_joint_training_resumed_after_sigkill_is_bit_for_bit(entropy_run, corpus, tmp_path):
    """Joint training with the patch size held at its target: killed after step 5 (the newest
    checkpoint is step 3), resumed: every figure of every step equals the uninterrupted run's, and
    the checkpoints and the final model directory hold both models."""
    target = ["--patching.target_patch_size=4", "--patching.recalibrate_interval=2", "--train.micro_batch_size=4"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = run([*blt_args(entropy_run, corpus, whole), *JOINT, *target])
    assert result.returncode == 0, result.stderr[-4000:]
    worker = [str(REPO / "tests" / "workers" / "interrupt.py"), "kill-after-step", "5"]
    result = run([*blt_args(entropy_run, corpus, killed), *JOINT, *target], program=worker)
    assert result.returncode == -9, result.stderr[-4000:]
    result = run([*blt_args(entropy_run, corpus, killed), *JOINT, *target, "--checkpoint.resume=auto"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "after step 3" in result.stdout
    expected, resumed = train_records(whole), train_records(killed)
    keys = ("loss", "grad_norm", "entropy_loss", "patch_threshold", "avg_patch_len")
    assert {s: [r[k] for k in keys] for s, r in resumed.items()} == {s: [r[k] for k in keys] for s, r in expected.items()}
    metadata = json.loads((whole / "checkpoints" / "step_6" / "metadata.json").read_text())
    assert {"model", "optimizer", "entropy_model", "entropy_optimizer"} <= set(metadata["tensors"])
    # The final model directory carries the trained entropy model and the threshold in use.
    model_cfg = load_config(str(whole / "model" / "config.yaml"), [])
    assert model_cfg.patching.entropy_model == "entropy_model"
    assert model_cfg.patching.threshold == metadata["patching"]["threshold"]
    trained = load_file(whole / "model" / "entropy_model" / "model.safetensors")
    loaded = load_file(entropy_run / "model" / "model.safetensors")
    assert trained.keys() == loaded.keys() and any(not trained[k].equal(loaded[k]) for k in loaded)
    assert expected[1]["entropy_loss"] > expected[6]["entropy_loss"]


@pytest.fixture(scope="module")
def joint_single(entropy_run, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("joint_single")
    result = run([*blt_args(entropy_run, corpus, out), *JOINT, "--train.micro_batch_size=4"])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


JOINT_LAYOUTS = {
    "dp_shard=2": (2, ["--parallel.dp_shard=2", "--train.micro_batch_size=2"]),
    "dp_shard=2 x tp=2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.micro_batch_size=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(JOINT_LAYOUTS))
def test_joint_training_under_a_parallel_layout_matches_one_process(layout, joint_single, entropy_run, corpus, tmp_path):
    nproc, layout_args = JOINT_LAYOUTS[layout]
    result = run([*blt_args(entropy_run, corpus, tmp_path), *JOINT, *layout_args], nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    expected, got = train_records(joint_single), train_records(tmp_path)
    assert got.keys() == expected.keys() == set(range(1, 7))
    for step, record in expected.items():
        # Patch boundaries are compared exactly: they come from the jointly trained entropy model.
        assert got[step]["avg_patch_len"] == record["avg_patch_len"], step
        for key in ("loss", "grad_norm", "entropy_loss"):
            assert got[step][key] == pytest.approx(record[key], rel=1e-5), (step, key)
    # The entropy model learns, so the boundaries move: the run is not a frozen one in disguise.
    assert len({record["avg_patch_len"] for record in expected.values()}) > 2


@pytest.mark.parametrize("saved, wanted", [("joint", "frozen"), ("frozen", "joint")])
def test_switching_entropy_model_training_on_resume_is_refused_before_anything_is_written(
    saved, wanted, joint_single, entropy_run, corpus, tmp_path
):
    """joint -> frozen would patch with the entropy model the run started from, not the trained one;
    frozen -> joint has no entropy optimizer to resume. Refused with exit 2 before any file changes."""
    out = tmp_path / "run"
    shutil.copytree(joint_single, out)
    for metadata_file in (out / "checkpoints").glob("step_*/metadata.json"):
        metadata = json.loads(metadata_file.read_text())
        metadata["config"]["patching"]["entropy_model_training"] = saved  # a frozen run's checkpoint says frozen
        metadata_file.write_text(json.dumps(metadata))
    files = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = run([*blt_args(entropy_run, corpus, out), *(JOINT if wanted == "joint" else []), "--train.steps=8",
                  "--train.micro_batch_size=4", f"--patching.entropy_model_training={wanted}",
                  "--checkpoint.resume=auto"])  # fmt: skip
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"cannot resume with patching.entropy_model_training {saved} -> {wanted}" in result.stderr
    assert f"or resume with patching.entropy_model_training: {saved}" in result.stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == files


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--patching.entropy_model_training=joint"], "patching.entropy_model_training: joint needs patching.mode entropy"),
        (["--patching.target_patch_size=4"], "patching.target_patch_size: needs patching.mode entropy"),
        (["--patching.mode=entropy", "--patching.entropy_model=em", "--patching.entropies=store",
          "--patching.entropy_model_training=joint"], "patching.entropies: precomputed entropies go stale"),
    ],
)  # fmt: skip
def test_joint_training_and_a_target_need_online_entropy_patching(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
