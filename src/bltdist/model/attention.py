"""The attention backend: every attention in the model goes through this module.

Self-attention is causal, optionally limited to a sliding window, and never crosses a document
boundary. A mask is *described* (document ids + window) and each backend turns the description
into what it needs, so no dense (bytes x bytes) mask is ever built at real sizes:

- ``flash``: flash-attn's varlen kernel (CUDA, when the package is installed); documents become
  separate sequences and the window becomes ``window_size``.
- ``flex``: FlexAttention with a block-sparse mask (CUDA default without flash-attn).
- ``sdpa``: PyTorch SDPA over query blocks, each against only the keys it can see; the block masks
  are at most (block x (block + window)) and are built once per forward (CPU default).

Byte-patch cross-attention has a fixed structure (a patch's slots see only its own bytes; a byte
sees only the slots of one patch), so it is computed with gathers and segment reductions in
O(bytes x slots) instead of attention over a (bytes x patches) mask.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will run: ``auto`` picks flash, then flex on CUDA, and sdpa on CPU."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "flash" if flash_attn_available() else "flex"
    if requested == "flash" and not (device.type == "cuda" and flash_attn_available()):
        raise ValueError("attention backend 'flash' needs CUDA and `pip install flash-attn`")
    return requested


class AttentionMask(Protocol):
    """What the model's self-attention takes: who may see whom, and how to compute it. The model
    calls only ``attend``; context parallelism (``bltdist.parallel.context``) supplies masks whose
    ``attend`` brings in keys held by other ranks, without the model knowing about process groups."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, T, H, D); k, v: (B, T, Hkv, D) with Hkv dividing H. Returns (B, T, H, D)."""


