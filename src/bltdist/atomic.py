"""Atomic writes: a file or directory appears under its final name complete, or not at all.

Everything is written inside a hidden staging directory beside the final name, fsynced, then
renamed over the final name (one rename is atomic on POSIX filesystems), and the parent directory
is fsynced so that the rename itself survives a power loss. A crash leaves at worst one staging
directory behind (``.<name>.tmp-*``), which no reader ever opens and one removal clears.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for directory, _, files in os.walk(path):
        for name in files:
            with open(Path(directory) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(directory)


def commit(staging: Path, final: Path) -> None:
    """fsyncs the file or directory ``staging`` and renames it to ``final``. An existing final
    directory is moved aside first and deleted only after the rename: a crash in between leaves it
    under a hidden name, never half-deleted under its own."""
    _fsync_tree(staging)
    replaced = final.with_name(f".{final.name}.replaced")
    if staging.is_dir() and final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


@contextlib.contextmanager
def _staged(final: Path, is_file: bool) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    # A file is staged inside a private directory too: writers' own temporary files (safetensors
    # >= 0.8 writes through a hidden sibling, ".tmp" and six random characters) then stay in it.
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging = scratch / final.name if is_file else scratch
    try:
        yield staging
        commit(staging, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # after a directory's commit there is nothing left to remove


def atomic_file(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """``with atomic_file(path) as staging:`` write the file at ``staging``; on success it replaces
    ``path``, on failure it is removed and ``path`` is untouched."""
    return _staged(Path(path), is_file=True)


def atomic_directory(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """``with atomic_directory(path) as staging:`` fill the empty directory ``staging``; on success
    it replaces ``path`` (a directory) with one rename, on failure it is removed."""
    return _staged(Path(path), is_file=False)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as staging:
        staging.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
