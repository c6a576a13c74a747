"""Fused hash n-gram embedding: every (function, n) hash of every byte and the sum of their table
rows in one kernel; the specification is ``bltdist.model.hash_embedding``.

The forward kernel also writes the fused-table row of each (position, table), (N, tables) int64,
a few bytes per position, so that the backward pass never hashes again. Two backward passes
exist because which one is faster depends on how often rows repeat (``benchmarks/kernels.py``
times both): ``atomic`` adds each position's gradient into its rows with atomics (fast, but the
order of additions and so the last bits vary between runs); ``sorted`` sorts the rows and lets
one program sum every position of one row (deterministic, at the price of a sort).

Neither holds a dense copy of the table beside its gradient (for blt_1b's 6 x 500002 x 1024 table
a dense fp32 copy is 12 GB): ``sorted`` sums each row in fp32 registers and stores it once in the
gradient's dtype; ``atomic`` adds into the gradient itself, which needs fp32, so for a bf16/fp16
table (FSDP's mixed precision) it sums like ``sorted`` instead of atomics on a dense fp32 buffer.
``benchmarks/hash_memory.py`` measures the backward peak against the PyTorch reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bltdist.model.hash_embedding import HASH_PRIMES

BACKWARD_MODES = ("atomic", "sorted")
BLOCK_POSITIONS = 16


@triton.jit
def _position_and_dim_block(num_positions, dim, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The flat positions (axis 0 of the grid) and embedding dims (axis 1) of this program, each
    with the mask of those in bounds."""
    positions = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return positions, positions < num_positions, dims, dims < dim


