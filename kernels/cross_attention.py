"""Fused byte-patch cross-attention, forward and backward; the specification is
``patch_pool_attention`` and ``byte_to_slot_attention`` in ``bltdist.model.attention``.

Neither direction builds a mask or gathers per-byte copies of queries or keys:

- Encoder direction (pool): one program per (row, patch, head) runs an online softmax of the
  patch's S slots over the patch's bytes, block by block. Bytes are visited in patch order
  through a stable sort of ``patch_ids`` (the identity for the contiguous patches of a layout),
  so any assignment of bytes to patches is computed correctly. Every byte belongs to exactly one
  patch, so the backward program of a patch writes its bytes' key and value gradients alone.
- Decoder direction (unpool): one program per (row, block of bytes, head) reads, for each byte,
  the S slots of its source patch. Many bytes read the same slots, so the backward pass adds the
  slot key and value gradients with atomics into fp32 buffers.

Both keep softmax statistics (log-sum-exp per query) from the forward pass for the backward pass
and accumulate in fp32 whatever the input dtype. Grouped key/value heads are read in place in the
forward pass; their gradients are summed over each group's query heads afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
MAX_SLOTS = 64
BLOCK_BYTES = 16


@triton.jit
def _softmax_scale(head_dim):
    # From head_dim, not a float argument: under torch.compile with dynamic shapes such an argument
    # arrived as fp64 or, computed from a symbolic head dim, was launched into an integer slot.
    return 1.0 / tl.sqrt(tl.cast(head_dim, tl.float32))


@triton.jit
def _patch_program_queries(
    q_ptr, segment_ends_ptr, num_patches, slots, heads, kv_heads, head_dim,
    S_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Where the (row, patch, head) program of the encoder direction reads and writes: its patch's
    run [start, end) of sorted bytes, its S slot queries (loaded) and the offsets of their
    outputs and softmax statistics."""
    patch_flat = tl.program_id(0)  # row * num_patches + patch
    head = tl.program_id(1)
    row = patch_flat // num_patches
    kv_head = head // (heads // kv_heads)
    end = tl.load(segment_ends_ptr + patch_flat)
    start = tl.load(segment_ends_ptr + patch_flat - 1, mask=patch_flat % num_patches > 0, other=0)
    slot_idx = tl.arange(0, S_PAD)
    dims = tl.arange(0, D_PAD)
    slot_mask = slot_idx < slots
    dim_mask = dims < head_dim
    q_mask = slot_mask[:, None] & dim_mask[None, :]
    q_offsets = ((patch_flat.to(tl.int64) * slots + slot_idx[:, None]) * heads + head) * head_dim + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    lse_offsets = (patch_flat.to(tl.int64) * slots + slot_idx) * heads + head
    return row, head, kv_head, start, end, dims, dim_mask, slot_mask, q, q_mask, q_offsets, lse_offsets


