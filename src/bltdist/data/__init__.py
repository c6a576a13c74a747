"""Training data: document sources, prepared datasets, the train/held-out split and the packed sequence loader."""

from bltdist.config import DataConfig
from bltdist.data.documents import DocumentSet, DocumentTable
from bltdist.data.loader import EntropySource, MixtureSource, PackedByteLoader
from bltdist.data.prepared import is_prepared, open_prepared, prepare
from bltdist.data.sources import (
    iter_documents,
    list_files,
    load_documents,
    split_documents,
)


def open_table(path: str | None, text_field: str = "text") -> DocumentTable:
    """The documents of ``path``: a prepared directory memory-mapped, anything else read into memory
    (None = the embedded stdlib corpus); DataError when unusable."""
    if is_prepared(path):
        return open_prepared(path)
    return DocumentTable.from_documents(load_documents(path, text_field))


def build_datasets(path: str | None, text_field: str, val_fraction: float) -> tuple[DocumentSet, DocumentSet]:
    """(train, val) documents of ``path`` (None = the embedded stdlib corpus); DataError when unusable."""
    return open_table(path, text_field).split(val_fraction)


def build_sources(data: DataConfig) -> tuple[list[MixtureSource], list[MixtureSource]]:
    """(train, val) sources of the ``data`` config section, each split on its own; data.path is a
    source named "data"."""
    sources = [(source.name, source.path, source.weight) for source in data.sources] or [("data", data.path, 1.0)]
    train, val = [], []
    for name, path, weight in sources:
        table = open_table(path, data.text_field)
        train_documents, val_documents = table.split(data.val_fraction)
        train.append(MixtureSource(name, train_documents, weight, table.fingerprint))
        val.append(MixtureSource(name, val_documents, weight, table.fingerprint))
    return train, val


__all__ = [
    "DocumentSet",
    "DocumentTable",
    "EntropySource",
    "MixtureSource",
    "PackedByteLoader",
    "build_datasets",
    "build_sources",
    "is_prepared",
    "iter_documents",
    "list_files",
    "load_documents",
    "open_prepared",
    "open_table",
    "prepare",
    "split_documents",
]
