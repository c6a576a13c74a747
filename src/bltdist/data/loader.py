"""Packed fixed-length byte sequences, reproducible and independent of the parallel layout.

The token stream is endless: epoch after epoch of all documents ([BOS] + bytes + [EOS]) in an
order reshuffled per epoch from (seed, epoch). Global sequence g is stream[g*L : g*L + L + 1]
(L = seq_len), so consecutive sequences overlap by one token and every token is a target exactly
once. Sequence g belongs to data-parallel rank (g // micro_batch_size) % dp_size, which makes the
global batch [step*G, (step+1)*G) the same sequences for every layout with G sequences per step.
"""

import random

import numpy as np
import torch

from bltdist.errors import DataError
from bltdist.patching import BOS_ID, BYTE_OFFSET, EOS_ID

STATE_VERSION = 1


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
        self._tokens, self._doc_bounds = _tokenise(documents)
        self._epoch_streams: dict[int, np.ndarray] = {}
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
        first_sequence = (self._batches_served * self.dp_size + self.dp_rank) * self.micro_batch_size
        # This rank's micro-batch is a run of consecutive sequences: one window covers all of them.
        window = self._stream_window(first_sequence * self.seq_len, self.micro_batch_size * self.seq_len + 1)
        sequences = torch.from_numpy(window).long().unfold(0, self.seq_len + 1, self.seq_len)
        self._batches_served += 1
        return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()

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

    def _stream_window(self, start: int, length: int) -> np.ndarray:
        """stream[start : start + length] of the endless stream, crossing epochs as needed."""
        epoch_tokens = self.epoch_tokens
        first_epoch = start // epoch_tokens
        for stale in [e for e in self._epoch_streams if e < first_epoch]:
            del self._epoch_streams[stale]
        pieces = []
        position, end = start, start + length
        while position < end:
            epoch, offset = divmod(position, epoch_tokens)
            take = min(end - position, epoch_tokens - offset)
            pieces.append(self._epoch_stream(epoch)[offset : offset + take])
            position += take
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self._tokens
        if epoch not in self._epoch_streams:
            order = list(range(self.num_documents))
            # A string seed hashes the same on every platform and Python version.
            random.Random(f"bltdist:{self.seed}:{epoch}").shuffle(order)
            bounds = self._doc_bounds
            self._epoch_streams[epoch] = np.concatenate([self._tokens[bounds[i] : bounds[i + 1]] for i in order])
        return self._epoch_streams[epoch]


def _tokenise(documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one int16 token array in the given order, and each document's [start, end)."""
    byte_lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    token_lengths = byte_lengths + 2
    bounds = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(token_lengths, out=bounds[1:])
    tokens = np.empty(int(bounds[-1]), dtype=np.int16)
    is_byte = np.ones(len(tokens), dtype=bool)
    is_byte[bounds[:-1]] = False
    is_byte[bounds[1:] - 1] = False
    tokens[is_byte] = np.frombuffer(b"".join(documents), dtype=np.uint8).astype(np.int16) + BYTE_OFFSET
    tokens[bounds[:-1]] = BOS_ID
    tokens[bounds[1:] - 1] = EOS_ID
    return tokens, bounds
