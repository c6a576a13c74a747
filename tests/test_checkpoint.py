"""Checkpoints: exact resume after crashes and preemption, resharding across layouts, atomicity,
integrity errors and consolidation. Real trainer processes (gloo on CPU for several ranks); the
interruptions come from tests/workers/interrupt.py, which only adds the trigger."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bltdist.config import load_config
from bltdist.training.parallelize import build_model
from test_parallel import write_corpus
from processes import launcher, side_by_side

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "interrupt.py"

# Every width divisible by 2 so that tp=2 and dp_shard=4 both fit; a few steps take seconds.
ARGS = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.encoder_layers=1",
    "--model.blt.decoder_layers=1", "--model.blt.global_dim=64", "--model.blt.global_heads=2",
    "--model.blt.global_layers=2", "--model.blt.hash_vocab=64", "--model.blt.local_window=16",
    "--model.blt.hash_ngram_sizes=[3,4]", "--model.blt.encoder_ffn_dim=64", "--model.blt.decoder_ffn_dim=64",
    "--model.blt.global_ffn_dim=128", "--patching.patch_size=3", "--train.seq_len=64",
    "--train.global_batch_size=8", "--train.steps=9", "--train.val_batches=1", "--train.val_interval=0",
    "--logging.interval=1", "--optim.warmup_steps=2", "--optim.grad_clip=0.5", "--checkpoint.interval=3",
]  # fmt: skip
LAYOUTS = {
    "single": (1, ["--train.micro_batch_size=4"]),
    "dp_shard=4": (4, ["--parallel.dp_shard=4", "--train.micro_batch_size=2"]),
    "dp_shard=2 x tp=2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.micro_batch_size=2"]),
    "dp_shard=2": (2, ["--parallel.dp_shard=2", "--train.micro_batch_size=4"]),
    "tp=2 x pp=2": (4, ["--parallel.dp_shard=1", "--parallel.tp=2", "--parallel.pp=2", "--train.micro_batch_size=8"]),
    "cp=2": (2, ["--parallel.dp_shard=1", "--parallel.cp=2", "--train.micro_batch_size=8"]),
}


def launch(layout: str, extra: list[str], worker: list[str] | None = None) -> subprocess.CompletedProcess:
    nproc, layout_args = LAYOUTS[layout]
    program = [str(WORKER), *worker] if worker else ["-m", "bltdist.train"]
    command = [sys.executable, *launcher(nproc), *program, *ARGS, *layout_args, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def losses(output_dir: Path) -> dict[int, float]:
    """Per-step loss; a step logged twice (before a crash and after resuming) keeps its last value."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def latest(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "latest").read_text().strip()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 8)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """One process, 9 steps without interruption, checkpoints at 3, 6 and 9, two kept."""
    out = tmp_path_factory.mktemp("reference")
    result = launch("single", [f"--data.path={corpus}", f"--output_dir={out}", "--checkpoint.keep_last=2"])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_checkpoints_are_committed_and_pruned(reference):
    checkpoints = reference / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_6", "step_9"]
    assert latest(reference) == "step_9"
    metadata = json.loads((checkpoints / "step_9" / "metadata.json").read_text())
    assert metadata["step"] == 9 and metadata["consumed"]["sequences"] == 9 * 8
    assert metadata["consumed"]["bytes"] == 9 * 8 * 64 and metadata["optimizer"]["steps"] == 9
    assert metadata["scheduler"]["last_epoch"] == 9 and len(metadata["rng"]) == 1
    for shard in metadata["shards"]:
        assert (checkpoints / "step_9" / shard["file"]).stat().st_size == shard["bytes"]
    # The trainer's final model directory is the consolidation of the last checkpoint.
    assert (reference / "model" / "model.safetensors").is_file()


def test_killed_mid_training_resumes_bitwise(reference, corpus, tmp_path):
    args = [f"--data.path={corpus}", f"--output_dir={tmp_path}"]
    killed = launch("single", args, worker=["kill-after-step", "5"])
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert latest(tmp_path) == "step_3"
    resumed = launch("single", [*args, "--checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "after step 3" in resumed.stdout
    assert losses(tmp_path) == losses(reference)  # bitwise: floats compared with ==


def test_killed_mid_async_save_resumes_from_the_previous_checkpoint(reference, corpus, tmp_path):
    args = [f"--data.path={corpus}", f"--output_dir={tmp_path}", "--checkpoint.async_save=true"]
    killed = launch("single", args, worker=["kill-in-save", "6"])
    assert killed.returncode == -9, killed.stderr[-4000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".step_6.tmp", "latest", "step_3"]
    assert any((checkpoints / ".step_6.tmp").glob("*.safetensors"))  # the shards were written
    resumed = launch("single", [*args, "--checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "after step 3" in resumed.stdout
    assert losses(tmp_path) == losses(reference)
    assert not list(checkpoints.glob(".step_*"))


def test_sigterm_saves_exits_0_and_resumes_exactly(reference, corpus, tmp_path):
    args = [f"--data.path={corpus}", f"--output_dir={tmp_path}"]
    stopped = launch("single", args, worker=["sigterm-after-step", "4"])
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert latest(tmp_path) == "step_4" and max(losses(tmp_path)) == 4
    resumed = launch("single", [*args, "--checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert losses(tmp_path) == losses(reference)


def damage_truncate(step_dir: Path) -> Path:
    shard = next(step_dir.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard


def damage_flip_bytes(step_dir: Path) -> Path:
    shard = next(step_dir.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


def damage_remove(step_dir: Path) -> Path:
    shard = next(step_dir.glob("*.safetensors"))
    shard.unlink()
    return shard


BAD_CHECKPOINTS = {
    "truncated": (damage_truncate, []),
    "checksum": (damage_flip_bytes, []),
    "missing shard": (damage_remove, []),
    "different model": (None, ["--model.blt.global_dim=32"]),
}


@pytest.fixture(scope="module")
def bad_checkpoint_runs(reference, corpus, tmp_path_factory) -> dict[str, tuple]:
    """message -> (output_dir, the file the error must name, its tree digest before, the result): each
    case resumes a damaged copy of the reference; all at once, each is mostly start-up on one core."""
    cases = {}
    for message, (damage, extra) in BAD_CHECKPOINTS.items():
        out = tmp_path_factory.mktemp("bad_checkpoint") / "run"
        shutil.copytree(reference, out)
        step_dir = out / "checkpoints" / "step_9"
        named = damage(step_dir) if damage else step_dir / "metadata.json"
        cases[message] = out, named, tree_digest(out), extra

    def resume(case: tuple) -> subprocess.CompletedProcess:
        out, _, _, extra = case
        return launch("single", [f"--data.path={corpus}", f"--output_dir={out}", "--checkpoint.resume=auto", *extra])

    results = side_by_side(resume, *((case,) for case in cases.values()))
    return {message: (*case[:3], result) for (message, case), result in zip(cases.items(), results)}


@pytest.mark.parametrize("message", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_exits_2_naming_the_file_and_changes_nothing(bad_checkpoint_runs, message):
    out, named, before, result = bad_checkpoint_runs[message]
    assert result.returncode == 2, result.stderr[-4000:]
    assert message in result.stderr and str(named) in result.stderr and "Traceback" not in result.stderr
    assert "resume from another checkpoint" in result.stderr or "start a new output_dir" in result.stderr
    assert tree_digest(out) == before


def test_consolidate_writes_a_model_directory_that_init_from_reads(reference, tmp_path):
    out = tmp_path / "model"
    command = [sys.executable, "-m", "bltdist.convert", "consolidate", str(reference / "checkpoints" / "step_6"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    cfg = load_config(str(out / "config.yaml"), [])
    model = build_model(cfg.model, cfg.train.seed, str(out), torch.device("cpu"))
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    bad = subprocess.run([*command[:4], str(tmp_path / "nowhere"), str(tmp_path / "x")], capture_output=True, text=True,
                         cwd=REPO, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and str(tmp_path / "nowhere") in bad.stderr


@pytest.fixture(scope="module")
def reference_dp_tp(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference_dp_tp")
    result = launch("dp_shard=2 x tp=2", [f"--data.path={corpus}", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_four_processes_killed_mid_training_resume_bitwise(reference_dp_tp, corpus, tmp_path):
    """dp_shard=2 x tp=2 with async saves: rank 0 is killed after step 5, the run resumes."""
    args = [f"--data.path={corpus}", f"--output_dir={tmp_path}", "--checkpoint.async_save=true"]
    killed = launch("dp_shard=2 x tp=2", args, worker=["kill-after-step", "5"])
    assert killed.returncode != 0
    assert latest(tmp_path) == "step_3"
    resumed = launch("dp_shard=2 x tp=2", [*args, "--checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert losses(tmp_path) == losses(reference_dp_tp)


@pytest.mark.slow
def test_resharding_dp_shard_4_to_tp_2_x_pp_2_to_one_process(reference, corpus, tmp_path):
    """Each leg stops on SIGTERM (sent to rank 0 only: the ranks agree) and the next resumes its
    checkpoint under another layout; every loss stays within 1e-5 of the uninterrupted run."""
    first, second, third = tmp_path / "dp_shard_4", tmp_path / "tp_pp", tmp_path / "single"
    result = launch("dp_shard=4", [f"--data.path={corpus}", f"--output_dir={first}"], worker=["sigterm-after-step", "3"])
    assert result.returncode == 0, result.stderr[-4000:]
    result = launch("tp=2 x pp=2", [f"--data.path={corpus}", f"--output_dir={second}",
                                    f"--checkpoint.resume={first / 'checkpoints' / 'step_3'}"],
                    worker=["sigterm-after-step", "6"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    result = launch("single", [f"--data.path={corpus}", f"--output_dir={third}",
                               f"--checkpoint.resume={second / 'checkpoints' / 'step_6'}"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    expected = losses(reference)
    got = {**losses(first), **losses(second), **losses(third)}
    assert sorted(losses(second)) == [4, 5, 6] and sorted(losses(third)) == [7, 8, 9]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"step {step}: {got[step]} vs {loss}"


@pytest.mark.slow
def test_resharding_cp_2_to_dp_shard_2(reference, corpus, tmp_path):
    first, second = tmp_path / "cp", tmp_path / "dp"
    result = launch("cp=2", [f"--data.path={corpus}", f"--output_dir={first}"], worker=["sigterm-after-step", "3"])
    assert result.returncode == 0, result.stderr[-4000:]
    result = launch("dp_shard=2", [f"--data.path={corpus}", f"--output_dir={second}",
                                   f"--checkpoint.resume={first / 'checkpoints' / 'step_3'}"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    expected, got = losses(reference), {**losses(first), **losses(second)}
    assert sorted(losses(second)) == [4, 5, 6, 7, 8, 9]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"step {step}: {got[step]} vs {loss}"