"""The attention backend: every attention in the model goes through this module.

Self-attention is causal, optionally limited to a sliding window, and never crosses a document
boundary. A mask is *described* (document ids + window) and each backend turns the description
into what it needs, so no dense (bytes x bytes) mask is ever built at real sizes:

- ``flash``: flash-attn's varlen kernel (CUDA, when the package is installed, bf16/fp16 inputs);
  documents become separate sequences and the window becomes ``window_size``.
- ``flex``: compiled FlexAttention with a block-sparse mask (CUDA default without flash-attn or for
  fp32; on CPU forward only: torch has no FlexAttention backward there).
- ``sdpa``: PyTorch SDPA over query blocks, each against the window of keys it can see, all in
  one call; the block masks are (block x (block + window - 1)) and are built once per forward
  (CPU default). Without a window it is one block: a (T x T) mask, for the CPU's short sequences.

Byte-patch cross-attention has a fixed structure (a patch's slots see only its own bytes; a byte
sees only the slots of one patch), so it is computed with gathers and segment reductions in
O(bytes x slots) instead of attention over a (bytes x patches) mask.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")
# flash-attn computes only in half precision; anything else (the fp32 entropy model) goes elsewhere.
FLASH_DTYPES = (torch.bfloat16, torch.float16)
# Compiled FlexAttention graphs are specialised to one shape (dynamic shapes do not compile on CPU
# in torch 2.13). The trainer buckets patch counts, so a run meets a few shapes; this many may
# compile before dynamo gives up and runs the slow eager reference.
FLEX_SHAPE_LIMIT = 64
# torch's compiled FlexAttention kernel for CUDA refuses heads with fewer dims (tiny test models).
FLEX_MIN_HEAD_DIM = 16

logger = logging.getLogger(__name__)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_backend(requested: str, device: torch.device) -> str:
    """``requested`` if it can run on ``device``, else a ValueError naming ``model.attention_backend``."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attention_backend: unknown backend {requested!r}; choose one of {BACKENDS}")
    if requested == "flash" and not (device.type == "cuda" and flash_attn_available()):
        raise ValueError("model.attention_backend 'flash' needs CUDA and `pip install flash-attn`")
    return requested


def resolve_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    needs_grad: bool = False,
    head_dim: int = FLEX_MIN_HEAD_DIM,
) -> str:
    """The backend that runs one attention call on ``device`` with inputs of ``dtype``.

    ``auto``: flash-attn for half precision on CUDA when installed, else FlexAttention on CUDA,
    SDPA on CPU. A backend that cannot take the call falls back: flash to flex for fp32 inputs,
    flex to sdpa on CPU when a gradient is needed (torch has no FlexAttention backward on CPU) and
    on CUDA for heads under 16 dims (the compiled kernel refuses them). The choice and every
    fallback are logged once per process.
    """
    check_backend(requested, device)
    chosen, reason = requested, None
    if requested == "auto":
        if device.type != "cuda":
            chosen = "sdpa"
        else:
            chosen = "flash" if flash_attn_available() and dtype in FLASH_DTYPES else "flex"
    elif requested == "flash" and dtype not in FLASH_DTYPES:
        chosen, reason = "flex", "flash-attn computes only in bf16/fp16"
    elif requested == "flex" and device.type == "cpu" and needs_grad:
        chosen, reason = "sdpa", "torch has no FlexAttention backward on CPU"
    if chosen == "flex" and device.type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
        chosen, reason = "sdpa", f"compiled FlexAttention needs heads of at least {FLEX_MIN_HEAD_DIM} dims"
    # Logging inside a compiled region would break its graph, so there only eager calls log (the
    # online entropy model, validation outside compiled blocks).
    if not torch.compiler.is_compiling():
        inputs = f"{str(dtype).removeprefix('torch.')} {device.type} inputs, head dim {head_dim}"
        if reason is None:
            _log_once(logging.INFO, f"attention backend {chosen} (requested {requested}) for {inputs}")
        else:
            level = logging.INFO if requested == "auto" else logging.WARNING
            _log_once(level, f"attention backend {requested} falls back to {chosen} for {inputs}: {reason}")
    return chosen


