"""python -m bltdist.scaling: shapes FLOP-matched to the BPE reference, and a whole tiny study."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bltdist.scaling import MATCH_TOLERANCE, closest_shape

REPO = Path(__file__).resolve().parents[1]


def test_closest_shape_matches_the_target_and_prefers_the_reference_proportions():
    def cost(dim, layers):
        return 12.0 * dim * dim * layers

    target = cost(128, 4)
    dim, layers, flops = closest_shape(target, ratio=128 / 4, max_dim=512, max_layers=16, cost=cost)
    assert abs(flops / target - 1) <= MATCH_TOLERANCE
    assert (dim, layers) == (128, 4)  # 256 x 1 and 64 x 16 cost the same but stray from the ratio


def test_closest_shape_takes_the_nearest_when_nothing_matches():
    dim, layers, flops = closest_shape(10.0, ratio=1.0, max_dim=64, max_layers=2, cost=lambda d, n: 1000.0 * d * n)
    assert (dim, layers) == (16, 1) and flops == 16000.0


@pytest.mark.slow
def test_tiny_study_trains_every_model_and_writes_its_report(tmp_path):
    out = tmp_path / "study"
    # Two runs at a time (--jobs 2): each is one single-threaded process, and the machine has 2 cores.
    command = [sys.executable, "-m", "bltdist.scaling", "--budget", "2e9", "--out", str(out), "--seq-len", "64",
               "--batch", "2", "--dim", "64", "--layers", "1", "--vocab-size", "300", "--local-dim", "16",
               "--entropy-dim", "32", "--entropy-layers", "1", "--entropy-patch-sizes", "4.5", "--val-batches", "1",
               "--calibration-bytes", "20000", "--jobs", "2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "scaling.json").read_text())
    names = [model["name"] for model in report["models"]]
    assert names == ["bpe_lm", "byte_lm", "blt_static_4", "blt_static_6", "blt_entropy_4.5"]
    steps = report["config"]["steps"]
    for model in report["models"]:
        assert model["train_bytes"] == steps * 2 * 64  # the same bytes for every model
        # What each spent: its own measured FLOPs per byte, close to the plan (patch lengths vary a little).
        assert model["train_flops"] == pytest.approx(model["train_flops_per_byte"] * model["train_bytes"])
        assert model["train_flops_per_byte"] == pytest.approx(model["planned_train_flops_per_byte"], rel=0.5)
        assert model["curve"][-1]["step"] == steps and 0 < model["final_val_bpb"] < 12
        if model["name"].startswith("blt_entropy"):  # the threshold recalibrated to the target patch size holds it
            assert model["measured_patch_size"] == pytest.approx(model["planned_patch_size"], rel=0.25)
    reference = report["models"][0]
    assert reference["planned_train_flops_per_byte"] == report["target_train_flops_per_byte"]
    assert report["winner"] in names
    assert (out / "scaling.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "scaling.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    # A second call trains nothing again: it reads the finished runs.
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == len(names) + 1
