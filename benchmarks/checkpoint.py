"""Checkpoint save and load time and bytes written per rank, sync and async, for two model sizes.

Runs the trainer's own pieces (model, FSDP/TP, AdamW with its state, scheduler, data loader,
``bltdist.training.checkpoint.Checkpointer``) without training: AdamW's state is created by one step at
learning rate 0. Per size it times, on every rank (the figure is the slowest rank):

- sync save: ``save()`` until the checkpoint is committed (``latest`` replaced);
- async save: ``save()`` until training may go on (the state is copied to CPU), and until committed;
- load: building the Checkpointer (checksums of every shard, split over the ranks) plus ``restore()``;
- for comparison, DCP's default ``FileSystemWriter`` (torch.save format) on the same state, and the
  floor of a writer of our own: each rank's local tensors through ``safetensors.torch.save_file``
  plus fsync (no offsets, no checksums, no commit).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint.py [--sizes tiny mid]

Writes benchmarks/results/checkpoint-cpu-<date>.json (rank 0) with ``device``, ``torch``, ``triton``,
``commit`` and ``config`` next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from results import write_results
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from bltdist.config import config_to_dict, load_config
from bltdist.data import PackedByteLoader
from bltdist.training.checkpoint import Checkpointer, _flatten, _materialise_optimizer_state, _tensor_state
from bltdist.training.state import build_training_state

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    # configs/tiny_static.yaml as shipped.
    "tiny": [],
    # About 60M parameters: 0.7 GB of weights and AdamW state in fp32.
    "mid": [
        "--model.blt.local_dim=384", "--model.blt.local_heads=6", "--model.blt.global_dim=768",
        "--model.blt.global_heads=12", "--model.blt.global_layers=6", "--model.blt.hash_vocab=8192",
        "--model.blt.hash_ngram_sizes=[3,4,5,6,7,8]",
    ],
}  # fmt: skip


def slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    tensor = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def timed(function) -> tuple[float, object]:
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    result = function()
    return slowest(time.perf_counter() - start), result


def measure(size: str, world_size: int, scratch: Path) -> dict:
    out = scratch / size
    overrides = [*SIZES[size], f"--output_dir={out}", "--checkpoint.keep_last=0", "--train.global_batch_size=8"]
    cfg = load_config(str(REPO / "configs" / "tiny_static.yaml"), overrides)

    def training_state():
        state = build_training_state(cfg)
        loader = PackedByteLoader([b"benchmark bytes " * 64], cfg.train.seq_len, cfg.train.micro_batch_size,
                                  state.dp_rank, state.dims.dp, cfg.train.seed)  # fmt: skip
        _materialise_optimizer_state(state.optimizer)
        return state, (state.model_parts, state.optimizer, state.scheduler, loader)

    def new_checkpointer() -> Checkpointer:
        return Checkpointer(cfg.checkpoint, out, config_to_dict(cfg), cfg.train.steps, state.dims.sizes(),
                            state.dp_rank, torch.device("cpu"))  # fmt: skip

    state, (model_parts, optimizer, scheduler, loader) = training_state()
    layout = state.dims.sizes()
    params = sum(p.numel() for part in model_parts for p in part.parameters())
    figures: dict[str, float | int | list] = {}

    checkpointer = new_checkpointer()
    checkpointer.restore(model_parts, optimizer, scheduler, loader)
    figures["sync_save_s"], _ = timed(lambda: checkpointer.save(1))
    checkpointer.close()
    metadata = json.loads((out / "checkpoints" / "step_1" / "metadata.json").read_text())
    # DCP's HuggingFaceStorageWriter names rank r's file shard-<r + 1>-...: its index is the rank's.
    shard_bytes = [shard["bytes"] for shard in sorted(metadata["shards"], key=lambda s: s["file"])]
    figures["bytes_written_per_rank"] = shard_bytes
    figures["bytes_written_total"] = sum(shard_bytes)

    cfg.checkpoint.async_save = True
    checkpointer = new_checkpointer()
    checkpointer.restore(model_parts, optimizer, scheduler, loader)
    figures["async_save_blocking_s"], _ = timed(lambda: checkpointer.save(2))
    start = time.perf_counter()
    checkpointer.wait()
    figures["async_save_total_s"] = slowest(time.perf_counter() - start) + figures["async_save_blocking_s"]
    checkpointer.close()

    cfg.checkpoint.async_save = False
    cfg.checkpoint.resume = "auto"
    _, fresh = training_state()
    figures["load_verify_s"], checkpointer = timed(new_checkpointer)
    figures["load_restore_s"], _ = timed(lambda: checkpointer.restore(*fresh))
    figures["load_total_s"] = figures["load_verify_s"] + figures["load_restore_s"]
    checkpointer.close()

    torch_save_dir = out / "dcp_filesystem_writer"
    tensors = _tensor_state(model_parts, optimizer)
    figures["dcp_filesystem_writer_save_s"], _ = timed(
        lambda: dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(torch_save_dir)), no_dist=world_size == 1)
    )
    if dist.is_initialized():
        dist.barrier()
    local_file = out / f"local-{dist.get_rank() if dist.is_initialized() else 0}.safetensors"

    def save_local_tensors():
        local = {name: (t.to_local() if isinstance(t, DTensor) else t).contiguous() for name, t in _flatten(tensors)}
        save_file(local, local_file)
        with open(local_file, "rb") as handle:
            os.fsync(handle.fileno())

    figures["own_writer_floor_save_s"], _ = timed(save_local_tensors)
    if int(os.environ.get("RANK", "0")) == 0:
        figures["dcp_filesystem_writer_bytes_total"] = sum(p.stat().st_size for p in torch_save_dir.iterdir())
    return {"parameters": params, "layout": layout, "overrides": SIZES[size], **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--scratch", default=None, help="directory for the checkpoints (default: a temporary one)")
    parser.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    scratch = Path(args.scratch or tempfile.gettempdir()) / "bltdist-checkpoint-benchmark"
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    # Every size runs under the default layout: dp_shard over all processes.
    results = {size: measure(size, world_size, scratch) for size in args.sizes}
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        config = {"base": "configs/tiny_static.yaml", "processes": world_size, "threads": torch.get_num_threads(),
                  "storage": "local disk, fsync on"}  # fmt: skip
        out = write_results("checkpoint", "cpu", config, results, out=args.out)
        for size, figures in results.items():
            print(f"{size}: {json.dumps(figures)}")
        print(f"results: {out}")
    if dist.is_initialized():
        # gloo aborts a process whose peers tear down while its transport threads still run.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
