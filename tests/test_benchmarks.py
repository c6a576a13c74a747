"""benchmarks/mfu.py on CPU at tiny sizes: every point is a real 2-process run whose summary.json
feeds the JSON, the markdown table and the PNG plot. benchmarks/ring_block.py at a tiny shape."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.decoder_layers=1",
    "--model.blt.global_dim=64", "--model.blt.global_heads=2", "--model.blt.global_layers=1",
    "--model.blt.hash_vocab=64", "--model.blt.local_window=32", "--model.blt.hash_ngram_sizes=[3,4]",
    "--train.micro_batch_size=2", "--train.global_batch_size=4",
]  # fmt: skip


@pytest.mark.slow
def test_cpu_sweep_writes_json_table_and_plot(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "benchmarks/mfu.py", "--nproc", "2", "--configs", "configs/tiny_static.yaml",
               "--seq-lens", "64", "128", "--layouts", "fsdp", "--steps", "3", "--peak-tflops", "0.05",
               "--results-dir", str(tmp_path), "--overrides", *TINY_MODEL]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    (json_path,) = tmp_path.glob("mfu-cpu-*.json")
    data = json.loads(json_path.read_text())
    assert data["device"] == "cpu" and data["torch"] and data["commit"]
    assert [p["seq_len"] for p in data["points"]] == [64, 128]
    for point in data["points"]:
        assert "error" not in point, point
        assert 0 < point["mfu"] < 1 and point["bytes_per_sec_per_rank"] > 0
        assert point["mfu"] == pytest.approx(point["tflops_per_rank"] / 0.05)
        assert point["step_time_breakdown"]["forward_backward_s"] > 0
    table = json_path.with_suffix(".md").read_text()
    assert table.count("| configs/tiny_static.yaml |") == 2
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_layout_is_rejected_before_any_run(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/mfu.py", "--nproc", "1", "--layouts", "zp=2",
                             "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode != 0 and "layout 'zp=2'" in result.stderr
    assert not list(tmp_path.iterdir())


def test_ring_block_runs_on_cpu_and_writes_its_figures(tmp_path):
    command = [sys.executable, "benchmarks/ring_block.py", "--batch", "1", "--patches", "64", "--heads", "2",
               "--head-dim", "16", "--iters", "2", "--warmup", "1", "--results-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    (json_path,) = tmp_path.glob("ring_block-cpu-*.json")
    data = json.loads(json_path.read_text())
    assert data["device"] == "cpu" and data["config"]["patches"] == 64
    for key in ("ring_ms", "ring_fp32_inputs_ms", "sdpa_ms", "ring_block_tflops_per_sec"):
        assert data[key] > 0, key
    assert data["speedup_vs_fp32_inputs"] == pytest.approx(data["ring_fp32_inputs_ms"] / data["ring_ms"])
