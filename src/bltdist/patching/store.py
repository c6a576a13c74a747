"""Precomputed entropies on disk: written by ``python -m bltdist.patch precompute``, read by the trainer.

Layout of an output directory (format 2)::

    manifest.json              the plan: entropy model fingerprint, context, documents, the prepared
                               dataset the shards are aligned with (or null), shards
    shard-00000.safetensors    entropies (float32, every token of its documents, concatenated),
    shard-00001.safetensors    offsets (int64, documents + 1) and digests (uint8, documents x 16)
    ...

A document's entropies depend on its bytes only (see ``bltdist.patching.entropy``), so the trainer
may look for its train and held-out documents in two ways:

- **aligned**, when ``--data`` is a prepared directory (``python -m bltdist.data prepare``): entropy
  shard i holds the documents of the i-th non-empty prepared shard, in order. A run reading that
  prepared directory finds a document's entropies from its row and byte offset alone (token offset
  = byte offset in its shard + 2 per earlier document of the shard): nothing is loaded per
  document, and entropies are read from the memory-mapped shard files (safetensors maps them), so
  this works for any size of corpus;
- **by digest** otherwise (raw files, several sources): by the blake2b-128 digest of the document's
  bytes, in a sorted array of every stored digest (24 bytes of memory per stored document), so the
  split, order and spelling of the data path do not matter.

Shards are written to a temporary name, fsynced and renamed, so after a kill every shard file
present is complete; a rerun of the same command skips them and writes the rest. Nothing in a
shard depends on when or by which worker it was written, so an interrupted and resumed run ends
with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bltdist.atomic import atomic_file
from bltdist.data.documents import (
    DIGEST_BYTES,
    DocumentSet,
    DocumentTable,
    document_digest,
)
from bltdist.data.loader import ChainedDocuments
from bltdist.data.prepared import open_prepared, run_tasks, start_resumable_output
from bltdist.errors import UserError
from bltdist.patching.entropy import EntropyModel

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"

# Where a document's entropies are: a prepared directory and a row range of it, or the documents themselves.
Documents = list[bytes] | tuple[str, int, int]


class EntropyStoreError(UserError):
    """A precomputed-entropies directory that is missing, incomplete or made for another model."""


def plan_shards(documents: list[bytes], shard_tokens: int) -> list[tuple[int, int]]:
    """[first, end) document ranges of consecutive documents holding about ``shard_tokens`` tokens each."""
    shards, first, tokens = [], 0, 0
    for index, document in enumerate(documents):
        if tokens and tokens + len(document) + 2 > shard_tokens:
            shards.append((first, index))
            first, tokens = index, 0
        tokens += len(document) + 2
    shards.append((first, len(documents)))
    return shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def build_manifest(model: EntropyModel, documents: Sequence[bytes] | DocumentTable, shard_tokens: int) -> dict:
    """The plan of a precompute run: documents in memory cut every ``shard_tokens`` tokens, or a
    prepared table shard by shard."""
    manifest = {"format": FORMAT_VERSION, "entropy_model_fingerprint": model.fingerprint, "context": model.context}
    if isinstance(documents, DocumentTable):
        ranges = list(zip(documents.shard_rows[:-1].tolist(), documents.shard_rows[1:].tolist()))
        token_lengths, content = documents.lengths + 2, {"prepared": documents.fingerprint, "documents_sha256": None}
    else:
        ranges = plan_shards(list(documents), shard_tokens)
        token_lengths = np.array([len(d) + 2 for d in documents], dtype=np.int64)
        all_digests = hashlib.sha256(b"".join(document_digest(d) for d in documents)).hexdigest()
        content = {"prepared": None, "documents_sha256": all_digests}
    return {**manifest, "documents": len(token_lengths), "tokens": int(token_lengths.sum()), **content,
            "shards": [{"file": shard_name(index), "first_document": first, "documents": end - first,
                        "tokens": int(token_lengths[first:end].sum())}
                       for index, (first, end) in enumerate(ranges)]}  # fmt: skip


def precompute(
    model_dir: str,
    documents: Sequence[bytes] | str,
    out: str,
    shard_tokens: int,
    workers: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Write (or finish writing) the entropies of ``documents`` (bytes, or the path of a prepared
    directory: shards aligned with its own) to ``out``; returns a summary."""
    model = EntropyModel(model_dir)
    out_dir = Path(out)
    table = open_prepared(documents) if isinstance(documents, str) else None
    manifest = build_manifest(model, table if table is not None else documents, shard_tokens)
    start_resumable_output(
        out_dir / MANIFEST_FILE, manifest,
        EntropyStoreError(f"--out: {out_dir} holds entropies of another entropy model, data or --shard-tokens; "
                          "give another --out directory or delete this one"),
    )  # fmt: skip
    shards = manifest["shards"]
    pending = [index for index, shard in enumerate(shards) if not (out_dir / shard["file"]).exists()]
    log(f"precompute: {len(shards) - len(pending)} of {len(shards)} shard(s) already written, {len(pending)} to go")

    def shard_documents(shard: dict) -> Documents:
        first, end = shard["first_document"], shard["first_document"] + shard["documents"]
        return (documents, first, end) if table is not None else list(documents[first:end])

    tasks = [(str(model.directory), str(out_dir), index, shard_documents(shards[index])) for index in pending]
    run_tasks(_write_shard, tasks, workers, log, initializer=_init_worker)
    return {
        "out": str(out_dir),
        "shards": len(shards),
        "written": len(pending),
        "documents": manifest["documents"],
        "tokens": manifest["tokens"],
    }


