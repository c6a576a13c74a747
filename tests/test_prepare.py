"""Prepared datasets and data mixtures: ``python -m bltdist.data prepare``, memory-mapped reading, weighted sources."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import SMALL, read_metrics, run_trainer

from bltdist.config import DataConfig, DataSourceConfig, load_config
from bltdist.data import (
    MixtureSource,
    PackedByteLoader,
    build_sources,
    open_prepared,
    prepare,
)
from bltdist.data.documents import document_digest
from bltdist.data.prepared import start_resumable_output
from bltdist.errors import ConfigError, DataError
from processes import launcher

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def mixed_corpus(root: Path) -> Path:
    """Text, JSON lines (plain and gzip) and Parquet, with empty and non-UTF-8 documents."""
    for index in range(12):
        write(root / "books" / f"book{index:02d}.txt", f"book {index} ".encode() * (index * 7 + 1) + b"\xff\xfe")
    rows = "".join(json.dumps({"text": f"row {index} " * (index % 5)}) + "\n" for index in range(30))
    write(root / "web" / "rows.jsonl", rows)
    write(root / "web" / "more.jsonl.gz", gzip.compress(rows.replace("row", "gz").encode()))
    pq.write_table(pa.table({"text": [f"parquet {i}" * i for i in range(9)]}), root / "tables.parquet")
    return root


def run_prepare(inputs: list[Path], out: Path, *options: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bltdist.data", "prepare", *map(str, inputs), "--out", str(out), *options]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, **kwargs)


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def batches(loader: PackedByteLoader, count: int) -> list[torch.Tensor]:
    return [torch.cat(loader.next_batch(), dim=1) for _ in range(count)]


def test_prepared_corpus_gives_the_batches_of_the_raw_files(tmp_path):
    corpus = mixed_corpus(tmp_path / "corpus")
    result = run_prepare([corpus], tmp_path / "prepared", "--workers", "2", "--shard-bytes", "300")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert len(manifest["shards"]) > 3 and manifest["documents"] == 12 + 2 * 30 + 9
    table = open_prepared(str(tmp_path / "prepared"))
    assert all(isinstance(shard.base, np.memmap) for shard in table.shards), "prepared bytes are memory-mapped"
    sources = {}
    for kind, path in (("raw", corpus), ("prepared", tmp_path / "prepared")):
        sources[kind] = build_sources(DataConfig(path=str(path), val_fraction=0.2))
    for split in (0, 1):  # train and held-out: the same documents in the same order
        raw, prepared = (sources[kind][split][0].documents for kind in ("raw", "prepared"))
        assert list(raw) == list(prepared) and len(prepared) > 5
        assert prepared.digests().tolist() == [list(document_digest(d)) for d in raw], "stored digests"
    loaders = [PackedByteLoader(sources[kind][0], 64, 3, dp_rank=1, dp_size=2, seed=4) for kind in ("raw", "prepared")]
    for raw_batch, prepared_batch in zip(*(batches(loader, 25) for loader in loaders)):
        assert torch.equal(raw_batch, prepared_batch)
    assert loaders[1].epochs_consumed > 1, "the test must cross an epoch"


@pytest.mark.slow
def test_prepare_killed_and_rerun_is_byte_identical(tmp_path):
    corpus = tmp_path / "corpus"
    for index in range(60):
        rows = "".join(json.dumps({"text": f"{index}-{row} " * 50}) + "\n" for row in range(40))
        write(corpus / f"part{index:03d}.jsonl", rows)
    reference = run_prepare([corpus], tmp_path / "reference", "--shard-bytes", "20000")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "bltdist.data", "prepare", str(corpus), "--out", str(out), "--workers", "2",
               "--shard-bytes", "20000"]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.json")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job, workers included, as a preempted node would
    process.wait()
    finished = len(list(out.glob("shard-*.json")))
    total = len(json.loads((tmp_path / "reference" / "manifest.json").read_text())["shards"])
    assert 0 < finished < total and not (out / "manifest.json").exists(), "the kill must land mid-way"
    rerun = run_prepare([corpus], out, "--workers", "2", "--shard-bytes", "20000")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{finished} of {total} shard(s) already written" in rerun.stdout
    assert directory_bytes(out) == directory_bytes(tmp_path / "reference")


def test_a_write_killed_with_its_writers_own_temporary_file_leaves_nothing_after_the_restart(tmp_path):
    out = tmp_path / "out"
    killed_mid_write = (
        "import os, sys\n"
        "from bltdist.atomic import atomic_file\n"
        "with atomic_file(sys.argv[1]) as staging:\n"
        "    (staging.parent / '.tmpAbC123').write_bytes(b'half')  # as safetensors >= 0.8 writes, beside its target\n"
        "    staging.write_bytes(b'half')\n"
        "    os._exit(9)  # no cleanup runs, as under SIGKILL\n"
    )  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", killed_mid_write, str(out / "shard-00000.safetensors")], check=False)
    assert killed.returncode == 9 and any(out.iterdir())
    start_resumable_output(out / "manifest.json", {"shards": 1}, DataError("another plan"))
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json"]


def test_prepare_under_torchrun_writes_each_ranks_share_and_the_bytes_of_one_process(tmp_path):
    corpus = mixed_corpus(tmp_path / "corpus")
    single = run_prepare([corpus], tmp_path / "single", "--shard-bytes", "300")
    assert single.returncode == 0, single.stderr
    command = [sys.executable, *launcher(2), "-m", "bltdist.data", "prepare", str(corpus), "--out", str(tmp_path / "ranks"), "--shard-bytes", "300"]  # fmt: skip
    ranks = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    shards = len(json.loads((tmp_path / "single" / "manifest.json").read_text())["shards"])
    for rank in range(2):  # each rank wrote every other shard
        assert f"(rank {rank} of 2): 0 of {len(range(rank, shards, 2))} shard(s) already written" in ranks.stdout
    assert directory_bytes(tmp_path / "ranks") == directory_bytes(tmp_path / "single")


def test_prepare_refuses_other_inputs_and_a_reader_refuses_an_unfinished_directory(tmp_path):
    write(tmp_path / "a.txt", "alpha")
    write(tmp_path / "b.txt", "beta")
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), log=lambda _: None)
    result = run_prepare([tmp_path / "b.txt"], tmp_path / "out")
    assert result.returncode == 2 and "other inputs" in result.stderr and str(tmp_path / "out") in result.stderr
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(DataError, match="incomplete"):
        build_sources(DataConfig(path=str(tmp_path / "out")))
    empty = run_prepare([write(tmp_path / "blank.jsonl", "\n\n")], tmp_path / "empty")
    assert empty.returncode == 2 and "no documents" in empty.stderr


# Mixtures


def two_sources(root: Path) -> list[DataSourceConfig]:
    """Source "a" holds only a/A bytes, source "b" only b/B bytes: every byte names its source."""
    for name, weight in (("a", 0.7), ("b", 0.3)):
        write(root / name / "docs.jsonl", "".join(json.dumps({"text": (name * (3 + i % 17)) + name.upper()}) + "\n"
                                                   for i in range(60)))  # fmt: skip
        assert prepare([str(root / name)], str(root / f"{name}.prepared"), log=lambda _: None)["documents"] == 60
    return [DataSourceConfig("a", str(root / "a.prepared"), 0.7), DataSourceConfig("b", str(root / "b"), 0.3)]


def sequence_sources(sequences: torch.Tensor) -> list[str]:
    """The source of each sequence, by its bytes (ids are bytes + 4); a sequence never mixes sources."""
    names = []
    for row in sequences.tolist():
        letters = {chr(token - 4).lower() for token in row if token >= 4}
        assert len(letters) == 1, f"a sequence mixes sources: {letters}"
        names.append(letters.pop())
    return names


def test_mixture_shares_follow_the_weights_over_200_steps(tmp_path):
    train, _ = build_sources(DataConfig(sources=two_sources(tmp_path)))
    loader = PackedByteLoader(train, seq_len=16, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)
    served = [name for inputs, _ in (loader.next_batch() for _ in range(200)) for name in sequence_sources(inputs)]
    for name, weight in (("a", 0.7), ("b", 0.3)):
        assert abs(served.count(name) / len(served) - weight) < 0.02
        assert abs(served[:80].count(name) / 80 - weight) < 0.02, "every prefix keeps the weights"
    assert loader.source_sequences() == {"a": served.count("a"), "b": served.count("b")}
    assert all(epochs > 1 for epochs in loader.source_epochs().values())


MIXTURE_RANK = """
import json, sys, torch
from bltdist.config import DataConfig, DataSourceConfig
from bltdist.data import PackedByteLoader, build_sources
sources, rank, dp_size, micro_batch, state_file, out = json.loads(sys.argv[1])
train, _ = build_sources(DataConfig(sources=[DataSourceConfig(**source) for source in sources]))
loader = PackedByteLoader(train, seq_len=24, micro_batch_size=micro_batch, dp_rank=rank, dp_size=dp_size, seed=9)
if state_file:
    loader.load_state_dict(json.load(open(state_file)))
