"""Worker for tests/test_plan.py: measures the peak tensor memory of training steps of the trainer's
parallelised model (``bltdist.memtrack`` definition) and has rank 0 write every rank's peak as JSON
to argv[1]. Run as ``torchrun ... memory.py OUT [--config overrides]`` or as one process."""

import json
import os
import sys

import torch
import torch.distributed as dist

from bltdist.config import grad_accum_steps, load_config, parse_args
from bltdist.memtrack import PeakTensorMemory
from bltdist.parallel import ParallelDims, build_mesh, check_layout, clip_grad_norm
from bltdist.train import Patcher, Stepper, build_model, build_optimizer, parallelize


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(*parse_args(overrides))
    check_layout(cfg, world_size)
    dims = ParallelDims.from_config(cfg, world_size)
    mesh = None
    if world_size > 1:
        dist.init_process_group("gloo")
        mesh = build_mesh(dims, "cpu")
    device = torch.device("cpu")
    model = build_model(cfg, device)
    model_parts = parallelize(model, cfg, dims, mesh, bf16=False)
    optimizer = build_optimizer(model_parts, cfg, device)
    stepper = Stepper(model_parts, cfg, dims, mesh, Patcher(cfg.patching, device), torch.autocast("cpu", enabled=False), device)
    accum = grad_accum_steps(cfg, world_size)
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
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"peak_bytes_per_rank": peaks, "peak_phase_per_rank": phases}, f)
    if world_size > 1:
        # gloo aborts a process whose peers tear down while its transport threads still run.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
