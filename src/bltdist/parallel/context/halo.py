"""The local layers' sliding-window attention when the window's first keys live on other cp ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bltdist.model.attention import SelfAttentionMask
from bltdist.parallel.context.comms import AllGatherChunkTails

BEFORE_START_DOC = -2  # halo positions before the sequence starts
QUERY_BLOCK = 128


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

    def prepare(self, hidden: torch.Tensor, head_dim: int) -> None:
        pass  # attend builds its small per-block masks as it goes, with no cache to fill

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key_values = torch.cat([k, v], dim=-1)
        tails = gather_rows(key_values, self.tail_index).unflatten(1, (2, self.halo)).transpose(0, 1)
        all_tails = AllGatherChunkTails.apply(tails, self.group)  # (2cp, B, halo, Hkv, 2D)
        halos = gather_rows(all_tails.transpose(0, 1).flatten(1, 2), self.halo_index).unflatten(1, (2, self.halo))
        outputs = []
        for own, mask in enumerate(self.chunk_masks):
            rows = slice(own * self.width, (own + 1) * self.width)
            chunk_k, chunk_v = torch.cat([halos[:, own], key_values[:, rows]], dim=1).chunk(2, dim=-1)
            outputs.append(_windowed_attention(q[:, rows], chunk_k, chunk_v, mask, self.halo))
        return torch.cat(outputs, dim=1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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


def halo_plan(chunk_starts, chunk_ends, own_chunks, width: int, halo: int, doc_ids: torch.Tensor):
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
