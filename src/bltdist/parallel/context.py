"""Context parallelism: one micro-batch's sequence split across the ranks of the cp group.

Every cp rank receives the same full micro-batch (tokens and patch lengths): the cp ranks share
one data-parallel coordinate, and patching runs on the whole sequence, so the patches are exactly
those of a single-process run. ``ContextParallelLayout.build`` then gives each rank its share.

Split. The patch sequence (right-padded with empty patches to a multiple of 2*cp) is cut into
2*cp chunks of equal patch count; rank r keeps chunks r and 2cp-1-r (load balance under causal
attention: early chunks attend to little, late chunks to a lot). A rank's bytes are the bytes of
its patches, so the encoder pools and the global model sees exactly the single-process patches.
Byte counts then differ per chunk and per row; every chunk is right-padded with inert bytes to
the longest chunk of the batch (every rank knows all patch lengths, so all ranks agree on that
size without communicating), or to a given larger width: a pipeline stage gets the width of its
whole batch, so that its microbatches all have one shape (``bltdist.parallel.pipeline``). Padding bytes form a document of their own, belong to no patch and
carry no loss. The global model, the expensive part, is balanced exactly; the local layers pay
for the padding (the spread of chunk byte counts, small when patches are many per chunk).

Global attention: ring attention (``RingPatchMask``). K and V travel around the ring while each
rank's queries attend to the chunk pair in hand; partial outputs merge by log-sum-exp. Only half
of each off-diagonal pair is ever visible (an earlier rank's first chunk to all our queries, or
all of a later rank's keys to our second chunk), and only that half is computed. Document and
causal masks come from global patch indices and document ids, which every rank already knows, so
only K and V move. The backward pass sends K, V and their gradient accumulators around the ring
once more. The all-gather alternative (Llama 3's choice) would be simpler but holds the K/V of
the whole sequence in every layer, in the forward and saved for the backward: at 4k+ patches,
25 layers and no GQA that memory is what cp is meant to remove, so the ring is used here (a
reasoned choice: no GPU timing of the two was taken).
The blocks are computed with plain tensor algebra in fp32 (no fused kernel; see "Left out").

Local attention (``HaloByteMask``): a byte sees the previous window - 1 bytes, which may live on
another rank. Each rank all-gathers the last window - 1 keys and values of every chunk (a few
rows per rank and layer; an all-gather rather than neighbour send/recv because a chunk shorter
than the window needs bytes from chunks further back), and prepends to each own chunk the
``window - 1`` bytes before it. The exchange's backward all-reduces the gradient and keeps each
rank's own part (gloo has no reduce-scatter; the tails are small). Hash n-grams look back too;
all ranks have the full tokens, so the table rows come from the whole sequence.

Decoder cross-attention: the first bytes of a chunk read the global output of the previous
chunk's last patch; those rows are all-gathered the same way, with gradient.

Loss and gradients: each rank computes the cross-entropy of its own bytes (``local_loss_sum``);
the sum over cp ranks is the single-process loss, and the single-process gradient of every
parameter is the *sum* of the cp ranks' gradients. A trainer whose FSDP averages over the
flattened dp_shard x cp mesh must therefore multiply the loss by cp before backward, exactly as
torchtitan does: ``(local_loss_sum * cp / (B * T * accum)).backward()`` with B x T the full
micro-batch, makes the averaged gradient that of the mean loss over the global batch.

Trainer use, per micro-batch (cp_group from the device mesh, e.g. ``mesh["cp"].get_group()``)::

    layout = ContextParallelLayout.build(tokens, lengths, cfg.model.blt.local_window, cp_group)
    logits = model(tokens, lengths, layout=layout)           # this rank's bytes only
    loss_sum = local_loss_sum(logits, targets, layout)      # sum over cp = full loss

Left out: fused attention kernels (flash / flex) for the ring blocks and halo attention, and
overlap of the halo exchange with compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bltdist.config import Config
from bltdist.errors import ConfigError
from bltdist.model.attention import SelfAttentionMask
from bltdist.model.blt import PatchLayout

IGNORE_INDEX = -100
PADDING_DOC = -1  # padding bytes: a document no real byte belongs to
BEFORE_START_DOC = -2  # halo positions before the sequence starts
QUERY_BLOCK = 128


def check_context_layout(cfg: Config) -> None:
    """Raises ConfigError when parallel.cp cannot split the configured sequences; call it before
    any process group exists."""
    cp = cfg.parallel.cp
    if cp == 1:
        return
    problems = []
    if cfg.model.arch != "blt":
        problems.append(
            f"parallel.cp: context parallelism splits the BLT's patch sequence; model.arch {cfg.model.arch!r} "
            "has no patches, set parallel.cp: 1"
        )
    if cfg.train.seq_len < 2 * cp:
        problems.append(
            f"train.seq_len: parallel.cp {cp} cuts every sequence into 2 x cp = {2 * cp} chunks of at least "
            f"one patch (one byte) each, but train.seq_len is {cfg.train.seq_len}; make train.seq_len >= {2 * cp} "
            "or lower parallel.cp"
        )
    if problems:
        raise ConfigError(problems)


def chunk_order(cp: int) -> list[int]:
    """Chunk index for every (rank, own slot) pair, rank-major: rank r holds chunks r, 2cp-1-r."""
    return [chunk for rank in range(cp) for chunk in (rank, 2 * cp - 1 - rank)]


# ---------------------------------------------------------------------------------------------
# Communication steps


class _AllGatherChunkTails(torch.autograd.Function):
    """Every rank's (2, B, ...) rows of its two chunks -> (2cp, B, ...) rows in chunk order.

    Backward: each rank's rows were read by any rank, so the gradient is summed over the group
    (an all-reduce: gloo has no reduce-scatter, and these are a few rows) and each rank keeps its own.
    """

    @staticmethod
    def forward(ctx, own_rows: torch.Tensor, group) -> torch.Tensor:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        gathered = [torch.empty_like(own_rows) for _ in range(size)]
        dist.all_gather(gathered, own_rows.contiguous(), group=group)
        by_rank = torch.stack(gathered)  # (cp, 2, B, ...)
        return torch.cat([by_rank[:, 0], by_rank[:, 1].flip(0)])  # chunks 0..cp-1, then cp..2cp-1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return torch.stack([grad[ctx.rank], grad[2 * ctx.size - 1 - ctx.rank]]), None


def _start_ring_shift(tensor: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Send ``tensor`` to the next rank of the ring and receive the previous rank's into a new buffer."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group),
    ]
    return received, dist.batch_isend_irecv(ops)


def _finish(requests: list) -> None:
    for request in requests:
        request.wait()


# ---------------------------------------------------------------------------------------------
# Global attention: ring


def _block_scores(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """q: (B, Tq, Hkv, G, D), k: (B, Tk, Hkv, D), visible: (B, Tq, Tk) -> (B, Hkv, G, Tq, Tk)."""
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~visible[:, None, None], -math.inf)


def _block_forward(q, k, v, visible) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to one block of keys: output (B, Tq, Hkv, G, D) and log-sum-exp (B, Hkv, G, Tq).
    A query that sees no key of the block gets lse -inf and output 0, which the merge ignores."""
    scores = _block_scores(q, k, visible)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhgqk,bkhd->bqhgd", probs, v), lse


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part: slice, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold a block's partial softmax into the running one for the queries in ``part`` (in place)."""
    old_lse = lse[..., part]
    new_lse = torch.logaddexp(old_lse, block_lse)
    old_weight = torch.exp(old_lse - new_lse).permute(0, 3, 1, 2)[..., None]
    block_weight = torch.exp(block_lse - new_lse).permute(0, 3, 1, 2)[..., None]
    out[:, part] = out[:, part] * old_weight + block_out * block_weight
    lse[..., part] = new_lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RingPatchMask) -> torch.Tensor:
        batch, length, heads, head_dim = q.shape
        grouped_q = q.float().unflatten(2, (k.shape[2], heads // k.shape[2]))
        key_values = torch.cat([k, v], dim=-1).float().contiguous()
        out = torch.zeros_like(grouped_q)
        lse = torch.full((batch, k.shape[2], heads // k.shape[2], length), -math.inf, device=q.device)
        for step in range(mask.size):
            source = (mask.rank - step) % mask.size
            if step + 1 < mask.size:
                next_key_values, requests = _start_ring_shift(key_values, mask.group)
            q_part, k_part = mask.visible_parts(source)
            block_k, block_v = key_values[:, k_part].chunk(2, dim=-1)
            visible = mask.visible(source, q_part, k_part)
            block_out, block_lse = _block_forward(grouped_q[:, q_part], block_k, block_v, visible)
            _merge_into(out, lse, q_part, block_out, block_lse)
            if step + 1 < mask.size:
                _finish(requests)
                key_values = next_key_values
        ctx.mask = mask
        ctx.save_for_backward(q, k, v, out, lse)
        return out.flatten(2, 3).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        mask = ctx.mask
        grouped_q = q.float().unflatten(2, (k.shape[2], q.shape[2] // k.shape[2]))
        grad_out = grad_out.float().unflatten(2, grouped_q.shape[2:4])
        # delta = rowsum(dO * O): the softmax backward's correction, the same for every key block.
        delta = (grad_out * out).sum(-1).permute(0, 2, 3, 1)  # (B, Hkv, G, T)
        grad_q = torch.zeros_like(grouped_q)
        key_values = torch.cat([k, v], dim=-1).float().contiguous()
        grad_key_values = torch.zeros_like(key_values)  # travels with key_values back to its owner
        for step in range(mask.size):
            source = (mask.rank - step) % mask.size
            if step + 1 < mask.size:
                next_key_values, requests = _start_ring_shift(key_values, mask.group)
            q_part, k_part = mask.visible_parts(source)
            block_k, block_v = key_values[:, k_part].chunk(2, dim=-1)
            scores = _block_scores(grouped_q[:, q_part], block_k, mask.visible(source, q_part, k_part))
            probs = torch.exp(scores - lse[..., q_part, None])
            part_grad_out = grad_out[:, q_part]
            grad_v = torch.einsum("bhgqk,bqhgd->bkhd", probs, part_grad_out)
            grad_probs = torch.einsum("bqhgd,bkhd->bhgqk", part_grad_out, block_v)
            grad_scores = probs * (grad_probs - delta[..., q_part, None]) / math.sqrt(q.shape[-1])
            grad_q[:, q_part] += torch.einsum("bhgqk,bkhd->bqhgd", grad_scores, block_k)
            grad_k = torch.einsum("bhgqk,bqhgd->bkhd", grad_scores, grouped_q[:, q_part])
            grad_key_values[:, k_part] += torch.cat([grad_k, grad_v], dim=-1)
            if step + 1 < mask.size:
                _finish(requests)
                key_values = next_key_values
            if mask.size > 1:
                # After cp shifts the accumulator has gone round the ring and is back at its owner.
                grad_key_values, requests = _start_ring_shift(grad_key_values, mask.group)
                _finish(requests)
        grad_k, grad_v = grad_key_values.chunk(2, dim=-1)
        return grad_q.flatten(2, 3).to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None


@dataclass
class RingPatchMask:
    """Causal, same-document attention over the global patch sequence of the whole cp group.

    Rank j holds patches ``positions[j]`` (its two chunks) with documents ``doc_ids[j]`` (B, 2C).
    """

    group: object
    rank: int
    size: int
    chunk: int  # C, patches per chunk
    positions: torch.Tensor  # (cp, 2C) global patch index
    doc_ids: torch.Tensor  # (cp, B, 2C)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The blocks and their log-sum-exp merge run in fp32; autocast would cast them back down.
        with torch.autocast(q.device.type, enabled=False):
            return _RingAttention.apply(q, k, v, self)

    def visible_parts(self, source: int) -> tuple[slice, slice]:
        """Which of our queries can see which of ``source``'s keys at all (load balancing halves
        every off-diagonal block): an earlier rank's first chunk precedes both our chunks, and
        a later rank's two chunks both precede our second chunk and follow our first."""
        everything, first, second = slice(None), slice(0, self.chunk), slice(self.chunk, None)
        if source == self.rank:
            return everything, everything
        return (everything, first) if source < self.rank else (second, everything)

    def visible(self, source: int, q_part: slice, k_part: slice) -> torch.Tensor:
        q_pos, k_pos = self.positions[self.rank, q_part], self.positions[source, k_part]
        q_doc, k_doc = self.doc_ids[self.rank][:, q_part], self.doc_ids[source][:, k_part]
        return (q_pos[:, None] >= k_pos[None, :]) & (q_doc[:, :, None] == k_doc[:, None, :])


# ---------------------------------------------------------------------------------------------
# Local attention: sliding window with a halo from earlier chunks


@dataclass
class HaloByteMask:
    """Windowed, causal, same-document attention over a rank's bytes, laid out as two chunks of
    ``width`` bytes each (real bytes first, then padding), with the ``halo`` bytes before each
    chunk fetched from whichever ranks hold them."""

    group: object
    width: int
    halo: int
    tail_index: torch.Tensor  # (B, 2 * halo): rows of our local bytes that other chunks' halos read
    halo_index: torch.Tensor  # (B, 2 * halo): rows of the gathered tails (chunk-major) forming our halos
    chunk_masks: list[SelfAttentionMask]  # per own chunk, over [halo, chunk] with contiguous positions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key_values = torch.cat([k, v], dim=-1)
        tails = _gather_rows(key_values, self.tail_index).unflatten(1, (2, self.halo)).transpose(0, 1)
        all_tails = _AllGatherChunkTails.apply(tails, self.group)  # (2cp, B, halo, Hkv, 2D)
        halos = _gather_rows(all_tails.transpose(0, 1).flatten(1, 2), self.halo_index).unflatten(1, (2, self.halo))
        outputs = []
        for own, mask in enumerate(self.chunk_masks):
            rows = slice(own * self.width, (own + 1) * self.width)
            chunk_k, chunk_v = torch.cat([halos[:, own], key_values[:, rows]], dim=1).chunk(2, dim=-1)
            outputs.append(_windowed_attention(q[:, rows], chunk_k, chunk_v, mask, self.halo))
        return torch.cat(outputs, dim=1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i]] for x (B, N, ...) and index (B, M) -> (B, M, ...)."""
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _windowed_attention(q, k, v, mask: SelfAttentionMask, offset: int) -> torch.Tensor:
    """Queries q (B, L, H, D) at positions offset.. of the sequence that k, v (B, offset + L, Hkv, D)
    and ``mask`` describe; each block of queries scans only the keys its window can reach."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    window = mask.window if mask.window is not None else mask.seq_len
    outputs = []
    for start in range(0, q.shape[2], QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, q.shape[2])
        k_start = max(0, offset + start - window + 1)
        q_pos = torch.arange(offset + start, offset + end, device=q.device)
        k_pos = torch.arange(k_start, offset + end, device=q.device)
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, k_start : offset + end],
                v[:, :, k_start : offset + end],
                attn_mask=mask.visible(q_pos, k_pos),
                enable_gqa=q.shape[1] != k.shape[1],
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# The rank's layout


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
        num_chunks = 2 * size
        patch_lengths = patch_lengths.to(device=tokens.device, dtype=torch.long)
        patch_lengths = F.pad(patch_lengths, (0, -patch_lengths.shape[1] % num_chunks))
        _check_right_padded(patch_lengths)
        whole = PatchLayout.build(tokens, patch_lengths, window, backend="sdpa")
        chunk = patch_lengths.shape[1] // num_chunks
        chunk_starts, chunk_ends = _chunk_bounds(patch_lengths, num_chunks)
        own_chunks = torch.tensor([rank, num_chunks - 1 - rank], device=tokens.device)
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
        tail_rows, halo_index, halo_docs = _halo_plan(
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
        return _gather_rows(per_byte, self.byte_index)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """This rank's next-byte targets, IGNORE_INDEX on padding."""
        return torch.where(self.byte_valid, torch.gather(targets, 1, self.byte_index), IGNORE_INDEX)

    def decoder_patch_states(self, patch_states: torch.Tensor) -> torch.Tensor:
        """(B, 2C, dim) -> (B, 2C + 2, dim): each own chunk preceded by the previous chunk's last
        patch, which the chunk's first bytes read. Chunk 0 has no predecessor; its row is never read."""
        last_rows = patch_states[:, [self.chunk - 1, 2 * self.chunk - 1]].transpose(0, 1)  # (2, B, dim)
        last_by_chunk = _AllGatherChunkTails.apply(last_rows, self.group)  # (2cp, B, dim)
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        first, second = patch_states[:, : self.chunk], patch_states[:, self.chunk :]
        before_first, before_second = last_by_chunk[rank - 1], last_by_chunk[2 * size - 2 - rank]
        return torch.cat([before_first[:, None], first, before_second[:, None], second], dim=1)


def local_loss_sum(logits: torch.Tensor, targets: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """Summed cross-entropy (nats) of this rank's bytes; ``targets`` is the full (B, T) micro-batch.
    The sum over the cp group equals the single-process loss sum."""
    local = layout.local_targets(targets)
    return F.cross_entropy(logits.flatten(0, 1), local.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _check_right_padded(patch_lengths: torch.Tensor) -> None:
    """An empty patch between real ones would let a byte's source patch skip a chunk boundary."""
    real = patch_lengths > 0
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ValueError("patch_lengths may hold zero-length patches only as right padding")


def _chunk_bounds(patch_lengths: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last global byte (B, num_chunks each) of every chunk of
    ``patch_lengths`` (B, P), P a multiple of ``num_chunks``."""
    chunk = patch_lengths.shape[1] // num_chunks
    chunk_ends = torch.cumsum(patch_lengths, dim=1)[:, chunk - 1 :: chunk].contiguous()
    return F.pad(chunk_ends[:, :-1], (1, 0)), chunk_ends


def chunk_width(patch_lengths: torch.Tensor, cp: int) -> int:
    """Bytes per own chunk of ``ContextParallelLayout.build`` (its default ``width``): the longest
    of the 2 x cp chunks of any row of ``patch_lengths`` (B, P), at least 1. A rank's local byte
    count is twice this; every rank computes it alike from the patch lengths alone."""
    num_chunks = 2 * cp
    patch_lengths = patch_lengths.to(dtype=torch.long)
    patch_lengths = F.pad(patch_lengths, (0, -patch_lengths.shape[1] % num_chunks))
    chunk_starts, chunk_ends = _chunk_bounds(patch_lengths, num_chunks)
    return max(int((chunk_ends - chunk_starts).max()), 1)


def own_targets(targets: torch.Tensor, patch_lengths: torch.Tensor, group, width: int | None = None) -> torch.Tensor:
    """``ContextParallelLayout.build(tokens, patch_lengths, window, group, width).local_targets(targets)``
    without building the layout: this rank's next-byte targets (B, 2 * width), IGNORE_INDEX on
    padding. Rows are independent, so a batch's local targets split by rows are those of its parts."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    num_chunks = 2 * size
    patch_lengths = patch_lengths.to(device=targets.device, dtype=torch.long)
    patch_lengths = F.pad(patch_lengths, (0, -patch_lengths.shape[1] % num_chunks))
    chunk_starts, chunk_ends = _chunk_bounds(patch_lengths, num_chunks)
    own_chunks = torch.tensor([rank, num_chunks - 1 - rank], device=targets.device)
    byte_index, valid = _own_bytes(chunk_starts, chunk_ends, own_chunks, width)
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


def _halo_plan(chunk_starts, chunk_ends, own_chunks, width: int, halo: int, doc_ids: torch.Tensor):
    """Index plans of the halo exchange, all (B, 2 * halo):

    - tail_rows: local rows of each own chunk's last ``halo`` bytes (clamped to the chunk's start
      when it is shorter; such rows are never read), which this rank contributes;
    - halo_index: for the ``halo`` bytes before each own chunk, their row in the gathered tails
      (chunk-major, ``halo`` rows per chunk): found in whichever earlier chunk holds them;
    - halo_docs: their document ids, BEFORE_START_DOC before the sequence starts.
    """
    steps = torch.arange(halo, device=chunk_starts.device)
    own_bytes = (chunk_ends - chunk_starts)[:, own_chunks, None]
    slot_offset = torch.arange(2, device=chunk_starts.device)[:, None] * width
    tail_rows = ((own_bytes - halo + steps).clamp_min(0) + slot_offset).flatten(1)
    halo_pos = (chunk_starts[:, own_chunks, None] - halo + steps).flatten(1)
    before_start = halo_pos < 0
    holder = torch.searchsorted(chunk_ends, halo_pos, right=True)  # first chunk ending after the byte
    row_in_tail = halo_pos - torch.gather(chunk_ends, 1, holder) + halo
    halo_index = torch.where(before_start, 0, holder * halo + row_in_tail)
    halo_docs = torch.where(before_start, BEFORE_START_DOC, torch.gather(doc_ids, 1, halo_pos.clamp_min(0)))
    return tail_rows, halo_index, halo_docs.view(-1, 2, halo)
