"""What a cluster does to a run, against the real trainer: checkpoints found, refused or not trusted,
saves that fail, and inputs refused before anything starts or is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_checkpoint import corpus, launch, latest, losses, reference, tree_digest  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def events(output_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" in r]


def copy_run(reference: Path, out: Path) -> Path:
    shutil.copytree(reference, out)
    return out


@pytest.mark.slow
def test_resume_auto_without_latest_takes_the_newest_complete_checkpoint_and_says_so(reference, corpus, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    (out / "checkpoints" / "latest").unlink()
    shutil.rmtree(out / "model")
    resumed = launch("single", [f"--data.path={corpus}", f"--output_dir={out}", "--checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "latest is missing: resuming from the newest complete checkpoint, step_9" in resumed.stdout
    assert events(out)[-1] == {"step": 9, "event": "resume", "from": str(out / "checkpoints" / "step_9")}


@pytest.mark.slow
def test_resume_auto_with_a_damaged_latest_falls_back_and_one_outside_the_run_is_refused(reference, corpus, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    args = [f"--data.path={corpus}", f"--output_dir={out}", "--checkpoint.resume=auto", "--train.steps=10"]
    (out / "checkpoints" / "latest").write_text("step_12\n")  # a step whose save never completed
    resumed = launch("single", args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "names 'step_12', which is not a complete checkpoint: resuming from the newest complete" in resumed.stdout
    assert "after step 9" in resumed.stdout
    (out / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step_20\n")
    before = tree_digest(out)
    refused = launch("single", args)
    assert refused.returncode == 2 and "outside this run's checkpoints" in refused.stderr, refused.stderr[-4000:]
    assert tree_digest(out) == before


def add_stray_shard(out: Path) -> None:
    """A copy of an older shard left in the newest checkpoint, as a careless restore would leave it."""
    older = next((out / "checkpoints" / "step_6").glob("*.safetensors"))
    shutil.copy(older, out / "checkpoints" / "step_9" / "stray-copy.safetensors")


@pytest.mark.parametrize(
    "change, resume, message",
    [
        (None, [], "already holds checkpoints (step_6, step_9)"),  # a fresh run over a finished one
        (add_stray_shard, ["--checkpoint.resume=auto"], "stray-copy.safetensors, which its metadata.json does not list"),
    ],
    ids=["fresh-run-over-checkpoints", "stray-shard"],
)
@pytest.mark.slow
def test_checkpoints_are_never_overwritten_or_mixed_by_mistake(reference, corpus, tmp_path, change, resume, message):
    out = copy_run(reference, tmp_path / "run")
    if change is not None:
        change(out)
    before = tree_digest(out)
    result = launch("single", [f"--data.path={corpus}", f"--output_dir={out}", *resume])
    assert result.returncode == 2 and message in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr and tree_digest(out) == before


@pytest.mark.slow
def test_a_changed_global_batch_or_seed_is_refused_on_resume_before_anything_is_written(reference, corpus, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    before = tree_digest(out)
    for change in ("--train.global_batch_size=16", "--train.seed=1"):
        result = launch("single", [f"--data.path={corpus}", f"--output_dir={out}", "--checkpoint.resume=auto", change])
        assert result.returncode == 2 and "cannot resume with train." in result.stderr, result.stderr[-4000:]
    assert tree_digest(out) == before


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(corpus, tmp_path, async_save):
    args = [f"--data.path={corpus}", f"--output_dir={tmp_path}", f"--checkpoint.async_save={str(async_save).lower()}"]
    result = launch("single", args, worker=["disk-full-in-save", "6"])
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "checkpoint of step 6 could not be written to" in message and "No space left on device" in message
    assert "the newest complete checkpoint is still" in message and "step_3" in message
    assert latest(tmp_path) == "step_3" and max(losses(tmp_path)) <= 8  # surfaced before the next save (step 9)
    assert events(tmp_path)[-1]["event"] == "failed"


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bltdist.train", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)  # fmt: skip


def test_a_yaml_error_does_not_hide_the_other_problems(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1,\n")
    result = run_train([str(broken), "--optim.lr=-1", "--train.stepz=3"])
    assert result.returncode == 2
    assert "is not valid YAML" in result.stderr and "optim.lr" in result.stderr and "train.stepz" in result.stderr


def test_a_binary_file_named_as_data_is_trained_on_with_a_warning(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    result = run_train(["configs/tiny_static.yaml", f"--data.path={binary}", f"--output_dir={tmp_path / 'run'}",
                        "--train.steps=1", "--train.val_batches=1", "--train.seq_len=64", "--train.global_batch_size=2",
                        "--train.micro_batch_size=2"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"data.path {binary} looks binary" in result.stderr
