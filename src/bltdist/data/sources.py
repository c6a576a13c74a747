"""Where documents come from: files, directories, globs, or the embedded Python stdlib corpus.

A document is raw bytes, never decoded, with a stable key ("relpath" for a text file,
"relpath:line" for JSON lines, "relpath:row" for Parquet) that decides the held-out split. Text and
JSON lines files may be gzip (``.gz``) or zstandard (``.zst``, with the ``zstandard`` package)
compressed; the suffix before the compression suffix says what they hold.
"""

import glob
import gzip
import io
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from bltdist.data.documents import DocumentTable
from bltdist.errors import DataError

JSON_LINES_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIX = ".parquet"
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
BINARY_SNIFF_BYTES = 4096
# Test suites are about as large as the library itself and mostly fixtures; they stay out.
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_root(path: str | None) -> Path:
    """Directory that document keys are relative to, so keys survive moving the data elsewhere."""
    if path is None:
        return stdlib_root()
    given = Path(path)
    if given.is_dir():
        return given
    if given.exists():
        return given.parent
    literal_parts = []
    for part in given.parts:
        if _has_glob_magic(part):
            break
        literal_parts.append(part)
    return Path(*literal_parts) if literal_parts else Path(".")


def list_files(path: str | None) -> list[Path]:
    """Files of a file, directory (recursive, sorted) or glob; ``None`` = the stdlib ``.py`` files.

    Directories skip hidden entries; directories and glob matches skip ``.pyc``, unreadable and
    binary files (a NUL byte in the first 4 KiB; Parquet excepted). A named file is always read.
    """
    if path is None:
        return _stdlib_files()
    given = Path(path)
    if given.is_file():
        if not _is_readable_data_file(given):
            warnings.warn(
                f"data.path {given} looks binary (a NUL byte in its first {BINARY_SNIFF_BYTES} bytes); training on its "
                "raw bytes as one document. Point data.path at text, JSONL or Parquet if that is not what you meant",
                stacklevel=2,
            )
        return [given]
    if given.is_dir():
        files = _directory_files(given)
        if not files:
            raise DataError(
                f"{path}: directory has no readable files (hidden files, .pyc and binary files are skipped); "
                "point data.path at a directory with text, JSONL or Parquet files"
            )
        return files
    if given.exists():
        raise DataError(f"{path}: neither a file nor a directory; point data.path at text, JSONL or Parquet data")
    if not _has_glob_magic(path):
        raise DataError(f"{path}: no such file or directory; check data.path")
    files = set()
    for match in glob.glob(path, recursive=True):
        match_path = Path(match)
        if match_path.is_dir():
            files.update(_directory_files(match_path))
        elif _is_readable_data_file(match_path):
            files.add(match_path)
    if not files:
        raise DataError(f"{path}: the glob matches no readable files; check data.path")
    # "**" matches a directory and the files inside it: the set keeps each file once.
    return sorted(files, key=Path.as_posix)


def iter_documents(
    files: Iterable[Path], text_field: str = "text", root: Path | None = None
) -> Iterator[tuple[str, bytes]]:
    """(key, raw bytes) of every document; keys are relative to ``root`` (default: the files' common parent).

    ``.json``/``.jsonl`` are JSON lines with the text in ``text_field`` (key "relpath:line", line
    counted from 1, blank lines skipped); ``.parquet`` reads column ``text_field`` (key
    "relpath:row", row counted from 0, null rows skipped); any other file is one document. Empty
    text files hold no document.
    """
    files = list(files)
    if root is None and files:
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
    for file in files:
        relpath = _relative_key(file, root)
        suffix = content_suffix(file)
        if suffix in JSON_LINES_SUFFIXES:
            yield from _json_lines_documents(file, relpath, text_field)
        elif suffix == PARQUET_SUFFIX:
            yield from _parquet_documents(file, relpath, text_field)
        else:
            data = _read_bytes(file)
            if data:
                yield relpath, data


def load_documents(path: str | None, text_field: str = "text") -> list[tuple[str, bytes]]:
    """All (key, bytes) documents of ``path``; DataError when there are none."""
    files = list_files(path)
    documents = list(iter_documents(files, text_field, root=source_root(path)))
    if documents:
        return documents
    if len(files) == 1:
        file = files[0]
        if _file_size(file) == 0:
            raise DataError(f"{file} is empty; give data.path a file with text in it")
        raise DataError(f"{file} holds no documents (only blank lines or null values); check its contents")
    raise DataError(f"{path}: no documents in any of its {len(files)} files (all empty); check data.path")


