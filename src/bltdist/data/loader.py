"""Packed fixed-length byte sequences from one or more weighted sources, reproducible and independent of the layout.

Each source is an endless token stream: epoch after epoch of all its documents ([BOS] + bytes +
[EOS]) in an order permuted per epoch from (seed, source, epoch). Its m-th sequence is
stream[m*L : m*L + L + 1] (L = seq_len), so consecutive sequences overlap by one token and every
token is a target exactly once. Global sequence g comes from the source a fixed schedule gives it
(``SourceSchedule``; one source: sequence g of that source), and belongs to data-parallel rank
(g // micro_batch_size) % dp_size, which makes the global batch [step*G, (step+1)*G) the same
sequences for every layout with G sequences per step.

Documents are read from their shards (memory maps for prepared data) through an index permutation:
the loader holds a few integers per document, never a copy of the corpus.

With an entropy source the loader also serves, for every input token, the next-byte entropy of the
entropy model. Entropies belong to documents, not to sequences (see ``bltdist.patching.entropy``): the
loader finds which documents a sequence window covers and asks the source for exactly those
spans, so a sequence that starts mid-document gets the same entropies as the whole document would.
Document indexes count through the sources in order (``PackedByteLoader.documents``).

With ``prefetch`` > 0 the next batches (tokens, entropies and, with ``patch_lengths``, patch
lengths) are prepared on a background thread while the training step runs. Batch k is a function
of k alone, so the thread computes batches ahead while the loader counts only those handed out:
its state is always that of the batches consumed, and a resume repeats none and skips none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from bltdist.data.documents import DocumentSet
from bltdist.errors import DataError

STATE_VERSION = 2
# (inputs, targets, entropies or None, patch lengths or None): what the loader serves for one micro-batch.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
SCHEDULE_BLOCK = 10_000  # sequences per repeat of the mixture schedule: weights are kept to 1/10000


class EntropySource(Protocol):
    """Next-byte entropies of the loader's documents, by document index and token span."""

    def span(self, document_index: int, start: int, stop: int) -> np.ndarray:
        """float32 entropies of tokens [start, stop) of document ``document_index`` ([BOS] + bytes + [EOS])."""


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One named source of a mixture; ``weight`` is its share of sequences (weights are normalised)."""

    name: str
    documents: DocumentSet
    weight: float = 1.0
    fingerprint: str | None = None  # names a prepared dataset's content, so a resume can tell it changed


class PackedStream:
    """The endless packed token stream of one source."""

    def __init__(self, documents: DocumentSet, seed: int, source_index: int, shuffle: bool):
        self.documents, self.seed, self.source_index, self.shuffle = documents, seed, source_index, shuffle
        self.token_lengths = documents.token_lengths
        self.epoch_tokens = int(self.token_lengths.sum())
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pieces(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """(document index, first token, end token) of each document piece in stream[start : start + length]."""
        if len(self._orders) > 1:  # a window may span two epochs; older ones are not read again
            for stale in [epoch for epoch in self._orders if epoch < start // self.epoch_tokens]:
                del self._orders[stale]
        pieces = []
        position, end = start, start + length
        while position < end:
            epoch, offset = divmod(position, self.epoch_tokens)
            order, order_starts = self._orders[epoch] if epoch in self._orders else self._epoch_order(epoch)
            slot = int(order_starts.searchsorted(offset, side="right")) - 1
            document = int(order[slot])
            lo = offset - int(order_starts[slot])
            hi = min(int(self.token_lengths[document]), lo + end - position)
            pieces.append((document, lo, hi))
            position += hi - lo
        return pieces

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of ``epoch`` and where each document starts in the epoch's stream."""
        if epoch not in self._orders:
            count = len(self.token_lengths)
            # PCG64 from a fixed seed sequence: the same permutation on every rank and platform.
            rng = np.random.default_rng([self.seed, self.source_index, epoch])
            order = rng.permutation(count) if self.shuffle else np.arange(count)
            lengths = self.token_lengths[order]
            self._orders[epoch] = (order, np.cumsum(lengths) - lengths)
        return self._orders[epoch]


