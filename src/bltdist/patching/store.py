"""Precomputed entropies on disk: written by ``python -m bltdist.patch precompute``, read by the trainer.

Layout of an output directory::

    manifest.json              the plan: entropy model fingerprint, context, documents, shards
    shard-00000.safetensors    entropies (float32, every token of its documents, concatenated),
    shard-00001.safetensors    offsets (int64, documents + 1) and digests (uint8, documents x 16)
    ...

Documents are stored under the blake2b-128 digest of their bytes, because a document's entropies
depend on its bytes only (see ``bltdist.patching.entropy``): the trainer finds its train and held-out
documents whatever the split, order or spelling of the data path. Shards are written to a temporary
name, fsynced and renamed, so after a kill every shard file present is complete; a rerun of the same
command skips them and writes the rest. Nothing in a shard depends on when or by which worker it was
written, so an interrupted and resumed run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bltdist.atomic import atomic_file, atomic_write
from bltdist.data.documents import DIGEST_BYTES, DocumentSet, document_digest
from bltdist.errors import UserError
from bltdist.patching.entropy import EntropyModel

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


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


def build_manifest(model: EntropyModel, documents: list[bytes], shard_tokens: int) -> dict:
    all_digests = hashlib.sha256(b"".join(document_digest(d) for d in documents)).hexdigest()
    return {
        "format": FORMAT_VERSION,
        "entropy_model_fingerprint": model.fingerprint,
        "context": model.context,
        "documents": len(documents),
        "tokens": sum(len(d) + 2 for d in documents),
        "documents_sha256": all_digests,
        "shards": [
            {"file": shard_name(index), "first_document": first, "documents": end - first,
             "tokens": sum(len(d) + 2 for d in documents[first:end])}
            for index, (first, end) in enumerate(plan_shards(documents, shard_tokens))
        ],
    }  # fmt: skip


def precompute(
    model_dir: str,
    documents: list[bytes],
    out: str,
    shard_tokens: int,
    workers: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Write (or finish writing) the entropies of ``documents`` to ``out``; returns a summary."""
    model = EntropyModel(model_dir)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise EntropyStoreError(f"--out: {out_dir} is a file; give a directory for the shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(model, documents, shard_tokens)
    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.exists():
        if _read_manifest(manifest_path, "--out") != manifest:
            raise EntropyStoreError(
                f"--out: {out_dir} holds entropies of another entropy model, data or --shard-tokens; "
                "give another --out directory or delete this one"
            )
    else:
        atomic_write(manifest_path, json.dumps(manifest, indent=1) + "\n")
    for leftover in out_dir.glob(".*.tmp-*"):
        leftover.unlink()  # a shard being written when a previous run was killed

    shards = manifest["shards"]
    pending = [index for index, shard in enumerate(shards) if not (out_dir / shard["file"]).exists()]
    log(f"precompute: {len(shards) - len(pending)} of {len(shards)} shard(s) already written, {len(pending)} to go")
    tasks = [
        (str(model.directory), str(out_dir), index,
         documents[shards[index]["first_document"] : shards[index]["first_document"] + shards[index]["documents"]])
        for index in pending
    ]  # fmt: skip
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            log(_write_shard(task))
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_init_worker) as pool:
            for message in pool.imap_unordered(_write_shard, tasks):
                log(message)
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


def _write_shard(task: tuple[str, str, int, list[bytes]]) -> str:
    model_dir, out_dir, index, documents = task
    if model_dir not in _worker_models:
        _worker_models[model_dir] = EntropyModel(model_dir)
    model = _worker_models[model_dir]
    entropies = [model.document_entropies(document) for document in documents]
    lengths = np.array([len(e) for e in entropies], dtype=np.int64)
    tensors = {
        "entropies": torch.from_numpy(np.concatenate(entropies)),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
        "digests": torch.frombuffer(bytearray(b"".join(document_digest(d) for d in documents)), dtype=torch.uint8)
        .view(len(documents), DIGEST_BYTES),
    }  # fmt: skip
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
        self._handles = [safe_open(self.directory / shard["file"], framework="pt") for shard in manifest["shards"]]
        self._where: dict[bytes, tuple[int, int]] = {}
        for shard_index, handle in enumerate(self._handles):
            offsets = handle.get_tensor("offsets").tolist()
            digests = handle.get_tensor("digests").numpy()
            for row, digest in enumerate(digests):
                self._where[digest.tobytes()] = (shard_index, offsets[row])
        self._key = key

    def source(self, documents: Sequence[bytes]) -> PrecomputedSource:
        """EntropySource over ``documents``; EntropyStoreError when some were not precomputed."""
        documents = documents if isinstance(documents, DocumentSet) else DocumentSet.of(documents)
        # A prepared corpus stores its documents' digests: nothing is read or hashed here.
        locations = [self._where.get(digest.tobytes()) for digest in documents.digests()]
        absent = sum(location is None for location in locations)
        if absent:
            raise EntropyStoreError(
                f"{self._key}: {absent} of {len(documents)} documents of the run's data are not in {self.directory}; "
                "run precompute on the same data.path as the training run"
            )
        return PrecomputedSource(self._handles, locations)


class PrecomputedSource:
    def __init__(self, handles: list, locations: list[tuple[int, int]]):
        self._handles = handles
        self._locations = locations

    def span(self, document_index: int, start: int, stop: int) -> np.ndarray:
        shard, offset = self._locations[document_index]
        return self._handles[shard].get_slice("entropies")[offset + start : offset + stop].numpy()
