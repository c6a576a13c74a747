"""Incremental inference with key/value caches, beside the training forward and sharing its weights.

``IncrementalBLT`` and ``IncrementalByteLM`` run the submodules of a ``BLT`` or ``ByteLM`` (the same
blocks, projections and cross-attentions) on one sequence that grows byte by byte. Each attention
layer gets a ``KVCache`` in place of the training mask: the local layers keep their sliding window,
the global transformer every completed patch. The first call on an empty cache (the prompt) is
the training computation itself; later calls add one position and attend to what is cached.

What a position computes is what the training forward gives it inside a longer sequence
(BLT_NOTES section 7): ``closes[t]`` (does byte t+1 start a patch?) is decided before byte t's
prediction, the global model runs once per completed patch, and byte t reads the last patch that
ends at or before it, never the patch still open.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bltdist.model.attention import SelfAttentionMask
from bltdist.model.blt import BLT, ByteLM
from bltdist.model.layers import rotary_table


class KVCache:
    """One self-attention layer's keys and values of the last ``window - 1`` positions (all when
    window is None); stands in for the layer's mask. A sequence is one document, so a query sees
    every cached key."""

    def __init__(self, window: int | None):
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.keys is None:  # the prompt: exactly what a training forward computes for it
            out = SelfAttentionMask(q.new_zeros(q.shape[:2], dtype=torch.long), self.window, "sdpa").attend(q, k, v)
            keys, values = k, v
        else:
            if q.shape[1] != 1:
                raise ValueError("after the first call a KVCache takes one position at a time")
            keys, values = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)
            out = _attend_all(q, keys, values)
        # Keep what the next query can still see: the last window - 1 positions.
        dropped = 0 if self.window is None else max(keys.shape[1] - (self.window - 1), 0)
        self.keys, self.values = keys[:, dropped:], values[:, dropped:]
        return out


def _attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, 1, H, D) against every key of k, v: (B, L, Hkv, D)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@dataclass
class _PatchIds:
    """The two fields of a PatchLayout that the encoder's slot pooling reads."""

    patch_ids: torch.Tensor
    num_patches: int


