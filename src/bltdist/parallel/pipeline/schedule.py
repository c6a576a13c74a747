"""Running a rank's pipeline stages with a ``torch.distributed.pipelining`` schedule.

Patch count: a stage sizes its receive buffers on its first step, but the padded patch count of a
batch varies under entropy or space patching. The patch axis is padded to a multiple of
``patch_bucket`` with zero-length patches (inert: no byte or real patch sees them) and one
schedule is kept per batch shape and mode, the few most recent.

Loss: the schedule calls the loss once per microbatch and adds the gradients (``scale_grads=False``);
the loss is the microbatch's summed byte cross-entropy / ``loss_divisor``, so a step differentiates
(summed CE over the rank's batch) / loss_divisor, the quantity the non-pipeline trainer differentiates.

FSDP: shard the stages with ``reshard_after_forward=False`` (torchtitan's choice under PP too):
with resharding, the ZBV schedule's split backward (input gradients first, weight gradients later)
ends with wrong weight gradients (measured: dp_shard=2 x pp=2 on gloo, torch 2.13).

Torch versions: all schedules tested on 2.13; GPipe, 1F1B and Interleaved1F1B on 2.11, where
ZBVZeroBubble fails with gloo in torch's p2p warm-up (a send from a rank to itself; NCCL allows it),
so training names that combination before the start (``torch_schedule_problems``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from bltdist.model.loss import byte_loss_sum
from bltdist.parallel.context import chunk_width, own_targets
from bltdist.parallel.dims import V_SHAPED_SCHEDULES, stages_per_rank
from bltdist.parallel.pipeline.stage import BLTStage
from bltdist.patching.rules import pad_patch_lengths

SCHEDULES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
}


def torch_schedule_problems(schedule_name: str, device: torch.device) -> list[str]:
    """What the installed torch cannot run of ``schedule_name`` on ``device``, named before the start."""
    if schedule_name in V_SHAPED_SCHEDULES and device.type == "cpu" and torch.__version__ < "2.13":
        return [
            f"parallel.pp_schedule: {schedule_name} on CPU (gloo) needs torch >= 2.13: torch {torch.__version__}'s "
            "pipelining sets up a V's stages with a send from a rank to itself, which gloo refuses; use GPipe, "
            "1F1B or Interleaved1F1B, or torch >= 2.13"
        ]
    return []


class BLTPipeline:
    """Runs the parts of one rank with a torch pipelining schedule.

    Build it after TP / FSDP have been applied to the parts: the stages wrap the parts as they are.
    """

    def __init__(
        self,
        parts: list[BLTStage],
        pp_group: dist.ProcessGroup,
        schedule_name: str,
        n_microbatches: int,
        device: torch.device,
        patch_bucket: int = 64,
        max_cached_schedules: int = 4,
    ):
        if len(parts) != stages_per_rank(schedule_name):
            raise ValueError(f"{schedule_name} runs {stages_per_rank(schedule_name)} stage(s) per rank, got {len(parts)}")
        self.parts, self.group, self.schedule_name = parts, pp_group, schedule_name
        self.n_microbatches, self.device = n_microbatches, device
        self.patch_bucket, self.max_cached_schedules = patch_bucket, max_cached_schedules
        self.holds_last_stage = any(part.is_last for part in parts)
        self.carry = next((part.carry for part in parts if part.carry is not None), None)
        self.cp_group = parts[0].cp_group
        self._schedules: OrderedDict[tuple[int, int, int, int, bool], object] = OrderedDict()
        self._loss_divisor = 1.0

    def step(
        self, tokens: torch.Tensor, patch_lengths: torch.Tensor, targets: torch.Tensor, loss_divisor: float
    ) -> torch.Tensor | None:
        """Forward and backward of this rank's batch (B, T) through the pipeline (``patch_lengths``
        None for a plain LM's stages); gradients accumulate into the parts' parameters. Returns the
        summed byte cross-entropy of the batch (detached) on the rank holding the last stage, None elsewhere."""
        return self._run(tokens, patch_lengths, targets, loss_divisor, training=True)

    def evaluate(self, tokens: torch.Tensor, patch_lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The summed byte cross-entropy of the batch on the last stage's rank, None elsewhere.
        Call it between optimizer steps (no gradients held)."""
        if self.schedule_name not in V_SHAPED_SCHEDULES:
            with torch.no_grad():
                return self._run(tokens, patch_lengths, targets, 1.0, training=False)
        # torch's ZBV schedule runs its backward actions even in eval(), so the V evaluates with a
        # training step whose gradients are thrown away: correct, at the cost of a backward.
        parameters = [p for part in self.parts for p in part.parameters()]
        if any(p.grad is not None for p in parameters):
            raise RuntimeError("evaluate() under the V schedule needs the gradients cleared (optimizer.zero_grad())")
        with torch.enable_grad():
            ce_sum = self._run(tokens, patch_lengths, targets, 1.0, training=True)
        for p in parameters:
            p.grad = None
        return ce_sum

    def _run(self, tokens, patch_lengths, targets, loss_divisor: float, training: bool) -> torch.Tensor | None:
        if tokens.shape[0] % self.n_microbatches:
            raise ValueError(f"batch of {tokens.shape[0]} rows does not split into {self.n_microbatches} microbatches")
        losses: list[torch.Tensor] = []
        batch = dict(target=targets, losses=losses, tokens=tokens)
        if patch_lengths is None:  # a plain LM: under cp each position is a patch of one byte or token
            patch_lengths = torch.ones_like(tokens)
        else:
            patch_lengths = batch["patch_lengths"] = pad_patch_lengths(patch_lengths, self.patch_bucket)
        local_bytes = tokens.shape[1]
        if self.cp_group is not None:
            # Every microbatch pads its chunks to the longest chunk of the whole batch (an int
            # kwarg, which torch hands unsplit to every microbatch): one byte-state shape per step.
            # The last stage's logits cover the rank's bytes; so do the targets, -100 (ignored by
            # the cross-entropy) on padding. Split by rows, they match every microbatch's logits.
            width = chunk_width(patch_lengths, dist.get_world_size(self.cp_group))
            batch.update(target=own_targets(targets, patch_lengths, self.cp_group, width), cp_width=width)
            local_bytes = 2 * width
        schedule = self._schedule_for((*tokens.shape, patch_lengths.shape[1], local_bytes, training))
        self._loss_divisor = float(loss_divisor)
        if self.carry is not None:
            self.carry.clear()
        if training:
            # The logits stay unmerged: the loss of each microbatch is all the trainer needs.
            schedule.step(return_outputs=False, **batch)
        else:
            schedule.eval(**batch)
        if self.carry is not None and len(self.carry):
            raise RuntimeError(f"{len(self.carry)} parked byte states were never read by the last stage")
        if not self.holds_last_stage:
            return None
        return torch.stack(losses).detach().sum() * self._loss_divisor

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Pure: torch may also call it on placeholder activations while inferring shapes.
        return byte_loss_sum(logits, targets) / self._loss_divisor

    def _schedule_for(self, key: tuple[int, int, int, int, bool]):
        """The schedule for batches of shape (rows, bytes, padded patches, bytes of this rank),
        training or not: torch sizes a stage's buffers, and its backward ones, on its first step.
        The rank's byte count differs from the batch's under cp, where it varies with the patches."""
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        if len(self._schedules) == self.max_cached_schedules:
            self._schedules.popitem(last=False)
        schedule = self._build_schedule()
        self._schedules[key] = schedule
        return schedule

    def _build_schedule(self):
        stages = [
            PipelineStage(
                part,
                part.stage_index,
                part.num_stages,
                self.device,
                group=self.group,
                # The zero-bubble schedules split a backward into input and weight gradients, but the
                # parked byte states' gradient only appears in a full backward: the last stage of the
                # V runs its whole backward in the input step and has nothing left for the weight step.
                dw_builder=_no_weight_step if part.is_last and part.carry is not None else None,
            )
            for part in self.parts
        ]
        schedule_class = SCHEDULES[self.schedule_name]
        stage_arg = stages[0] if stages_per_rank(self.schedule_name) == 1 else stages
        return schedule_class(stage_arg, self.n_microbatches, loss_fn=self._loss, scale_grads=False)


def _no_weight_step():
    return lambda: None
