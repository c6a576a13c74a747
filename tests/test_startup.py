"""Sharded start-up: the model is built on the meta device and parallelised, then each rank allocates
and initialises (or loads) only its shards; the weights equal those of one process in every layout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bltdist.config import load_config
from bltdist.errors import UserError
from bltdist.model_dir import WEIGHTS_FILE, load_model_weights, save_weights_dir
from bltdist.training.parallelize import build_model
from test_parallel import MODEL
from processes import launcher

REPO = Path(__file__).resolve().parents[1]
ARGS = [*MODEL, "--train.seq_len=64", "--train.global_batch_size=4", "--train.micro_batch_size=1"]


def model_dir_with_other_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model directory whose weights differ from the seed's, the hash table stored in bf16."""
    cfg = load_config(None, ARGS)
    weights = build_model(cfg.model, cfg.train.seed + 1, None, torch.device("cpu")).state_dict()
    weights = {name: t.bfloat16() if "hash" in name else t for name, t in weights.items()}
    save_weights_dir(weights, cfg, path)
    return {name: t.float() for name, t in weights.items()}


@pytest.mark.parametrize("layout, nproc, parallel_args", [
    ("dp_shard=2 x tp=2", 4, ["--parallel.dp_shard=2", "--parallel.tp=2"]),
    pytest.param("pp=2 x dp_shard=2", 4, ["--parallel.dp_shard=2", "--parallel.pp=2", "--parallel.pp_schedule=GPipe"],
                 marks=pytest.mark.slow),
])  # fmt: skip
def test_each_rank_initialises_or_loads_only_its_shards_and_gets_the_single_process_weights(
    layout, nproc, parallel_args, tmp_path
):
    from_file = model_dir_with_other_weights(tmp_path / "model")
    cfg = load_config(None, ARGS)
    expected = build_model(cfg.model, cfg.train.seed, None, torch.device("cpu")).state_dict()
    command = [sys.executable, *launcher(nproc), str(REPO / "tests" / "workers" / "startup.py"), str(tmp_path / "out.pt"), str(tmp_path / "model"),
               *ARGS, *parallel_args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    measured = torch.load(tmp_path / "out.pt")
    whole_bytes = sum(t.nbytes for t in expected.values())
    for mode, reference in (("init", expected), ("init_from", from_file)):
        got = measured[mode]["weights"]
        assert got.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(got[name], tensor), f"{layout} {mode}: {name} differs from one process"
        # Every layout here splits each weight over at least 2 ranks (FSDP over dp_shard=2); only
        # shard padding and a few replicated norms stand above half.
        assert max(measured[mode]["local_bytes_per_rank"]) < 0.55 * whole_bytes, measured[mode]["local_bytes_per_rank"]


def test_init_from_reports_a_truncated_or_mismatched_file_by_name(tmp_path):
    model_dir_with_other_weights(tmp_path / "model")
    cfg = load_config(None, ARGS)
    model = build_model(cfg.model, cfg.train.seed, None, torch.device("cpu"))
    load_model_weights(model, tmp_path / "model")
    weights_file = tmp_path / "model" / WEIGHTS_FILE
    weights_file.write_bytes(weights_file.read_bytes()[:-1000])
    with pytest.raises(UserError, match="truncated"):
        load_model_weights(model, tmp_path / "model")
    other = build_model(load_config(None, [*ARGS, "--model.blt.hash_vocab=32"]).model, 0, None, torch.device("cpu"))
    model_dir_with_other_weights(tmp_path / "model")
    with pytest.raises(UserError, match=r"encoder.hash_embedding.weight: shape \(128, 32\) in file, \(64, 32\)"):
        load_model_weights(other, tmp_path / "model")