def _init_worker() -> None:
    # Workers share the machine's cores among themselves: one thread each.
    torch.set_num_threads(1)


_worker_models: dict[str, EntropyModel] = {}


def _write_shard(task: tuple[str, str, int, Documents]) -> str:
    model_dir, out_dir, index, documents = task
    if model_dir not in _worker_models:
        _worker_models[model_dir] = EntropyModel(model_dir)
    model = _worker_models[model_dir]
    if isinstance(documents, tuple):  # rows of a prepared directory, read from its memory map here
        prepared, first, end = documents
        documents = open_prepared(prepared).select(np.arange(first, end))
    documents = DocumentSet.of(documents)
    lengths = documents.token_lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    entropies = np.empty(int(offsets[-1]), dtype=np.float32)  # filled in place: a shard's entropies are held once
    for row in range(len(documents)):
        entropies[offsets[row] : offsets[row + 1]] = model.document_entropies(documents[row])
    tensors = {
        "entropies": torch.from_numpy(entropies),
        "offsets": torch.from_numpy(offsets),
        "digests": torch.from_numpy(np.array(documents.digests(), dtype=np.uint8)),  # stored ones for prepared data
    }
    final = Path(out_dir) / shard_name(index)
    with atomic_file(final) as staging:
        save_file(tensors, staging, metadata={"entropy_model_fingerprint": model.fingerprint})
    return f"precompute: wrote {final.name} ({len(documents)} documents, {int(lengths.sum())} tokens)"


