"""Pipeline parallelism for BLT, on ``torch.distributed.pipelining``.

Placement. The global transformer's layers are cut into ``num_stages`` contiguous stages; the
first stage also holds the local encoder (and the global in_proj), the last the local decoder
with the head (and the global final norm).

- ``GPipe``, ``1F1B``: one stage per rank, stage i on pipeline rank i.
- ``Interleaved1F1B``: two stages per rank in a loop, rank r holds stages r and r + pp.
- ``ZBVZeroBubble``: two stages per rank in a V, rank r holds stages r and 2 pp - 1 - r, so rank 0
  holds both the encoder and the decoder.

What crosses a stage boundary. Only float activations: the patch states (mb, P, global_dim) and,
in the GPipe / 1F1B / interleaved placements, the encoder's byte states (mb, T, local_dim) that the
decoder starts from; the middle stages pass those on untouched. In the V placement the byte states
never leave rank 0: ``ByteStateCarry`` hands them from the first stage to the last. The patch
layout (tokens, patch_lengths) is not an activation: every rank of a pipeline group loads the same
batch, and ``schedule.step`` hands keyword arguments, split into the same microbatches, to every
stage, so each stage rebuilds ``PatchLayout`` itself. (Torch pipelining also marks every received
buffer ``requires_grad``, which an integer tensor cannot be.)

Patch count. A stage sizes its receive buffers on its first step, but the padded patch count P of
a batch varies under entropy or space patching. ``BLTPipeline`` pads the patch axis with
zero-length patches up to a multiple of ``patch_bucket`` (padding patches form no document, so no
real byte or patch sees them) and keeps one schedule per batch shape (rows, bytes, padded patches)
and mode (training or evaluation), the few most recent.

Context parallelism. With a cp group (``split_model(..., cp_group)``) every stage runs the cp
rank's share of each microbatch: ``BLTStage`` builds a ``ContextParallelLayout`` instead of a
``PatchLayout`` (its ring attention, halo and decoder exchanges run inside the stage, among the
cp ranks of the same stage, which run the same schedule in step), the patch states are the rank's
two patch chunks (P / cp rows, rotary positions from ``layout.patch_positions``), the byte states
and the last stage's logits its own bytes: 2 x width, width the longest chunk of the *whole
batch* (``chunk_width``), handed to every microbatch so that all have one shape. That width
varies from batch to batch, so it is part of a schedule's shape key. The loss target is the
rank's own targets (``own_targets``, -100 on padding bytes, ignored by the cross-entropy),
computed once for the batch and split by torch like the logits. Summed over the cp ranks, the
losses and gradients are those of the whole sequence, as on the non-pipeline cp path.

Loss and gradients. The schedule calls the loss once per microbatch and adds the microbatch
gradients; it is built with ``scale_grads=False`` and the loss is the microbatch's summed byte
cross-entropy divided by ``loss_divisor``. The gradient of a step is therefore that of
(summed CE over the rank's batch / loss_divisor), the same quantity the single-process trainer
differentiates. Pass ``loss_divisor`` = bytes of this rank's optimizer step (micro-batch x seq_len
x accumulation steps) when data-parallel gradients are averaged (FSDP's default), or the global
byte count when they are summed.

How the trainer uses it (all ranks of the pipeline group load the same batch)::

    check_pipeline_layout(cfg)                                   # before any process group
    parts = split_model(model, pp_rank, pp_size, cfg.parallel.pp_schedule, cp_group)  # cp_group: None if cp = 1
    # ... apply TP / FSDP (reshard_after_forward=False, see below) / activation checkpointing ...
    del model                    # the parts keep only this rank's modules alive
    pipeline = BLTPipeline(parts, pp_group, cfg.parallel.pp_schedule, microbatch_count(cfg), device)
    optimizer = AdamW(p for part in parts for p in part.parameters())
    for each accumulation step:
        with autocast:
            ce_sum = pipeline.step(tokens, patch_lengths, targets, loss_divisor)  # None off the last stage
    grad_norm = clip_grad_norm_([p for part in parts for p in part.parameters()], max_norm, pp_group)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    with autocast:
        val_ce_sum = pipeline.evaluate(tokens, patch_lengths, targets)          # None off the last stage

FSDP. Shard the parts with ``reshard_after_forward=False`` (torchtitan's choice under PP too):
with resharding, the ZBV schedule's split backward of its middle stages (input gradients first,
weight gradients later, by torch) ends with wrong weight gradients (measured: dp_shard=2 x pp=2 on
gloo, torch 2.13); GPipe and interleaved 1F1B matched the single-process run either way.

Torch versions. Tested on torch 2.13 (all schedules) and 2.11 (GPipe, 1F1B, Interleaved1F1B).
On 2.11 with gloo, ZBVZeroBubble fails in torch's own p2p warm-up, which sends from a rank to
itself between the V's two same-rank stages (gloo has no self pair; NCCL has).

Parameter names. A part keeps the original module paths (``encoder.*``,
``global_model.layers.3.*``, ``decoder.*``), so every name in ``part.state_dict()`` is the name
of the same parameter in the unsplit model; ``gather_full_state_dict`` collects them on one rank.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from bltdist.errors import ConfigError
from bltdist.model.attention import resolve_backend
from bltdist.model.blt import BLT, PatchLayout
from bltdist.model.layers import rotary_table
from bltdist.parallel.context import ContextParallelLayout, chunk_width, own_targets

if TYPE_CHECKING:
    from bltdist.config import Config

SCHEDULES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
}
V_SHAPED = ("ZBVZeroBubble",)
SINGLE_STAGE = ("GPipe", "1F1B")


# ---------------------------------------------------------------------------------------------
# Layout: which stages a rank holds and which layers a stage holds


def stages_per_rank(schedule_name: str) -> int:
    if schedule_name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule_name!r}; choose one of {tuple(SCHEDULES)}")
    return 1 if schedule_name in SINGLE_STAGE else 2


def stage_indices(pp_rank: int, pp_size: int, schedule_name: str) -> list[int]:
    """The stages rank ``pp_rank`` holds, in the order the schedule expects them."""
    if stages_per_rank(schedule_name) == 1:
        return [pp_rank]
    if schedule_name in V_SHAPED:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank, pp_rank + pp_size]


def layer_split(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous global layers per stage, as even as possible.

    Layers that do not divide evenly go to the middle stages first, then to the first stage: the
    first stage also runs the encoder and the last one the decoder and head, the heavier of the two.
    """
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages but only {num_layers} global layers; each stage needs one")
    counts = [num_layers // num_stages] * num_stages
    preference = [*range(1, num_stages - 1), 0, num_stages - 1]
    for stage in preference[: num_layers % num_stages]:
        counts[stage] += 1
    starts = [sum(counts[:stage]) for stage in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def microbatch_count(cfg: Config) -> int:
    """parallel.pp_microbatches, or one sequence per microbatch (the smallest bubble)."""
    return cfg.parallel.pp_microbatches or cfg.train.micro_batch_size


def check_pipeline_layout(cfg: Config) -> None:
    """Raises one ConfigError listing every pipeline setting that cannot run; call it before any
    process group exists. Nothing to check when parallel.pp is 1."""
    parallel = cfg.parallel
    if parallel.pp == 1:
        return
    problems = []
    schedule = parallel.pp_schedule
    num_stages = parallel.pp * stages_per_rank(schedule)
    if cfg.model.arch != "blt":
        problems.append(
            f"parallel.pp: pipeline parallelism splits the BLT global transformer, but model.arch is "
            f"{cfg.model.arch!r}; set parallel.pp: 1"
        )
    elif num_stages > cfg.model.blt.global_layers:
        problems.append(
            f"parallel.pp: {parallel.pp} ranks x {stages_per_rank(schedule)} stage(s) per rank ({schedule}) = "
            f"{num_stages} pipeline stages, but model.blt.global_layers is {cfg.model.blt.global_layers}; every "
            "stage needs at least one global layer: lower parallel.pp, use a one-stage-per-rank schedule "
            "(GPipe, 1F1B) or add global layers"
        )
    microbatches = microbatch_count(cfg)
    if cfg.train.micro_batch_size % microbatches:
        problems.append(
            f"parallel.pp_microbatches: {microbatches} pipeline microbatches must divide train.micro_batch_size "
            f"{cfg.train.micro_batch_size} (every microbatch must have the same shape)"
        )
    if schedule == "1F1B" and microbatches < parallel.pp:
        problems.append(
            f"parallel.pp_microbatches: 1F1B needs at least parallel.pp = {parallel.pp} microbatches, got "
            f"{microbatches}; raise parallel.pp_microbatches (and train.micro_batch_size) or use GPipe"
        )
    if schedule == "Interleaved1F1B" and microbatches % max(1, microbatches // parallel.pp):
        rounds = max(1, microbatches // parallel.pp)
        problems.append(
            f"parallel.pp_microbatches: Interleaved1F1B runs microbatches in rounds of parallel.pp = {parallel.pp}; "
            f"{microbatches} is not a multiple of its {rounds} rounds; use a multiple of {parallel.pp}"
        )
    if schedule in V_SHAPED and cfg.train.compile:
        problems.append(f"train.compile: torch's {schedule} schedule does not support torch.compile; set it false")
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------
# Stage modules


class _Parked:
    """One microbatch's byte states, parked on the rank between the first and the last stage."""

    def __init__(self, byte_states: torch.Tensor):
        # A fresh autograd leaf, like a received activation: the last stage's backward fills .grad.
        self.leaf = byte_states.detach().requires_grad_(byte_states.requires_grad)


class _AddParkedGradient(torch.autograd.Function):
    """Identity on the first stage's patch states whose backward also sends the last stage's
    gradient of the parked byte states into the encoder."""

    @staticmethod
    def forward(ctx, patch_states, byte_states, parked: _Parked):
        ctx.parked = parked
        # A copy, not a view: FSDP's pre-backward hook on a stage output is lost under in-place ops on views.
        return patch_states.clone()

    @staticmethod
    def backward(ctx, grad_patch_states):
        return grad_patch_states, ctx.parked.leaf.grad, None


class ByteStateCarry:
    """Hands the encoder's byte states from the first stage to the last when one rank holds both.

    Forward: every stage runs its microbatches in order, so a queue matches the last stage's
    microbatch to the first stage's. Backward: the first stage's backward for a microbatch always
    comes after the last stage's (it waits for the gradient that flows back through the middle
    stages), so by then the parked leaf holds the decoder's gradient and ``_AddParkedGradient``
    adds it to the encoder's.
    """

    def __init__(self):
        self._queue: deque[_Parked] = deque()

    def send(self, patch_states: torch.Tensor, byte_states: torch.Tensor) -> torch.Tensor:
        parked = _Parked(byte_states)
        self._queue.append(parked)
        return _AddParkedGradient.apply(patch_states, byte_states, parked)

    def receive(self) -> torch.Tensor:
        return self._queue.popleft().leaf

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)


class BLTStage(nn.Module):
    """The part of a BLT that one pipeline stage runs; shares the model's parameters and keeps
    their names. forward(*activations, tokens, patch_lengths, cp_width) -> the next stage's
    activations, or logits on the last stage.

    With a ``carry`` (V placement) the activations are the patch states alone and the byte states
    go through the carry; without one they travel as the second activation.

    With a ``cp_group`` the stage runs this cp rank's share of every microbatch
    (``ContextParallelLayout``, chunks padded to ``cp_width`` bytes): the byte states and logits
    cover the rank's bytes, the patch states its two patch chunks.
    """

    def __init__(
        self, model: BLT, stage_index: int, num_stages: int, layers: range, carry: ByteStateCarry | None, v_shaped: bool,
        cp_group: dist.ProcessGroup | None = None,
    ):  # fmt: skip
        super().__init__()
        self.stage_index, self.num_stages = stage_index, num_stages
        self.cp_group = cp_group
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.cfg, self.attention_backend = model.cfg, model.attention_backend
        self.carry = carry
        self.byte_states_travel = not v_shaped
        source = model.global_model
        self.rope_theta = source.rope_theta
        self.head_dim = source.dim // source.layers[0].attn.heads
        self.encoder = model.encoder if self.is_first else None
        self.global_model = nn.Module()
        self.global_model.in_proj = source.in_proj if self.is_first else None
        self.global_model.layers = nn.ModuleDict({str(i): source.layers[i] for i in layers})
        self.global_model.norm = source.norm if self.is_last else None
        self.decoder = model.decoder if self.is_last else None

    def forward(
        self, *activations: torch.Tensor, tokens: torch.Tensor, patch_lengths: torch.Tensor, cp_width: int | None = None
    ):
        if self.cp_group is None:
            backend = resolve_backend(self.attention_backend, tokens.device)
            layout = PatchLayout.build(tokens, patch_lengths, self.cfg.local_window, backend)
        else:
            layout = ContextParallelLayout.build(tokens, patch_lengths, self.cfg.local_window, self.cp_group, cp_width)
        if self.is_first:
            byte_states, slots = self.encoder(tokens, layout)
            patch_states = slots.flatten(-2)
            if self.global_model.in_proj is not None:
                patch_states = self.global_model.in_proj(patch_states)
        else:
            patch_states, *carried = activations
            byte_states = carried[0] if carried else None
        # Under cp the rank's patches are two chunks from far apart in the sequence: their own positions.
        rope = rotary_table(layout.patch_positions, self.head_dim, self.rope_theta)
        for layer in self.global_model.layers.values():
            patch_states = layer(patch_states, rope, layout.patch_mask)
        if not self.is_last:
            if self.byte_states_travel:
                return patch_states, byte_states
            return self.carry.send(patch_states, byte_states) if self.is_first else patch_states
        if self.global_model.norm is not None:
            patch_states = self.global_model.norm(patch_states)
        if not self.byte_states_travel:
            byte_states = self.carry.receive()
        return self.decoder(byte_states, patch_states, layout)


def split_model(
    model: BLT, pp_rank: int, pp_size: int, schedule_name: str, cp_group: dist.ProcessGroup | None = None
) -> list[BLTStage]:
    """The stage modules rank ``pp_rank`` runs, in schedule order. Parameters of other ranks'
    stages stay in ``model`` but belong to no part; optimise only the parts' parameters.
    ``cp_group``: the rank's context-parallel group when parallel.cp > 1 (every stage then runs
    the rank's share of the sequence), else None."""
    per_rank = stages_per_rank(schedule_name)
    num_stages = pp_size * per_rank
    layers = layer_split(len(model.global_model.layers), num_stages)
    indices = stage_indices(pp_rank, pp_size, schedule_name)
    v_shaped = schedule_name in V_SHAPED
    # The V puts the first and the last stage on rank 0: there the byte states stay on the rank.
    carry = ByteStateCarry() if v_shaped and pp_rank == 0 else None
    return [BLTStage(model, index, num_stages, layers[index], carry, v_shaped, cp_group) for index in indices]


# ---------------------------------------------------------------------------------------------
# Running a step


def pad_patch_axis(patch_lengths: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pads (B, P) patch lengths with zero-length patches up to a multiple of ``multiple``."""
    padding = -patch_lengths.shape[1] % multiple
    return F.pad(patch_lengths, (0, padding)) if padding else patch_lengths


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
        """Forward and backward of this rank's batch (B, T) through the pipeline; gradients
        accumulate into the parts' parameters. Returns the summed byte cross-entropy of the batch
        (detached) on the rank holding the last stage, None elsewhere."""
        return self._run(tokens, patch_lengths, targets, loss_divisor, training=True)

    def evaluate(self, tokens: torch.Tensor, patch_lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The summed byte cross-entropy of the batch on the last stage's rank, None elsewhere.
        Call it between optimizer steps (no gradients held)."""
        if self.schedule_name not in V_SHAPED:
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
        patch_lengths = pad_patch_axis(patch_lengths, self.patch_bucket)
        losses: list[torch.Tensor] = []
        batch = dict(target=targets, losses=losses, tokens=tokens, patch_lengths=patch_lengths)
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
        # Targets of cp padding bytes are -100, cross_entropy's default ignore_index.
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / self._loss_divisor

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
        stage_arg = stages[0] if self.schedule_name in SINGLE_STAGE else stages
        return schedule_class(stage_arg, self.n_microbatches, loss_fn=self._loss, scale_grads=False)


def _no_weight_step():
    return lambda: None


# ---------------------------------------------------------------------------------------------
# Across stages: gradient clipping and the full state dict


def clip_grad_norm_(parameters, max_norm: float, pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Clips the gradients of this rank's parts by the norm over all stages and shards; returns it.

    The parameters of one rank may be DTensors (FSDP / TP): their local norm is made whole over
    their mesh first, then squared norms are summed over the pipeline group.
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        squared = norm**2
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def gather_full_state_dict(parts: list[BLTStage], pp_group: dist.ProcessGroup) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict, with the unsplit model's names, on pipeline rank 0 (None on
    the others). Every rank of the pipeline group, and of the parts' FSDP / TP meshes, must call it."""
    local = {}
    for part in parts:
        for name, value in part.state_dict().items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            local[name] = value.detach().cpu()
    is_root = dist.get_rank(pp_group) == 0
    gathered = [None] * dist.get_world_size(pp_group) if is_root else None
    dist.gather_object(local, gathered, dst=dist.get_global_rank(pp_group, 0), group=pp_group)
    if not is_root:
        return None
    return {name: value for rank_dict in gathered for name, value in rank_dict.items()}