def split_documents(
    documents: list[tuple[str, bytes]], val_fraction: float
) -> tuple[list[bytes], list[bytes]]:
    """(train, val) bytes by the rule of ``DocumentTable.split``, which every data source follows."""
    train, val = DocumentTable.from_documents(documents).split(val_fraction)
    return list(train), list(val)


def content_suffix(file: Path) -> str:
    """What a file holds, by its suffix before any compression suffix: ``a.jsonl.gz`` -> ``.jsonl``."""
    path = file.with_suffix("") if file.suffix.lower() in COMPRESSED_SUFFIXES else file
    return path.suffix.lower()


def _has_glob_magic(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def _stdlib_files() -> list[Path]:
    root = stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_SKIPPED_DIRS and not d.startswith(".")]
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    if not files:
        raise DataError(f"{root}: no Python standard library sources found for the embedded corpus; set data.path")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _directory_files(directory: Path) -> list[Path]:
    files = []
    for parent, subdirs, names in os.walk(directory):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            file = Path(parent) / name
            if not name.startswith(".") and _is_readable_data_file(file):
                files.append(file)
    return sorted(files, key=lambda f: f.relative_to(directory).as_posix())


def _is_readable_data_file(file: Path) -> bool:
    if file.suffix == ".pyc" or not file.is_file():
        return False
    if file.suffix.lower() in COMPRESSED_SUFFIXES:
        return True  # compressed bytes hold NULs; the content is checked when read
    try:
        with open(file, "rb") as handle:
            head = handle.read(BINARY_SNIFF_BYTES)
    except OSError:
        return False
    return file.suffix.lower() == PARQUET_SUFFIX or b"\0" not in head


def _relative_key(file: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return file.relative_to(root).as_posix()
        except ValueError:
            pass
    return file.as_posix()


def _open_binary(file: Path) -> io.BufferedIOBase:
    """``file`` opened for reading, decompressed as its suffix says."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".gz":
            return gzip.open(file, "rb")
        if suffix in (".zst", ".zstd"):
            try:
                import zstandard
            except ImportError as error:
                raise DataError(f"{file}: reading zstandard needs `pip install zstandard`") from error
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), closefd=True))
        return open(file, "rb")
    except OSError as error:
        raise DataError(f"{file}: cannot read ({error.strerror}); check the file's permissions") from error


def _read_bytes(file: Path) -> bytes:
    try:
        with _open_binary(file) as handle:
            return handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{file}: cannot read ({error}); check the file and its compression") from error


def _file_size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _json_lines_documents(file: Path, relpath: str, text_field: str) -> Iterator[tuple[str, bytes]]:
    try:
        with _open_binary(file) as handle:  # line by line: a JSON lines file may be larger than memory
            yield from _json_rows(file, handle, relpath, text_field)
    except (OSError, EOFError) as error:
        raise DataError(f"{file}: cannot read ({error}); check the file and its compression") from error


def _json_rows(file: Path, lines: Iterable[bytes], relpath: str, text_field: str) -> Iterator[tuple[str, bytes]]:
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(
                f"{file}, line {line_number}: not valid JSON ({error}); .json/.jsonl files must hold one "
                "JSON object per line"
            ) from error
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(
                f"{file}, line {line_number}: no field {text_field!r}; set data.text_field to the field "
                "that holds the text"
            )
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{file}, line {line_number}: field {text_field!r} is {type(text).__name__}, not a string")
        # Lone surrogates are legal in JSON strings; keep their bytes rather than fail the run.
        yield f"{relpath}:{line_number}", text.encode("utf-8", "surrogatepass")


def _parquet_documents(file: Path, relpath: str, text_field: str) -> Iterator[tuple[str, bytes]]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise DataError(f"{file}: reading Parquet needs pyarrow; run `pip install pyarrow`") from error
    try:
        parquet = pyarrow.parquet.ParquetFile(file)
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise DataError(
                f"{file}: no column {text_field!r} (columns: {', '.join(columns)}); set data.text_field"
            )
        column_type = parquet.schema_arrow.field(text_field).type
        is_text = pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)
        is_binary = pyarrow.types.is_binary(column_type) or pyarrow.types.is_large_binary(column_type)
        if not (is_text or is_binary):
            raise DataError(f"{file}: column {text_field!r} holds {column_type}, not strings or bytes")
        row = 0
        for batch in parquet.iter_batches(columns=[text_field]):  # batch by batch: a file may be larger than memory
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield f"{relpath}:{row}", value.encode("utf-8", "surrogatepass") if is_text else value
                row += 1
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{file}: cannot read as Parquet ({error}); check the file") from error
