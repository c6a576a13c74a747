"""Tensor parallelism for BLT, applied from outside with DTensor's ``parallelize_module``.

Global transformer (most of the FLOPs): Megatron-style column-parallel q/k/v and FFN gate/up,
row-parallel o and down, plus sequence parallelism: between blocks each rank holds P / tp of the
patch positions, the RMSNorms run on that shard, and the patch sequence is all-gathered before
attention/FFN and reduce-scattered after. The patch count is padded to a multiple of tp by the
trainer (padding patches are inert, see ``bltdist.patching.pad_patch_lengths``).

Local encoder, decoder and cross-attentions: sharded the same way (heads and FFN width split
across tp ranks) but without sequence parallelism. Their byte stream stays replicated because
every decoder layer interleaves byte-to-patch cross-attention with windowed self-attention over
the whole byte sequence. Compute is not repeated: each rank does 1 / tp of every projection,
attention and FFN; only RMSNorms, residual adds and the hash lookups run on every rank. The cost
is two all-reduces of a (bytes x local_dim) activation per local block and one per
cross-attention, forward and backward (Megatron's TP without SP). The byte and hash embeddings
and the 260-way output head stay whole on every tp rank (FSDP shards them over dp_shard x cp):
their lookups count no FLOPs and the head is under 1% of the model's FLOPs.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def _sequence_parallel_block_plan() -> dict:
    # The block's inputs are (x, rope, mask); only x is a tensor to redistribute.
    return {
        "attn_norm": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "ffn.gate_proj": ColwiseParallel(),
        "ffn.up_proj": ColwiseParallel(),
        "ffn.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def _replicated_stream_block_plan() -> dict:
    return {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "ffn.gate_proj": ColwiseParallel(),
        "ffn.up_proj": ColwiseParallel(),
        "ffn.down_proj": RowwiseParallel(),
    }


def _cross_attention_plan() -> dict:
    return {
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard ``model`` (a BLT, a pipeline part holding some of its submodules, or a plain LM) over ``tp_mesh``."""
    for name, module in list(model.named_modules()):
        parent = name.split(".")[-2] if name.count(".") >= 1 else ""
        if name.split(".")[-1] == "global_model":
            _parallelize_global(module, tp_mesh)
        elif parent == "layers" and ("encoder." in name or "decoder." in name or name.count(".") == 1):
            # Local blocks, and the blocks of a plain LM (arch entropy, bytelm, tokenlm: layers.N).
            parallelize_module(module, tp_mesh, _replicated_stream_block_plan())
        elif parent == "cross_attn":
            parallelize_module(module, tp_mesh, _cross_attention_plan())


def _parallelize_global(global_model: nn.Module, tp_mesh: DeviceMesh) -> None:
    # named_children: a pipeline stage may hold only some of the layers, under their original indices.
    layers = list(global_model.layers.named_children())
    first, last = layers[0][0], layers[-1][0]
    for index, block in layers:
        plan = _sequence_parallel_block_plan()
        parallelize_module(block, tp_mesh, plan)
        if index == first:
            # Patch states arrive whole on every rank; each keeps its share of positions.
            parallelize_module(
                block,
                tp_mesh,
                PrepareModuleInput(
                    input_layouts=(Replicate(), None, None),
                    desired_input_layouts=(Shard(1), None, None),
                    use_local_output=True,
                ),
            )
        if index == last:
            # The decoder needs every patch's state: gather the positions back.
            parallelize_module(
                block,
                tp_mesh,
                PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True),
            )
