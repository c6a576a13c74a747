"""The byte vocabulary every part of bltdist shares, and how a document becomes tokens.

Ids: 0 = BOE/padding, 1 = BOS, 2 = EOS, 3 reserved; byte b is id b + 4 (the BLT reference's
convention, so released weights read the same ids).
"""

import numpy as np
import torch

BOE_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 4


def document_tokens(document: bytes, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Tokens [start, stop) of [BOS] + document + [EOS] as int16 (stop None = the end).

    A span is cut before tokenising so that a chunk of a long document costs only its own length."""
    total = len(document) + 2
    stop = total if stop is None else min(stop, total)
    tokens = np.empty(max(stop - start, 0), dtype=np.int16)
    if len(tokens) == 0:
        return tokens
    body_start, body_stop = max(start, 1), min(stop, total - 1)  # token positions holding bytes
    tokens[body_start - start : body_stop - start] = (
        np.frombuffer(document[body_start - 1 : body_stop - 1], dtype=np.uint8).astype(np.int16) + BYTE_OFFSET
    )
    if start == 0:
        tokens[0] = BOS_ID
    if stop == total:
        tokens[-1] = EOS_ID
    return tokens


def document_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Document index (B, T) of each position: the number of BOS tokens at or before it, so a
    sequence that starts inside a document gives that partial document id 0."""
    return torch.cumsum((tokens == BOS_ID).long(), dim=1)
