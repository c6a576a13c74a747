"""patching.target_patch_size: the threshold recalibrated during training so that patches keep their
target average length, identically on every rank, logged and saved with checkpoints."""

import json

import numpy as np
import pytest
import torch
from test_joint_entropy import blt_args, corpus, entropy_run, run, train_records  # noqa: F401 (fixtures)

from bltdist.config import load_config
from bltdist.patching.cli import entropy_sample
from bltdist.patching.entropy import EntropyModel
from bltdist.patching.patcher import Patcher
from bltdist.patching.rules import patch_starts
from bltdist.patching.tokens import BOS_ID, BYTE_OFFSET, document_tokens


def patcher_with_recent(entropy_run, mode: str, target: float, max_patch_length: int | None) -> Patcher:
    cfg = load_config(None, ["--patching.mode=entropy", f"--patching.entropy_model={entropy_run / 'model'}",
                             f"--patching.threshold_mode={mode}", f"--patching.target_patch_size={target}",
                             f"--patching.max_patch_length={'null' if max_patch_length is None else max_patch_length}"])  # fmt: skip
    patcher = Patcher(cfg.patching, recent_batches=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the first of three micro-batches falls out of the window of two
        tokens = torch.randint(BYTE_OFFSET, 260, (4, 128), generator=generator)
        tokens[:, 40] = BOS_ID
        patcher.observe(tokens, torch.rand(4, 128, generator=generator) * 4)
    return patcher


@pytest.mark.parametrize("mode, target, max_patch_length", [("global", 4.0, None), ("global", 6.0, 8),
                                                             ("monotonic", 3.0, None)])  # fmt: skip
def test_recalibration_hits_the_target_on_the_recent_micro_batches(entropy_run, mode, target, max_patch_length):
    patcher = patcher_with_recent(entropy_run, mode, target, max_patch_length)
    threshold = patcher.recalibrate()
    assert patcher.threshold == threshold
    tokens = sum(t.numel() for t, _ in patcher.recent)
    patches = sum(int(patcher.starts(t, e).sum()) for t, e in patcher.recent)
    assert tokens / patches == pytest.approx(target, rel=0.01)
    # Bisection found the best threshold: a little lower or higher misses the target by more.
    for nudge in (-0.02, 0.02):
        moved = sum(int(patch_starts(t, "entropy", entropies=e, threshold=threshold + nudge, threshold_mode=mode,
                                     max_patch_length=max_patch_length).sum()) for t, e in patcher.recent)  # fmt: skip
        assert abs(tokens / moved - target) >= abs(tokens / patches - target)


@pytest.mark.slow
def test_patch_size_is_held_at_its_target_identically_on_every_rank_and_saved(entropy_run, corpus, tmp_path):
    """A threshold far from the target (every byte a patch) is recalibrated after step 1 and every
    2 steps; the thresholds logged by 1 process and by 2 data-parallel ranks are bit for bit the same
    (they come from summed whole-number counts), the checkpoint and the model directory keep it."""
    target = ["--patching.target_patch_size=4", "--patching.recalibrate_interval=2", "--patching.threshold=0.0"]
    single, double = tmp_path / "single", tmp_path / "double"
    result = run([*blt_args(entropy_run, corpus, single), *target, "--train.micro_batch_size=4"])
    assert result.returncode == 0, result.stderr[-4000:]
    result = run([*blt_args(entropy_run, corpus, double), *target, "--train.micro_batch_size=4",
                  "--parallel.dp_shard=2"], nproc=2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = train_records(single), train_records(double)
    assert one[1]["avg_patch_len"] == 1.0  # threshold 0: every position starts a patch
    thresholds = [one[step]["patch_threshold"] for step in range(1, 7)]
    assert thresholds == [two[step]["patch_threshold"] for step in range(1, 7)]
    # Logged: the threshold each step used; recalibrated after steps 1, 2, 4 and 6.
    assert thresholds[0] == 0.0 and thresholds[2] == thresholds[3] and thresholds[4] == thresholds[5]
    assert len(set(thresholds)) == 4
    later = [one[step]["avg_patch_len"] for step in range(2, 7)]
    # Each step's batch is another sample than the one its threshold was fitted on: around the target.
    assert all(2.5 < length < 6.5 for length in later) and sum(later) / len(later) == pytest.approx(4.0, rel=0.15)
    saved = json.loads((single / "checkpoints" / "step_6" / "metadata.json").read_text())["patching"]["threshold"]
    assert saved not in thresholds and saved == load_config(str(single / "model" / "config.yaml"), []).patching.threshold


def test_calibration_samples_chunks_of_many_documents_with_the_entropies_training_computes(entropy_run):
    """``python -m bltdist.patch calibrate`` spreads its byte budget over chunks of many documents (a few
    whole long documents made the threshold miss the target in training); each chunk's tokens and
    entropies are those of the training stream at that place."""
    model = EntropyModel(str(entropy_run / "model"))
    context = model.context
    documents = [bytes(f"doc {i}: ", "ascii") + bytes((i * 7 + j * j) % 95 + 32 for j in range(4 * context + i))
                 for i in range(12)]  # fmt: skip
    sample = entropy_sample(model, documents, 10 * context, seed=0)
    assert len(sample.tokens) == 10 and sample.num_tokens <= 10 * context
    found = set()
    for tokens, entropies in zip(sample.tokens, sample.entropies):
        place = next((i, c) for i, d in enumerate(documents) for c in range(model.num_chunks(d))
                     if np.array_equal(document_tokens(d, c * context, (c + 1) * context), tokens))  # fmt: skip
        whole = model.document_entropies(documents[place[0]])
        assert np.array_equal(entropies, whole[place[1] * context : (place[1] + 1) * context])
        found.add(place)
    assert len(found) == 10 and len({i for i, _ in found}) >= 5  # whole documents: 2 of them
    again = entropy_sample(model, documents, 10 * context, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again.tokens, sample.tokens))
    assert len(entropy_sample(model, documents, None, seed=0).tokens) == len(documents)  # None: all, whole