class SourceSchedule:
    """Which source each global sequence comes from: a fixed block of ``SCHEDULE_BLOCK`` slots, repeated.

    Source s gets quota_s slots per block (its weight share, largest remainder), spread evenly
    through the block (its j-th slot at (j + 0.5) / quota_s), so every prefix of the schedule is
    within one sequence per source of its weights. Sequence g is sequence
    (g // BLOCK) * quota_s + (its rank among source s's slots) of source s: found in O(1), for
    any g, with no state beyond g.
    """

    def __init__(self, names: list[str], weights: list[float]):
        if any(not weight > 0 for weight in weights):
            bad = next(name for name, weight in zip(names, weights) if not weight > 0)
            raise DataError(f"data.sources: source {bad!r} has weight {weights[names.index(bad)]}; weights must be > 0")
        shares = np.asarray(weights, dtype=np.float64) / sum(weights) * SCHEDULE_BLOCK
        quotas = np.floor(shares).astype(np.int64)
        quotas[np.argsort(-(shares - quotas), kind="stable")[: SCHEDULE_BLOCK - int(quotas.sum())]] += 1
        if not quotas.all():
            starved = names[int(np.argmin(quotas))]
            raise DataError(f"data.sources: source {starved!r} has a weight below 1/{SCHEDULE_BLOCK} of the total; "
                            "raise it or drop the source")  # fmt: skip
        self.quotas = quotas
        positions = np.concatenate([(np.arange(quota) + 0.5) / quota for quota in quotas])
        sources = np.repeat(np.arange(len(quotas)), quotas)
        order = np.lexsort((sources, positions))  # ties go to the earlier source
        self.block_sources = sources[order]
        self.block_ranks = np.concatenate([np.arange(quota) for quota in quotas])[order]

    def locate(self, sequence: int) -> tuple[int, int]:
        """(source, that source's sequence number) of global sequence ``sequence``."""
        block, slot = divmod(sequence, SCHEDULE_BLOCK)
        source = int(self.block_sources[slot])
        return source, block * int(self.quotas[source]) + int(self.block_ranks[slot])

    def counts(self, sequences: int) -> np.ndarray:
        """Sequences each source gave to the first ``sequences`` global sequences."""
        blocks, rest = divmod(sequences, SCHEDULE_BLOCK)
        return blocks * self.quotas + np.bincount(self.block_sources[:rest], minlength=len(self.quotas))


class ChainedDocuments(Sequence[bytes]):
    """The documents of several sources as one sequence: the indexes an entropy source is asked about."""

    def __init__(self, parts: list[DocumentSet]):
        self.parts = parts
        self.bases = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.bases[-1])

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        part = int(np.searchsorted(self.bases, index, side="right")) - 1
        return self.parts[part][index - int(self.bases[part])]

    def digests(self) -> np.ndarray:
        return np.concatenate([part.digests() for part in self.parts])


