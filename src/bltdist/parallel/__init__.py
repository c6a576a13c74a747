"""4D parallelism applied from outside the model: one module per dimension.

Order of application (torchtitan's): pipeline split, tensor parallel, activation checkpointing,
compile, then FSDP. ``mesh`` holds the device mesh; ``grads`` the global-norm clipping, which must see
every shard and every pipeline stage.
"""

from bltdist.parallel.data_parallel import apply_fsdp
from bltdist.parallel.grads import clip_grad_norm
from bltdist.parallel.mesh import MESH_DIMS, Meshes, ParallelDims, build_mesh, check_layout
from bltdist.parallel.tensor_parallel import apply_tensor_parallel, pad_patch_lengths

__all__ = [
    "MESH_DIMS",
    "Meshes",
    "ParallelDims",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "check_layout",
    "clip_grad_norm",
    "pad_patch_lengths",
]
