"""Ring attention over the global patch sequence of the cp group (causal, within documents)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bltdist.parallel.context.comms import finish, start_ring_shift


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


@contextmanager
def _block_products(input_dtype: torch.dtype):
    """The blocks' fp32 products in TF32 on a GPU when the inputs came in bf16 or fp16: their values
    are exact in TF32, so the scores equal fp32 products, and probabilities and score gradients keep
    10 bits (flash attention keeps bf16's 7); an H100 runs fp32 products at a seventh of TF32's rate.
    fp32 inputs keep fp32 products. (The setting is CUDA's only: CPU products are unchanged.)"""
    if input_dtype == torch.float32:
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part: slice, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold a block's partial softmax into the running one for the queries in ``part`` (in place)."""
    old_lse = lse[..., part]
    new_lse = torch.logaddexp(old_lse, block_lse)
    old_weight = torch.exp(old_lse - new_lse).permute(0, 3, 1, 2)[..., None]
    block_weight = torch.exp(block_lse - new_lse).permute(0, 3, 1, 2)[..., None]
    out[:, part] = out[:, part] * old_weight + block_out * block_weight
    lse[..., part] = new_lse


def _pass_on(key_values: torch.Tensor, mask: RingPatchMask, step: int):
    """Starts sending ``key_values`` to the next rank, except at the last step (nothing is left to see)."""
    return start_ring_shift(key_values, mask.group) if step + 1 < mask.size else None


def _received(passing, key_values: torch.Tensor) -> torch.Tensor:
    """The previous rank's key_values once they have arrived (``key_values`` after the last step)."""
    if passing is None:
        return key_values
    received, requests = passing
    finish(requests)
    return received


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RingPatchMask) -> torch.Tensor:
        batch, length, heads, head_dim = q.shape
        grouped_q = q.float().unflatten(2, (k.shape[2], heads // k.shape[2]))
        key_values = torch.cat([k, v], dim=-1).contiguous()  # travels in the inputs' dtype: bf16 halves the bytes
        out = torch.zeros_like(grouped_q)
        lse = torch.full((batch, k.shape[2], heads // k.shape[2], length), -math.inf, device=q.device)
        with _block_products(q.dtype):
            for step in range(mask.size):
                passing = _pass_on(key_values, mask, step)  # the next block travels while this one computes
                q_part, k_part, block_k, block_v, visible = mask.block(step, key_values)
                block_out, block_lse = _block_forward(grouped_q[:, q_part], block_k, block_v, visible)
                _merge_into(out, lse, q_part, block_out, block_lse)
                key_values = _received(passing, key_values)
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
        key_values = torch.cat([k, v], dim=-1).contiguous()
        # Sums over every rank's queries: fp32 whatever the inputs, travelling with key_values back to its owner.
        grad_key_values = torch.zeros_like(key_values, dtype=torch.float32)
        with _block_products(q.dtype):
            for step in range(mask.size):
                passing = _pass_on(key_values, mask, step)
                q_part, k_part, block_k, block_v, visible = mask.block(step, key_values)
                scores = _block_scores(grouped_q[:, q_part], block_k, visible)
                probs = torch.exp(scores - lse[..., q_part, None])
                part_grad_out = grad_out[:, q_part]
                grad_v = torch.einsum("bhgqk,bqhgd->bkhd", probs, part_grad_out)
                grad_probs = torch.einsum("bqhgd,bkhd->bhgqk", part_grad_out, block_v)
                grad_scores = probs * (grad_probs - delta[..., q_part, None]) / math.sqrt(q.shape[-1])
                grad_q[:, q_part] += torch.einsum("bhgqk,bkhd->bqhgd", grad_scores, block_k)
                grad_k = torch.einsum("bhgqk,bqhgd->bkhd", grad_scores, grouped_q[:, q_part])
                grad_key_values[:, k_part] += torch.cat([grad_k, grad_v], dim=-1)
                key_values = _received(passing, key_values)
                if mask.size > 1:
                    # After cp shifts the accumulator has gone round the ring and is back at its owner.
                    grad_key_values, requests = start_ring_shift(grad_key_values, mask.group)
                    finish(requests)
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

    def prepare(self, hidden: torch.Tensor, head_dim: int) -> None:
        pass  # each ring step builds its block's mask as it goes, with no cache to fill

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The blocks and their log-sum-exp merge run in fp32; autocast would cast them back down.
        with torch.autocast(q.device.type, enabled=False):
            return _RingAttention.apply(q, k, v, self)

    def block(self, step: int, key_values: torch.Tensor):
        """What ring step ``step`` computes, holding the (B, 2C, Hkv, 2D) ``key_values`` of rank
        rank - step: our queries and its keys that can see each other, its K and V there (fp32), and the mask."""
        source = (self.rank - step) % self.size
        q_part, k_part = self.visible_parts(source)
        block_k, block_v = key_values[:, k_part].float().chunk(2, dim=-1)
        return q_part, k_part, block_k, block_v, self.visible(source, q_part, k_part)

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
