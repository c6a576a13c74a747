"""A cp rank's share of a micro-batch: its two chunks of patches and their bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bltdist.model.attention import SelfAttentionMask
from bltdist.model.blt import PatchLayout, SequenceLayout
from bltdist.model.loss import IGNORE_INDEX
from bltdist.parallel.context.comms import AllGatherChunkTails
from bltdist.parallel.context.halo import HaloByteMask, gather_rows, halo_plan
from bltdist.parallel.context.ring import RingPatchMask
from bltdist.patching.rules import pad_patch_lengths

PADDING_DOC = -1  # padding bytes: a document no real byte belongs to


def chunk_order(cp: int) -> list[int]:
    """Chunk index for every (rank, own slot) pair, rank-major: rank r holds chunks r, 2cp-1-r."""
    return [chunk for rank in range(cp) for chunk in (rank, 2 * cp - 1 - rank)]


@dataclass
class ContextParallelLayout(PatchLayout):
    """One cp rank's share of a micro-batch, in the shape ``BLT.forward(..., layout=)`` reads.

    Local bytes are (B, 2 * width): own chunk r in [0, width), own chunk 2cp-1-r in
    [width, 2 * width), each right-padded. Local patches are (B, 2C) in the same order.
    """

    byte_index: torch.Tensor  # (B, 2 * width): global byte of each local byte (0 for padding)
    byte_valid: torch.Tensor  # (B, 2 * width): False on padding
    group: object
    chunk: int

    @classmethod
    def build(
        cls, tokens: torch.Tensor, patch_lengths: torch.Tensor, window: int | None, group, width: int | None = None
    ) -> PatchLayout:
        """This rank's layout of the full micro-batch tokens (B, T) and patch_lengths (B, P), which
        every rank of ``group`` (the cp group) passes identically. ``window``: model.blt.local_window.

        ``width``: bytes per own chunk, at least ``chunk_width(patch_lengths, cp)``; by default
        exactly that. A pipeline passes the width of its whole batch to every microbatch, so that
        all microbatches, and the activations its stages exchange, have one shape."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        batch, seq_len = tokens.shape
        patch_lengths, chunk_starts, chunk_ends = _chunks(patch_lengths, 2 * size, tokens.device)
        whole = PatchLayout.build(tokens, patch_lengths, window, backend="sdpa")
        chunk = patch_lengths.shape[1] // (2 * size)
        own_chunks = _own_chunk_indices(group, tokens.device)
        own_slot = torch.arange(2, device=tokens.device)
        byte_index, valid = _own_bytes(chunk_starts, chunk_ends, own_chunks, width)
        width = byte_index.shape[1] // 2

        def local(per_byte: torch.Tensor) -> torch.Tensor:
            return torch.gather(per_byte, 1, byte_index)

        # Own slot k holds its chunk's patches in rows k*C .. k*C + C - 1, then one spare row.
        patch_shift = (own_chunks * chunk - own_slot * chunk).repeat_interleave(width)
        patch_ids = torch.where(valid, local(whole.patch_ids) - patch_shift, 2 * chunk)
        # decoder_patch_states gives slot k the rows k*(C+1) .. : the previous chunk's last patch, then its own.
        source_shift = (own_chunks * chunk - 1 - own_slot * (chunk + 1)).repeat_interleave(width)
        source_patch = torch.where(valid, local(whole.source_patch) - source_shift, 0)
        byte_docs = torch.where(valid, local(whole.byte_mask.doc_ids), PADDING_DOC)

        halo = max(min(window or seq_len, seq_len) - 1, 1)
        tail_rows, halo_index, halo_docs = halo_plan(
            chunk_starts, chunk_ends, own_chunks, width, halo, whole.byte_mask.doc_ids
        )
        chunk_docs = byte_docs.view(batch, 2, width)
        chunk_masks = [
            SelfAttentionMask(torch.cat([halo_docs[:, k], chunk_docs[:, k]], dim=1), window, "sdpa") for k in range(2)
        ]

        order = torch.tensor(chunk_order(size), device=tokens.device).view(size, 2)
        patch_positions = (order[..., None] * chunk + torch.arange(chunk, device=tokens.device)).flatten(1)  # (cp, 2C)
        patch_docs = whole.patch_mask.doc_ids[:, patch_positions].permute(1, 0, 2)  # (cp, B, 2C)
        return cls(
            patch_ids=patch_ids,
            source_patch=source_patch,
            num_patches=2 * chunk,
            byte_mask=HaloByteMask(group, width, halo, tail_rows, halo_index, chunk_masks),
            patch_mask=RingPatchMask(group, rank, size, chunk, patch_positions, patch_docs),
            byte_positions=byte_index,
            patch_positions=patch_positions[rank],
            byte_index=byte_index,
            byte_valid=valid,
            group=group,
            chunk=chunk,
        )

    def local_bytes(self, per_byte: torch.Tensor) -> torch.Tensor:
        return gather_rows(per_byte, self.byte_index)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """This rank's next-byte targets, IGNORE_INDEX on padding."""
        return torch.where(self.byte_valid, torch.gather(targets, 1, self.byte_index), IGNORE_INDEX)

    def decoder_patch_states(self, patch_states: torch.Tensor) -> torch.Tensor:
        """(B, 2C, dim) -> (B, 2C + 2, dim): each own chunk preceded by the previous chunk's last
        patch, which the chunk's first bytes read. Chunk 0 has no predecessor; its row is never read."""
        last_rows = patch_states[:, [self.chunk - 1, 2 * self.chunk - 1]].transpose(0, 1)  # (2, B, dim)
        last_by_chunk = AllGatherChunkTails.apply(last_rows, self.group)  # (2cp, B, dim)
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        first, second = patch_states[:, : self.chunk], patch_states[:, self.chunk :]
        before_first, before_second = last_by_chunk[rank - 1], last_by_chunk[2 * size - 2 - rank]
        return torch.cat([before_first[:, None], first, before_second[:, None], second], dim=1)


