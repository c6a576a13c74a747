"""Pipeline stages: a BLT (or a plain LM, ``ByteLMStage``) without the parts other stages hold, called
the way torch pipelining calls it.

The global layers are cut into contiguous stages; the first stage also holds the local encoder
(and the global in_proj), the last the local decoder with the head (and the global final norm).
GPipe and 1F1B put stage i on rank i; Interleaved1F1B puts stages r and r + pp on rank r; the
ZBVZeroBubble V puts stages r and 2pp - 1 - r on rank r, so rank 0 holds the encoder and the decoder.

Between stages travel the patch states and, except in the V, the encoder's byte states that the
decoder starts from (in the V, ``ByteStateCarry`` keeps them on rank 0). Tokens and patch lengths
are not activations: every rank of a pipeline group loads the same batch and torch hands every
stage its microbatch of them as keyword arguments, so each stage builds its own patch layout.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn

from bltdist.model.blt import BLT, ByteLM
from bltdist.parallel.context import ContextParallelLayout, ContextParallelSequence
from bltdist.parallel.dims import V_SHAPED_SCHEDULES, stages_per_rank


def stage_indices(pp_rank: int, pp_size: int, schedule_name: str) -> list[int]:
    """The stages rank ``pp_rank`` holds, in the order the schedule expects them."""
    if stages_per_rank(schedule_name) == 1:
        return [pp_rank]
    if schedule_name in V_SHAPED_SCHEDULES:
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


class BLTStage(BLT):
    """The parts of a BLT that one pipeline stage runs, the others None: the same modules, so the
    same parameters under the same names. ``forward`` takes what torch pipelining passes, the
    previous stage's activations positionally and the microbatch as keywords, and runs BLT.forward.

    With a ``cp_group`` the stage runs this cp rank's share of every microbatch, its chunks padded
    to ``cp_width`` bytes so that every microbatch, and so every activation, has one shape.
    """

    def __init__(self, model: BLT, stage_index: int, num_stages: int, layers: range, v_shaped: bool,
                 carry: ByteStateCarry | None, cp_group: dist.ProcessGroup | None):  # fmt: skip
        with torch.device("meta"):
            super().__init__(model.cfg, model.attention_backend)  # a skeleton whose parts are replaced below
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.carry, self.cp_group, self.v_shaped = carry, cp_group, v_shaped
        source = model.global_model
        self.encoder = model.encoder if self.is_first else None
        self.global_model.in_proj = source.in_proj if self.is_first else None
        self.global_model.layers = nn.ModuleDict({str(i): source.layers[str(i)] for i in layers})
        self.global_model.norm = source.norm if self.is_last else None
        self.decoder = model.decoder if self.is_last else None

    def forward(self, *activations: torch.Tensor, tokens: torch.Tensor, patch_lengths: torch.Tensor,
                cp_width: int | None = None):  # fmt: skip
        layout = None
        if self.cp_group is not None:
            layout = ContextParallelLayout.build(tokens, patch_lengths, self.cfg.local_window, self.cp_group, cp_width)
        patch_states, byte_states = (*activations, None, None)[:2]  # the first stage receives none
        if self.carry is not None and self.is_last:
            byte_states = self.carry.receive()
        out = super().forward(tokens, patch_lengths, layout, patch_states, byte_states)
        if self.is_last:
            return out
        patch_states, byte_states = out
        if not self.v_shaped:
            return patch_states, byte_states
        # In the V the byte states stay on rank 0 (first and last stage): only patch states travel.
        return self.carry.send(patch_states, byte_states) if self.is_first else patch_states


class ByteLMStage(ByteLM):
    """The parts of a plain LM (arch entropy, bytelm, tokenlm) that one pipeline stage runs, the
    others None: the embedding on the first stage, the layers cut like BLT's global layers, the norm
    and head on the last. Only the hidden states travel; the tokens come as a keyword, as in BLTStage.
    With a ``cp_group`` the stage runs this cp rank's positions of every microbatch."""

    carry = None  # every stage's input is the previous stage's output: nothing bypasses a stage

    def __init__(self, model: ByteLM, stage_index: int, num_stages: int, layers: range,
                 cp_group: dist.ProcessGroup | None):  # fmt: skip
        with torch.device("meta"):
            super().__init__(model.cfg, model.attention_backend)  # a skeleton whose parts are replaced below
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.cp_group = cp_group
        self.embedding = model.embedding if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.output = model.output if self.is_last else None

    def forward(self, *hidden: torch.Tensor, tokens: torch.Tensor, cp_width: int | None = None) -> torch.Tensor:
        layout = None
        if self.cp_group is not None:
            layout = ContextParallelSequence.build(tokens, self.cfg.window, self.cp_group, cp_width)
        return super().forward(tokens, layout, *hidden)  # the first stage receives no hidden states


def split_model(model: BLT | ByteLM, pp_rank: int, pp_size: int, schedule: str,
                cp_group: dist.ProcessGroup | None = None) -> list[BLTStage | ByteLMStage]:  # fmt: skip
    """The stages rank ``pp_rank`` runs, in schedule order. Parameters of other ranks' stages stay
    in ``model`` but belong to no stage; optimise only the stages' parameters. ``cp_group``: the
    rank's context-parallel group when parallel.cp > 1, else None."""
    num_stages = pp_size * stages_per_rank(schedule)
    indices = stage_indices(pp_rank, pp_size, schedule)
    if isinstance(model, ByteLM):
        layers = layer_split(len(model.layers), num_stages)
        return [ByteLMStage(model, index, num_stages, layers[index], cp_group) for index in indices]
    layers = layer_split(len(model.global_model.layers), num_stages)
    # The V puts the first and the last stage on rank 0: there the byte states stay on the rank.
    v_shaped = schedule in V_SHAPED_SCHEDULES
    carry = ByteStateCarry() if v_shaped and pp_rank == 0 else None
    return [BLTStage(model, index, num_stages, layers[index], v_shaped, carry, cp_group) for index in indices]
