"""Packed fixed-length byte sequences, reproducible and independent of the parallel layout.

The token stream is endless: epoch after epoch of all documents ([BOS] + bytes + [EOS]) in an
order reshuffled per epoch from (seed, epoch). Global sequence g is stream[g*L : g*L + L + 1]
(L = seq_len), so consecutive sequences overlap by one token and every token is a target exactly
once. Sequence g belongs to data-parallel rank (g // micro_batch_size) % dp_size, which makes the
global batch [step*G, (step+1)*G) the same sequences for every layout with G sequences per step.

With an entropy source the loader also serves, for every input token, the next-byte entropy of the
entropy model. Entropies belong to documents, not to sequences (see ``bltdist.patching.entropy``): the
loader finds which documents a sequence window covers and asks the source for exactly those
spans, so a sequence that starts mid-document gets the same entropies as the whole document would.
"""

import random
from typing import Protocol

import numpy as np
import torch

from bltdist.errors import DataError
from bltdist.patching.tokens import document_tokens

STATE_VERSION = 1


class EntropySource(Protocol):
    """Next-byte entropies of the loader's documents, by document index and token span."""

    def span(self, document_index: int, start: int, stop: int) -> np.ndarray:
        """float32 entropies of tokens [start, stop) of document ``document_index`` ([BOS] + bytes + [EOS])."""


