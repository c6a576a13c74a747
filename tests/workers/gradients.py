"""Worker for tests/test_parallel.py: one forward+backward of the trainer's parallelised model on a
fixed batch; rank 0 saves every parameter's full gradient (gathered) to the path in argv[1].

Run as ``torchrun ... gradients.py OUT [--config overrides]`` or as a plain single process.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bltdist.config import load_config
from bltdist.parallel import ParallelDims, build_mesh, check_layout
from bltdist.parallel.grads import _clean_name
from bltdist.train import Patcher, Stepper, build_model, parallelize


def fixed_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: random bytes with documents starting at several offsets."""
    generator = torch.Generator().manual_seed(1234)
    size, length = cfg.train.global_batch_size, cfg.train.seq_len
    tokens = torch.randint(4, 260, (size, length + 1), generator=generator)
    tokens[:, 0] = 1
    for row in range(size):
        tokens[row, 7 + 5 * row] = 1
    return tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, overrides)
    check_layout(cfg, world_size)
    dims = ParallelDims.from_config(cfg, world_size)
    mesh = None
    if world_size > 1:
        dist.init_process_group("gloo")
        mesh = build_mesh(dims, "cpu")
    model = build_model(cfg, torch.device("cpu"))
    model_parts = parallelize(model, cfg, dims, mesh, bf16=False)
    device = torch.device("cpu")
    stepper = Stepper(model_parts, cfg, dims, mesh, Patcher(cfg.patching, device), torch.autocast("cpu", enabled=False), device)
    tokens, targets = fixed_batch(cfg)
    dp_rank = mesh.dp.get_local_rank() if mesh is not None else 0
    per_rank = cfg.train.global_batch_size // dims.dp
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    stepper.forward_backward(tokens[mine], targets[mine], None)
    grads = {}
    for name, param in (item for part in model_parts for item in part.named_parameters()):
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        grads[_clean_name(name)] = grad.detach().clone()
    if dims.pp > 1:
        # Each pipeline rank holds the gradients of its own stages.
        stages = [None] * dims.pp
        dist.all_gather_object(stages, grads, group=mesh["pp"].get_group())
        grads = {name: grad for stage in stages for name, grad in stage.items()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(grads, out)
    if dist.is_initialized():
        # gloo aborts a process whose peers tear down while its transport threads still run.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
