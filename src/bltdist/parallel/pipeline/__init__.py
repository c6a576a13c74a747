"""Pipeline parallelism: ``stage`` splits a BLT (or a plain LM) into stages, ``schedule`` runs them with
torch's schedules.

Trainer use (every rank of a pipeline group loads the same batch)::

    parts = split_model(model, pp_rank, pp, schedule, cp_group)   # then TP, compile, AC, FSDP per part
    pipeline = BLTPipeline(parts, pp_group, schedule, microbatches, device)
    loss_sum = pipeline.step(tokens, patch_lengths, targets, loss_divisor)   # None off the last stage;
    # patch_lengths None for a plain LM
"""

from bltdist.parallel.pipeline.schedule import BLTPipeline, torch_schedule_problems
from bltdist.parallel.pipeline.stage import BLTStage, ByteLMStage, split_model

__all__ = ["BLTPipeline", "BLTStage", "ByteLMStage", "split_model", "torch_schedule_problems"]
