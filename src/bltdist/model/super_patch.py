"""Patches of patches: a second latent level (``model.blt.super_patch``), in plain PyTorch.

It takes the global transformer's place in the BLT and keeps its interface, patch inputs
(B, P, S * local_dim) in and patch states (B, P, global_dim) out, so the byte encoder and decoder
around it are unchanged. Inside, the BLT's design repeats one level up:

  patch inputs -> patch-level encoder (causal self-attention over patches)
        -> per super-patch: max-pool its patches' states, project to K slots, cross-attend to its
           own patches -> (B, Ps, K * global_dim)
        -> the super-patch transformer, causal over super-patches (``layers``: the config's
           global_layers) -> (B, Ps, global_dim)
        -> patch-level decoder: each patch starts from its encoder state, cross-attends to the slots
           of one earlier super-patch, then causal self-attention over patches -> (B, P, global_dim).

Causality, as at the byte level: patch q reads super-patch s(q+1) - 1, the last one that ends at or
before q (the end of the sequence counts as a boundary). It holds only patches <= q. That needs
the first patch of every row and of every document to be a super-patch of its own, which every
grouping has (``document_starts``): super-patches start at every document-start patch (a BOS, a
patch of its own) and at the patch after it; so no super-patch holds patches of two documents
either. Then ``mode: static`` starts one every ``patches_per_super_patch`` patches; ``mode: entropy``
takes the patcher's grouping (``super_patch_lengths``, passed with the patch lengths), which closes a
super-patch once the summed next-byte entropy of its bytes passes ``entropy_threshold``. Those
entropies come from the causal entropy model, so whether patch q+1 opens a super-patch depends on
bytes up to patch q's end only, as entropy patch boundaries do at the byte level.

Super-patches are right-padded to a multiple of gcd(P, 16) rows (and, where the caller buckets the patch
count for compiled shapes, to a bucket of the same precision: their count moves with the documents). The
trainer pads P to a multiple of the tensor-parallel degree, so a power-of-two degree up to 16 divides the
super-patch count too, as sequence parallelism over the super-patch transformer needs. Padding rows hold
no patch and form a document of their own, so no real row ever sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from bltdist.model.attention import SelfAttentionMask
from bltdist.model.layers import CrossAttention, RMSNorm, TransformerBlock, rotary_table
from bltdist.patching.rules import patch_count_bucket

if TYPE_CHECKING:
    from bltdist.config import BLTConfig

SUPER_PATCH_ROW_MULTIPLE = 16  # super-patch rows are padded to a multiple of gcd(P, this)


@dataclass
class SuperPatchLayout:
    """How one batch's patches group into super-patches, from the patch layout's documents."""

    super_ids: torch.Tensor  # (B, P): super-patch of each patch
    source_super: torch.Tensor  # (B, P): the super-patch whose slots patch q reads in the decoder
    num_supers: int  # Ps, padded
    super_mask: SelfAttentionMask
    super_positions: torch.Tensor  # (Ps,)

    @classmethod
    def build(cls, patch_docs: torch.Tensor, starts: torch.Tensor, backend: str,
              bucket_bits: int | None = None) -> SuperPatchLayout:  # fmt: skip
        """``patch_docs`` (B, P): each patch's document, -1 for padding patches (the patch layout's);
        ``starts`` (B, P): True where a super-patch begins (``static_starts`` or ``starts_of_lengths``);
        ``bucket_bits``: the precision the caller bucketed the patch count to, if it did (compiled
        shapes): the super-patch count, which moves with the documents per row, is bucketed alike."""
        batch, num_patches = patch_docs.shape
        super_ids = torch.cumsum(starts.long(), dim=1) - 1
        real = int(super_ids[:, -1].max()) + 1
        multiple = math.gcd(num_patches, SUPER_PATCH_ROW_MULTIPLE)
        num_supers = patch_count_bucket(real, multiple, bucket_bits)
        # The end of the row counts as a boundary: the last patch reads the super-patch it closes.
        next_super = torch.cat([super_ids[:, 1:], super_ids[:, -1:] + 1], dim=1)
        super_docs = torch.full((batch, num_supers), -1, dtype=patch_docs.dtype, device=patch_docs.device)
        super_docs = super_docs.scatter_reduce(1, super_ids, patch_docs, reduce="amax", include_self=False)
        return cls(
            super_ids=super_ids,
            source_super=(next_super - 1).clamp_min(0),
            num_supers=num_supers,
            super_mask=SelfAttentionMask(super_docs, None, backend),
            super_positions=torch.arange(num_supers, device=patch_docs.device),
        )


def _first_patches(patch_docs: torch.Tensor) -> torch.Tensor:
    first = torch.ones_like(patch_docs, dtype=torch.bool)
    first[:, 1:] = patch_docs[:, 1:] != patch_docs[:, :-1]
    return first


def document_starts(patch_docs: torch.Tensor) -> torch.Tensor:
    """Starts (B, P) every grouping has, which causality needs: each document's first patch (a BOS, or
    the row's first) and the patch after it. Padding patches (document -1) start one of their own."""
    first = _first_patches(patch_docs)
    after_first = torch.zeros_like(first)
    after_first[:, 1:] = first[:, :-1]
    return first | after_first


