"""Patch boundaries for the global model, computed on whole batches with tensor ops.

A patching is a boolean ``starts`` tensor (B, T), True where a patch begins. Every rule below
is a mask operation over the batch, so patching a long packed batch costs a few kernel calls.

Document boundaries: patches never cross a document boundary. Each BOS token is a patch of its
own and the byte after it always starts a new patch; since every document begins with BOS, no
patch can hold bytes of two documents. This matters because the decoder feeds the bytes of patch
j+1 from the global output of patch j: with that lag kept inside a document, no byte is ever
predicted from another document's patch. Sequence position 0 counts as BOS-like (the start of a
packed sequence may be the middle of a document): positions 0 and 1 always start patches, which
is also what the Hugging Face BLT port does.
"""

import torch
import torch.nn.functional as F

from bltdist.patching.tokens import BOS_ID, BYTE_OFFSET, document_ids

PATCH_MODES = ("static", "space", "entropy")
THRESHOLD_MODES = ("global", "monotonic")
# Bucket sizes for patch counts (significant bits kept): compiled blocks recompile the whole model for
# every count, so few buckets (at most 25% padding); eager FlexAttention recompiles only its kernels
# (about a second each), so finer ones (at most 6.25% padding, 16 sizes per doubling).
COMPILED_BUCKET_BITS = 3
FLEX_BUCKET_BITS = 5


def patch_starts(
    tokens: torch.Tensor,
    mode: str,
    *,
    patch_size: int = 4,
    entropies: torch.Tensor | None = None,
    threshold: float | None = None,
    threshold_mode: str = "global",
    max_patch_length: int | None = None,
) -> torch.Tensor:
    """Boolean (B, T) mask of patch starts for token ids ``tokens`` (B, T).

    Modes:
      - ``static``: a patch every ``patch_size`` bytes, counted from the byte after the last BOS
        (or after position 0 for a sequence that starts inside a document).
      - ``space``: the BLT reference's space patching (SpaceByte's rule). A byte is space-like
        unless it is an ASCII letter or digit or a UTF-8 continuation byte (0x80-0xBF); special
        tokens are space-like. A patch ends at the first space-like byte of each run of space-like
        bytes and after every special token, so ``hello world`` gives ``hello `` and ``world``.
      - ``entropy``: ``entropies`` (B, T) holds H(t), the entropy of the prediction of byte t+1.
        ``threshold_mode="global"``: byte t+1 starts a patch when H(t) > threshold;
        ``"monotonic"``: when H(t) - H(t-1) > threshold. Both rules apply per document, as the BLT
        reference (``find_entropy_patch_start_ids``, run on each document) does: for a BOS-like
        position b, H(b) is never used (b+1 starts anyway), so in monotonic mode, which has no rise
        to compare for H(b+1), position b+2 always starts a patch, and no rise is compared across
        a document boundary. A packed row thus gets exactly the patches of its documents patched
        one by one. The Hugging Face port has the global rule only.

    Then, in every mode: positions 0 and 1 start patches, every BOS is a patch of its own, and
    with ``max_patch_length`` longer patches are cut into pieces of that length (the last piece
    of each patch shorter).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
    if mode == "static":
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        starts = _static_starts(tokens, patch_size)
    elif mode == "space":
        starts = _space_starts(tokens)
    elif mode == "entropy":
        starts = _entropy_starts(tokens, entropies, threshold, threshold_mode)
    else:
        raise ValueError(f"unknown patching mode {mode!r}; expected one of {', '.join(PATCH_MODES)}")
    starts |= _document_starts(tokens)
    if max_patch_length is not None:
        if max_patch_length < 1:
            raise ValueError(f"max_patch_length must be >= 1, got {max_patch_length}")
        starts = _split_long_patches(starts, max_patch_length)
    return starts


def patch_lengths(starts: torch.Tensor) -> torch.Tensor:
    """Patch lengths (B, P) from a starts mask, right-padded with 0 to the batch's largest count."""
    batch, seq_len = starts.shape
    if seq_len == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=starts.device)
    if not bool(starts[:, 0].all()):
        raise ValueError("every row of starts must begin a patch at position 0")
    ids = patch_ids(starts)
    num_patches = int(ids[:, -1].max()) + 1
    lengths = torch.zeros(batch, num_patches, dtype=torch.long, device=starts.device)
    return lengths.scatter_add_(1, ids, torch.ones_like(ids))