class PackedByteLoader:
    """Serves (inputs, targets), each (micro_batch_size, seq_len) int64, to one data-parallel rank.

    ``documents`` is one source (bytes documents or a DocumentSet) or a list of MixtureSource.
    """

    def __init__(
        self,
        documents: Sequence[bytes] | list[MixtureSource],
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        entropy_source: EntropySource | None = None,
        prefetch: int = 0,
    ):
        sources = documents if documents and isinstance(documents[0], MixtureSource) else None
        if sources is None:
            sources = [MixtureSource("data", DocumentSet.of(documents))] if len(documents) else []
        if not sources or not all(len(source.documents) for source in sources):
            raise ValueError("PackedByteLoader needs at least one document in every source")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.seq_len, self.micro_batch_size, self.dp_rank, self.dp_size = seq_len, micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.entropy_source, self.sources = seed, shuffle, entropy_source, sources
        self.streams = [PackedStream(source.documents, seed, index, shuffle) for index, source in enumerate(sources)]
        self.schedule = SourceSchedule([source.name for source in sources], [source.weight for source in sources])
        self._document_bases = np.cumsum([0] + [len(source.documents) for source in sources])
        self._batches_served = 0  # micro-batches served to this rank; all ranks advance in lockstep
        self.prefetch, self._prefetcher = prefetch, None
        # (inputs, entropies or None) -> patch lengths (B, P), set when they depend on the batch alone:
        # computed with the batch (on the prefetch thread), served by next_training_batch.
        self.patch_lengths: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    @property
    def documents(self) -> Sequence[bytes]:
        """Every source's documents in one sequence, indexed as the entropy source is asked."""
        parts = [source.documents for source in self.sources]
        return parts[0] if len(parts) == 1 else ChainedDocuments(parts)

    @property
    def num_documents(self) -> int:
        return int(self._document_bases[-1])

    @property
    def epoch_tokens(self) -> int:
        """Tokens per epoch of all sources together, BOS and EOS included."""
        return sum(stream.epoch_tokens for stream in self.streams)

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
        """Fractional epoch reached by the global stream (of the only source; the least-read source of a mixture)."""
        return min(self.source_epochs().values())

    def source_sequences(self) -> dict[str, int]:
        """Sequences each source gave to the global stream so far."""
        counts = self.schedule.counts(self.global_sequences_consumed)
        return {source.name: int(count) for source, count in zip(self.sources, counts)}

    def source_epochs(self) -> dict[str, float]:
        """Fractional epochs of each source read by the global stream so far."""
        return {name: count * self.seq_len / stream.epoch_tokens
                for (name, count), stream in zip(self.source_sequences().items(), self.streams)}  # fmt: skip

    def consumed(self) -> dict:
        """What the global stream has read so far, per source: target bytes (BOS/EOS included) and epochs."""
        return {"source_bytes": {name: count * self.seq_len for name, count in self.source_sequences().items()},
                "epochs": self.source_epochs()}  # fmt: skip

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro_batch_size sequences of this rank as (inputs, targets)."""
        inputs, targets, _, _ = self._next(with_entropies=False)
        return inputs, targets

    def next_batch_with_entropies(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, entropies): entropies (micro_batch_size, seq_len) float32, one per input token."""
        if self.entropy_source is None:
            raise ValueError("this loader has no entropy source; pass entropy_source to serve entropies")
        return self._next(with_entropies=True)[:3]

    def next_training_batch(self) -> Batch:
        """(inputs, targets, entropies, patch lengths): entropies when the loader has an entropy source,
        patch lengths when it has ``patch_lengths``, else None."""
        return self._next(with_entropies=self.entropy_source is not None)

    def _next(self, with_entropies: bool) -> Batch:
        if not self.prefetch:
            batch = self.batch(self._batches_served, with_entropies)
        else:
            prefetcher = self._prefetcher
            if prefetcher is None or (prefetcher.next_index, prefetcher.with_entropies) != (
                self._batches_served, with_entropies
            ):  # the first batch, or the position was moved by load_state_dict
                self.close()
                make_batch = functools.partial(self.batch, with_entropies=with_entropies)
                self._prefetcher = BatchPrefetcher(make_batch, self._batches_served, self.prefetch, with_entropies)
            batch = self._prefetcher.take()
        self._batches_served += 1
        return batch

    def close(self) -> None:
        """Stop the background thread, if any (a later batch starts a new one)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def batch(self, index: int, with_entropies: bool) -> Batch:
        """This rank's ``index``-th micro-batch (inputs, targets, entropies or None, patch lengths or
        None); changes no state."""
        first_sequence = (index * self.dp_size + self.dp_rank) * self.micro_batch_size
        windows = np.empty((self.micro_batch_size, self.seq_len + 1), dtype=np.int64)
        entropies = np.empty((self.micro_batch_size, self.seq_len), dtype=np.float32) if with_entropies else None
        for row, sequence in enumerate(range(first_sequence, first_sequence + self.micro_batch_size)):
            source, number = self.schedule.locate(sequence)
            stream = self.streams[source]
            pieces = stream.pieces(number * self.seq_len, self.seq_len + 1)
            stream.documents.write_tokens(pieces, windows[row])
            if with_entropies:
                self._write_entropies(pieces, int(self._document_bases[source]), entropies[row])
        # Copied in numpy: slicing and copying a torch tensor costs several times more Python.
        inputs, targets = torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
        values = None if entropies is None else torch.from_numpy(entropies)
        lengths = None if self.patch_lengths is None else self.patch_lengths(inputs, values)
        return inputs, targets, values, lengths

    def _write_entropies(self, pieces: list[tuple[int, int, int]], document_base: int, out: np.ndarray) -> None:
        """The entropies of the input tokens (all but the last) of a window cut into ``pieces``."""
        position = 0
        for document, lo, hi in pieces:
            count = min(hi - lo, len(out) - position)
            if count <= 0:
                break
            out[position : position + count] = self.entropy_source.span(document_base + document, lo, lo + count)
            position += count

    def state_dict(self) -> dict:
        """Small, JSON-serialisable and the same on every rank when ranks are in lockstep."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "sources": [
                {
                    "name": source.name,
                    "weight": source.weight,
                    "num_documents": len(source.documents),
                    "epoch_tokens": stream.epoch_tokens,
                    "fingerprint": source.fingerprint,
                }
                for source, stream in zip(self.sources, self.streams)
            ],
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "global_sequences_consumed": self.global_sequences_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` left off; the micro-batch size and dp layout may differ from the saved
        ones as long as the sequences consumed fill whole micro-batches of every rank."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}; "
                            "this bltdist orders data differently from the one that saved it")  # fmt: skip
        mismatches = [f"{name} {state[name]} (now {current})"
                      for name, current in (("seed", self.seed), ("seq_len", self.seq_len), ("shuffle", self.shuffle))
                      if state[name] != current]  # fmt: skip
        mismatches += _source_mismatches(state["sources"], self.state_dict()["sources"])
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


class BatchPrefetcher:
    """Runs ``make_batch(first)``, ``make_batch(first + 1)``, ... on a background thread, at most
    ``depth`` batches ahead of ``take``. An exception in the thread is raised by the ``take`` that
    would have returned its batch."""

    def __init__(self, make_batch: Callable[[int], Batch], first: int, depth: int, with_entropies: bool):
        self.next_index, self.with_entropies = first, with_entropies
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_batch, first), name="bltdist-prefetch", daemon=True)
        self._thread.start()

    def _run(self, make_batch: Callable[[int], Batch], index: int) -> None:
        while not self._stop.is_set():
            try:
                item = (make_batch(index), None)
            except Exception as error:  # noqa: BLE001 (handed to the training thread, which raises it)
                item = (None, error)
            self._queue.put(item)
            if item[1] is not None:
                return
            index += 1

    def take(self) -> Batch:
        batch, error = self._queue.get()
        if error is not None:
            raise error
        self.next_index += 1
        return batch

    def close(self) -> None:
        self._stop.set()
        # Emptying the queue frees a put the thread may be blocked in; it then sees the stop and ends.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


def _source_mismatches(saved: list[dict], current: list[dict]) -> list[str]:
    """What differs between the saved and the current sources, each naming its source."""
    saved_names, current_names = [source["name"] for source in saved], [source["name"] for source in current]
    if saved_names != current_names:
        return [f"sources {saved_names} (now {current_names})"]
    return [
        f"source {was['name']!r} {key} {was[key]} (now {now[key]})"
        for was, now in zip(saved, current)
        for key in ("weight", "num_documents", "epoch_tokens", "fingerprint")
        if was[key] != now[key]
    ]