@functools.cache
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)


class AttentionMask(Protocol):
    """What the model's self-attention takes: who may see whom, and how to compute it. The model
    calls only ``attend``; context parallelism (``bltdist.parallel.context``) supplies masks whose
    ``attend`` brings in keys held by other ranks, without the model knowing about process groups."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, T, H, D); k, v: (B, T, Hkv, D) with Hkv dividing H. Returns (B, T, H, D)."""

    def prepare(self, hidden: torch.Tensor, head_dim: int) -> None:
        """Build what ``attend`` will need for blocks whose input is ``hidden``, before they run."""


@dataclass
class SelfAttentionMask:
    """Causal + sliding-window + same-document visibility, shared by all layers of one forward."""

    doc_ids: torch.Tensor  # (B, T) int64, equal ids = same document
    window: int | None  # a query at t sees keys t - window < s <= t; None = all earlier keys
    backend: str  # as requested (BACKENDS); resolved by prepare, else per call (the choice depends on the dtype)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        backend = self._cache.get("backend")
        if backend is None:
            needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
            backend = resolve_backend(self.backend, q.device, q.dtype, needs_grad, q.shape[-1])
        if backend == "flash":
            return _flash_attention(q, k, v, self)
        if backend == "flex":
            return _flex_attention(q, k, v, self)
        return _blocked_sdpa(q, k, v, self)

    def prepare(self, hidden: torch.Tensor, head_dim: int) -> None:
        # Here, outside the compiled blocks: resolving the backend there breaks their graph (on torch
        # 2.11 at the flash-attn import check), and filling the cache there recompiles the first block.
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        backend = resolve_backend(self.backend, device, dtype, torch.is_grad_enabled(), head_dim)
        self._cache["backend"] = backend
        if backend == "flash":
            _varlen_sequences(self)
        elif backend == "flex":
            _block_mask(self)
        else:
            _window_bias(self, dtype)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (B, 1, len(q_pos), len(k_pos)) visibility for the given positions."""
        same_doc = self.doc_ids[:, q_pos, None] == self.doc_ids[:, None, k_pos]
        delta = q_pos[:, None] - k_pos[None, :]
        allowed = delta >= 0
        if self.window is not None:
            allowed = allowed & (delta < self.window)
        return (same_doc & allowed).unsqueeze(1)


def _key_windows(mask: SelfAttentionMask) -> tuple[int, int, torch.Tensor]:
    """(block, keys, visibility (B, blocks, block, keys)), built once per forward.

    Query block i (positions [i * block, (i + 1) * block)) is attended against the ``keys``
    positions that end at its last query: with a window W a block of C queries scans C + W - 1
    keys instead of the whole prefix; without a window one block covers the sequence. Positions
    before 0 and after the end are padding; a padding query sees only itself (no row is empty).
    """
    if "windows" not in mask._cache:
        seq_len, window, device = mask.seq_len, mask.window, mask.doc_ids.device
        block = seq_len if window is None else min(seq_len, 128)
        keys = seq_len if window is None else block + window - 1
        blocks = -(-seq_len // block)
        left = keys - block
        q_pos = torch.arange(blocks * block, device=device).view(blocks, block)
        k_pos = q_pos[:, -1:] - keys + 1 + torch.arange(keys, device=device)  # (blocks, keys)
        docs = F.pad(mask.doc_ids, (left, blocks * block - seq_len), value=-1)
        same_doc = docs[:, q_pos + left, None] == docs[:, k_pos + left][:, :, None, :]  # (B, blocks, block, keys)
        delta = q_pos[:, :, None] - k_pos[:, None, :]
        allowed = (delta >= 0) & (k_pos >= 0)[:, None, :]
        if window is not None:
            allowed = allowed & (delta < window)
        mask._cache["windows"] = (block, keys, same_doc & allowed)
    return mask._cache["windows"]


def _blocked_sdpa(q, k, v, mask: SelfAttentionMask) -> torch.Tensor:
    """All query blocks in one SDPA call, each against its key window taken by ``unfold``: one
    batched kernel, and a backward that adds each window's gradient into k and v in one pass
    (slicing per block would allocate and add a whole-sequence gradient per block)."""
    batch, seq_len, heads = q.shape[:3]
    block, keys, visible = _key_windows(mask)
    blocks = visible.shape[1]
    right = blocks * block - seq_len
    q = F.pad(q, (0, 0, 0, 0, 0, right)).unflatten(1, (blocks, block))  # (B, blocks, block, H, D)
    q = q.permute(0, 1, 3, 2, 4).flatten(0, 1)  # (B * blocks, H, block, D)

    def windows(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, keys - block, right)).unfold(1, keys, block)  # (B, blocks, Hkv, D, keys)
        x = x.permute(0, 1, 2, 4, 3).flatten(0, 1)  # (B * blocks, Hkv, keys, D)
        return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x

    out = F.scaled_dot_product_attention(q, windows(k), windows(v), attn_mask=_window_bias(mask, q.dtype))
    out = out.unflatten(0, (batch, blocks)).permute(0, 1, 3, 2, 4).flatten(1, 2)  # (B, blocks * block, H, D)
    return out[:, :seq_len]


def _window_bias(mask: SelfAttentionMask, dtype: torch.dtype) -> torch.Tensor:
    """The key windows' visibility as an additive mask (B * blocks, 1, block, keys): SDPA turns a
    boolean mask into this at every call, forward and backward; once per forward is enough."""
    if ("additive", dtype) not in mask._cache:
        visible = _key_windows(mask)[2]
        additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, -math.inf)
        mask._cache["additive", dtype] = additive.flatten(0, 1)[:, None]
    return mask._cache["additive", dtype]


def _flex_attention(q, k, v, mask: SelfAttentionMask) -> torch.Tensor:
    out = _run_flex(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=_block_mask(mask),
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _block_mask(mask: SelfAttentionMask):
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
    return mask._cache["block_mask"]


def _run_flex(q, k, v, **kwargs) -> torch.Tensor:
    """FlexAttention compiled (it is only fused, and only memory-light, when compiled). Inside a
    compiled region it is traced into the caller's graph; otherwise its own compiled graphs, one
    per shape, may number up to FLEX_SHAPE_LIMIT instead of dynamo's default of 8."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    with torch._dynamo.config.patch(recompile_limit=FLEX_SHAPE_LIMIT):
        return _compiled_flex()(q, k, v, **kwargs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flash_attention(q, k, v, mask: SelfAttentionMask) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    batch, seq_len, heads, head_dim = q.shape
    cu_seqlens, max_seqlen = _varlen_sequences(mask)
    window = (-1, -1) if mask.window is None else (mask.window - 1, 0)
    out = flash_attn_varlen_func(
        q.reshape(batch * seq_len, heads, head_dim),
        k.reshape(batch * seq_len, k.shape[2], head_dim),
        v.reshape(batch * seq_len, v.shape[2], head_dim),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        causal=True,
        window_size=window,
    )
    return out.reshape(batch, seq_len, heads, head_dim)


def _varlen_sequences(mask: SelfAttentionMask) -> tuple[torch.Tensor, int]:
    """flash-attn's varlen batch: each (row, document) run is a sequence of its own."""
    if "cu_seqlens" not in mask._cache:
        batch, seq_len = mask.doc_ids.shape
        flat_docs = mask.doc_ids + torch.arange(batch, device=mask.doc_ids.device)[:, None] * (seq_len + 1)
        flat_docs = flat_docs.reshape(-1)
        boundaries = torch.nonzero(flat_docs[1:] != flat_docs[:-1]).flatten() + 1
        edges = torch.cat([boundaries.new_zeros(1), boundaries, boundaries.new_full((1,), flat_docs.numel())])
        mask._cache["cu_seqlens"] = edges.to(torch.int32)
        mask._cache["max_seqlen"] = int((edges[1:] - edges[:-1]).max())
    return mask._cache["cu_seqlens"], mask._cache["max_seqlen"]


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