class IncrementalByteLM:
    """Next-byte entropies of a growing sequence, as the entropy model gives them in training: the
    sequence is cut into chunks of ``context`` tokens, each run on its own (``bltdist.patching.entropy``),
    so the caches start afresh at every chunk."""

    def __init__(self, model: ByteLM, context: int):
        self.model, self.context = model, context
        self.device = model.output.weight.device
        self.position = 0
        self.caches: list[KVCache] = []

    @torch.no_grad()
    def advance(self, tokens: list[int]) -> list[float]:
        """Entropies H(t) (nats, float32 values) of the given next tokens."""
        entropies, done = [], 0
        while done < len(tokens):
            in_chunk = self.position % self.context
            if in_chunk == 0:
                self.caches = [KVCache(self.model.cfg.window) for _ in self.model.layers]
            count = min(len(tokens) - done, self.context - in_chunk)
            entropies += self._run(tokens[done : done + count], in_chunk)
            done, self.position = done + count, self.position + count
        return entropies

    def _run(self, tokens: list[int], first_position: int) -> list[float]:
        cfg = self.model.cfg
        positions = torch.arange(first_position, first_position + len(tokens), device=self.device)
        rope = rotary_table(positions, cfg.dim // cfg.heads, cfg.rope_theta)
        h = self.model.embedding(torch.tensor([tokens], device=self.device))
        for layer, cache in zip(self.model.layers.values(), self.caches):
            h = layer(h, rope, cache)
        log_probs = torch.log_softmax(self.model.output(self.model.norm(h)).float(), dim=-1)
        return (-(log_probs.exp() * log_probs).sum(dim=-1))[0].tolist()


class IncrementalBLT:
    """Logits of the next byte of one growing sequence.

    Call ``advance(tokens, closes)`` with the prompt first, then with one byte at a time;
    ``closes[i]`` says whether the byte after ``tokens[i]`` starts a patch (``OnlineBoundaries``).
    The first token of the sequence must be a BOS (a patch of its own, so ``closes[0]`` is True).
    """

    def __init__(self, model: BLT):
        self.model, cfg = model, model.cfg
        self.device = model.decoder.output.weight.device
        encoder, decoder = model.encoder, model.decoder
        self.encoder_caches = [KVCache(cfg.local_window) for _ in encoder.layers]
        self.global_caches = [KVCache(None) for _ in model.global_model.layers.values()]
        self.decoder_caches = [KVCache(cfg.local_window) for _ in decoder.layers]
        self.tokens: list[int] = []
        self.num_patches = 0  # completed patches, run through the global model
        self.open_states: list[torch.Tensor] | None = None  # per encoder cross layer: the open patch's bytes
        self.latest_slots: torch.Tensor | None = None  # decoder slots (1, 1, S, dim) of the last completed patch

    @torch.no_grad()
    def advance(self, tokens: list[int], closes: list[bool]) -> torch.Tensor:
        """fp32 logits (vocab,) predicting the byte after the last of ``tokens``."""
        first = len(self.tokens)
        self.tokens += tokens
        byte_states, cross_states = self._encode(first, len(tokens))
        patch_inputs = self._complete_patches(cross_states, closes)
        table = [] if self.latest_slots is None else [self.latest_slots]
        if patch_inputs is not None:
            table.append(self._run_global(patch_inputs))
        slots = torch.cat(table, dim=1)
        # Byte t reads the last patch that ends at or before it: count the patches closed so far.
        closed_by = torch.tensor(closes, dtype=torch.long, device=self.device).cumsum(0)
        earlier = 0 if self.latest_slots is None else 1  # row 0 of slots: the patch completed before these bytes
        source = (closed_by - 1 + earlier)[None]
        self.latest_slots = slots[:, -1:]
        return self._decode(byte_states, slots, source)[0, -1]

    def _encode(self, first: int, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Byte states (1, count, dim) of the new bytes and their states at each encoder cross layer."""
        encoder = self.model.encoder
        context = max(encoder.hash_embedding.ngram_sizes) - 1  # earlier bytes the n-gram hashes read
        window = torch.tensor([self.tokens[max(first - context, 0) :]], device=self.device)
        h = (encoder.byte_embedding(window) + encoder.hash_embedding(window))[:, -count:]
        head_dim = encoder.dim // encoder.layers[0].attn.heads
        rope = rotary_table(torch.arange(first, first + count, device=self.device), head_dim, encoder.rope_theta)
        cross_states = []
        for i, (layer, cache) in enumerate(zip(encoder.layers, self.encoder_caches)):
            h = layer(h, rope, cache)
            if encoder.all_layers_cross or i == len(encoder.layers) - 1:
                cross_states.append(h)
        return h, cross_states

    def _complete_patches(self, cross_states: list[torch.Tensor], closes: list[bool]) -> torch.Tensor | None:
        """Pools the patches the new bytes complete into global inputs (1, P, S * dim); keeps the open one."""
        if self.open_states is not None:
            cross_states = [torch.cat([opened, new], dim=1) for opened, new in zip(self.open_states, cross_states)]
        pending = cross_states[0].shape[1]
        opened_before = pending - len(closes)
        last_close = max((i for i, closed in enumerate(closes) if closed), default=None)
        complete = 0 if last_close is None else opened_before + last_close + 1  # bytes of completed patches
        self.open_states = [states[:, complete:] for states in cross_states]
        if complete == 0:
            return None
        starts = torch.tensor([False] * opened_before + [False] + closes[:-1], device=self.device)[:complete]
        starts[0] = True
        patch_ids = (starts.long().cumsum(0) - 1)[None]
        layout = _PatchIds(patch_ids, int(patch_ids[0, -1]) + 1)
        encoder, slots = self.model.encoder, None
        for i, states in enumerate(cross_states):  # the pooling of LocalEncoder.forward, one cross layer at a time
            states = states[:, :complete]
            if slots is None or encoder.repool_slots:
                slots = encoder._init_slots(states, layout)
            slots = slots + encoder.cross_attn[i].pool(slots, states, patch_ids)
        return slots[:, : layout.num_patches].flatten(-2)

    def _run_global(self, patch_inputs: torch.Tensor) -> torch.Tensor:
        """Global outputs of newly completed patches, as decoder slots (1, P, S, local_dim)."""
        global_model, decoder = self.model.global_model, self.model.decoder
        count = patch_inputs.shape[1]
        positions = torch.arange(self.num_patches, self.num_patches + count, device=self.device)
        rope = rotary_table(positions, global_model.head_dim, global_model.rope_theta)
        self.num_patches += count
        h = global_model.in_proj(patch_inputs) if global_model.in_proj is not None else patch_inputs
        for layer, cache in zip(global_model.layers.values(), self.global_caches):
            h = layer(h, rope, cache)
        h = global_model.norm(h) if global_model.norm is not None else h
        return decoder.slot_proj(h).unflatten(-1, (decoder.slots, decoder.dim))

    def _decode(self, byte_states: torch.Tensor, slots: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        decoder, first = self.model.decoder, len(self.tokens) - byte_states.shape[1]
        head_dim = decoder.dim // decoder.layers[0].attn.heads
        rope = rotary_table(torch.arange(first, len(self.tokens), device=self.device), head_dim, decoder.rope_theta)
        h = byte_states
        for i, (layer, cache) in enumerate(zip(decoder.layers, self.decoder_caches)):
            if decoder.all_layers_cross or i == 0:
                h = h + decoder.cross_attn[i].unpool(h, slots, source)
            h = layer(h, rope, cache)
        return decoder.output(decoder.norm(h)).float()
