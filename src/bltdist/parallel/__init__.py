"""4D parallelism applied from outside the model, one module or package per dimension.

- ``dims``: the layout (degrees, checks, device mesh);
- ``fsdp``: data parallelism (FSDP2 / HSDP); ``tensor_parallel``; ``context/``; ``pipeline/``;
- ``grads``: the gradient norm over every shard and stage.

``bltdist.training.parallelize`` applies them in torchtitan's order: pipeline split, tensor
parallel, activation checkpointing, compile, FSDP.
"""

from bltdist.parallel.dims import Meshes, ParallelDims

__all__ = ["Meshes", "ParallelDims"]
