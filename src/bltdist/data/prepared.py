"""Prepared datasets: written once by ``python -m bltdist.data prepare``, memory-mapped by every rank.

A prepared directory (format ``bltdist-prepared``, version 1)::

    plan.json                  inputs, text field, shard size, which input files go to which shard
    shard-00000.bytes          the shard's documents, their raw bytes one after another
    shard-00000.lengths.npy    int64, bytes of each document (starts are their running sum)
    shard-00000.key_crc32.npy  uint32, crc32 of each document's key: decides the held-out split
    shard-00000.digests.npy    uint8 (documents, 16), blake2b-128 of each document's bytes: finds
                               precomputed entropies without hashing the corpus
    shard-00000.keys.jsonl     each document's key as a JSON string, one a line (for people and tools)
    shard-00000.json           the shard's counts and the sha256 of its other files; written last,
                               so its presence says the shard is complete
    ...
    manifest.json              written when every shard is: format, version, totals, every shard's
                               counts and checksums, and a fingerprint naming the whole content

Plain files and NumPy ``.npy`` arrays rather than Arrow or a database: ``np.memmap`` and
``np.load(mmap_mode="r")`` read them with no dependency and no parsing, a reader pays only for the
pages it touches, and any tool can read them. One file per column, so that start-up reads 12 bytes
per document (lengths and key checksums), and digests only when entropies need them.

Shards are planned from the input file list alone (consecutive files up to ``shard_bytes`` of
input each) and every file is written under a temporary name and renamed (``bltdist.atomic``), so
the output depends on the inputs only: worker count, interruptions and reruns give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bltdist.atomic import atomic_file, atomic_write
from bltdist.data.documents import (
    DIGEST_BYTES,
    DocumentTable,
    document_digest,
    key_checksum,
)
from bltdist.data.sources import iter_documents, list_files, source_root
from bltdist.errors import DataError, UserError

FORMAT_NAME = "bltdist-prepared"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
DEFAULT_SHARD_BYTES = 256 * 2**20
COLUMNS = ("lengths", "key_crc32", "digests")
HASH_CHUNK = 2**20


def shard_files(index: int) -> dict[str, str]:
    stem = f"shard-{index:05d}"
    return {"bytes": f"{stem}.bytes", **{column: f"{stem}.{column}.npy" for column in COLUMNS},
            "keys": f"{stem}.keys.jsonl", "summary": f"{stem}.json"}  # fmt: skip


def is_prepared(path: str | None) -> bool:
    """True when ``path`` is a directory written by prepare (finished or not)."""
    return path is not None and Path(path).is_dir() and (Path(path) / PLAN_FILE).is_file()


def plan_shards(inputs: list[str], text_field: str, shard_bytes: int) -> dict:
    """Which input files go to which shard: consecutive files, about ``shard_bytes`` of input each."""
    shards: list[list[dict]] = [[]]
    size = 0
    for given in inputs:
        root = source_root(given)
        for file in list_files(given):
            file_size = file.stat().st_size
            if shards[-1] and size + file_size > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append({"file": str(file), "root": str(root), "size": file_size})
            size += file_size
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "inputs": inputs, "text_field": text_field,
            "shard_bytes": shard_bytes, "shards": shards}  # fmt: skip


def prepare(
    inputs: list[str], out: str, workers: int = 1, text_field: str = "text", shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Callable[[str], None] = print, rank: int = 0, world_size: int = 1,
) -> dict | None:  # fmt: skip
    """Write (or finish writing) the prepared dataset of ``inputs`` to ``out``; returns its manifest.

    With ``world_size`` > 1 (one call per rank, e.g. under torchrun, on a filesystem all ranks
    share) rank r writes shards r, r + world_size, ...; rank 0 then waits for every shard and writes
    the manifest, the other ranks return None when their shards are written. The output is the
    same bytes as one process writes.
    """
    out_dir = Path(out)
    plan = plan_shards(inputs, text_field, shard_bytes)
    mine = range(rank, len(plan["shards"]), world_size)
    start_resumable_output(
        out_dir / PLAN_FILE, plan,
        DataError(f"--out: {out_dir} holds a prepared dataset of other inputs, --text-field or --shard-bytes; "
                  "give another --out directory or delete this one"),
        # Each rank cleans up only what it writes itself: the rest may be another rank's file in progress.
        owned=None if world_size == 1 else [shard_files(index)["bytes"][:-len("bytes")] for index in mine]
        + ([PLAN_FILE, MANIFEST_FILE] if rank == 0 else []),
    )  # fmt: skip
    pending = [index for index in mine if not (out_dir / shard_files(index)["summary"]).exists()]
    where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    log(f"prepare{where}: {len(mine) - len(pending)} of {len(mine)} shard(s) already written, {len(pending)} to go")
    run_tasks(_write_shard, [(str(out_dir), index, plan["shards"][index], text_field) for index in pending], workers, log)
    if rank != 0:
        return None
    wait_for_files([out_dir / shard_files(index)["summary"] for index in range(len(plan["shards"]))], log)
    manifest = _manifest(out_dir, plan)
    if manifest["documents"] == 0:
        raise DataError(f"{', '.join(inputs)}: no documents in any input file; check the inputs and --text-field")
    atomic_write(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    log(f"prepare: {manifest['documents']} documents, {manifest['bytes']} bytes in {len(manifest['shards'])} "
        f"shard(s) written to {out_dir}")  # fmt: skip
    return manifest


def start_resumable_output(plan_path: Path, plan: dict, other_plan: UserError, owned: list[str] | None = None) -> None:
    """Start or resume an output directory whose files are written atomically, described by ``plan``:
    write ``plan_path``, or raise ``other_plan`` when the one there describes other output, and delete
    the staging files a killed run left behind (``bltdist.atomic``). With ``owned`` (one of several
    processes writing the directory) only the files whose names start with one of its entries are
    this process's: it writes the plan only when that is one of them, and deletes only their staging files."""
    out_dir = plan_path.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise type(other_plan)(f"--out: {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan_path.exists():
        try:
            same = json.loads(plan_path.read_text(encoding="utf-8")) == plan
        except (OSError, ValueError):
            same = False  # unreadable: not a plan this command wrote
        if not same:
            raise other_plan
    elif owned is None or plan_path.name in owned:
        atomic_write(plan_path, json.dumps(plan, indent=1) + "\n")
    for leftover in out_dir.glob(".*.tmp-*"):
        if owned is None or any(leftover.name.startswith(f".{name}") for name in owned):
            shutil.rmtree(leftover, ignore_errors=True)  # the staging directory of a write a killed run left unfinished


def run_tasks(function: Callable, tasks: list, workers: int, log: Callable[[str], None],
              initializer: Callable[[], None] | None = None) -> None:  # fmt: skip
    """``function(task)`` for every task, in ``workers`` spawned processes when there are several;
    each returns the line to log."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            log(function(task))
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=initializer) as pool:
        for message in pool.imap_unordered(function, tasks):
            log(message)


def wait_for_files(paths: list[Path], log: Callable[[str], None], poll_s: float = 0.5) -> None:
    """Return once every path exists (files other ranks write); logs what it waits for once a minute."""
    last_log = time.monotonic()
    while missing := [path for path in paths if not path.exists()]:
        if time.monotonic() - last_log > 60:
            log(f"prepare: waiting for {len(missing)} shard(s) other ranks write, e.g. {missing[0].name}")
            last_log = time.monotonic()
        time.sleep(poll_s)


def _write_shard(task: tuple[str, int, list[dict], str]) -> str:
    out_dir, index, files, text_field = Path(task[0]), task[1], task[2], task[3]
    names = shard_files(index)
    lengths, checksums, digests, keys = [], [], [], []
    with atomic_file(out_dir / names["bytes"]) as staging, open(staging, "wb") as data:
        for entry in files:  # streamed: a shard never has to fit in memory
            for key, document in iter_documents([Path(entry["file"])], text_field, root=Path(entry["root"])):
                data.write(document)
                lengths.append(len(document))
                checksums.append(key_checksum(key))
                digests.append(document_digest(document))
                keys.append(json.dumps(key) + "\n")
    columns = {
        "lengths": np.array(lengths, dtype=np.int64),
        "key_crc32": np.array(checksums, dtype=np.uint32),
        "digests": np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), DIGEST_BYTES),
    }
    for column, values in columns.items():
        with atomic_file(out_dir / names[column]) as staging, open(staging, "wb") as handle:
            np.save(handle, values, allow_pickle=False)  # to a handle: given a path, np.save appends ".npy"
    atomic_write(out_dir / names["keys"], "".join(keys))
    size = sum(lengths)
    summary = {"index": index, "documents": len(keys), "bytes": size,
               "sha256": {kind: _sha256(out_dir / names[kind]) for kind in names if kind != "summary"}}  # fmt: skip
    atomic_write(out_dir / names["summary"], json.dumps(summary, indent=1) + "\n")
    return f"prepare: wrote {names['bytes']} ({len(keys)} documents, {size} bytes)"


def _manifest(out_dir: Path, plan: dict) -> dict:
    shards = [_read_json(out_dir / shard_files(index)["summary"]) for index in range(len(plan["shards"]))]
    content = hashlib.sha256("".join(json.dumps(shard["sha256"], sort_keys=True) for shard in shards).encode())
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "inputs": plan["inputs"],
            "text_field": plan["text_field"], "documents": sum(s["documents"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "fingerprint": content.hexdigest(), "shards": shards}  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot be read ({error}); rerun prepare to rewrite it") from error


def open_prepared(directory: str) -> DocumentTable:
    """The documents of a finished prepared directory, memory-mapped: nothing is read but the indexes."""
    root = Path(directory)
    if not (root / MANIFEST_FILE).is_file():
        raise DataError(f"{root}: prepared dataset is incomplete (no {MANIFEST_FILE}); rerun the same prepare command")
    manifest = _read_json(root / MANIFEST_FILE)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{root}: {MANIFEST_FILE} is {manifest.get('format')} version {manifest.get('version')}, this "
                        f"bltdist reads {FORMAT_NAME} version {FORMAT_VERSION}; prepare the data again")  # fmt: skip
    kept = [shard for shard in manifest["shards"] if shard["documents"]]  # shards without documents are left out
    _allow_open_files(len(kept))
    shards = []
    for shard in kept:
        data_path = root / shard_files(shard["index"])["bytes"]
        if not data_path.is_file() or data_path.stat().st_size != shard["bytes"]:
            raise DataError(f"{data_path}: missing, or not the {shard['bytes']} bytes {MANIFEST_FILE} says; prepare "
                            "the data again")  # fmt: skip
        # A memory map keeps its file open; an empty file cannot be mapped. Read through a plain ndarray
        # view of the map: slicing an np.memmap costs several microseconds of Python per slice.
        mapped = np.memmap(data_path, dtype=np.uint8, mode="r") if shard["bytes"] else np.zeros(0, np.uint8)
        shards.append(mapped.view(np.ndarray))

    def column(name: str) -> np.ndarray:  # read whole (a few bytes per document), so no file stays open
        return np.concatenate([np.load(root / shard_files(shard["index"])[name]) for shard in kept])

    lengths, key_crc32 = column("lengths"), column("key_crc32")
    starts = np.cumsum(lengths) - lengths  # shards laid end to end hold the documents in order

    def stored_digests(rows: np.ndarray) -> np.ndarray:  # read when precomputed entropies are looked up by digest
        return column("digests")[rows]

    return DocumentTable(shards, starts, lengths, key_crc32, stored_digests, manifest["fingerprint"],
                         [shard["documents"] for shard in kept])  # fmt: skip


def _allow_open_files(mapped: int) -> None:
    """Raise this process's open-file limit up to its hard limit when ``mapped`` memory maps (one open
    file each) would come near the soft one: a large corpus has thousands of shards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = mapped + 1024  # room for everything else the process opens
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
