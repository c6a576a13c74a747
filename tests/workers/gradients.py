"""Worker for tests/test_parallel.py: one forward+backward of the trainer's parallelised model on a
fixed batch; rank 0 saves every parameter's full gradient (gathered) to the path in argv[1]. With
``train`` and trainer arguments after the overrides, the same processes then run the trainer in the
process group already started: one launch proves a layout's gradients and its training, and the
start-up, most of a many-process run on a few cores, is paid once.

Run as ``torchrun ... gradients.py OUT [--config overrides] [train TRAINER_ARGS]`` or as a plain
single process.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bltdist.config import load_config
from bltdist.parallel.grads import clean_name
from bltdist.train import main as train
from bltdist.training.state import TrainingState, build_training_state


def fixed_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: random bytes with documents starting at several offsets."""
    generator = torch.Generator().manual_seed(1234)
    size, length = cfg.train.global_batch_size, cfg.train.seq_len
    tokens = torch.randint(4, 260, (size, length + 1), generator=generator)
    tokens[:, 0] = 1
    for row in range(size):
        tokens[row, 7 + 5 * row] = 1
    return tokens[:, :-1], tokens[:, 1:]


def save_gradients(out: str, overrides: list[str]) -> TrainingState:
    cfg = load_config(None, overrides)
    state = build_training_state(cfg)
    tokens, targets = fixed_batch(cfg)
    per_rank = cfg.train.global_batch_size // state.dims.dp
    mine = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
    state.stepper.forward_backward(tokens[mine], targets[mine], None)
    grads = {}
    for name, param in (item for part in state.model_parts for item in part.named_parameters()):
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        grads[clean_name(name)] = grad.detach().clone()
    if state.dims.pp > 1:
        # Each pipeline rank holds the gradients of its own stages.
        stages = [None] * state.dims.pp
        dist.all_gather_object(stages, grads, group=state.mesh["pp"].get_group())
        grads = {name: grad for stage in stages for name, grad in stage.items()}
    if state.rank == 0:
        torch.save(grads, out)
    return state


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    then_train = "train" in args
    overrides, trainer_args = (args[: args.index("train")], args[args.index("train") + 1 :]) if then_train else (args, [])
    state = save_gradients(out, overrides)
    if then_train:
        train(trainer_args)  # builds its own state in this process group, and ends the group
    else:
        state.close()


if __name__ == "__main__":
    main()
