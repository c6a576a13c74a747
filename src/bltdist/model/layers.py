"""Building blocks shared by every part of BLT: norm, rotary embedding, attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bltdist import kernels
from bltdist.model.attention import AttentionMask, byte_to_slot_attention, patch_pool_attention

# The PyTorch references of the fused kernels, under the kernels' names.
REFERENCE_CROSS_ATTENTION = {
    "patch_pool_attention": patch_pool_attention,
    "byte_to_slot_attention": byte_to_slot_attention,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch normalises bf16 inputs in fp32 inside one fused kernel (the variance of wide activations
        # overflows bf16 precision); a weight of another dtype (fp32 under autocast) would make it fall back
        # to separate casts and products, five passes over the activations on a GPU instead of one.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_table(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim // 2): positions are (T,) or, when every
    row has its own positions (a context-parallel shard), (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x: (B, T, H, D), the BLT reference convention."""
    cos, sin = (t.unsqueeze(-2).to(x.dtype) for t in rope)  # broadcast over heads
    # (even, odd) -> (even cos - odd sin, odd cos + even sin), bit for bit, as whole-width
    # products with the pair-swapped x: elementwise ops on the strided even/odd halves are not
    # vectorised, and stacking them costs a copy and a zero-filled gradient per half.
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    signed_sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return x * cos.repeat_interleave(2, dim=-1) + swapped * signed_sin


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope, mask: AttentionMask) -> torch.Tensor:
        # Head counts are read off the projections' widths, so a tensor-parallel shard holding
        # heads / tp of them runs this same code.
        q = apply_rotary(self.q_proj(x).unflatten(-1, (-1, self.head_dim)), rope)
        k = apply_rotary(self.k_proj(x).unflatten(-1, (-1, self.head_dim)), rope)
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        return self.o_proj(mask.attend(q, k, v).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention + SwiGLU; the unit that activation checkpointing and FSDP wrap."""

    def __init__(self, dim: int, heads: int, kv_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = SelfAttention(dim, heads, kv_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, ffn_dim)

    def forward(self, x: torch.Tensor, rope, mask: AttentionMask) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask)
        return x + self.ffn(self.ffn_norm(x))


class CrossAttention(nn.Module):
    """Byte-patch cross-attention with normed queries and keys and no positions.

    ``double_residual`` reproduces the reference, whose cross-attention returns x + attn(x) to a
    caller that adds x again. ``kernels`` (``auto``, ``triton``, ``torch``) picks the fused Triton
    kernels or the PyTorch reference.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float, double_residual: bool, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.double_residual = double_residual
        self.q_norm = RMSNorm(dim, eps)
        self.kv_norm = RMSNorm(dim, eps)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def _attend(self, queries: torch.Tensor, keys_values: torch.Tensor, index: torch.Tensor, kind: str) -> torch.Tensor:
        # Head counts come from the projections' widths, as in SelfAttention (tensor-parallel shards).
        q = self.q_proj(self.q_norm(queries)).unflatten(-1, (-1, self.head_dim))
        kv = self.kv_norm(keys_values)
        k = self.k_proj(kv).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(kv).unflatten(-1, (-1, self.head_dim))
        attended = kernels.fused(self.kernels, kind, q, k, v, index)
        if attended is None:
            attended = REFERENCE_CROSS_ATTENTION[kind](q, k, v, index)
        out = self.o_proj(attended.flatten(-2))
        return out + queries if self.double_residual else out

    def pool(self, slots: torch.Tensor, byte_states: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """slots: (B, P, S, dim) attend to their own patch's bytes in byte_states: (B, T, dim)."""
        return self._attend(slots, byte_states, patch_ids, "patch_pool_attention")

    def unpool(self, byte_states: torch.Tensor, slots: torch.Tensor, source_patch: torch.Tensor) -> torch.Tensor:
        """byte_states: (B, T, dim) attend to the slots (B, P, S, dim) of patch source_patch[t]."""
        return self._attend(byte_states, slots, source_patch, "byte_to_slot_attention")
