"""Worker for tests/test_startup.py: builds the trainer's state twice, once initialised from the seed
and once loaded from the model directory in argv[2] (``checkpoint.init_from``); rank 0 saves to
argv[1] both sets of weights (gathered to full tensors by name) and every rank's parameter bytes.

Run as ``torchrun ... startup.py OUT MODEL_DIR [--config overrides]``.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bltdist.config import load_config
from bltdist.parallel.grads import clean_name
from bltdist.training.state import build_training_state


def full_weights_and_local_bytes(state) -> tuple[dict[str, torch.Tensor], int]:
    weights, local_bytes = {}, 0
    for name, param in (item for part in state.model_parts for item in part.named_parameters()):
        local_bytes += (param.to_local() if isinstance(param, DTensor) else param).nbytes
        weights[clean_name(name)] = (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()
    if state.dims.pp > 1:  # each pipeline rank holds its own stages
        stages = [None] * state.dims.pp
        dist.all_gather_object(stages, weights, group=state.mesh["pp"].get_group())
        weights = {name: tensor for stage in stages for name, tensor in stage.items()}
    return weights, local_bytes


def main() -> None:
    out, model_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    result = {}
    for mode, extra in (("init", []), ("init_from", [f"--checkpoint.init_from={model_dir}"])):
        state = build_training_state(load_config(None, [*overrides, *extra]))
        weights, local_bytes = full_weights_and_local_bytes(state)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, local_bytes)
        result[mode] = {"weights": weights, "local_bytes_per_rank": per_rank}
    if state.rank == 0:
        torch.save(result, out)
    state.close()


if __name__ == "__main__":
    main()
