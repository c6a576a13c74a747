"""Data parallelism with FSDP2 (``fully_shard``): sharded over dp_shard x cp, replicated over
dp_replicate (HSDP when both are > 1; plain replication when only dp_replicate is).

Every parameter is sharded, the hash n-gram tables included (they hold most of the parameters of
the released models). Each transformer block and cross-attention is its own FSDP unit so that only
one block's full weights exist at a time; the root unit holds the embeddings, slot projections
and the head. On GPU parameters are gathered in bf16 and gradients reduced in fp32.

Gradients are averaged over the dp_cp ranks; the trainer scales each rank's loss so that the
average equals the gradient of the global mean (see ``bltdist.training.step``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from bltdist.model.layers import CrossAttention, TransformerBlock
from bltdist.parallel.wrappers import outermost

# Under tensor parallelism a unit returns DTensor.to_local()'s view, and torch 2.13 warns once per unit
# and rank that an in-place op on it would skip FSDP's gather. No caller changes a unit's output in
# place (every layout's gradients equal one process's, tests/test_parallel.py): the warning is noise.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool = True) -> None:
    """Shard ``model`` (a whole model or one pipeline part) block by block, then at its root."""
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    # At the outermost wrapper, as torchtitan shards compiled blocks: FSDP's hooks on the inner
    # block would run inside the compiled code and break its graph (bltdist.parallel.wrappers).
    for _, _, module in outermost(model, (TransformerBlock, CrossAttention)):
        fully_shard(module, **kwargs)
        if isinstance(module, CrossAttention):
            # Called through pool / unpool rather than forward: FSDP must gather around those.
            register_fsdp_forward_method(module, "pool")
            register_fsdp_forward_method(module, "unpool")
    fully_shard(model, **kwargs)