def pad_patch_lengths(lengths: torch.Tensor, multiple: int, bucket_bits: int | None = None) -> torch.Tensor:
    """Right-pads (B, P) patch lengths with zero-length patches to a multiple of ``multiple``, or
    with ``bucket_bits`` to ``patch_count_bucket(P, multiple, bucket_bits)``.

    Zero-length patches hold no bytes: they pool nothing, no byte reads them in the decoder, and
    they form a document of their own in the global model, so real patches never see them. Parallel
    layouts pad so that patches split evenly (tp, 2 x cp) and pipeline shapes repeat (buckets)."""
    count = lengths.shape[1]
    missing = patch_count_bucket(count, multiple, bucket_bits) - count
    return F.pad(lengths, (0, missing)) if missing else lengths


def super_patch_lengths(tokens: torch.Tensor, lengths: torch.Tensor, entropies: torch.Tensor, threshold: float,
                        max_patches: int | None = None) -> torch.Tensor:  # fmt: skip
    """Patches per super-patch (B, Ps) for ``model.blt.super_patch.mode: entropy``, right-padded with 0; each row
    sums to its number of real (non-zero-length) patches of ``lengths`` (B, P).

    A super-patch closes after the patch at which the summed entropies H(t) of its bytes pass
    ``threshold`` (H(t) as in ``patch_starts``: about byte t+1, from bytes <= t), or at ``max_patches``
    patches. Whether patch q+1 opens a new super-patch thus depends on bytes up to patch q's end
    only, as entropy patch boundaries do one level down. Every document's first patch (its BOS, or the
    row's first byte) is a super-patch of its own and the patch after it opens the next, so no
    super-patch crosses a document and the model's one-step lag never reads another document.
    Computed on the CPU from the batch alone (float64 sums), so every rank holding the batch gets
    the same grouping."""
    lengths = lengths.detach().cpu().long()
    seq_len = tokens.shape[1]
    ends = lengths.cumsum(dim=1)
    first_bytes = (ends - lengths).clamp_max(seq_len - 1)
    patch_docs = document_ids(tokens.detach().cpu()).gather(1, first_bytes)
    cumulative = F.pad(entropies.detach().cpu().double().cumsum(dim=1), (1, 0))
    patch_sums = cumulative.gather(1, ends) - cumulative.gather(1, ends - lengths)
    rows = [
        _group_patches(docs[:count], sums[:count], threshold, max_patches)
        for docs, sums, count in zip(patch_docs.tolist(), patch_sums.tolist(), (lengths > 0).sum(dim=1).tolist())
    ]
    grouped = torch.zeros(len(rows), max(map(len, rows), default=0), dtype=torch.long)
    for row, sizes in enumerate(rows):
        grouped[row, : len(sizes)] = torch.tensor(sizes, dtype=torch.long)
    return grouped.to(tokens.device)