@triton.jit
def _load_patch_bytes(
    k_ptr, v_ptr, byte_order_ptr, first, end, row, seq_len, kv_heads, kv_head, head_dim, dims, dim_mask,
    BLOCK_T: tl.constexpr,
):
    """Keys and values of the block of a patch's bytes that starts at sorted index ``first``."""
    sorted_idx = first + tl.arange(0, BLOCK_T)
    in_patch = sorted_idx < end
    byte = tl.load(byte_order_ptr + row * seq_len + sorted_idx, mask=in_patch, other=0)
    kv_offsets = ((row * seq_len + byte[:, None]) * kv_heads + kv_head) * head_dim + dims[None, :]
    kv_mask = in_patch[:, None] & dim_mask[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
    return byte, in_patch, kv_mask, k, v


@triton.jit
def _pool_forward_kernel(
    q_ptr, k_ptr, v_ptr, byte_order_ptr, segment_ends_ptr, out_ptr, lse_ptr,
    seq_len, num_patches, slots, heads, kv_heads, head_dim,
    S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    scale = _softmax_scale(head_dim)
    row, head, kv_head, start, end, dims, dim_mask, slot_mask, q, q_mask, q_offsets, lse_offsets = (
        _patch_program_queries(q_ptr, segment_ends_ptr, num_patches, slots, heads, kv_heads, head_dim, S_PAD, D_PAD)
    )
    running_max = tl.full((S_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((S_PAD,), tl.float32)
    acc = tl.zeros((S_PAD, D_PAD), tl.float32)
    for first in range(start, end, BLOCK_T):
        _, in_patch, _, k, v = _load_patch_bytes(
            k_ptr, v_ptr, byte_order_ptr, first, end, row, seq_len, kv_heads, kv_head, head_dim, dims, dim_mask,
            BLOCK_T,
        )
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (S_PAD, BLOCK_T)
        scores = tl.where(in_patch[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    has_bytes = running_sum > 0
    out = acc / tl.where(has_bytes, running_sum, 1.0)[:, None]
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    lse = tl.where(has_bytes, running_max + tl.log(tl.where(has_bytes, running_sum, 1.0)), 0.0)
    tl.store(lse_ptr + lse_offsets, lse, mask=slot_mask)


@triton.jit
def _pool_backward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, byte_order_ptr, segment_ends_ptr,
    grad_q_ptr, grad_k_ptr, grad_v_ptr,
    seq_len, num_patches, slots, heads, kv_heads, head_dim,
    S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    scale = _softmax_scale(head_dim)
    row, head, kv_head, start, end, dims, dim_mask, slot_mask, q, q_mask, q_offsets, lse_offsets = (
        _patch_program_queries(q_ptr, segment_ends_ptr, num_patches, slots, heads, kv_heads, head_dim, S_PAD, D_PAD)
    )
    grad_out = tl.load(grad_out_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + lse_offsets, mask=slot_mask, other=0.0)
    # d(softmax)/d(score) = p * (dP - sum_t p dP), and sum_t p dP = grad_out . out per slot.
    out_dot_grad = tl.sum(out * grad_out, axis=1)
    grad_q = tl.zeros((S_PAD, D_PAD), tl.float32)
    for first in range(start, end, BLOCK_T):
        byte, in_patch, kv_mask, k, v = _load_patch_bytes(
            k_ptr, v_ptr, byte_order_ptr, first, end, row, seq_len, kv_heads, kv_head, head_dim, dims, dim_mask,
            BLOCK_T,
        )
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        probs = tl.exp(scores - lse[:, None])
        probs = tl.where(in_patch[None, :] & slot_mask[:, None], probs, 0.0)
        grad_probs = tl.sum(grad_out[:, None, :] * v[None, :, :], axis=2)
        grad_scores = probs * (grad_probs - out_dot_grad[:, None]) * scale
        grad_q += tl.sum(grad_scores[:, :, None] * k[None, :, :], axis=1)
        # Key/value gradients are per query head; the caller sums each group of heads.
        grad_kv_offsets = ((row * seq_len + byte[:, None]) * heads + head) * head_dim + dims[None, :]
        grad_k = tl.sum(grad_scores[:, :, None] * q[:, None, :], axis=0)
        grad_v = tl.sum(probs[:, :, None] * grad_out[:, None, :], axis=0)
        tl.store(grad_k_ptr + grad_kv_offsets, grad_k, mask=kv_mask)
        tl.store(grad_v_ptr + grad_kv_offsets, grad_v, mask=kv_mask)
    tl.store(grad_q_ptr + q_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _byte_program_queries(
    q_ptr, source_patch_ptr, seq_len, num_patches, slots, heads, kv_heads, head_dim,
    BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    """Where the (row, head, block of bytes) program of the decoder direction reads and writes: its
    bytes' queries (loaded), the first slot of each byte's source patch and the offsets of the
    bytes' outputs and softmax statistics."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    block = tl.program_id(2)
    kv_head = head // (heads // kv_heads)
    positions = block * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = positions < seq_len
    dims = tl.arange(0, D_PAD)
    mask = in_row[:, None] & (dims < head_dim)[None, :]
    flat_positions = row.to(tl.int64) * seq_len + positions
    q_offsets = (flat_positions[:, None] * heads + head) * head_dim + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=mask, other=0.0).to(tl.float32)
    patch = tl.load(source_patch_ptr + flat_positions, mask=in_row, other=0)
    slot_base = (row.to(tl.int64) * num_patches + patch) * slots
    lse_offsets = flat_positions * heads + head
    return head, kv_head, in_row, dims, mask, q, q_offsets, slot_base, lse_offsets


@triton.jit
def _unpool_forward_kernel(
    q_ptr, k_ptr, v_ptr, source_patch_ptr, out_ptr, lse_ptr,
    seq_len, num_patches, slots, heads, kv_heads, head_dim,
    BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    scale = _softmax_scale(head_dim)
    head, kv_head, in_row, dims, mask, q, q_offsets, slot_base, lse_offsets = _byte_program_queries(
        q_ptr, source_patch_ptr, seq_len, num_patches, slots, heads, kv_heads, head_dim, BLOCK_T, D_PAD
    )
    running_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, D_PAD), tl.float32)
    for slot in range(slots):
        kv_offsets = ((slot_base + slot)[:, None] * kv_heads + kv_head) * head_dim + dims[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_offsets, mask=mask, other=0.0).to(tl.float32)
        score = tl.sum(q * k, axis=1) * scale
        new_max = tl.maximum(running_max, score)
        rescale = tl.exp(running_max - new_max)
        weight = tl.exp(score - new_max)
        running_sum = running_sum * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * v
        running_max = new_max
    tl.store(out_ptr + q_offsets, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + lse_offsets, running_max + tl.log(running_sum), mask=in_row)


@triton.jit
def _unpool_backward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, source_patch_ptr,
    grad_q_ptr, grad_k_ptr, grad_v_ptr,
    seq_len, num_patches, slots, heads, kv_heads, head_dim,
    BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    scale = _softmax_scale(head_dim)
    head, kv_head, in_row, dims, mask, q, q_offsets, slot_base, lse_offsets = _byte_program_queries(
        q_ptr, source_patch_ptr, seq_len, num_patches, slots, heads, kv_heads, head_dim, BLOCK_T, D_PAD
    )
    grad_out = tl.load(grad_out_ptr + q_offsets, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + q_offsets, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + lse_offsets, mask=in_row, other=0.0)
    out_dot_grad = tl.sum(out * grad_out, axis=1)
    grad_q = tl.zeros((BLOCK_T, D_PAD), tl.float32)
    for slot in range(slots):
        kv_offsets = ((slot_base + slot)[:, None] * kv_heads + kv_head) * head_dim + dims[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_offsets, mask=mask, other=0.0).to(tl.float32)
        prob = tl.exp(tl.sum(q * k, axis=1) * scale - lse)
        grad_score = prob * (tl.sum(grad_out * v, axis=1) - out_dot_grad) * scale
        grad_q += grad_score[:, None] * k
        grad_kv_offsets = ((slot_base + slot)[:, None] * heads + head) * head_dim + dims[None, :]
        tl.atomic_add(grad_k_ptr + grad_kv_offsets, grad_score[:, None] * q, mask=mask)
        tl.atomic_add(grad_v_ptr + grad_kv_offsets, prob[:, None] * grad_out, mask=mask)
    tl.store(grad_q_ptr + q_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)


def _sum_head_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(..., H, D) per-query-head gradients -> (..., Hkv, D), the inverse of repeat_interleave."""
    return grad.unflatten(-2, (kv_heads, -1)).sum(-2)


# Custom ops rather than autograd Functions: torch.compile keeps them opaque, as it would a library
# kernel, instead of tracing the Triton launches into its graph (on torch 2.11 inductor fails to
# compile such a backward with dynamic shapes, and launched a float argument into an integer slot).
@torch.library.custom_op("bltdist::patch_pool_attention", mutates_args=())
def _patch_pool_forward(
    slot_q: torch.Tensor, byte_k: torch.Tensor, byte_v: torch.Tensor, patch_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, byte_order, segment_ends): the output and what its backward needs."""
    batch, num_patches, slots, heads, head_dim = slot_q.shape
    seq_len, kv_heads = byte_k.shape[1], byte_k.shape[2]
    # A stable sort visits each patch's bytes as one run, in their original order.
    sorted_ids, byte_order = torch.sort(patch_ids, dim=1, stable=True)
    segment_ends = torch.zeros(batch, num_patches, dtype=torch.int64, device=patch_ids.device)
    segment_ends.scatter_add_(1, sorted_ids, torch.ones_like(sorted_ids))
    segment_ends = torch.cumsum(segment_ends, dim=1)
    out = torch.empty_like(slot_q)
    lse = torch.empty(batch, num_patches, slots, heads, dtype=torch.float32, device=slot_q.device)
    _pool_forward_kernel[(batch * num_patches, heads)](
        slot_q, byte_k, byte_v, byte_order, segment_ends, out, lse,
        seq_len, num_patches, slots, heads, kv_heads, head_dim, **_pool_blocks(slots, head_dim),
    )
    return out, lse, byte_order, segment_ends


@_patch_pool_forward.register_fake
def _(slot_q, byte_k, byte_v, patch_ids):
    batch, num_patches, slots, heads, _ = slot_q.shape
    lse = slot_q.new_empty(batch, num_patches, slots, heads, dtype=torch.float32)
    order, ends = patch_ids.new_empty(patch_ids.shape), patch_ids.new_empty(batch, num_patches)
    return slot_q.new_empty(slot_q.shape), lse, order, ends


@torch.library.custom_op("bltdist::patch_pool_attention_backward", mutates_args=())
def _patch_pool_backward(
    grad_out: torch.Tensor, slot_q: torch.Tensor, byte_k: torch.Tensor, byte_v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, byte_order: torch.Tensor, segment_ends: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_patches, slots, heads, head_dim = slot_q.shape
    seq_len, kv_heads = byte_k.shape[1], byte_k.shape[2]
    grad_q = torch.empty_like(slot_q)
    # Every byte belongs to one patch, so the kernel writes every row of these buffers.
    grad_k = torch.empty(batch, seq_len, heads, head_dim, dtype=torch.float32, device=byte_k.device)
    grad_v = torch.empty_like(grad_k)
    _pool_backward_kernel[(batch * num_patches, heads)](
        slot_q, byte_k, byte_v, out, grad_out.contiguous(), lse, byte_order, segment_ends, grad_q, grad_k, grad_v,
        seq_len, num_patches, slots, heads, kv_heads, head_dim, **_pool_blocks(slots, head_dim),
    )
    grad_k, grad_v = (_sum_head_groups(grad, kv_heads).to(byte_k.dtype) for grad in (grad_k, grad_v))
    return grad_q, grad_k, grad_v


@_patch_pool_backward.register_fake
def _(grad_out, slot_q, byte_k, byte_v, out, lse, byte_order, segment_ends):
    return slot_q.new_empty(slot_q.shape), byte_k.new_empty(byte_k.shape), byte_v.new_empty(byte_v.shape)


def _pool_blocks(slots: int, head_dim: int) -> dict:
    return dict(S_PAD=triton.next_power_of_2(slots), BLOCK_T=BLOCK_BYTES, D_PAD=triton.next_power_of_2(head_dim))


def _unpool_blocks(head_dim: int) -> dict:
    return dict(BLOCK_T=BLOCK_BYTES, D_PAD=triton.next_power_of_2(head_dim))


def _save_inputs_and_outputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _patch_pool_grad(ctx, grad_out, *_no_grads):
    slot_q, byte_k, byte_v, _, out, lse, byte_order, segment_ends = ctx.saved_tensors
    grads = _patch_pool_backward(grad_out, slot_q, byte_k, byte_v, out, lse, byte_order, segment_ends)
    return *grads, None


_patch_pool_forward.register_autograd(_patch_pool_grad, setup_context=_save_inputs_and_outputs)


@torch.library.custom_op("bltdist::byte_to_slot_attention", mutates_args=())
def _byte_to_slot_forward(
    byte_q: torch.Tensor, slot_k: torch.Tensor, slot_v: torch.Tensor, source_patch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse)."""
    batch, seq_len, heads, head_dim = byte_q.shape
    num_patches, slots, kv_heads = slot_k.shape[1], slot_k.shape[2], slot_k.shape[3]
    out = torch.empty_like(byte_q)
    lse = torch.empty(batch, seq_len, heads, dtype=torch.float32, device=byte_q.device)
    _unpool_forward_kernel[(batch, heads, triton.cdiv(seq_len, BLOCK_BYTES))](
        byte_q, slot_k, slot_v, source_patch, out, lse,
        seq_len, num_patches, slots, heads, kv_heads, head_dim, **_unpool_blocks(head_dim),
    )
    return out, lse


@_byte_to_slot_forward.register_fake
def _(byte_q, slot_k, slot_v, source_patch):
    batch, seq_len, heads, _ = byte_q.shape
    return byte_q.new_empty(byte_q.shape), byte_q.new_empty(batch, seq_len, heads, dtype=torch.float32)


@torch.library.custom_op("bltdist::byte_to_slot_attention_backward", mutates_args=())
def _byte_to_slot_backward(
    grad_out: torch.Tensor, byte_q: torch.Tensor, slot_k: torch.Tensor, slot_v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, source_patch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_patches, slots, kv_heads, head_dim = slot_k.shape
    seq_len, heads = byte_q.shape[1], byte_q.shape[2]
    grad_q = torch.empty_like(byte_q)
    grad_k = torch.zeros(batch, num_patches, slots, heads, head_dim, dtype=torch.float32, device=slot_k.device)
    grad_v = torch.zeros_like(grad_k)
    _unpool_backward_kernel[(batch, heads, triton.cdiv(seq_len, BLOCK_BYTES))](
        byte_q, slot_k, slot_v, out, grad_out.contiguous(), lse, source_patch, grad_q, grad_k, grad_v,
        seq_len, num_patches, slots, heads, kv_heads, head_dim, **_unpool_blocks(head_dim),
    )
    grad_k, grad_v = (_sum_head_groups(grad, kv_heads).to(slot_k.dtype) for grad in (grad_k, grad_v))
    return grad_q, grad_k, grad_v


@_byte_to_slot_backward.register_fake
def _(grad_out, byte_q, slot_k, slot_v, out, lse, source_patch):
    return byte_q.new_empty(byte_q.shape), slot_k.new_empty(slot_k.shape), slot_v.new_empty(slot_v.shape)


def _byte_to_slot_grad(ctx, grad_out, _no_grad_lse):
    byte_q, slot_k, slot_v, source_patch, out, lse = ctx.saved_tensors
    return *_byte_to_slot_backward(grad_out, byte_q, slot_k, slot_v, out, lse, source_patch), None


_byte_to_slot_forward.register_autograd(_byte_to_slot_grad, setup_context=_save_inputs_and_outputs)


def patch_pool_attention(slot_q, byte_k, byte_v, patch_ids) -> torch.Tensor:
    """Same contract as ``bltdist.model.attention.patch_pool_attention``."""
    return _patch_pool_forward(*_contiguous(slot_q, byte_k, byte_v, patch_ids))[0]


def byte_to_slot_attention(byte_q, slot_k, slot_v, source_patch) -> torch.Tensor:
    """Same contract as ``bltdist.model.attention.byte_to_slot_attention``."""
    return _byte_to_slot_forward(*_contiguous(byte_q, slot_k, slot_v, source_patch))[0]


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # Here, once, rather than in the ops: the backward gets the inputs the forward saved, already contiguous.
    return [t.contiguous() for t in tensors]


def _unsupported_attention(q, k, v, head_dim, slots) -> str | None:
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    if slots > MAX_SLOTS:
        return f"{slots} slots per patch > {MAX_SLOTS}"
    return None


def patch_pool_unsupported_reason(slot_q, byte_k, byte_v, patch_ids) -> str | None:
    """Why the encoder-direction kernel cannot compute this call, or None when it can."""
    return _unsupported_attention(slot_q, byte_k, byte_v, slot_q.shape[-1], slot_q.shape[2])


def byte_to_slot_unsupported_reason(byte_q, slot_k, slot_v, source_patch) -> str | None:
    """Why the decoder-direction kernel cannot compute this call, or None when it can."""
    return _unsupported_attention(byte_q, slot_k, slot_v, byte_q.shape[-1], slot_k.shape[2])