def _read_manifest(path: Path, key: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EntropyStoreError(f"{key}: {path} cannot be read as a manifest ({error}); rerun precompute") from error


class PrecomputedEntropies:
    """A finished precompute directory, checked against the entropy model the run is configured with."""

    def __init__(self, directory: str, model: EntropyModel, key: str = "--entropies"):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise EntropyStoreError(
                f"{key}: {self.directory} holds no {MANIFEST_FILE}; create it with "
                "python -m bltdist.patch precompute --entropy-model DIR --data PATH --out DIR"
            )
        manifest = _read_manifest(manifest_path, key)
        if manifest.get("format") != FORMAT_VERSION:
            raise EntropyStoreError(f"{key}: {manifest_path} has format {manifest.get('format')}, expected {FORMAT_VERSION}")
        if manifest["entropy_model_fingerprint"] != model.fingerprint:
            raise EntropyStoreError(
                f"{key}: {self.directory} was computed with another entropy model than {model.directory}; "
                "rerun precompute with this model, or point patching.entropy_model at the model it was made with"
            )
        missing = [shard["file"] for shard in manifest["shards"] if not (self.directory / shard["file"]).is_file()]
        if missing:
            raise EntropyStoreError(
                f"{key}: {self.directory} is incomplete ({len(missing)} of {len(manifest['shards'])} shards missing, "
                f"e.g. {missing[0]}); rerun the same precompute command to finish it"
            )
        # safe_open maps each file: entropies are read from the pages a span touches, nothing is loaded here.
        self._handles = [safe_open(self.directory / shard["file"], framework="pt") for shard in manifest["shards"]]
        self.manifest, self._key = manifest, key
        self._digest_index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def source(self, documents: Sequence[bytes]) -> PrecomputedSource:
        """EntropySource over ``documents``; EntropyStoreError when some were not precomputed."""
        if not isinstance(documents, (DocumentSet, ChainedDocuments)):
            documents = DocumentSet.of(documents)
        if self._aligned_with(documents):
            return PrecomputedSource(self._handles, AlignedLocations(documents))
        # A prepared corpus stores its documents' digests: nothing is read or hashed here.
        wanted = _digest_keys(documents.digests())
        keys, order, shard_of, offset_of = self._digests()
        found = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        absent = int((keys[found] != wanted).sum())
        if absent:
            raise EntropyStoreError(
                f"{self._key}: {absent} of {len(documents)} documents of the run's data are not in {self.directory}; "
                "run precompute on the same data.path as the training run"
            )
        stored = order[found]
        return PrecomputedSource(self._handles, np.stack([shard_of[stored], offset_of[stored]], axis=1))

    def _aligned_with(self, documents: Sequence[bytes]) -> bool:
        """True when ``documents`` are whole documents of the prepared table the shards follow."""
        if not isinstance(documents, DocumentSet) or self.manifest["prepared"] is None:
            return False
        table = documents.table
        whole = np.array_equal(documents.lengths, table.lengths[documents.rows])  # not a cut single document
        return table.fingerprint == self.manifest["prepared"] and whole

    def _digests(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sorted digest keys, stored row of each, shard of each stored row, offset of each stored row)."""
        if self._digest_index is None:
            digests = [handle.get_tensor("digests").numpy() for handle in self._handles]
            offsets = [handle.get_tensor("offsets").numpy()[:-1] for handle in self._handles]
            keys = _digest_keys(np.concatenate(digests))
            order = np.argsort(keys, kind="stable")
            shard_of = np.repeat(np.arange(len(digests)), [len(d) for d in digests])
            self._digest_index = keys[order], order, shard_of, np.concatenate(offsets)
        return self._digest_index


def _digest_keys(digests: np.ndarray) -> np.ndarray:
    """(documents, 16) uint8 digests as one 16-byte string each, which numpy sorts and searches."""
    return np.ascontiguousarray(digests, dtype=np.uint8).view(f"S{DIGEST_BYTES}").ravel()


class AlignedLocations:
    """(shard, token offset) of each document of a DocumentSet of the prepared table the shards follow,
    computed from its row and byte start: entropy shard s holds the table's shard s, each document's
    [BOS] + bytes + [EOS] one after another."""

    def __init__(self, documents: DocumentSet):
        self.documents, self.table = documents, documents.table

    def __getitem__(self, index: int) -> tuple[int, int]:
        row = int(self.documents.rows[index])
        shard = int(np.searchsorted(self.table.shard_rows, row, side="right")) - 1
        byte_offset = int(self.documents.starts[index]) - int(self.table.shard_starts[shard])
        return shard, byte_offset + 2 * (row - int(self.table.shard_rows[shard]))


class PrecomputedSource:
    def __init__(self, handles: list, locations: Sequence[tuple[int, int]] | np.ndarray):
        self._handles = handles
        self._locations = locations

    def span(self, document_index: int, start: int, stop: int) -> np.ndarray:
        shard, offset = (int(value) for value in self._locations[document_index])
        return self._handles[shard].get_slice("entropies")[offset + start : offset + stop].numpy()