def entropy_super_patch_lengths(super_patch, tokens: torch.Tensor, lengths: torch.Tensor,
                                entropies: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
    """``BLT.forward``'s ``super_patch_lengths`` under ``super_patch`` (a model.blt.super_patch section, or None):
    the grouping by summed entropy in mode entropy, else None (the model groups static super-patches itself)."""
    if super_patch is None or not super_patch.enabled or super_patch.mode != "entropy":
        return None
    return super_patch_lengths(tokens, lengths, entropies, super_patch.entropy_threshold,
                               super_patch.max_patches_per_super_patch)  # fmt: skip


def _group_patches(docs: list[int], sums: list[float], threshold: float, max_patches: int | None) -> list[int]:
    """Super-patch sizes of one row's patches, by their documents and summed entropies (a sequential
    scan: whether a super-patch closes depends on the running sum since it opened)."""
    sizes: list[int] = []
    total, closed = 0.0, True
    for q, (doc, patch_sum) in enumerate(zip(docs, sums)):
        document_start = q == 0 or doc != docs[q - 1]
        if closed or document_start:
            sizes.append(0)
            total = 0.0
        sizes[-1] += 1
        total += patch_sum
        closed = document_start or total > threshold or sizes[-1] == max_patches
    return sizes


def patch_count_bucket(count: int, multiple: int = 1, significant_bits: int | None = COMPILED_BUCKET_BITS) -> int:
    """``count`` rounded up to ``significant_bits`` significant bits (three: ..., 96, 112, 128, 160,
    192, 224, 256, ...), then to a multiple of ``multiple``: at most 2 ** (1 - bits) padding (25% at
    three bits) and 2 ** (bits - 1) sizes per doubling. Compiled graphs are specialised to the patch
    count, so these buckets bound how many a run compiles whatever its patch counts. None: only the
    multiple (no bucketing)."""
    if significant_bits is None:
        return -(-count // multiple) * multiple
    granularity = 1 << max(0, count.bit_length() - significant_bits)
    rounded = -(-count // granularity) * granularity
    return -(-rounded // multiple) * multiple


def patch_ids(starts: torch.Tensor) -> torch.Tensor:
    """Index (B, T) of the patch each position belongs to."""
    return torch.cumsum(starts.long(), dim=1) - 1


def _bos_like(tokens: torch.Tensor) -> torch.Tensor:
    bos_like = tokens == BOS_ID
    bos_like[:, :1] = True
    return bos_like


def _last_index_where(mask: torch.Tensor) -> torch.Tensor:
    """For each position, the latest position at or before it where ``mask`` holds (mask[:, 0] must hold)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.cummax(torch.where(mask, positions, 0), dim=1).values


def _static_starts(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    offset_after_bos = positions - _last_index_where(_bos_like(tokens)) - 1
    return offset_after_bos % patch_size == 0


def _space_starts(tokens: torch.Tensor) -> torch.Tensor:
    byte = tokens - BYTE_OFFSET
    word_byte = (
        ((byte >= ord("0")) & (byte <= ord("9")))
        | ((byte >= ord("A")) & (byte <= ord("Z")))
        | ((byte >= ord("a")) & (byte <= ord("z")))
        | ((byte >= 0x80) & (byte < 0xC0))  # UTF-8 continuation bytes stay with their character
    )
    space_like = ~word_byte  # special tokens have byte < 0, so they are space-like too
    ends = space_like.clone()
    ends[:, 1:] &= ~space_like[:, :-1]
    ends |= tokens < BYTE_OFFSET
    starts = torch.zeros_like(ends)
    starts[:, 1:] = ends[:, :-1]
    return starts


def _entropy_starts(
    tokens: torch.Tensor, entropies: torch.Tensor | None, threshold: float | None, threshold_mode: str
) -> torch.Tensor:
    if entropies is None or threshold is None:
        raise ValueError("entropy patching needs both entropies and threshold")
    if entropies.shape != tokens.shape:
        raise ValueError(f"entropies shape {tuple(entropies.shape)} != tokens shape {tuple(tokens.shape)}")
    starts = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    # H(t) for t in 1..T-2 decides position t+1; H(T-1) is about a byte outside the sequence.
    if threshold_mode == "global":
        # Per document without masking: at a BOS-like position b, H(b) would decide b+1 and H(b-1)
        # (the previous document's last position) would decide b, both of which start anyway.
        starts[:, 2:] = entropies[:, 1:-1] > threshold
    elif threshold_mode == "monotonic":
        # Per document: b+2 always starts and the first rise compared is H(b+2) - H(b+1), for b+3;
        # a rise that reaches back to b or into the previous document is never used.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        offset_after_bos = positions - _last_index_where(_bos_like(tokens))
        starts[:, 3:] = (entropies[:, 2:-1] - entropies[:, 1:-2]) > threshold
        starts &= offset_after_bos >= 3
        starts |= offset_after_bos == 2
    else:
        raise ValueError(f"unknown threshold_mode {threshold_mode!r}; expected one of {', '.join(THRESHOLD_MODES)}")
    return starts


def _document_starts(tokens: torch.Tensor) -> torch.Tensor:
    bos_like = _bos_like(tokens)
    starts = bos_like.clone()
    starts[:, 1:] |= bos_like[:, :-1]
    return starts


def _split_long_patches(starts: torch.Tensor, max_patch_length: int) -> torch.Tensor:
    positions = torch.arange(starts.shape[1], device=starts.device)
    offset_in_patch = positions - _last_index_where(starts)
    return starts | (offset_in_patch % max_patch_length == 0)