def static_starts(patch_docs: torch.Tensor, patches_per_super_patch: int) -> torch.Tensor:
    """mode static: a super-patch every ``patches_per_super_patch`` patches, counted from each document start."""
    positions = torch.arange(patch_docs.shape[1], device=patch_docs.device)
    last_first = torch.cummax(torch.where(_first_patches(patch_docs), positions, 0), dim=1).values
    return document_starts(patch_docs) | ((positions - last_first - 1) % patches_per_super_patch == 0)


def starts_of_lengths(super_patch_lengths: torch.Tensor, patch_docs: torch.Tensor) -> torch.Tensor:
    """mode entropy: the starts of the patcher's grouping, patches per super-patch (B, Ps), each row
    summing to the row's real patches (``bltdist.patching.rules.super_patch_lengths``)."""
    lengths = super_patch_lengths.to(device=patch_docs.device, dtype=torch.long)
    real_patches = (patch_docs >= 0).sum(dim=1)
    if not torch.equal(lengths.sum(dim=1), real_patches):
        raise ValueError(f"super_patch_lengths must sum to each row's real patch count {real_patches.tolist()}, "
                         f"got {lengths.sum(dim=1).tolist()}")  # fmt: skip
    batch, num_patches = patch_docs.shape
    first_patches = (lengths.cumsum(dim=1) - lengths).masked_fill(lengths == 0, num_patches)
    starts = torch.zeros(batch, num_patches + 1, dtype=torch.bool, device=patch_docs.device)
    return document_starts(patch_docs) | starts.scatter_(1, first_patches, True)[:, :num_patches]


def _patch_blocks(cfg: BLTConfig, count: int) -> nn.ModuleList:
    kv_heads, ffn_dim = cfg.global_kv_heads or cfg.global_heads, cfg.global_ffn_dim or int(8 * cfg.global_dim / 3)
    return nn.ModuleList(
        TransformerBlock(cfg.global_dim, cfg.global_heads, kv_heads, ffn_dim, cfg.norm_eps) for _ in range(count)
    )


def _patch_cross_attention(cfg: BLTConfig) -> nn.ModuleList:
    kv_heads = cfg.global_kv_heads or cfg.global_heads
    return nn.ModuleList([CrossAttention(cfg.global_dim, cfg.global_heads, kv_heads, cfg.norm_eps,
                                         cfg.cross_attn_double_residual, cfg.kernels)])  # fmt: skip


