"""Everything a training run holds, built from a config by one function: ``build_training_state``.

The trainer, the planner, the benchmarks and the test workers all start here, so they run the
model exactly as training does: the same process group and mesh, model parts, optimizer and
micro-step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bltdist.config import Config, TrainConfig
from bltdist.model import BLT
from bltdist.parallel import Meshes, ParallelDims
from bltdist.patching.patcher import Patcher
from bltdist.tokenizer import load_run_tokenizer
from bltdist.training.entropy_training import EntropyTraining
from bltdist.training.optim import build_optimizer, build_scheduler
from bltdist.training.parallelize import materialize, meta_model, parallelize
from bltdist.training.step import Stepper


@dataclass
class TrainingState:
    device: torch.device
    dims: ParallelDims
    mesh: Meshes | None  # None in a single process
    model_parts: list[torch.nn.Module]  # the whole model, or this rank's pipeline stages
    parameter_count: int  # of the whole model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    patcher: Patcher | None  # None for the plain LMs (entropy, bytelm, tokenlm), which have no patches
    stepper: Stepper

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp.get_local_rank() if self.mesh is not None else 0

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.model_parts for p in part.parameters()]

    def close(self) -> None:
        if dist.is_initialized():
            # No rank tears the group down while another still talks to it: gloo aborts such a process.
            dist.barrier()
            dist.destroy_process_group()


def training_device(train: TrainConfig) -> torch.device:
    use_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")


def uses_bf16(train: TrainConfig, device: torch.device) -> bool:
    return train.dtype == "bfloat16" or (train.dtype == "auto" and device.type == "cuda")


def build_training_state(cfg: Config, world_size: int | None = None) -> TrainingState:
    """Starts the process group (when there are several processes; torchrun's environment says how
    many), builds the mesh, the model parts, the optimizer and schedule, the patcher and the stepper."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    dims = ParallelDims.from_config(cfg, world_size)
    device = training_device(cfg.train)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = None
    if world_size > 1:
        if not dist.is_initialized():  # a benchmark that builds several states starts it once
            timeout = datetime.timedelta(seconds=cfg.parallel.timeout_seconds)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        mesh = dims.build_mesh(device.type)
    bf16 = uses_bf16(cfg.train, device)
    model = meta_model(cfg.model)
    parameter_count = sum(p.numel() for p in model.parameters())
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    flex_per_shape = isinstance(model, BLT) and model.global_attention_compiles_per_shape(device, compute_dtype, True)
    model_parts = parallelize(model, dims, mesh, cfg.train, bf16)
    materialize(model_parts, model, cfg.train.seed, cfg.checkpoint.init_from, device)
    del model  # a pipeline rank keeps only its own stages; the others' stay on the meta device
    optimizer = build_optimizer(model_parts, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    accum = dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    patcher = None
    if cfg.model.arch == "blt":
        patcher = Patcher(cfg.patching, device, recent_batches=accum, super_patch=cfg.model.blt.super_patch)
    entropy_training = EntropyTraining(cfg, patcher, mesh, device) if patcher is not None else None
    # With FSDP, its mixed-precision policy casts parameters to bf16; autocast covers the rest.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not dims.uses_fsdp)
    tokenizer = load_run_tokenizer(cfg) if cfg.model.arch == "tokenlm" else None
    # The byte attention's window: the local layers' for BLT, the whole network's for a plain LM.
    window = cfg.model.blt.local_window if cfg.model.arch == "blt" else cfg.model.entropy.window
    stepper = Stepper(model_parts, dims, mesh, patcher, cfg.train, window, autocast, device, tokenizer,
                      entropy_training, flex_per_shape)  # fmt: skip
    return TrainingState(device, dims, mesh, model_parts, parameter_count, optimizer, scheduler, patcher, stepper)
