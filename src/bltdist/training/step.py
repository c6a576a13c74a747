"""One micro-batch through the parallelised model (patching, forward, loss, backward), and one
optimizer step made of them.

Every rank of a context-parallel group gets the same micro-batch and patches it whole; the model
then computes the logits of the rank's own bytes only (``bltdist.parallel.context``). Every rank
of a pipeline group gets it too; the schedule splits it into microbatches and only the last stage
sees a loss (``bltdist.parallel.pipeline``); with both, every stage runs its cp rank's share.

Loss scaling: a rank's backward loss is its summed byte cross-entropy divided by the bytes of the
whole global batch, times the number of ranks FSDP averages gradients over (dp x cp). That average
is then the gradient of the global mean loss whatever the layout and accumulation: context-parallel
ranks hold disjoint bytes whose gradients must add up.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from bltdist.config import TrainConfig
from bltdist.errors import TrainingDiverged
from bltdist.model.loss import byte_loss_sum
from bltdist.parallel import Meshes, ParallelDims
from bltdist.parallel.context import ContextParallelLayout, ContextParallelSequence
from bltdist.parallel.grads import clip_grad_norm, first_nonfinite_gradient
from bltdist.parallel.pipeline import BLTPipeline
from bltdist.patching.patcher import Patcher
from bltdist.patching.rules import COMPILED_BUCKET_BITS, FLEX_BUCKET_BITS, pad_patch_lengths
from bltdist.tokenizer import BPETokenizer

# Pipeline stages size their buffers by the padded patch count; padding it to a multiple of this
# keeps the number of distinct shapes, and so of pipeline schedules built, small.
PATCH_BUCKET = 64


class Stepper:
    """Runs micro-batches through this rank's model parts."""

    def __init__(self, model_parts: list[torch.nn.Module], dims: ParallelDims, mesh: Meshes | None,
                 patcher: Patcher | None, train: TrainConfig, local_window: int | None, autocast,
                 device: torch.device, tokenizer: BPETokenizer | None = None, entropy_training=None,
                 flex_per_shape: bool = False):  # fmt: skip
        self.model_parts, self.patcher, self.autocast, self.local_window = model_parts, patcher, autocast, local_window
        # bltdist.training.entropy_training: the threshold held at its target, a jointly trained entropy model.
        self.entropy_training = entropy_training
        self.tokenizer = tokenizer  # tokenlm: byte rows become BPE token rows covering the same bytes
        self.cp_group = mesh["cp"].get_group() if dims.cp > 1 else None
        # Sequence parallelism splits each cp rank's patches evenly over tp; cp chunks come in 2 x cp.
        self.patch_multiple = dims.tp * (2 * dims.cp if dims.cp > 1 else 1)
        # Compiled blocks are specialised to the patch count, and so is FlexAttention in eager runs
        # (past its recompile limit it would run eager, slowly and silently): buckets bound the graphs.
        self.bucket_bits = COMPILED_BUCKET_BITS if train.compile else FLEX_BUCKET_BITS if flex_per_shape else None
        self.counts_patches = dims.cp == 1 or mesh["cp"].get_local_rank() == 0
        self.loss_divisor = train.global_batch_size * train.seq_len / dims.dp_cp
        self.pipeline = None
        if dims.pp > 1:
            self.pipeline = BLTPipeline(
                model_parts, mesh["pp"].get_group(), dims.pp_schedule, dims.pp_microbatches, device,
                patch_bucket=math.lcm(PATCH_BUCKET, self.patch_multiple),
            )  # fmt: skip
            # Patches are counted where the loss is: on the rank of the last stage.
            self.counts_patches = self.counts_patches and self.pipeline.holds_last_stage

    def train(self, mode: bool) -> None:
        for part in self.model_parts:
            part.train(mode)

    def forward_backward(self, tokens, targets, entropies, patch_lengths=None) -> tuple[float, int]:
        """Summed byte cross-entropy (nats) of this rank's bytes of the micro-batch (0 on ranks
        without a loss), and the number of real patches it counts (each patch counted once).
        ``entropies``: the tokens' next-byte entropies for entropy patching, else None.
        ``patch_lengths``: the patcher's lengths when the loader cut them with the batch, else None
        (cut here)."""
        return self._run(tokens, targets, entropies, patch_lengths, backward=True)

    @torch.no_grad()
    def evaluate(self, tokens, targets, entropies, patch_lengths=None) -> float:
        return self._run(tokens, targets, entropies, patch_lengths, backward=False)[0]

    def _run(self, tokens, targets, entropies, patch_lengths, backward: bool) -> tuple[float, int]:
        lengths, super_lengths, num_patches = None, None, tokens.numel()
        if self.tokenizer is not None:  # a BPE token is the tokenlm's patch: counted as one
            tokens, targets, num_patches = self.tokenizer.encode_rows(tokens, targets)
            num_patches = num_patches if self.counts_patches else 0
        if self.patcher is not None:
            if self.entropy_training is not None and self.entropy_training.joint:
                entropies = self.entropy_training.entropies(tokens, targets, backward)
            if backward:
                self.patcher.observe(tokens, entropies)
            lengths = self.patcher(tokens, entropies) if patch_lengths is None else patch_lengths
            super_lengths = self.patcher.super_patch_lengths(tokens, lengths, entropies)
            num_patches = int((lengths > 0).sum()) if self.counts_patches else 0
            lengths = pad_patch_lengths(lengths, self.patch_multiple, self.bucket_bits)
        with self.autocast:
            if self.pipeline is not None:
                if backward:
                    loss_sum = self.pipeline.step(tokens, lengths, targets, self.loss_divisor)
                else:
                    loss_sum = self.pipeline.evaluate(tokens, lengths, targets)
                return (0.0 if loss_sum is None else float(loss_sum)), num_patches
            loss_sum = self._loss_sum(tokens, lengths, targets, super_lengths)
        if backward:
            (loss_sum / self.loss_divisor).backward()
        return float(loss_sum.detach()), num_patches

    def _loss_sum(self, tokens, lengths, targets, super_lengths) -> torch.Tensor:
        (model,) = self.model_parts
        if lengths is None:  # a plain LM over bytes or BPE tokens, without patches
            if self.cp_group is None:
                return byte_loss_sum(model(tokens), targets)
            sequence = ContextParallelSequence.build(tokens, self.local_window, self.cp_group)
            return byte_loss_sum(model(tokens, sequence), sequence.local_targets(targets))
        if self.cp_group is None:  # super_lengths: entropy-grouped super-patches (cp refuses super-patches)
            logits = model(tokens, lengths, super_patch_lengths=super_lengths, bucket_bits=self.bucket_bits)
            return byte_loss_sum(logits, targets)
        layout = ContextParallelLayout.build(tokens, lengths, self.local_window, self.cp_group)
        return byte_loss_sum(model(tokens, lengths, layout=layout), layout.local_targets(targets))