@dataclass
class SelfAttentionMask:
    """Causal + sliding-window + same-document visibility, shared by all layers of one forward."""

    doc_ids: torch.Tensor  # (B, T) int64, equal ids = same document
    window: int | None  # a query at t sees keys t - window < s <= t; None = all earlier keys
    backend: str
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "flash":
            return _flash_attention(q, k, v, self)
        if self.backend == "flex":
            return _flex_attention(q, k, v, self)
        return _blocked_sdpa(q, k, v, self)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (B, 1, len(q_pos), len(k_pos)) visibility for the given positions."""
        same_doc = self.doc_ids[:, q_pos, None] == self.doc_ids[:, None, k_pos]
        delta = q_pos[:, None] - k_pos[None, :]
        allowed = delta >= 0
        if self.window is not None:
            allowed = allowed & (delta < self.window)
        return (same_doc & allowed).unsqueeze(1)


def _query_blocks(mask: SelfAttentionMask, device: torch.device) -> list[tuple[int, int, int, torch.Tensor]]:
    """(q_start, q_end, k_start, visibility) per query block, built once per forward.

    Small query blocks keep the keys each block scans close to what it can see: with a window W
    a block of C queries scans C + W - 1 keys instead of the whole prefix.
    """
    if "blocks" not in mask._cache:
        seq_len = mask.seq_len
        block = min(seq_len, 128 if mask.window is not None else 256)
        blocks = []
        for q_start in range(0, seq_len, block):
            q_end = min(q_start + block, seq_len)
            k_start = 0 if mask.window is None else max(0, q_start - mask.window + 1)
            q_pos = torch.arange(q_start, q_end, device=device)
            k_pos = torch.arange(k_start, q_end, device=device)
            blocks.append((q_start, q_end, k_start, mask.visible(q_pos, k_pos)))
        mask._cache["blocks"] = blocks
    return mask._cache["blocks"]


def _blocked_sdpa(q, k, v, mask: SelfAttentionMask) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    outputs = []
    for q_start, q_end, k_start, visible in _query_blocks(mask, q.device):
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, q_start:q_end], k[:, :, k_start:q_end], v[:, :, k_start:q_end], attn_mask=visible
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


def _flex_attention(q, k, v, mask: SelfAttentionMask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    if "block_mask" not in mask._cache:
        doc_ids, window = mask.doc_ids, mask.window

        def visible(b, h, q_idx, kv_idx):
            allowed = (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            if window is not None:
                allowed = allowed & (q_idx - kv_idx < window)
            return allowed

        batch, seq_len = doc_ids.shape
        mask._cache["block_mask"] = create_block_mask(
            visible, batch, None, seq_len, seq_len, device=str(doc_ids.device)
        )
    groups = q.shape[2] // k.shape[2]
    out = _compiled_flex()(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=mask._cache["block_mask"],
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is only fast when compiled; on CPU (tests) it runs its eager reference.
    if torch.cuda.is_available():
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def _flash_attention(q, k, v, mask: SelfAttentionMask) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    batch, seq_len, heads, head_dim = q.shape
    if "cu_seqlens" not in mask._cache:
        # Each (row, document) run becomes its own sequence of the varlen batch.
        flat_docs = mask.doc_ids + torch.arange(batch, device=q.device)[:, None] * (seq_len + 1)
        flat_docs = flat_docs.reshape(-1)
        boundaries = torch.nonzero(flat_docs[1:] != flat_docs[:-1]).flatten() + 1
        edges = torch.cat([boundaries.new_zeros(1), boundaries, boundaries.new_full((1,), flat_docs.numel())])
        lengths = edges[1:] - edges[:-1]
        mask._cache["cu_seqlens"] = edges.to(torch.int32)
        mask._cache["max_seqlen"] = int(lengths.max())
    window = (-1, -1) if mask.window is None else (mask.window - 1, 0)
    out = flash_attn_varlen_func(
        q.reshape(batch * seq_len, heads, head_dim),
        k.reshape(batch * seq_len, k.shape[2], head_dim),
        v.reshape(batch * seq_len, v.shape[2], head_dim),
        mask._cache["cu_seqlens"],
        mask._cache["cu_seqlens"],
        mask._cache["max_seqlen"],
        mask._cache["max_seqlen"],
        causal=True,
        window_size=window,
    )
    return out.reshape(batch, seq_len, heads, head_dim)


def _expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def patch_pool_attention(
    slot_q: torch.Tensor, byte_k: torch.Tensor, byte_v: torch.Tensor, patch_ids: torch.Tensor
) -> torch.Tensor:
    """Encoder direction: every query slot of patch p attends to the bytes of patch p only.

    slot_q: (B, P, S, H, D) for S slots per patch; byte_k, byte_v: (B, T, Hkv, D);
    patch_ids: (B, T) patch index of each byte. Returns (B, P, S, H, D); a patch with no bytes
    (right padding) gets zeros. The softmax over each patch's bytes is a segment softmax.
    """
    batch, num_patches, slots, heads, head_dim = slot_q.shape
    byte_k = _expand_kv_heads(byte_k, heads)
    byte_v = _expand_kv_heads(byte_v, heads)
    index = patch_ids[:, :, None, None].expand(-1, -1, slots, heads)  # (B, T, S, H)
    q_per_byte = torch.gather(slot_q, 1, index[..., None].expand(-1, -1, -1, -1, head_dim))
    scores = torch.einsum("btshd,bthd->btsh", q_per_byte, byte_k) / math.sqrt(head_dim)
    scores = scores.float()
    # Subtracting the per-patch max only guards exp() against overflow; it cancels in the ratio,
    # so it carries no gradient.
    with torch.no_grad():
        patch_max = scores.new_full((batch, num_patches, slots, heads), -math.inf)
        patch_max.scatter_reduce_(1, index, scores, reduce="amax")
    weights = torch.exp(scores - torch.gather(patch_max, 1, index))
    denom = scores.new_zeros((batch, num_patches, slots, heads)).scatter_add(1, index, weights)
    weighted_v = weights.to(byte_v.dtype)[..., None] * byte_v[:, :, None]  # (B, T, S, H, D)
    numer = weighted_v.new_zeros((batch, num_patches, slots, heads, head_dim))
    numer = numer.scatter_add(1, index[..., None].expand(-1, -1, -1, -1, head_dim), weighted_v)
    return numer / denom.clamp_min(torch.finfo(denom.dtype).tiny).to(numer.dtype)[..., None]


def byte_to_slot_attention(
    byte_q: torch.Tensor, slot_k: torch.Tensor, slot_v: torch.Tensor, source_patch: torch.Tensor
) -> torch.Tensor:
    """Decoder direction: byte t attends to the S slots of patch ``source_patch[t]`` only.

    byte_q: (B, T, H, D); slot_k, slot_v: (B, P, S, Hkv, D); source_patch: (B, T).
    Returns (B, T, H, D).
    """
    heads, head_dim = byte_q.shape[2], byte_q.shape[3]
    slot_k = _expand_kv_heads(slot_k, heads)
    slot_v = _expand_kv_heads(slot_v, heads)
    index = source_patch[:, :, None, None, None].expand(-1, -1, *slot_k.shape[2:])
    k_per_byte = torch.gather(slot_k, 1, index)  # (B, T, S, H, D)
    v_per_byte = torch.gather(slot_v, 1, index)
    scores = torch.einsum("bthd,btshd->bths", byte_q, k_per_byte) / math.sqrt(head_dim)
    weights = torch.softmax(scores.float(), dim=-1).to(v_per_byte.dtype)
    return torch.einsum("bths,btshd->bthd", weights, v_per_byte)
