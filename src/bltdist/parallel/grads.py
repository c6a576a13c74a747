"""What needs every shard and every pipeline stage at once: the global gradient norm.

A parameter's gradient lives on some ranks as shards (FSDP, TP) and is repeated on others
(dp_replicate, TP ranks for parameters TP leaves whole, or every rank of a stage without FSDP).
Each rank adds the squared norm of its local piece divided by how many ranks of its pipeline
stage hold that same piece; one all-reduce over the world then counts every element exactly once,
and pipeline stages, which hold different parameters, add up.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _distinct_shards(tensor: torch.Tensor) -> int:
    if not isinstance(tensor, DTensor):
        return 1
    # Anything but Replicate splits the tensor: FSDP over TP uses _StridedShard, which is neither a
    # Shard subclass nor is_shard() in every PyTorch version. Gradients are never Partial here.
    return math.prod(tensor.device_mesh.size(dim) for dim, p in enumerate(tensor.placements) if not p.is_replicate())


@torch.no_grad()
def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float, stage_size: int, local_loss: float = 0.0) -> float:
    """Scale gradients in place so that their global norm is at most ``max_norm``; returns the norm
    before clipping. ``stage_size`` = ranks per pipeline stage (world size / pp). A non-finite
    ``local_loss`` (this rank's) makes the norm NaN on every rank: all ranks then agree that the
    step is non-finite without another collective."""
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else "cpu"
    squared = torch.tensor(0.0 if math.isfinite(local_loss) else math.nan, dtype=torch.float64, device=device)
    for grad in grads:
        copies = stage_size // _distinct_shards(grad)
        # An fp32 norm per gradient, squares summed in fp64: no fp64 copy of a (hash-table-sized) gradient.
        squared += torch.linalg.vector_norm(_local(grad), dtype=torch.float32).double().square() / copies
    if dist.is_initialized():
        dist.all_reduce(squared)
    total = float(squared.sqrt())
    if math.isfinite(max_norm) and total > max_norm:
        coefficient = max_norm / (total + 1e-6)
        for grad in grads:
            _local(grad).mul_(coefficient)
    return total


def first_nonfinite_gradient(named_parameters) -> str | None:
    """The name of this rank's first parameter whose (local) gradient holds a NaN or an infinity."""
    for name, param in named_parameters:
        if param.grad is not None and not bool(torch.isfinite(_local(param.grad)).all()):
            return clean_name(name)
    return None


def clean_name(name: str) -> str:
    # Activation-checkpoint and compile wrappers insert these into parameter names.
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name
