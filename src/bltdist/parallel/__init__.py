"""4D parallelism applied from outside the model, one module or package per dimension.

- ``dims``: the layout (degrees, checks, device mesh);
- ``fsdp``: data parallelism (FSDP2 / HSDP); ``tensor_parallel``; ``context/``; ``pipeline/``;
- ``grads``: the gradient norm over every shard and stage;
- ``wrappers``: blocks inside their compile and checkpoint wrappers.

``bltdist.training.parallelize`` applies them: pipeline split, tensor parallel, compile, activation
checkpointing, FSDP (``wrappers``: why compile goes inside the checkpoint, unlike torchtitan).
"""

from bltdist.parallel.dims import Meshes, ParallelDims

__all__ = ["Meshes", "ParallelDims"]