torch.save([loader.next_batch()[0] for _ in range(12)], out)
"""


def run_ranks(sources: list[DataSourceConfig], dp_size: int, micro_batch: int, state: Path | None, out: Path) -> list:
    """Every rank's 12 micro-batches, each rank in its own process."""
    listed = [source.__dict__ for source in sources]
    args = [json.dumps([listed, rank, dp_size, micro_batch, str(state or ""), str(out / f"{rank}.pt")])
            for rank in range(dp_size)]  # fmt: skip
    processes = [subprocess.Popen([sys.executable, "-c", MIXTURE_RANK, arg], stderr=subprocess.PIPE, text=True)
                 for arg in args]  # fmt: skip
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    return [torch.load(out / f"{rank}.pt") for rank in range(dp_size)]


@pytest.mark.slow
def test_two_source_mixture_under_two_ranks_equals_one_process_and_resumes_exactly(tmp_path):
    sources = two_sources(tmp_path)
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir(), (tmp_path / "resumed").mkdir()
    (single,) = run_ranks(sources, 1, 4, None, tmp_path / "one")
    ranks = run_ranks(sources, 2, 2, None, tmp_path / "two")
    for step in range(12):  # global batch 4: rank 0 serves sequences 0-1, rank 1 sequences 2-3
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), single[step])
    train, _ = build_sources(DataConfig(sources=sources))
    loader = PackedByteLoader(train, seq_len=24, micro_batch_size=4, dp_rank=0, dp_size=1, seed=9)
    batches(loader, 5)
    (tmp_path / "state.json").write_text(json.dumps(loader.state_dict()))
    resumed = run_ranks(sources, 2, 2, tmp_path / "state.json", tmp_path / "resumed")
    for step in range(7):
        assert torch.equal(torch.cat([resumed[0][step], resumed[1][step]]), single[5 + step])