def optimizer_step(stepper: Stepper, next_batch, accum: int, dims: ParallelDims, optimizer, scheduler,
                   grad_clip: float, timer) -> tuple[float, int, float]:  # fmt: skip
    """One optimizer step over ``accum`` micro-batches from ``next_batch()`` ((tokens, targets,
    entropies, patch lengths) on the device, the last two possibly None); returns this rank's summed
    loss, the patches it counts, and the gradient norm before clipping. A non-finite norm (NaN or infinite gradients, or loss on any
    rank) leaves the parameters, the optimizer and the gradients as they are for the caller to judge."""
    loss_sum, patches = 0.0, 0
    for micro in range(accum):
        with timer.phase("data_wait"):
            batch = next_batch()
        if dims.uses_fsdp:
            # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
            for part in stepper.model_parts:
                part.set_requires_gradient_sync(micro == accum - 1)
        with timer.phase("forward_backward"):
            micro_loss, micro_patches = stepper.forward_backward(*batch)
        loss_sum, patches = loss_sum + micro_loss, patches + micro_patches
    parameters = [p for part in stepper.model_parts for p in part.parameters()]
    with timer.phase("grad_norm_allreduce"):
        clip = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(parameters, clip, dims.world_size // dims.pp, local_loss=loss_sum)
    if math.isfinite(grad_norm):
        with timer.phase("optimizer"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    if stepper.entropy_training is not None and stepper.entropy_training.joint:
        with timer.phase("optimizer"):
            stepper.entropy_training.step(grad_clip)
    return loss_sum, patches, grad_norm


def first_nonfinite(stepper: Stepper, loss_sum: float) -> str:
    """What went non-finite first, by rank order: a rank's loss, or the gradient of a named parameter.
    Collective: every rank calls it (they all saw the same non-finite norm)."""
    mine = "the loss" if not math.isfinite(loss_sum) else None
    if mine is None:
        name = first_nonfinite_gradient(item for part in stepper.model_parts for item in part.named_parameters())
        mine = f"the gradient of {name}" if name else None
    found = [mine]
    if dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, mine)
    return next((f"{what} on rank {rank}" for rank, what in enumerate(found) if what), "the gradient norm")


class NonFiniteGuard:
    """``train.nonfinite``: stop at the first step whose loss or gradients are not finite, or skip
    such steps, at most ``train.max_skipped_steps`` in a row. Either way nothing of that step is
    applied, so no non-finite weight is ever trained on, saved or exported."""

    def __init__(self, train: TrainConfig):
        self.policy, self.limit = train.nonfinite, train.max_skipped_steps
        self.in_a_row, self.skipped = 0, 0

    def applied(self, step: int, grad_norm: float, stepper: Stepper, loss_sum: float, optimizer) -> bool:
        """Whether the step's update was applied; TrainingDiverged when the policy says stop."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        culprit = first_nonfinite(stepper, loss_sum)
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        if self.policy == "skip" and self.in_a_row <= self.limit:
            return False
        why = "train.nonfinite is stop" if self.policy == "stop" else (
            f"{self.in_a_row} steps in a row, more than train.max_skipped_steps = {self.limit}")  # fmt: skip
        raise TrainingDiverged(
            f"step {step}: non-finite loss or gradients, first in {culprit} ({why}); the step was not applied and "
            "nothing non-finite was saved: resume from the last checkpoint with a lower optim.lr or a longer "
            "optim.warmup_steps, or set train.nonfinite: skip to step over rare bad batches"
        )


class Reporter:
    """Sums per-rank figures over the world, counting each data-parallel shard of the batch once:
    tensor-parallel ranks repeat the same loss, so only their first rank contributes."""

    def __init__(self, mesh: Meshes | None, device: torch.device):
        self.device = device
        self.contributes = mesh is None or mesh["tp"].get_local_rank() == 0

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values if self.contributes else [0.0] * len(values), dtype=torch.float64)
        if dist.is_initialized():
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.tolist()
