"""Training data: document sources, the train/held-out split and the packed sequence loader."""

from bltdist.data.loader import EntropySource, PackedByteLoader
from bltdist.data.sources import iter_documents, list_files, load_documents, split_documents


def build_datasets(path: str | None, text_field: str, val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    """(train, val) documents of ``path`` (None = the embedded stdlib corpus); DataError when unusable."""
    return split_documents(load_documents(path, text_field), val_fraction)


__all__ = [
    "EntropySource",
    "PackedByteLoader",
    "build_datasets",
    "iter_documents",
    "list_files",
    "load_documents",
    "split_documents",
]
