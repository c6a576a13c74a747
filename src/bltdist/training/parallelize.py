"""From a config to the model parts of this rank: build on the meta device, split into pipeline
stages, then on each part tensor parallel, compile, activation checkpointing and FSDP last (torchtitan
checkpoints before it compiles: ``bltdist.parallel.wrappers`` says why not here); only then
allocate this rank's shards and initialise (or load) them.

Initialisation is independent of the layout by construction: every normal weight is drawn in
blocks of rows, each block from a generator seeded by (seed, weight name, block index), so a rank
draws only the blocks its shard overlaps and any layout holds the values of a single process.
No rank ever holds the whole model; ``checkpoint.init_from`` reads each rank's block of every
weight from the memory-mapped file.
"""

from __future__ import annotations

import hashlib

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from bltdist.config import ModelConfig, TrainConfig
from bltdist.model import BLT, ByteLM
from bltdist.model.layers import TransformerBlock
from bltdist.model_dir import WeightSlice, load_weight_slices
from bltdist.parallel import Meshes, ParallelDims
from bltdist.parallel.fsdp import apply_fsdp
from bltdist.parallel.grads import clean_name
from bltdist.parallel.pipeline import split_model
from bltdist.parallel.tensor_parallel import apply_tensor_parallel
from bltdist.parallel.wrappers import outermost

# Values per generator block: large enough that drawing is fast, small enough that the scratch
# block is negligible next to any shard.
INIT_BLOCK_ELEMENTS = 1 << 20
# Compiled variants of the transformer blocks a run may build before dynamo falls back to eager.
BLOCK_RECOMPILE_LIMIT = 64


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The configured model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        if cfg.arch == "blt":
            return BLT(cfg.blt, cfg.attention_backend)
        return ByteLM(cfg.plain_lm(), cfg.attention_backend)


def build_model(cfg: ModelConfig, seed: int, init_from: str | None, device: torch.device) -> torch.nn.Module:
    """The whole model on ``device`` with the weights every layout of the trainer starts from."""
    model = meta_model(cfg)
    materialize([model], model, seed, init_from, device)
    return model


def materialize(parts: list[torch.nn.Module], model: torch.nn.Module, seed: int, init_from: str | None,
                device: torch.device) -> None:  # fmt: skip
    """Allocate this rank's shards of the meta-built ``parts`` of ``model`` on ``device`` and initialise
    them from ``seed``, or load them from the model directory ``init_from``."""
    for part in parts:
        part.to_empty(device=device)
        if init_from:
            continue
        with torch.no_grad():
            part.init_weights(lambda weight, std, name: _draw_normal(weight, std, seed, clean_name(name)))
    if init_from:
        slices = [WeightSlice(clean_name(name), *_local_block(param))
                  for part in parts for name, param in part.named_parameters()]  # fmt: skip
        expected = {clean_name(name): param.shape for name, param in model.named_parameters()}
        load_weight_slices(init_from, expected, slices)


def _local_block(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor this rank holds of ``param`` and the index in the whole weight where it starts."""
    if not isinstance(param, DTensor):
        return param.data, (0,) * param.dim()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(offset)


def _draw_normal(weight: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill this rank's block of ``weight`` with N(0, std) values that depend on (seed, name) only."""
    local, offset = _local_block(weight)
    if local.numel() == 0:
        return
    shape = weight.shape
    rows_per_block = max(1, INIT_BLOCK_ELEMENTS // max(1, shape[1:].numel()))
    first_row, end_row = offset[0], offset[0] + local.shape[0]
    inner = tuple(slice(start, start + size) for start, size in zip(offset[1:], local.shape[1:]))
    for block in range(first_row // rows_per_block, (end_row - 1) // rows_per_block + 1):
        block_start = block * rows_per_block
        rows = min(rows_per_block, shape[0] - block_start)
        key = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        values = torch.empty(rows, *shape[1:]).normal_(0.0, std, generator=generator)
        low, high = max(first_row, block_start), min(end_row, block_start + rows)
        local[low - first_row : high - first_row].copy_(values[(slice(low - block_start, high - block_start), *inner)])


def parallelize(model: torch.nn.Module, dims: ParallelDims, mesh: Meshes | None, train: TrainConfig,
                bf16: bool) -> list[torch.nn.Module]:  # fmt: skip
    """The model parts this rank runs: the whole model, or its pipeline stages."""
    parts = [model]
    if dims.pp > 1:
        cp_group = mesh["cp"].get_group() if dims.cp > 1 else None
        parts = split_model(model, mesh["pp"].get_local_rank(), dims.pp, dims.pp_schedule, cp_group)
    for part in parts:
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"])
        if train.compile:
            _compile_blocks(part)
        if train.activation_checkpointing:
            # Around the compiled block, not inside it: see bltdist.parallel.wrappers. A block's name is
            # its index in its stack, kept by pipeline stages, so every layout checkpoints the same blocks.
            for parent, name, block in outermost(part, (TransformerBlock,)):
                if int(name) % train.activation_checkpointing_interval == 0:
                    parent.register_module(name, checkpoint_wrapper(block))
        if dims.uses_fsdp:
            # Under a pipeline, torch's zero-bubble schedules split each backward in two; FSDP must
            # keep the gathered weights between the halves (torchtitan does the same).
            apply_fsdp(part, mesh.fsdp, bf16=bf16, reshard_after_forward=dims.pp == 1)
    return parts


def _compile_blocks(model: torch.nn.Module) -> None:
    """Compile each transformer block, with its tensor-parallel hooks.

    Compiled graphs are static, one per input shape: the trainer buckets the patch count
    (``bltdist.patching.rules.patch_count_bucket``) so that few shapes occur. Every block shares
    one function, ``TransformerBlock.forward``, whose compiled variants (the byte blocks and each
    patch-count bucket, in training and in evaluation) all count against one recompile limit."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for parent, name, block in outermost(model, (TransformerBlock,)):
        parent.register_module(name, torch.compile(block, dynamic=False))
