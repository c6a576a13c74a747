"""The Byte Latent Transformer and its entropy model, in plain PyTorch (no parallel code).

Data flow for bytes x (B, T) and patch lengths (B, P):
  bytes -> byte + hash n-gram embeddings -> local encoder (windowed causal self-attention)
        -> per patch: max-pool the patch's byte states, project to S = cross_attn_k query slots,
           cross-attend to the patch's own bytes -> (B, P, S * local_dim)
        -> global transformer, causal over patches -> (B, P, global_dim)
        -> project each patch to S slots; decoder starts from the encoder's byte states and,
           before its layers, each byte cross-attends to the slots of one earlier patch
        -> RMSNorm -> logits (B, T, vocab) in fp32.

Causality: the logits at position t predict byte t+1. Position t reads the global output of the
last patch that ends at or before t, i.e. patch p(t+1) - 1 where p(t) is the patch of byte t.
That patch holds only bytes <= t, and it is the freshest such patch. The end of the sequence counts
as a patch boundary, so the last byte reads the last patch (the Hugging Face port instead needs a
zero-length patch after the last one for that; see ``bltdist.convert``). It needs the first patch of
every row to be a single byte (the BOS rule of ``bltdist.patching``); otherwise the first bytes
read their own, unfinished patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from bltdist.model.attention import AttentionMask, SelfAttentionMask, check_backend, resolve_backend
from bltdist.model.hash_embedding import HashNgramEmbedding
from bltdist.model.layers import CrossAttention, RMSNorm, TransformerBlock, rotary_table
from bltdist.model.super_patch import SuperPatchGlobal
from bltdist.patching.tokens import document_ids

if TYPE_CHECKING:
    from bltdist.config import BLTConfig, EntropyModelConfig


def default_ffn_dim(dim: int) -> int:
    return int(8 * dim / 3)


@dataclass
class PatchLayout:
    """Everything the three stages need to know about how one batch is cut into patches.

    The model reads a layout only through the fields and two methods below, so a layout of one
    rank's share of the sequence (``bltdist.parallel.context.ContextParallelLayout``) can stand in
    for it: there ``local_bytes`` picks the rank's bytes, the masks attend to keys of other ranks,
    and ``decoder_patch_states`` brings in the patch states that the first bytes of a shard read.
    """

    patch_ids: torch.Tensor  # (B, T): patch of each byte; num_patches = no patch (padding)
    source_patch: torch.Tensor  # (B, T): row of decoder_patch_states(...) that byte t reads
    num_patches: int  # P, the padded patch count of the batch
    byte_mask: SelfAttentionMask
    patch_mask: SelfAttentionMask
    byte_positions: torch.Tensor  # (T,) or (B, T): rotary positions of the bytes
    patch_positions: torch.Tensor  # (P,): rotary positions of the patches
    # (B, Ps): patches per super-patch, for model.blt.super_patch.mode entropy (the patcher groups them).
    super_patch_lengths: torch.Tensor | None = field(default=None, kw_only=True)
    # The significant bits the caller bucketed the patch count to (compiled shapes), if it did:
    # counts the model derives (super-patches) are bucketed alike.
    bucket_bits: int | None = field(default=None, kw_only=True)

    def local_bytes(self, per_byte: torch.Tensor) -> torch.Tensor:
        """The bytes this layout covers of a (B, T, ...) tensor over the whole sequence."""
        return per_byte

    def decoder_patch_states(self, patch_states: torch.Tensor) -> torch.Tensor:
        """The patch states (B, P, dim) that ``source_patch`` indexes."""
        return patch_states

    @classmethod
    def build(cls, tokens: torch.Tensor, patch_lengths: torch.Tensor, window: int | None, backend: str,
              super_patch_lengths: torch.Tensor | None = None, bucket_bits: int | None = None):  # fmt: skip
        batch, seq_len = tokens.shape
        patch_lengths = patch_lengths.to(device=tokens.device, dtype=torch.long)
        patch_ends = torch.cumsum(patch_lengths, dim=1)
        if not torch.equal(patch_ends[:, -1], torch.full_like(patch_ends[:, -1], seq_len)):
            raise ValueError(
                f"patch_lengths must sum to the sequence length {seq_len} in every row, "
                f"got {patch_ends[:, -1].tolist()}"
            )
        positions = torch.arange(seq_len, device=tokens.device).expand(batch, -1).contiguous()
        patch_ids = torch.searchsorted(patch_ends, positions, right=True)
        real_patches = (patch_lengths > 0).sum(dim=1, keepdim=True)
        next_byte_patch = torch.cat([patch_ids[:, 1:], real_patches], dim=1)
        source_patch = (next_byte_patch - 1).clamp_min(0)

        byte_docs = document_ids(tokens)
        patch_starts = (patch_ends - patch_lengths).clamp_max(seq_len - 1)
        # Right-padding patches (length 0) form a document of their own so they never touch real ones.
        patch_docs = torch.where(patch_lengths > 0, torch.gather(byte_docs, 1, patch_starts), -1)
        return cls(
            patch_ids=patch_ids,
            source_patch=source_patch,
            num_patches=patch_lengths.shape[1],
            byte_mask=SelfAttentionMask(byte_docs, window, backend),
            patch_mask=SelfAttentionMask(patch_docs, None, backend),
            byte_positions=torch.arange(seq_len, device=tokens.device),
            patch_positions=torch.arange(patch_lengths.shape[1], device=tokens.device),
            super_patch_lengths=super_patch_lengths,
            bucket_bits=bucket_bits,
        )


def _blocks(count: int, dim: int, heads: int, kv_heads: int | None, ffn_dim: int | None, eps: float):
    return nn.ModuleList(
        TransformerBlock(dim, heads, kv_heads or heads, ffn_dim or default_ffn_dim(dim), eps) for _ in range(count)
    )


def _cross_attentions(cfg: BLTConfig, count: int) -> nn.ModuleList:
    kv_heads = cfg.local_kv_heads or cfg.local_heads
    return nn.ModuleList(
        CrossAttention(cfg.local_dim, cfg.local_heads, kv_heads, cfg.norm_eps, cfg.cross_attn_double_residual, cfg.kernels)
        for _ in range(count)
    )


class LocalEncoder(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.dim, self.slots, self.rope_theta = cfg.local_dim, cfg.cross_attn_k, cfg.rope_theta
        self.all_layers_cross = cfg.encoder_cross_attn_all_layers
        self.repool_slots = cfg.encoder_cross_attn_repool
        self.byte_embedding = nn.Embedding(cfg.vocab_size, cfg.local_dim)
        self.hash_embedding = HashNgramEmbedding(
            cfg.hash_ngram_sizes, cfg.hash_functions, cfg.hash_vocab, cfg.local_dim, cfg.kernels
        )
        self.layers = _blocks(
            cfg.encoder_layers, cfg.local_dim, cfg.local_heads, cfg.local_kv_heads, cfg.encoder_ffn_dim, cfg.norm_eps
        )
        self.slot_proj = nn.Linear(cfg.local_dim, cfg.cross_attn_k * cfg.local_dim, bias=False)
        self.cross_attn = _cross_attentions(cfg, cfg.encoder_layers if self.all_layers_cross else 1)

    def forward(self, tokens: torch.Tensor, layout: PatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns byte states (B, T, dim) and patch slots (B, P, S, dim)."""
        # Embedded over the whole sequence, then narrowed to the layout's bytes: an n-gram looks back
        # across a context-parallel shard's first byte. Lookups cost no FLOPs; a shard pays the
        # memory of one (B, T, dim) activation for it.
        h = layout.local_bytes(self.byte_embedding(tokens) + self.hash_embedding(tokens))
        head_dim = self.layers[0].attn.head_dim
        layout.byte_mask.prepare(h, head_dim)
        rope = rotary_table(layout.byte_positions, head_dim, self.rope_theta)
        slots = None
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, layout.byte_mask)
            if self.all_layers_cross or i == len(self.layers) - 1:
                if slots is None or self.repool_slots:
                    slots = self._init_slots(h, layout)
                cross = self.cross_attn[i if self.all_layers_cross else 0]
                slots = slots + cross.pool(slots, h, layout.patch_ids)
        return h, slots[:, : layout.num_patches].contiguous()  # compiled blocks are specialised to strides too

    def _init_slots(self, h: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """Each patch's slots start from the max over its bytes' states, projected to S slots.

        One spare patch row collects the bytes of no patch (padding of a context-parallel shard)
        so that they never touch a real patch; ``forward`` drops it.
        """
        batch, _, dim = h.shape
        index = layout.patch_ids[..., None].expand(-1, -1, dim)
        pooled = h.new_zeros(batch, layout.num_patches + 1, dim).scatter_reduce(
            1, index, h, reduce="amax", include_self=False
        )
        return self.slot_proj(pooled).unflatten(-1, (self.slots, dim))


class GlobalTransformer(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.dim, self.rope_theta, self.head_dim = cfg.global_dim, cfg.rope_theta, cfg.global_dim // cfg.global_heads
        in_dim = cfg.cross_attn_k * cfg.local_dim
        self.in_proj = nn.Linear(in_dim, cfg.global_dim, bias=False) if in_dim != cfg.global_dim else None
        blocks = _blocks(
            cfg.global_layers, cfg.global_dim, cfg.global_heads, cfg.global_kv_heads, cfg.global_ffn_dim, cfg.norm_eps
        )
        # Keyed by index, so that a pipeline stage holding layers 3..5 keeps their names (layers.3, ...).
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(blocks)})
        self.norm = RMSNorm(cfg.global_dim, cfg.norm_eps) if cfg.global_final_norm else None

    def forward(self, patch_inputs: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """patch_inputs: (B, P, S * local_dim) -> (B, P, global_dim). A pipeline stage may hold
        only some layers, and in_proj only on the first stage, the norm only on the last."""
        h = self.in_proj(patch_inputs) if self.in_proj is not None else patch_inputs
        layout.patch_mask.prepare(h, self.head_dim)
        rope = rotary_table(layout.patch_positions, self.head_dim, self.rope_theta)
        for layer in self.layers.values():
            h = layer(h, rope, layout.patch_mask)
        return self.norm(h) if self.norm is not None else h


class LocalDecoder(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.dim, self.slots, self.rope_theta = cfg.local_dim, cfg.cross_attn_k, cfg.rope_theta
        self.all_layers_cross = cfg.decoder_cross_attn_all_layers
        self.slot_proj = nn.Linear(cfg.global_dim, cfg.cross_attn_k * cfg.local_dim, bias=False)
        self.cross_attn = _cross_attentions(cfg, cfg.decoder_layers if self.all_layers_cross else 1)
        self.layers = _blocks(
            cfg.decoder_layers, cfg.local_dim, cfg.local_heads, cfg.local_kv_heads, cfg.decoder_ffn_dim, cfg.norm_eps
        )
        self.norm = RMSNorm(cfg.local_dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.local_dim, cfg.vocab_size, bias=False)

    def forward(self, byte_states: torch.Tensor, patch_states: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        slots = self.slot_proj(layout.decoder_patch_states(patch_states)).unflatten(-1, (self.slots, self.dim))
        head_dim = self.layers[0].attn.head_dim
        layout.byte_mask.prepare(byte_states, head_dim)  # a pipeline's last stage has no encoder to do it
        rope = rotary_table(layout.byte_positions, head_dim, self.rope_theta)
        h = byte_states
        for i, layer in enumerate(self.layers):
            if self.all_layers_cross or i == 0:
                h = h + self.cross_attn[i].unpool(h, slots, layout.source_patch)
            h = layer(h, rope, layout.byte_mask)
        return self.output(self.norm(h)).float()


def init_weights(module: nn.Module, std: float, normal_=None) -> None:
    """Initialise every parameter in place; call after ``to_empty`` on a meta-built model.
    ``normal_(weight, std, name)`` draws the normal weights instead of torch's global generator (the
    trainer's draws each weight's values by name, the same however the weight is sharded)."""
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding, HashNgramEmbedding)):
            if normal_ is None:
                nn.init.normal_(sub.weight, mean=0.0, std=std)
            else:
                normal_(sub.weight, std, f"{name}.weight")
        elif isinstance(sub, RMSNorm):
            sub.reset_parameters()


class BLT(nn.Module):
    def __init__(self, cfg: BLTConfig, attention_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attention_backend = attention_backend
        self.encoder = LocalEncoder(cfg)
        # Patches of patches (model.blt.super_patch): a two-level global model of the same interface.
        self.global_model = SuperPatchGlobal(cfg) if cfg.super_patch.enabled else GlobalTransformer(cfg)
        self.decoder = LocalDecoder(cfg)

    def init_weights(self, normal_=None) -> None:
        init_weights(self, self.cfg.init_std, normal_)

    def forward(
        self,
        tokens: torch.Tensor,
        patch_lengths: torch.Tensor,
        layout: PatchLayout | None = None,
        patch_states: torch.Tensor | None = None,
        byte_states: torch.Tensor | None = None,
        super_patch_lengths: torch.Tensor | None = None,
        bucket_bits: int | None = None,
    ):
        """tokens: (B, T) byte ids; patch_lengths: (B, P), each row summing to T, zero-padded on
        the right. Returns fp32 logits (B, T, vocab) predicting the next byte.

        ``layout`` replaces the one built from tokens and patch_lengths; a context-parallel layout
        makes the logits those of the rank's bytes only, (B, layout's byte count, vocab).
        A pipeline stage is a BLT without the parts other stages hold: without the encoder it starts
        from ``patch_states`` and ``byte_states``, without the decoder it returns them.
        ``super_patch_lengths`` (B, Ps): patches per super-patch, which model.blt.super_patch.mode entropy
        needs (``bltdist.patching.Patcher.super_patch_lengths``), passed like ``patch_lengths``.
        ``bucket_bits``: the precision the caller bucketed the patch count to
        (``bltdist.patching.rules.patch_count_bucket``), so that the super-patch count is bucketed alike."""
        if layout is None:
            layout = PatchLayout.build(tokens, patch_lengths, self.cfg.local_window, self.backend(tokens.device),
                                       super_patch_lengths, bucket_bits)  # fmt: skip
        if self.encoder is not None:
            byte_states, slots = self.encoder(tokens, layout)
            patch_states = slots.flatten(-2)
        patch_states = self.global_model(patch_states, layout)
        if self.decoder is None:
            return patch_states, byte_states
        return self.decoder(byte_states, patch_states, layout)

    def backend(self, device: torch.device) -> str:
        return check_backend(self.attention_backend, device)

    def global_attention_compiles_per_shape(self, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> bool:
        """The global model attends with compiled FlexAttention, whose graphs are specialised to the
        patch count even when the model is not compiled: callers bucket patch counts for it."""
        head_dim = self.cfg.global_dim // self.cfg.global_heads
        return resolve_backend(self.attention_backend, device, dtype, needs_grad, head_dim) == "flex"


@dataclass
class SequenceLayout:
    """What a plain LM (``ByteLM``) needs to know about a batch: who attends to whom, and where.

    A context-parallel shard (``bltdist.parallel.context.ContextParallelSequence``) stands in for it:
    there ``local`` picks the rank's positions and the mask attends to keys of other ranks."""

    mask: AttentionMask
    positions: torch.Tensor  # (T,) or (B, T): rotary positions of the positions this layout covers

    def local(self, per_position: torch.Tensor) -> torch.Tensor:
        """The positions this layout covers of a (B, T, ...) tensor over the whole sequence."""
        return per_position

    @classmethod
    def build(cls, tokens: torch.Tensor, window: int | None, backend: str) -> SequenceLayout:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return cls(SelfAttentionMask(document_ids(tokens), window, backend), positions)


class ByteLM(nn.Module):
    """The entropy model: a small causal byte LM whose next-byte entropy places patch boundaries.
    The same network is the byte-level baseline (arch bytelm) and, over BPE ids, the BPE one (tokenlm)."""

    def __init__(self, cfg: EntropyModelConfig, attention_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attention_backend = attention_backend
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        blocks = _blocks(cfg.layers, cfg.dim, cfg.heads, cfg.kv_heads, cfg.ffn_dim, cfg.norm_eps)
        # Keyed by index, so that a pipeline stage holding layers 2..3 keeps their names (layers.2, ...).
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(blocks)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def init_weights(self, normal_=None) -> None:
        init_weights(self, self.cfg.init_std, normal_)

    def forward(
        self, tokens: torch.Tensor, layout: SequenceLayout | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: (B, T) ids -> fp32 logits (B, T, vocab) predicting the next id.

        ``layout`` replaces the one built from the tokens; a context-parallel layout makes the logits
        those of the rank's positions only. A pipeline stage is a ByteLM without the parts other
        stages hold: without the embedding it starts from ``hidden``, without the head it returns it."""
        if layout is None:
            layout = SequenceLayout.build(tokens, self.cfg.window, check_backend(self.attention_backend, tokens.device))
        head_dim = self.cfg.dim // self.cfg.heads
        rope = rotary_table(layout.positions, head_dim, self.cfg.rope_theta)
        h = self.embedding(layout.local(tokens)) if self.embedding is not None else hidden
        layout.mask.prepare(h, head_dim)
        for layer in self.layers.values():
            h = layer(h, rope, layout.mask)
        if self.output is None:
            return h
        return self.output(self.norm(h)).float()

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        """Entropy in nats of the predicted distribution of the next byte, (B, T)."""
        log_probs = torch.log_softmax(self.forward(tokens), dim=-1)
        return -(log_probs.exp() * log_probs).sum(dim=-1)