class PatchEncoder(nn.Module):
    """Causal self-attention over patches, then pooling into super-patch slots (the byte encoder's design)."""

    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.dim, self.slots = cfg.global_dim, cfg.super_patch.cross_attn_k
        self.layers = _patch_blocks(cfg, cfg.super_patch.encoder_layers)
        self.slot_proj = nn.Linear(cfg.global_dim, self.slots * cfg.global_dim, bias=False)
        self.cross_attn = _patch_cross_attention(cfg)

    def forward(self, h, rope, patch_mask, supers: SuperPatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch states (B, P, dim) and super-patch slots (B, Ps, K, dim)."""
        for layer in self.layers:
            h = layer(h, rope, patch_mask)
        batch, _, dim = h.shape
        index = supers.super_ids[..., None].expand(-1, -1, dim)
        pooled = h.new_zeros(batch, supers.num_supers, dim).scatter_reduce(1, index, h, reduce="amax",
                                                                            include_self=False)  # fmt: skip
        slots = self.slot_proj(pooled).unflatten(-1, (self.slots, dim))
        return h, slots + self.cross_attn[0].pool(slots, h, supers.super_ids)


class PatchDecoder(nn.Module):
    """Each patch reads the slots of one earlier super-patch, then causal self-attention over patches."""

    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.dim, self.slots = cfg.global_dim, cfg.super_patch.cross_attn_k
        self.slot_proj = nn.Linear(cfg.global_dim, self.slots * cfg.global_dim, bias=False)
        self.cross_attn = _patch_cross_attention(cfg)
        self.layers = _patch_blocks(cfg, cfg.super_patch.decoder_layers)
        self.norm = RMSNorm(cfg.global_dim, cfg.norm_eps)

    def forward(self, h, super_states, rope, patch_mask, supers: SuperPatchLayout) -> torch.Tensor:
        slots = self.slot_proj(super_states).unflatten(-1, (self.slots, self.dim))
        h = h + self.cross_attn[0].unpool(h, slots, supers.source_super)
        for layer in self.layers:
            h = layer(h, rope, patch_mask)
        return self.norm(h)


class SuperPatchGlobal(nn.Module):
    """The global transformer of a two-level BLT: patch encoder, super-patch transformer, patch decoder.

    The super-patch transformer's blocks sit at ``layers`` (keyed by index), where tensor
    parallelism looks for a global transformer's blocks; the patch-level blocks sit under
    ``patch_encoder`` and ``patch_decoder`` and are sharded like the byte encoder's and decoder's."""

    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.global_dim // cfg.global_heads
        in_dim, slots_dim = cfg.cross_attn_k * cfg.local_dim, cfg.super_patch.cross_attn_k * cfg.global_dim
        self.in_proj = nn.Linear(in_dim, cfg.global_dim, bias=False) if in_dim != cfg.global_dim else None
        self.patch_encoder = PatchEncoder(cfg)
        self.super_in_proj = nn.Linear(slots_dim, cfg.global_dim, bias=False) if slots_dim != cfg.global_dim else None
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(_patch_blocks(cfg, cfg.global_layers))})
        self.norm = RMSNorm(cfg.global_dim, cfg.norm_eps)
        self.patch_decoder = PatchDecoder(cfg)

    def forward(self, patch_inputs: torch.Tensor, layout) -> torch.Tensor:
        """patch_inputs: (B, P, S * local_dim) -> (B, P, global_dim); ``layout``: the BLT's PatchLayout."""
        supers = SuperPatchLayout.build(layout.patch_mask.doc_ids, self._starts(layout), layout.patch_mask.backend,
                                        layout.bucket_bits)  # fmt: skip
        h = self.in_proj(patch_inputs) if self.in_proj is not None else patch_inputs
        layout.patch_mask.prepare(h, self.head_dim)
        supers.super_mask.prepare(h, self.head_dim)
        patch_rope = rotary_table(layout.patch_positions, self.head_dim, self.cfg.rope_theta)
        h, slots = self.patch_encoder(h, patch_rope, layout.patch_mask, supers)
        s = slots.flatten(-2)
        s = self.super_in_proj(s) if self.super_in_proj is not None else s
        super_rope = rotary_table(supers.super_positions, self.head_dim, self.cfg.rope_theta)
        for layer in self.layers.values():
            s = layer(s, super_rope, supers.super_mask)
        return self.patch_decoder(h, self.norm(s), patch_rope, layout.patch_mask, supers)

    def _starts(self, layout) -> torch.Tensor:
        sp, patch_docs = self.cfg.super_patch, layout.patch_mask.doc_ids
        if sp.mode == "static":
            return static_starts(patch_docs, sp.patches_per_super_patch)
        if layout.super_patch_lengths is None:
            raise ValueError("model.blt.super_patch.mode entropy: pass super_patch_lengths, the grouping the patcher "
                             "computes from the entropies (bltdist.patching.Patcher.super_patch_lengths); the "
                             "trainer does, bltdist.evaluate and bltdist.generate do not yet")  # fmt: skip
        return starts_of_lengths(layout.super_patch_lengths, patch_docs)
