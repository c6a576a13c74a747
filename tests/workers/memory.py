"""Worker for tests/test_plan.py: measures the peak tensor memory of training steps of the trainer's
parallelised model (``bltdist.memtrack`` definition) and has rank 0 write every rank's peak as JSON
to argv[1]. Run as ``torchrun ... memory.py OUT [--config overrides]`` or as one process; more
measurements, each of its own config, follow after ``next``: ``memory.py OUT1 [...] next OUT2 [...]``,
one after the other in the same processes (start-up is most of a launch of several processes on a
few cores). Each counts only its own tensors: the measurements do not see each other."""

import json
import sys

import torch
import torch.distributed as dist

from bltdist.config import load_config, parse_args
from bltdist.memtrack import PeakTensorMemory
from bltdist.parallel.grads import clip_grad_norm
from bltdist.training.state import TrainingState, build_training_state


def measure(out: str, overrides: list[str]) -> TrainingState:
    cfg = load_config(*parse_args(overrides))
    state = build_training_state(cfg)
    dims, model_parts, optimizer, stepper = state.dims, state.model_parts, state.optimizer, state.stepper
    world_size = dims.world_size
    accum = dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len + 1)
    tracker = PeakTensorMemory()
    step = 0
    # The model's output is the last thing forward computes: from there on the loss and backward run
    # (FSDP's root pre-backward all-gather included), which the planner counts as the start of backward.
    model_parts[-1].register_forward_hook(lambda *_: setattr(tracker, "phase", f"step {step} micro-batch {micro} loss+backward"))
    with tracker:
        tracker.track([p for part in model_parts for p in part.parameters()], [b for part in model_parts for b in part.buffers()])
        # Two steps: the first creates the optimizer state, the second runs with all of it alive.
        for step in (1, 2):
            for micro in range(accum):
                tokens = torch.randint(4, 260, shape, generator=generator)
                tokens[:, 0] = 1
                if dims.uses_fsdp:
                    for part in model_parts:
                        part.set_requires_gradient_sync(micro == accum - 1)
                tracker.phase = f"step {step} micro-batch {micro} forward"
                stepper.forward_backward(tokens[:, :-1], tokens[:, 1:], None)
            tracker.phase = f"step {step} clip_grad_norm"
            clip_grad_norm([p for part in model_parts for p in part.parameters()], 1.0, world_size // dims.pp)
            tracker.phase = f"step {step} optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peaks, phases = [tracker.peak_bytes], [tracker.peak_phase]
    if world_size > 1:
        peaks, phases = [0] * world_size, [""] * world_size
        dist.all_gather_object(peaks, tracker.peak_bytes)
        dist.all_gather_object(phases, tracker.peak_phase)
    if state.rank == 0:
        with open(out, "w") as f:
            json.dump({"peak_bytes_per_rank": peaks, "peak_phase_per_rank": phases}, f)
    return state


def main() -> None:
    args = sys.argv[1:]
    measurements = []
    while "next" in args:
        measurements.append(args[: args.index("next")])
        args = args[args.index("next") + 1 :]
    for out, *overrides in [*measurements, args]:
        state = measure(out, overrides)  # the process group started by the first serves them all
    state.close()


if __name__ == "__main__":
    main()
