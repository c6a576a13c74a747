"""Blocks inside their compile and activation-checkpoint wrappers.

The trainer compiles each block, then wraps the compiled block for activation checkpointing, and
FSDP shards the outermost wrapper. The other order, compile around the checkpoint (torchtitan's),
makes dynamo trace the checkpointed block as one higher-order op, which may neither break its graph
nor have side effects: FSDP's hooks inside it break the graph, and dynamo then silently runs the
whole block eagerly (an H100 profile of BLT-1B found not one compiled kernel); with tensor
parallelism torch's compile of the checkpointed DTensor block fails outright.
"""

from __future__ import annotations

import torch.nn as nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

WRAPPERS = (CheckpointWrapper, OptimizedModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside any checkpoint and compile wrappers."""
    while isinstance(module, WRAPPERS):
        module = module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module._orig_mod
    return module


def outermost(model: nn.Module, types: tuple[type, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for each child of ``model``'s modules that is one of ``types`` or wraps
    one, taken at its outermost wrapper."""
    return [
        (parent, name, child)
        for parent in model.modules()
        if not isinstance(parent, WRAPPERS)
        for name, child in parent.named_children()
        if isinstance(unwrap(child), types)
    ]