@triton.jit
def _hash_embedding_forward_kernel(
    tokens_ptr,
    primes_ptr,
    ngram_sizes_ptr,
    weight_ptr,
    out_ptr,
    rows_ptr,
    num_positions,
    seq_len,
    dim,
    table_size,
    NUM_FUNCTIONS: tl.constexpr,
    NUM_SIZES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    positions, valid, dims, dim_mask = _position_and_dim_block(num_positions, dim, BLOCK_T, BLOCK_D)
    column = positions % seq_len  # left padding restarts at every row of the batch
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for function in range(NUM_FUNCTIONS):
        prime = tl.load(primes_ptr + function)
        for size_index in range(NUM_SIZES):
            n = tl.load(ngram_sizes_ptr + size_index)
            # Horner's rule gives sum_i x[j-n+1+i] * p^i with the same int64 wrap-around as the
            # reference's sum of powers: both are the same polynomial in the ring of int64.
            hashed = tl.zeros((BLOCK_T,), dtype=tl.int64)
            for back in range(n):
                token = tl.load(tokens_ptr + positions - back, mask=valid & (column >= back), other=0)
                hashed = hashed * prime + token.to(tl.int64)
            bucket = hashed % table_size
            # Floor modulo like torch.remainder whatever sign convention `%` follows.
            bucket = tl.where(bucket < 0, bucket + table_size, bucket)
            row = bucket + (function * NUM_SIZES + size_index) * table_size
            if tl.program_id(1) == 0:  # rows do not depend on dims: the first dim block stores them
                tl.store(rows_ptr + positions * (NUM_FUNCTIONS * NUM_SIZES) + function * NUM_SIZES + size_index,
                         row, mask=valid)
            values = tl.load(weight_ptr + row[:, None] * dim + dims[None, :],
                             mask=valid[:, None] & dim_mask[None, :], other=0.0)
            acc += values.to(tl.float32)
    tl.store(out_ptr + positions[:, None] * dim + dims[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & dim_mask[None, :])


@triton.jit
def _hash_embedding_atomic_backward_kernel(
    grad_out_ptr,
    rows_ptr,
    grad_weight_ptr,
    num_positions,
    dim,
    NUM_TABLES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    positions, valid, dims, dim_mask = _position_and_dim_block(num_positions, dim, BLOCK_T, BLOCK_D)
    mask = valid[:, None] & dim_mask[None, :]
    grad = tl.load(grad_out_ptr + positions[:, None] * dim + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    for table in range(NUM_TABLES):
        row = tl.load(rows_ptr + positions * NUM_TABLES + table, mask=valid, other=0)
        tl.atomic_add(grad_weight_ptr + row[:, None] * dim + dims[None, :], grad, mask=mask)


@triton.jit
def _hash_embedding_sorted_backward_kernel(
    grad_out_ptr,
    sorted_positions_ptr,
    segment_starts_ptr,
    segment_rows_ptr,
    grad_weight_ptr,
    dim,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(segment_starts_ptr + segment)
    end = tl.load(segment_starts_ptr + segment + 1)
    row = tl.load(segment_rows_ptr + segment)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < dim
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        in_segment = entries < end
        position = tl.load(sorted_positions_ptr + entries, mask=in_segment, other=0)
        acc += tl.load(grad_out_ptr + position[:, None] * dim + dims[None, :],
                       mask=in_segment[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    tl.store(grad_weight_ptr + row * dim + dims, tl.sum(acc, axis=0).to(grad_weight_ptr.dtype.element_ty),
             mask=dim_mask)


@functools.cache
def _hash_constants(num_functions: int, ngram_sizes: tuple[int, ...], device: torch.device):
    """Primes and n-gram sizes on the device, made once: a copy from the host would stall every call."""
    primes = [HASH_PRIMES[f % len(HASH_PRIMES)] for f in range(num_functions)]
    return (torch.tensor(primes, dtype=torch.int64, device=device),
            torch.tensor(ngram_sizes, dtype=torch.int32, device=device))  # fmt: skip


def _dim_block(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 256)


# A custom op, not an autograd Function: torch.compile keeps it opaque (see cross_attention.py).
# backward_mode is an argument only so that the backward can read it.
@torch.library.custom_op("bltdist::hash_ngram_embedding", mutates_args=())
def _hash_forward(
    tokens: torch.Tensor, weight: torch.Tensor, ngram_sizes: list[int], num_functions: int, table_size: int,
    backward_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, rows): the embedding and the fused-table row of each (position, table)."""
    tokens = tokens.contiguous()
    weight = weight.contiguous()
    num_positions, seq_len, dim = tokens.numel(), tokens.shape[-1], weight.shape[1]
    primes, sizes = _hash_constants(num_functions, tuple(ngram_sizes), tokens.device)
    out = torch.empty(*tokens.shape, dim, dtype=weight.dtype, device=weight.device)
    rows = torch.empty(num_positions, num_functions * len(ngram_sizes), dtype=torch.int64, device=tokens.device)
    block_d = _dim_block(dim)
    grid = (triton.cdiv(num_positions, BLOCK_POSITIONS), triton.cdiv(dim, block_d))
    _hash_embedding_forward_kernel[grid](
        tokens, primes, sizes, weight, out, rows, num_positions, seq_len, dim, table_size,
        NUM_FUNCTIONS=num_functions, NUM_SIZES=len(ngram_sizes), BLOCK_T=BLOCK_POSITIONS, BLOCK_D=block_d,
    )
    return out, rows


@_hash_forward.register_fake
def _(tokens, weight, ngram_sizes, num_functions, table_size, backward_mode):
    out = weight.new_empty(*tokens.shape, weight.shape[1])
    return out, tokens.new_empty(tokens.numel(), num_functions * len(ngram_sizes), dtype=torch.int64)


@torch.library.custom_op("bltdist::hash_ngram_embedding_backward", mutates_args=())
def _hash_backward(
    grad_out: torch.Tensor, rows: torch.Tensor, table_rows: int, weight_dtype: torch.dtype, backward_mode: str
) -> torch.Tensor:
    grad_out = grad_out.contiguous()
    num_positions, num_tables = rows.shape
    dim = grad_out.shape[-1]
    block_d = _dim_block(dim)
    grad_weight = torch.zeros(table_rows, dim, dtype=weight_dtype, device=grad_out.device)
    if backward_mode == "atomic" and weight_dtype == torch.float32:
        grid = (triton.cdiv(num_positions, BLOCK_POSITIONS), triton.cdiv(dim, block_d))
        _hash_embedding_atomic_backward_kernel[grid](
            grad_out, rows, grad_weight, num_positions, dim,
            NUM_TABLES=num_tables, BLOCK_T=BLOCK_POSITIONS, BLOCK_D=block_d,
        )
    else:
        sorted_rows, order = torch.sort(rows.flatten())
        segment_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        segment_starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        sorted_positions = order // num_tables
        grid = (segment_rows.numel(), triton.cdiv(dim, block_d))
        _hash_embedding_sorted_backward_kernel[grid](
            grad_out, sorted_positions, segment_starts, segment_rows, grad_weight, dim,
            BLOCK_E=16, BLOCK_D=block_d,
        )
    return grad_weight


@_hash_backward.register_fake
def _(grad_out, rows, table_rows, weight_dtype, backward_mode):
    return grad_out.new_empty(table_rows, grad_out.shape[-1], dtype=weight_dtype)


def _save_rows(ctx, inputs, output):
    _, weight, _, _, _, backward_mode = inputs
    ctx.save_for_backward(output[1])
    ctx.table_rows, ctx.weight_dtype, ctx.backward_mode = weight.shape[0], weight.dtype, backward_mode


def _hash_grad(ctx, grad_out, _no_grad_rows):
    (rows,) = ctx.saved_tensors
    grad_weight = _hash_backward(grad_out, rows, ctx.table_rows, ctx.weight_dtype, ctx.backward_mode)
    return None, grad_weight, None, None, None, None


_hash_forward.register_autograd(_hash_grad, setup_context=_save_rows)


def hash_ngram_embedding(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    ngram_sizes: list[int],
    num_functions: int,
    table_size: int,
    backward_mode: str = "atomic",
) -> torch.Tensor:
    """Sum over every (function, n) table of the row of the n-gram ending at each token:
    (B, T) -> (B, T, dim), equal to ``HashNgramEmbedding.forward`` for a weight laid out as there."""
    if backward_mode not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {backward_mode!r}; choose one of {BACKWARD_MODES}")
    return _hash_forward(tokens, weight, list(ngram_sizes), num_functions, table_size, backward_mode)[0]


def unsupported_reason(tokens, weight, ngram_sizes, num_functions, table_size) -> str | None:
    """Why the kernel cannot compute this call, or None when it can."""
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"table dtype {weight.dtype}"
    if tokens.dtype not in (torch.int64, torch.int32):
        return f"token dtype {tokens.dtype}"
    return None