def test_a_changed_or_renamed_source_refuses_to_resume(tmp_path):
    sources = two_sources(tmp_path)
    train, _ = build_sources(DataConfig(sources=sources))
    state = PackedByteLoader(train, 24, 4, 0, 1, seed=9).state_dict()
    write(tmp_path / "a" / "extra.txt", "aaaa")
    (tmp_path / "a.prepared" / "plan.json").unlink()
    for leftover in (tmp_path / "a.prepared").iterdir():
        leftover.unlink()
    prepare([str(tmp_path / "a")], str(tmp_path / "a.prepared"), log=lambda _: None)
    changed, _ = build_sources(DataConfig(sources=sources))
    with pytest.raises(DataError, match=r"source 'a' num_documents (\d+) \(now (?!\1)\d+\).*source 'a' fingerprint"):
        PackedByteLoader(changed, 24, 4, 0, 1, seed=9).load_state_dict(state)
    renamed = [MixtureSource("c" if s.name == "b" else s.name, s.documents, s.weight, s.fingerprint) for s in train]
    with pytest.raises(DataError, match=r"sources \['a', 'b'\] \(now \['a', 'c'\]\)"):
        PackedByteLoader(renamed, 24, 4, 0, 1, seed=9).load_state_dict(state)


def test_bad_mixture_configs_are_refused_before_the_start(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight: must be > 0"):
        load_config(None, ["--data.sources", "[{name: a, path: x}, {name: b, path: y, weight: -1}]"])
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(None, ["--data.sources", "[{name: a, path: x}, {name: a, path: y}]"])
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "bltdist.train", "--data.sources", f"[{{name: web, path: {missing}}}]",
         f"--output_dir={tmp_path / 'run'}", "--train.device=cpu"],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2 and str(missing) in result.stderr, result.stderr


def test_training_on_a_mixture_reports_each_source(tmp_path):
    sources = two_sources(tmp_path)
    listed = ", ".join(f"{{name: {s.name}, path: {s.path}, weight: {s.weight}}}" for s in sources)
    out = tmp_path / "run"
    result = run_trainer([*SMALL, f"--data.sources=[{listed}]", "--data.val_fraction=0.2", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr
    val_records = [record for record in read_metrics(out) if "val_bpb" in record]
    assert [record["step"] for record in val_records] == [0, 3]
    assert all(math.isfinite(record["val_bpb/a"]) and math.isfinite(record["val_bpb/b"]) for record in val_records)
    data = json.loads((out / "summary.json").read_text())["data"]
    sequences = {name: count / 64 for name, count in data["source_bytes"].items()}  # sequences of 64 bytes
    assert sum(sequences.values()) == 3 * 4 and abs(sequences["a"] - 0.7 * 12) <= 1, "within one of the weights"
    assert data["epochs"]["a"] > 0 and data["epochs"]["b"] > 0
