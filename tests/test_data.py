import gzip
import json
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bltdist.data import (
    DocumentTable,
    PackedByteLoader,
    build_datasets,
    iter_documents,
    list_files,
    load_documents,
    sources,
    split_documents,
)
from bltdist.errors import DataError
from bltdist.patching import BOS_ID, EOS_ID, document_tokens


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def sample_documents(count: int = 40) -> list[bytes]:
    return [f"document {i}: ".encode() + bytes(range(i % 7, 200, 3 + i % 5)) for i in range(count)]


def tokenised(document: bytes) -> list[int]:
    return [BOS_ID] + [b + 4 for b in document] + [EOS_ID]


# Sources


def test_text_file_is_one_document_split_by_bytes(tmp_path):
    file = write(tmp_path / "book.txt", b"0123456789" * 10)
    assert list(iter_documents(list_files(str(file)))) == [("book.txt", b"0123456789" * 10)]
    train, val = build_datasets(str(file), "text", 0.1)
    assert list(train) == [(b"0123456789" * 10)[:90]] and list(val) == [b"0123456789"]


def test_directory_is_recursive_sorted_and_skips_hidden_compiled_binary_and_empty(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.md", "zed")
    write(tmp_path / ".hidden.txt", "no")
    write(tmp_path / ".git" / "config", "no")
    write(tmp_path / "mod.pyc", "no")
    write(tmp_path / "image.bin", b"PNG\0\0\1")
    write(tmp_path / "empty.txt", b"")
    files = list_files(str(tmp_path))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/z.md", "b.txt", "empty.txt"]
    assert load_documents(str(tmp_path)) == [("a/z.md", b"zed"), ("b.txt", b"bee")]


def test_glob_keys_are_relative_to_the_literal_prefix(tmp_path):
    write(tmp_path / "data" / "one.txt", "1")
    write(tmp_path / "data" / "sub" / "two.txt", "2")
    write(tmp_path / "data" / "skip.md", "no")
    documents = load_documents(str(tmp_path / "data" / "**" / "*.txt"))
    assert documents == [("one.txt", b"1"), ("sub/two.txt", b"2")]
    everything = load_documents(str(tmp_path / "data" / "**"))
    assert [key for key, _ in everything] == ["one.txt", "skip.md", "sub/two.txt"]


def test_jsonl_with_custom_field_keys_rows_by_line(tmp_path):
    file = write(tmp_path / "rows.jsonl", '{"body": "first"}\n\n{"body": "h\\u00e9", "id": 3}\n{"body": ""}\n')
    assert load_documents(str(file), "body") == [
        ("rows.jsonl:1", b"first"),
        ("rows.jsonl:3", "hé".encode()),
        ("rows.jsonl:4", b""),
    ]


def test_parquet_string_and_binary_columns(tmp_path):
    pq.write_table(pa.table({"content": ["alpha", None, "gamma"], "n": [1, 2, 3]}), tmp_path / "s.parquet")
    pq.write_table(pa.table({"content": pa.array([b"\xff\x00raw"], pa.binary())}), tmp_path / "t.parquet")
    assert load_documents(str(tmp_path), "content") == [
        ("s.parquet:0", b"alpha"),
        ("s.parquet:2", b"gamma"),
        ("t.parquet:0", b"\xff\x00raw"),
    ]


def test_gzip_compressed_text_and_json_lines_read_as_their_content(tmp_path):
    write(tmp_path / "book.txt.gz", gzip.compress(b"\x00binary-looking but compressed"))
    write(tmp_path / "rows.jsonl.gz", gzip.compress(b'{"text": "one"}\n\n{"text": "two"}\n'))
    assert load_documents(str(tmp_path)) == [
        ("book.txt.gz", b"\x00binary-looking but compressed"),
        ("rows.jsonl.gz:1", b"one"),
        ("rows.jsonl.gz:3", b"two"),
    ]
    assert_data_error(write(tmp_path / "bad" / "broken.jsonl.gz", b"not gzip"), "cannot read")


def test_zstandard_compressed_json_lines_read_as_their_content(tmp_path):
    import zstandard  # in the dev extra

    file = write(tmp_path / "rows.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"text": "z"}\n{"text": "y"}\n'))
    assert load_documents(str(file)) == [("rows.jsonl.zst:1", b"z"), ("rows.jsonl.zst:2", b"y")]


def test_missing_zstandard_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert_data_error(write(tmp_path / "rows.jsonl.zst", b"\x28\xb5\x2f\xfd"), "pip install zstandard")


def test_document_set_token_spans_are_the_tokenised_documents():
    documents = [b"", b"a", b"\xff\x00bc", bytes(range(256))]
    table = DocumentTable.from_documents([(str(index), data) for index, data in enumerate(documents)])
    selected = table.select(np.arange(len(documents)))
    assert list(selected) == documents and selected.token_lengths.tolist() == [len(d) + 2 for d in documents]
    for index, document in enumerate(documents):
        total = len(document) + 2
        for start in range(0, total, 3):
            for stop in range(start + 1, total + 1, 2):
                tokens = np.empty(stop - start, dtype=np.int16)
                selected.write_tokens([(index, start, stop)], tokens)
                assert tokens.tolist() == document_tokens(document)[start:stop].tolist()
    pieces = [(3, 250, 258), (0, 0, 2), (2, 1, 6), (1, 0, 2)]  # one after another, as the loader writes a window
    tokens = np.empty(sum(hi - lo for _, lo, hi in pieces), dtype=np.int64)
    selected.write_tokens(pieces, tokens)
    assert tokens.tolist() == [t for index, lo, hi in pieces for t in document_tokens(documents[index])[lo:hi].tolist()]


def assert_data_error(path, *fragments: str, text_field: str = "text") -> None:
    with pytest.raises(DataError) as caught:
        build_datasets(str(path), text_field, 0.1)
    for fragment in (str(path), *fragments):
        assert fragment in str(caught.value)


def test_source_errors_name_the_path(tmp_path):
    assert_data_error(tmp_path / "missing.txt", "no such file")
    assert_data_error(tmp_path / "*.nothing", "matches no")
    write(tmp_path / "only_hidden" / ".secret", "x")
    write(tmp_path / "only_hidden" / "blob.bin", b"\0\0")
    assert_data_error(tmp_path / "only_hidden", "no readable files")
    assert_data_error(write(tmp_path / "empty.txt", b""), "is empty")
    write(tmp_path / "empties" / "a.txt", b"")
    write(tmp_path / "empties" / "b.jsonl", b"\n\n")
    assert_data_error(tmp_path / "empties", "no documents")
    assert_data_error(write(tmp_path / "blank.jsonl", b"\n \n"), "no documents")


def test_row_errors_name_file_line_and_field(tmp_path):
    file = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok"}, {"content": "wrong field"}])
    assert_data_error(file, "line 2", "'text'")
    assert_data_error(write(tmp_path / "bad.jsonl", '{"text": "ok"}\nnot json\n'), "line 2", "not valid JSON")
    assert_data_error(write_jsonl(tmp_path / "num.jsonl", [{"text": 5}]), "line 1", "not a string")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    assert_data_error(tmp_path / "t.parquet", "no column 'text'", "body")
    assert_data_error(write(tmp_path / "fake.parquet", b"not parquet at all"), "cannot read as Parquet")


def test_missing_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert_data_error(tmp_path / "t.parquet", "pip install pyarrow")


def test_unreadable_files_are_skipped_in_directories(tmp_path, monkeypatch):
    write(tmp_path / "ok.txt", "fine")
    locked = write(tmp_path / "locked.txt", "secret")
    locked.chmod(0)
    # Root reads files whatever their mode (CI runs as root), so the refusal is also simulated.
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(sources, "open", refusing_open, raising=False)
    assert [f.name for f in list_files(str(tmp_path))] == ["ok.txt"]


def test_embedded_corpus_has_both_splits():
    train, val = build_datasets(None, "text", 0.02)
    assert train and val and len(train) > 10 * len(val)
    files = list_files(None)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(f.parts) for f in files)
    assert len(train) + len(val) == sum(1 for f in files if f.stat().st_size > 0)


# Split


def test_split_holds_out_by_key_checksum():
    documents = [(f"file{i}.txt", bytes([i])) for i in range(200)]
    train, val = split_documents(documents, 0.25)
    expected_val = [data for key, data in documents if zlib.crc32(key.encode()) % 10000 < 2500]
    assert val == expected_val and len(train) + len(val) == 200
    assert 20 < len(val) < 80


def test_split_keeps_both_sides_non_empty():
    two = [("a", b"first"), ("b", b"second")]
    assert split_documents(two, 0.0) == ([b"first"], [b"second"])
    assert split_documents(two, 0.9999) == ([b"first"], [b"second"])
    assert split_documents([("only", b"abcdefghij")], 0.2) == ([b"abcdefgh"], [b"ij"])
    assert split_documents([("only", b"abc")], 0.0) == ([b"ab"], [b"c"])
    assert split_documents([("only", b"")], 0.5) == ([b""], [b""])


# Loader


def take(loader: PackedByteLoader, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(batches)]


def test_batches_have_shape_dtype_and_shifted_targets():
    loader = PackedByteLoader(sample_documents(), seq_len=32, micro_batch_size=3, dp_rank=0, dp_size=1, seed=0)
    previous_last_target = None
    for inputs, targets in take(loader, 5):
        assert inputs.shape == targets.shape == (3, 32) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert torch.equal(inputs[1:, 0], targets[:-1, -1]), "sequences overlap by one token"
        if previous_last_target is not None:
            assert inputs[0, 0] == previous_last_target
        previous_last_target = targets[-1, -1]


def test_every_token_is_a_target_once_and_epochs_cycle():
    documents = [b"ab", b"", b"\xff\xfe\x00\x80"]
    stream = sum((tokenised(d) for d in documents), [])  # 4 + 2 + 6 = 12 tokens per epoch
    loader = PackedByteLoader(documents, seq_len=5, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, shuffle=False)
    targets = torch.cat([t.flatten() for _, t in take(loader, 3)]).tolist()
    assert targets == (stream * 3)[1:31]
    assert loader.global_tokens_consumed == 30 and loader.epochs_consumed == 2.5


def test_non_utf8_and_zero_length_documents_give_valid_batches():
    documents = [b"", b"\xff\xfe\xc3(", b"", b"\x00", bytes(range(256))]
    loader = PackedByteLoader(documents, seq_len=64, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3)
    for inputs, targets in take(loader, 6):
        assert inputs.min() >= 0 and inputs.max() < 260 and targets.min() >= 0 and targets.max() < 260
    stream = torch.cat([inputs.flatten() for inputs, _ in take(loader, 4)])
    empty_documents = ((stream[:-1] == BOS_ID) & (stream[1:] == EOS_ID)).sum()
    assert empty_documents >= 2


def test_order_depends_on_the_seed_only():
    documents = sample_documents()

    def batches(seed: int) -> list[torch.Tensor]:
        loader = PackedByteLoader(documents, seq_len=64, micro_batch_size=2, dp_rank=0, dp_size=1, seed=seed)
        return [inputs for inputs, _ in take(loader, 4)]

    assert all(torch.equal(a, b) for a, b in zip(batches(7), batches(7)))
    assert not all(torch.equal(a, b) for a, b in zip(batches(7), batches(8)))


@pytest.mark.parametrize("dp_size, micro_batch_size", [(2, 4), (2, 2), (4, 1), (8, 1), (4, 2)])
def test_global_batch_is_independent_of_the_layout(dp_size, micro_batch_size):
    documents, seq_len, global_batch, steps = sample_documents(), 48, 8, 6  # several epochs
    reference = PackedByteLoader(documents, seq_len, global_batch, dp_rank=0, dp_size=1, seed=5)
    accumulation = global_batch // (dp_size * micro_batch_size)
    ranks = [PackedByteLoader(documents, seq_len, micro_batch_size, r, dp_size, seed=5) for r in range(dp_size)]
    for _ in range(steps):
        expected_inputs, _ = reference.next_batch()
        # Sequence g is served by rank (g // micro_batch_size) % dp_size, in its micro-step g // (mb * dp).
        served = {r: [rank.next_batch()[0] for _ in range(accumulation)] for r, rank in enumerate(ranks)}
        in_global_order = [
            served[(g // micro_batch_size) % dp_size][g // (micro_batch_size * dp_size)][g % micro_batch_size]
            for g in range(global_batch)
        ]
        assert torch.equal(torch.stack(in_global_order), expected_inputs)
        as_multiset = Counter(tuple(row.tolist()) for batches in served.values() for b in batches for row in b)
        assert as_multiset == Counter(tuple(row.tolist()) for row in expected_inputs)


def test_state_round_trip_reproduces_the_next_batches_across_epochs():
    documents = sample_documents(10)
    original = PackedByteLoader(documents, seq_len=100, micro_batch_size=2, dp_rank=1, dp_size=2, seed=11)
    take(original, 3)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = PackedByteLoader(documents, seq_len=100, micro_batch_size=2, dp_rank=1, dp_size=2, seed=11)
    resumed.load_state_dict(state)
    epochs_before = original.epochs_consumed
    for (a_in, a_out), (b_in, b_out) in zip(take(original, 12), take(resumed, 12)):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    assert int(epochs_before) < int(original.epochs_consumed), "the test must cross an epoch boundary"
    assert len(json.dumps(state)) < 400


def test_state_resumes_under_another_layout_with_the_same_global_batch():
    documents = sample_documents(10)
    single = PackedByteLoader(documents, seq_len=40, micro_batch_size=4, dp_rank=0, dp_size=1, seed=2)
    take(single, 3)
    state = single.state_dict()
    expected, _ = single.next_batch()
    halves = []
    for rank in range(2):
        loader = PackedByteLoader(documents, seq_len=40, micro_batch_size=2, dp_rank=rank, dp_size=2, seed=2)
        loader.load_state_dict(state)
        halves.append(loader.next_batch()[0])
    assert torch.equal(torch.cat(halves), expected)


def test_state_from_another_run_is_refused():
    documents = sample_documents(10)
    state = PackedByteLoader(documents, seq_len=40, micro_batch_size=3, dp_rank=0, dp_size=1, seed=2).state_dict()
    for seq_len, seed, mb, docs, fragment in [
        (41, 2, 3, documents, "seq_len 40"),
        (40, 3, 3, documents, "seed 2"),
        (40, 2, 3, documents[:-1], "num_documents 10"),
    ]:
        with pytest.raises(DataError, match=fragment):
            PackedByteLoader(docs, seq_len, mb, 0, 1, seed).load_state_dict(state)
    state["global_sequences_consumed"] = 3
    with pytest.raises(DataError, match="not a multiple"):
        PackedByteLoader(documents, 40, 2, 0, 1, 2).load_state_dict(state)


def test_validation_loader_serves_the_same_batches_every_time():
    documents = sample_documents(5)

    def first_batches() -> list[torch.Tensor]:
        loader = PackedByteLoader(documents, 64, 2, dp_rank=0, dp_size=1, seed=0, shuffle=False)
        return [inputs for inputs, _ in take(loader, 3)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(), first_batches()))
    assert first_batches()[0][0].tolist() == (tokenised(documents[0]) + tokenised(documents[1]))[:64]


def test_loader_arguments_are_checked():
    with pytest.raises(ValueError, match="at least one document"):
        PackedByteLoader([], 8, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedByteLoader([b"x"], 8, 1, 2, 2, 0)