class PackedByteLoader:
    """Serves (inputs, targets), each (micro_batch_size, seq_len) int64, to one data-parallel rank."""

    def __init__(
        self,
        documents: list[bytes],
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        entropy_source: EntropySource | None = None,
    ):
        if not documents:
            raise ValueError("PackedByteLoader needs at least one document")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.entropy_source = entropy_source
        self._tokens, self._doc_bounds = _tokenise(documents)
        self._epoch_streams: dict[int, np.ndarray] = {}
        self._epoch_orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._batches_served = 0  # micro-batches served to this rank; all ranks advance in lockstep

    @property
    def num_documents(self) -> int:
        return len(self._doc_bounds) - 1

    @property
    def epoch_tokens(self) -> int:
        """Tokens per epoch, BOS and EOS included."""
        return len(self._tokens)

    @property
    def global_sequences_consumed(self) -> int:
        """Sequences served to all ranks together, assuming every rank took as many batches as this one."""
        return self._batches_served * self.micro_batch_size * self.dp_size

    @property
    def global_tokens_consumed(self) -> int:
        """Target tokens (bytes plus BOS/EOS) served to all ranks together."""
        return self.global_sequences_consumed * self.seq_len

    @property
    def epochs_consumed(self) -> float:
        """Fractional epoch reached by the global stream."""
        return self.global_tokens_consumed / self.epoch_tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro_batch_size sequences of this rank as (inputs, targets)."""
        inputs, targets, _ = self._next(with_entropies=False)
        return inputs, targets

    def next_batch_with_entropies(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, entropies): entropies (micro_batch_size, seq_len) float32, one per input token."""
        if self.entropy_source is None:
            raise ValueError("this loader has no entropy source; pass entropy_source to serve entropies")
        return self._next(with_entropies=True)

    def _next(self, with_entropies: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        first_sequence = (self._batches_served * self.dp_size + self.dp_rank) * self.micro_batch_size
        # This rank's micro-batch is a run of consecutive sequences: one window covers all of them.
        start, length = first_sequence * self.seq_len, self.micro_batch_size * self.seq_len
        window = self._stream_window(start, length + 1)
        sequences = torch.from_numpy(window).long().unfold(0, self.seq_len + 1, self.seq_len)
        entropies = None
        if with_entropies:
            values = np.concatenate([
                self.entropy_source.span(document, lo, hi) for document, lo, hi in self._window_documents(start, length)
            ])  # fmt: skip
            entropies = torch.from_numpy(values).view(self.micro_batch_size, self.seq_len)
        self._batches_served += 1
        return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous(), entropies

    def state_dict(self) -> dict:
        """Small, JSON-serialisable and the same on every rank when ranks are in lockstep."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_documents": self.num_documents,
            "epoch_tokens": self.epoch_tokens,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "global_sequences_consumed": self.global_sequences_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` left off; the micro-batch size and dp layout may differ from the saved
        ones as long as the sequences consumed fill whole micro-batches of every rank."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        mismatches = [
            f"{name} {state[name]} (now {current})"
            for name, current in (
                ("seed", self.seed),
                ("seq_len", self.seq_len),
                ("shuffle", self.shuffle),
                ("num_documents", self.num_documents),
                ("epoch_tokens", self.epoch_tokens),
            )
            if state[name] != current
        ]
        if mismatches:
            raise DataError(
                "cannot resume the data stream: the checkpoint was saved with "
                + ", ".join(mismatches)
                + "; resume with the same train.seed, train.seq_len and data as the checkpoint"
            )
        consumed = state["global_sequences_consumed"]
        per_round = self.micro_batch_size * self.dp_size
        if consumed % per_round:
            raise DataError(
                f"cannot resume the data stream: {consumed} sequences consumed is not a multiple of "
                f"micro_batch_size x dp_size = {per_round}; keep the global batch size of the checkpoint"
            )
        self._batches_served = consumed // per_round
        self._epoch_streams.clear()
        self._epoch_orders.clear()

    def _stream_window(self, start: int, length: int) -> np.ndarray:
        """stream[start : start + length] of the endless stream, crossing epochs as needed."""
        epoch_tokens = self.epoch_tokens
        first_epoch = start // epoch_tokens
        for cache in (self._epoch_streams, self._epoch_orders):
            for stale in [e for e in cache if e < first_epoch]:
                del cache[stale]
        pieces = []
        position, end = start, start + length
        while position < end:
            epoch, offset = divmod(position, epoch_tokens)
            take = min(end - position, epoch_tokens - offset)
            pieces.append(self._epoch_stream(epoch)[offset : offset + take])
            position += take
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _window_documents(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """(document index, first token, end token) of each document piece in stream[start : start + length]."""
        pieces = []
        position, end = start, start + length
        while position < end:
            epoch, offset = divmod(position, self.epoch_tokens)
            order, order_starts = self._epoch_order(epoch)
            slot = int(np.searchsorted(order_starts, offset, side="right")) - 1
            document = int(order[slot])
            document_start = int(order_starts[slot])
            document_length = int(self._doc_bounds[document + 1] - self._doc_bounds[document])
            lo = offset - document_start
            hi = min(document_length, lo + end - position)
            pieces.append((document, lo, hi))
            position += hi - lo
        return pieces

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of ``epoch`` and where each document starts in the epoch's stream."""
        if epoch not in self._epoch_orders:
            order = np.arange(self.num_documents)
            if self.shuffle:
                shuffled = list(range(self.num_documents))
                # A string seed hashes the same on every platform and Python version.
                random.Random(f"bltdist:{self.seed}:{epoch}").shuffle(shuffled)
                order = np.asarray(shuffled, dtype=np.int64)
            lengths = np.diff(self._doc_bounds)[order]
            self._epoch_orders[epoch] = (order, np.cumsum(lengths) - lengths)
        return self._epoch_orders[epoch]

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self._tokens
        if epoch not in self._epoch_streams:
            order, _ = self._epoch_order(epoch)
            bounds = self._doc_bounds
            self._epoch_streams[epoch] = np.concatenate([self._tokens[bounds[i] : bounds[i + 1]] for i in order])
        return self._epoch_streams[epoch]


def _tokenise(documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one int16 token array in the given order, and each document's [start, end)."""
    bounds = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(d) + 2 for d in documents], out=bounds[1:])
    return np.concatenate([document_tokens(d) for d in documents]), bounds
