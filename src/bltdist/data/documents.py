"""Documents as arrays, the one form the loader reads, whether they come from raw files or a prepared directory.

A ``DocumentTable`` is byte shards (uint8 arrays: memory maps for a prepared directory, one
in-memory array for raw files) and per-document arrays: where each document starts in the shards
laid end to end, its length, and the crc32 of its key, which decides the held-out split. A
``DocumentSet`` is a selection of a table's documents (the train or the held-out split): a sequence
of ``bytes`` for code that wants whole documents (the entropy model), and token spans for the
loader, read straight from the shards without a copy of the corpus.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from bltdist.patching.tokens import BOS_ID, BYTE_OFFSET, EOS_ID

SPLIT_BUCKETS = 10_000
DIGEST_BYTES = 16  # blake2b-128, the digest bltdist.patching.store files precomputed entropies under


def document_digest(document: bytes | np.ndarray) -> bytes:
    return hashlib.blake2b(document, digest_size=DIGEST_BYTES).digest()


def key_checksum(key: str) -> int:
    return zlib.crc32(key.encode())


class DocumentTable:
    """Every document of one data source, by row."""

    def __init__(
        self,
        shards: list[np.ndarray],
        starts: np.ndarray,
        lengths: np.ndarray,
        key_crc32: np.ndarray,
        stored_digests: Callable[[np.ndarray], np.ndarray] | None = None,
        fingerprint: str | None = None,
        shard_documents: Sequence[int] | None = None,
    ):
        self.shards = shards
        self.shard_starts = np.concatenate([[0], np.cumsum([len(shard) for shard in shards], dtype=np.int64)])
        # First row of each shard: shard s holds rows [shard_rows[s], shard_rows[s + 1]).
        self.shard_rows = np.concatenate([[0], np.cumsum(shard_documents or [len(lengths)], dtype=np.int64)])
        self.starts, self.lengths, self.key_crc32 = starts, lengths, key_crc32
        self.stored_digests = stored_digests  # rows -> (rows, 16) digests, when the source stores them
        self.fingerprint = fingerprint  # names the exact content, when the source knows it without reading it

    @classmethod
    def from_documents(cls, documents: list[tuple[str, bytes]]) -> DocumentTable:
        """An in-memory table of (key, bytes) documents: raw files read the same way as prepared data."""
        lengths = np.array([len(data) for _, data in documents], dtype=np.int64)
        data = np.frombuffer(b"".join(data for _, data in documents), dtype=np.uint8)
        crc = np.array([key_checksum(key) for key, _ in documents], dtype=np.uint32)
        return cls([data], np.cumsum(lengths) - lengths, lengths, crc)

    def __len__(self) -> int:
        return len(self.lengths)

    def byte_range(self, start: int, length: int) -> np.ndarray:
        """Bytes [start, start + length) of the shards laid end to end; a document never crosses shards."""
        shard = int(self.shard_starts.searchsorted(start, side="right")) - 1 if len(self.shards) > 1 else 0
        local = start - int(self.shard_starts[shard])
        return self.shards[shard][local : local + length]

    def split(self, val_fraction: float) -> tuple[DocumentSet, DocumentSet]:
        """(train, held-out) by a fixed rule on each key: held out when crc32(key) % 10000 < val_fraction * 10000.

        Both splits are made non-empty: with two or more documents, the last one moves to an empty
        held-out split, the first one to an empty train split; a single document is cut in two, its
        last ``val_fraction`` share of bytes (at least one byte when it has any) held out.
        """
        if len(self) == 0:
            raise ValueError("no documents to split")
        if len(self) == 1:
            length = int(self.lengths[0])
            val_bytes = min(length, max(1, round(length * val_fraction)))
            rows, start = np.zeros(1, dtype=np.int64), int(self.starts[0])
            return (DocumentSet(self, rows, self.starts[:1], self.lengths[:1] - val_bytes),
                    DocumentSet(self, rows, np.array([start + length - val_bytes]), np.array([val_bytes])))  # fmt: skip
        held_out = self.key_crc32 % SPLIT_BUCKETS < val_fraction * SPLIT_BUCKETS
        if not held_out.any():
            held_out[-1] = True
        if held_out.all():
            held_out[0] = False
        return self.select(np.flatnonzero(~held_out)), self.select(np.flatnonzero(held_out))

    def select(self, rows: np.ndarray) -> DocumentSet:
        return DocumentSet(self, rows, self.starts[rows], self.lengths[rows])


class DocumentSet(Sequence[bytes]):
    """Some documents of a table, in row order; ``documents[i]`` is the bytes of the i-th."""

    def __init__(self, table: DocumentTable, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.table, self.rows = table, rows
        self.starts, self.lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)

    @classmethod
    def of(cls, documents: Sequence[bytes]) -> DocumentSet:
        """A DocumentSet of plain bytes documents (keys do not matter once split)."""
        if isinstance(documents, DocumentSet):
            return documents
        table = DocumentTable.from_documents([(str(index), data) for index, data in enumerate(documents)])
        return table.select(np.arange(len(table)))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self.table.byte_range(int(self.starts[index]), int(self.lengths[index])).tobytes()

    def __repr__(self) -> str:
        return f"DocumentSet({len(self)} documents, {int(self.lengths.sum())} bytes)"

    @property
    def token_lengths(self) -> np.ndarray:
        """Tokens of each document: [BOS] + bytes + [EOS]."""
        return self.lengths + 2

    def write_tokens(self, pieces: list[tuple[int, int, int]], out: np.ndarray) -> None:
        """Tokens [lo, hi) of each (document, lo, hi) piece, a document as [BOS] + bytes + [EOS], one
        after another into ``out`` (any integer dtype, as long as the pieces together), read from the
        shards. The loader's inner loop: plain slices and in-place adds, the cheapest numpy calls."""
        position = 0
        for index, lo, hi in pieces:
            length = int(self.lengths[index])
            body_start, body_stop = max(lo, 1), min(hi, length + 1)  # token positions holding bytes
            if body_stop > body_start:
                body = out[position + body_start - lo : position + body_stop - lo]
                body[:] = self.table.byte_range(int(self.starts[index]) + body_start - 1, body_stop - body_start)
                body += BYTE_OFFSET
            if lo == 0:
                out[position] = BOS_ID
            position += hi - lo
            if hi == length + 2:
                out[position - 1] = EOS_ID

    def digests(self) -> np.ndarray:
        """(documents, 16) uint8 blake2b-128 digests: stored ones where the source has them, so nothing is hashed."""
        whole = self.lengths == self.table.lengths[self.rows]  # a cut single document has its own digest
        if self.table.stored_digests is not None and whole.all():
            return np.asarray(self.table.stored_digests(self.rows))
        hashed = b"".join(document_digest(self[index]) for index in range(len(self)))
        return np.frombuffer(hashed, dtype=np.uint8).reshape(len(self), DIGEST_BYTES)
