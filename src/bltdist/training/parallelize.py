"""From a config to the model parts of this rank, in torchtitan's order: build on the meta device,
allocate and initialise, split into pipeline stages, then on each part tensor parallel, activation
checkpointing, compile, and FSDP last."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from bltdist.config import ModelConfig, TrainConfig
from bltdist.model import BLT, ByteLM
from bltdist.model.layers import TransformerBlock
from bltdist.model_dir import load_model_weights
from bltdist.parallel import Meshes, ParallelDims
from bltdist.parallel.fsdp import apply_fsdp
from bltdist.parallel.pipeline import split_model
from bltdist.parallel.tensor_parallel import apply_tensor_parallel


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The configured model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return BLT(cfg.blt) if cfg.arch == "blt" else ByteLM(cfg.entropy)


def build_model(cfg: ModelConfig, seed: int, init_from: str | None, device: torch.device) -> torch.nn.Module:
    """Built on the meta device, then allocated on ``device`` and initialised from ``seed`` (or
    loaded from the model directory ``init_from``). Every rank initialises the whole model from
    the same seed before it is split and sharded, so any layout starts from the weights of a
    single-process run."""
    model = meta_model(cfg)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    if init_from:
        load_model_weights(model, init_from)
    return model


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
        _checkpoint_and_compile_blocks(part, train)
        if dims.uses_fsdp:
            # Under a pipeline, torch's zero-bubble schedules split each backward in two; FSDP must
            # keep the gathered weights between the halves (torchtitan does the same).
            apply_fsdp(part, mesh.fsdp, bf16=bf16, reshard_after_forward=dims.pp == 1)
    return parts


def _checkpoint_and_compile_blocks(model: torch.nn.Module, train: TrainConfig) -> None:
    """Per transformer block: activation checkpointing first, then compile the result."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TransformerBlock):
                wrapped = checkpoint_wrapper(child) if train.activation_checkpointing else child
                parent.register_module(name, torch.compile(wrapped) if train.compile else wrapped)