@dataclass
class ContextParallelSequence(SequenceLayout):
    """One cp rank's share of a plain LM's micro-batch (arch entropy, bytelm, tokenlm), in the shape
    ``ByteLM.forward(..., layout=)`` reads.

    Each position (a byte, or a BPE token) is a patch of its own, so the 2 x cp chunks of
    ``ContextParallelLayout`` split the positions evenly and the rank's positions are the bytes of its
    chunks. Attention is that layout's: ring attention over the whole sequence (the global
    transformer's), or with a window shorter than the sequence the local layers' halo exchange."""

    index: torch.Tensor  # (B, 2 * width): global position of each local one (0 for padding)
    valid: torch.Tensor  # (B, 2 * width): False on padding

    @classmethod
    def build(cls, tokens: torch.Tensor, window: int | None, group, width: int | None = None) -> SequenceLayout:
        """This rank's layout of the tokens (B, T) that every rank of ``group`` (the cp group) passes
        identically; ``window``: the model's. ``width`` as in ``ContextParallelLayout.build``."""
        shard = ContextParallelLayout.build(tokens, torch.ones_like(tokens), window, group, width)
        windowed = window is not None and window < tokens.shape[1]
        # With one position per patch, local patches and local bytes are the same rows, in the same order.
        mask = shard.byte_mask if windowed else shard.patch_mask
        return cls(mask, shard.byte_positions, shard.byte_index, shard.byte_valid)

    def local(self, per_position: torch.Tensor) -> torch.Tensor:
        return gather_rows(per_position, self.index)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """This rank's next-position targets, IGNORE_INDEX on padding."""
        return torch.where(self.valid, torch.gather(targets, 1, self.index), IGNORE_INDEX)


def _chunks(patch_lengths: torch.Tensor, num_chunks: int, device) -> tuple[torch.Tensor, ...]:
    """``patch_lengths`` (B, P) right-padded to ``num_chunks`` chunks of equal patch count, and the
    first and one-past-last global byte (B, num_chunks each) of every chunk."""
    patch_lengths = pad_patch_lengths(patch_lengths.to(device=device, dtype=torch.long), num_chunks)
    real = patch_lengths > 0
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        # An empty patch between real ones would let a byte's source patch skip a chunk boundary.
        raise ValueError("patch_lengths may hold zero-length patches only as right padding")
    chunk = patch_lengths.shape[1] // num_chunks
    chunk_ends = torch.cumsum(patch_lengths, dim=1)[:, chunk - 1 :: chunk].contiguous()
    return patch_lengths, F.pad(chunk_ends[:, :-1], (1, 0)), chunk_ends


def _own_chunk_indices(group, device) -> torch.Tensor:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return torch.tensor([rank, 2 * size - 1 - rank], device=device)


def chunk_width(patch_lengths: torch.Tensor, cp: int) -> int:
    """Bytes per own chunk of ``ContextParallelLayout.build`` (its default ``width``): the longest
    of the 2 x cp chunks of any row of ``patch_lengths`` (B, P), at least 1. A rank's local byte
    count is twice this; every rank computes it alike from the patch lengths alone."""
    _, chunk_starts, chunk_ends = _chunks(patch_lengths, 2 * cp, patch_lengths.device)
    return max(int((chunk_ends - chunk_starts).max()), 1)


def own_targets(targets: torch.Tensor, patch_lengths: torch.Tensor, group, width: int | None = None) -> torch.Tensor:
    """``ContextParallelLayout.build(tokens, patch_lengths, window, group, width).local_targets(targets)``
    without building the layout: this rank's next-byte targets (B, 2 * width), IGNORE_INDEX on
    padding. Rows are independent, so a batch's local targets split by rows are those of its parts."""
    _, chunk_starts, chunk_ends = _chunks(patch_lengths, 2 * dist.get_world_size(group), targets.device)
    byte_index, valid = _own_bytes(chunk_starts, chunk_ends, _own_chunk_indices(group, targets.device), width)
    return torch.where(valid, torch.gather(targets, 1, byte_index), IGNORE_INDEX)


def _own_bytes(chunk_starts: torch.Tensor, chunk_ends: torch.Tensor, own_chunks: torch.Tensor, width: int | None):
    """Global byte index (B, 2 * width) of the two own chunks, each right-padded to ``width``, by
    default the longest chunk of the batch (so every rank agrees on it), and where it is real
    (not padding)."""
    chunk_bytes = chunk_ends - chunk_starts
    longest = max(int(chunk_bytes.max()), 1)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"width {width} is shorter than the longest chunk of the batch ({longest} bytes)")
    offsets = torch.arange(width, device=chunk_starts.device)
    valid = offsets < chunk_bytes[:, own_chunks, None]  # (B, 2, width)
    byte_index = torch.where(valid, chunk_starts[:, own_chunks, None] + offsets, 0)
    return byte_index.flatten(1), valid.flatten(1)
