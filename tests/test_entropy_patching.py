"""Entropy patching end to end: entropy spans in the loader, calibration, precompute, stats, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bltdist.config import DataConfig, load_config
from bltdist.data import (
    DocumentSet,
    PackedByteLoader,
    build_sources,
    load_documents,
    prepare,
)
from bltdist.data.sources import stdlib_root
from bltdist.model import ByteLM
from bltdist.model_dir import save_weights_dir
from bltdist.patching.cli import calibrate_threshold, entropy_sample, packed_rows
from bltdist.patching.cli import main as patch_main
from bltdist.patching.entropy import EntropyModel, OnlineEntropies
from bltdist.patching.patcher import Patcher
from bltdist.patching.store import PrecomputedEntropies, precompute
from bltdist.patching.tokens import document_tokens
from processes import side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
CODE_FILES = ("textwrap.py", "csv.py", "json/decoder.py")

# About 15 s on one core: enough training for code to be clearly more predictable than prose.
TINY_ENTROPY_MODEL = [
    "--model.arch=entropy", "--model.entropy.dim=64", "--model.entropy.layers=2", "--model.entropy.heads=2",
    "--model.entropy.ffn_dim=128", "--model.entropy.window=128", "--train.seq_len=256", "--train.steps=300",
    "--train.micro_batch_size=8", "--train.global_batch_size=8", "--optim.lr=4e-3", "--optim.warmup_steps=10",
    "--train.val_batches=1", "--train.val_interval=0", "--logging.interval=100",
]  # fmt: skip


def run_module(module: str, args: list[str], threads: int = 1, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300, **kwargs)  # fmt: skip


@pytest.fixture(scope="session")
def trained_entropy_model(tmp_path_factory) -> Path:
    """A tiny entropy model trained by the trainer on the embedded corpus."""
    out = tmp_path_factory.mktemp("entropy_run")
    # Nothing else runs beside this one process: two threads train it in 2/3 of the time of one.
    result = run_module("bltdist.train", [*TINY_ENTROPY_MODEL, f"--output_dir={out}"], threads=2)
    assert result.returncode == 0, result.stderr
    return out / "model"


def seeded_entropy_model(directory: Path, context: int) -> Path:
    """An untrained entropy model (seeded weights) whose chunks are ``context`` tokens long."""
    cfg = load_config(None, ["--model.arch=entropy", "--model.entropy.dim=16", "--model.entropy.layers=1",
                             "--model.entropy.heads=2", "--model.entropy.ffn_dim=32", "--model.entropy.window=8",
                             f"--train.seq_len={context}"])  # fmt: skip
    torch.manual_seed(0)
    model = ByteLM(cfg.model.entropy)
    model.init_weights()
    return save_weights_dir(model.state_dict(), cfg, directory)


def small_documents() -> list[bytes]:
    texts = [b"", b"x", b"def f(a, b):\n    return a + b\n" * 7, "naïve café ".encode() * 9, bytes(range(256))]
    return texts + [f"line {i}: the quick brown fox\n".encode() * (i + 1) for i in range(12)]


# The loader's entropy spans


class TokenValues:
    """An entropy source whose 'entropy' of a token is the token id: the served values must equal the inputs."""

    def __init__(self, documents):
        self.documents = documents

    def span(self, document_index, start, stop):
        return document_tokens(self.documents[document_index])[start:stop].astype(np.float32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_serves_the_entropy_of_every_input_token_across_documents_and_epochs(shuffle):
    documents = small_documents()
    loader = PackedByteLoader(documents, seq_len=37, micro_batch_size=3, dp_rank=1, dp_size=2, seed=5,
                              shuffle=shuffle, entropy_source=TokenValues(documents))  # fmt: skip
    epoch_tokens = loader.epoch_tokens
    for _ in range(3 * epoch_tokens // (37 * 3 * 2) + 1):
        inputs, targets, entropies = loader.next_batch_with_entropies()
        assert entropies.dtype == torch.float32 and entropies.shape == inputs.shape
        assert torch.equal(entropies.long(), inputs)
    assert loader.epochs_consumed > 3


def test_online_entropies_are_the_whole_document_entropies_in_chunks(tmp_path):
    model = EntropyModel(seeded_entropy_model(tmp_path / "em", context=16))
    documents = small_documents()
    source = OnlineEntropies(model, documents)
    for index, document in enumerate(documents):
        whole = model.document_entropies(document)
        assert len(whole) == len(document) + 2
        for start, stop in [(0, len(whole)), (3, 17), (15, 16), (16, 40), (len(whole) - 1, len(whole))]:
            stop = min(stop, len(whole))
            if start < stop:
                np.testing.assert_array_equal(source.span(index, start, stop), whole[start:stop])
    # Within a chunk the model sees the document from the chunk's start: the first chunk's
    # entropies are those of the model run on the first 16 tokens alone.
    long_document = documents[2]
    first_chunk = torch.from_numpy(document_tokens(long_document)[:16]).long().unsqueeze(0)
    np.testing.assert_array_equal(model.document_entropies(long_document)[:16], model.network.entropies(first_chunk)[0])


# Precomputed == online


def test_precomputed_patches_equal_online_patches(tmp_path):
    model_dir = seeded_entropy_model(tmp_path / "em", context=24)
    documents = small_documents()
    summary = precompute(str(model_dir), documents, str(tmp_path / "pre"), shard_tokens=200, workers=1, log=lambda _: None)
    assert summary["shards"] > 3
    median = float(np.median(np.concatenate([EntropyModel(model_dir).document_entropies(d) for d in documents])))
    cfg = load_config(None, ["--patching.mode=entropy", f"--patching.entropy_model={model_dir}",
                             f"--patching.threshold={median}", "--patching.max_patch_length=6"])  # fmt: skip
    online = Patcher(cfg.patching)
    cfg.patching.entropies = str(tmp_path / "pre")
    offline = Patcher(cfg.patching)
    # The trainer's documents are a subset in another order (a split): found by content.
    subset = documents[::-1][:-3]
    loaders = [
        PackedByteLoader(subset, seq_len=29, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3,
                         entropy_source=patcher.entropy_source(subset))
        for patcher in (online, offline)
    ]  # fmt: skip
    patches = 0
    for _ in range(40):
        (tokens, _, online_entropies), (same_tokens, _, offline_entropies) = (l.next_batch_with_entropies() for l in loaders)
        assert torch.equal(tokens, same_tokens)
        assert torch.equal(online_entropies, offline_entropies)
        lengths = online(tokens, online_entropies)
        assert torch.equal(lengths, offline(tokens, offline_entropies))
        patches += int((lengths > 0).sum())
    assert 40 * 2 * 29 / 6 < patches < 40 * 2 * 29, "the threshold must both cut and merge"


def test_precomputed_entropies_refuse_another_model_missing_documents_and_missing_shards(tmp_path):
    model_dir = seeded_entropy_model(tmp_path / "em", context=24)
    other_dir = seeded_entropy_model(tmp_path / "other", context=32)
    documents = small_documents()
    out = tmp_path / "pre"
    precompute(str(model_dir), documents, str(out), shard_tokens=200, workers=1, log=lambda _: None)
    with pytest.raises(Exception, match="another entropy model"):
        PrecomputedEntropies(str(out), EntropyModel(other_dir))
    store = PrecomputedEntropies(str(out), EntropyModel(model_dir))
    with pytest.raises(Exception, match="1 of 2 documents"):
        store.source([documents[3], b"a document nobody precomputed"])
    next(out.glob("shard-*.safetensors")).unlink()
    with pytest.raises(Exception, match="incomplete .* rerun the same precompute command"):
        PrecomputedEntropies(str(out), EntropyModel(model_dir))
    with pytest.raises(Exception, match="another entropy model, data or --shard-tokens"):
        precompute(str(other_dir), documents, str(out), shard_tokens=200, workers=1, log=lambda _: None)


def test_entropies_of_a_prepared_directory_follow_its_shards_and_are_found_by_row(tmp_path, monkeypatch):
    model_dir = seeded_entropy_model(tmp_path / "em", context=24)
    for index, document in enumerate(small_documents()):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"doc{index:02d}.txt").write_bytes(document)
    prepared, out = tmp_path / "prepared", tmp_path / "pre"
    prepare([str(tmp_path / "corpus")], str(prepared), shard_bytes=300, log=lambda _: None)
    result = run_module("bltdist.patch", ["precompute", f"--entropy-model={model_dir}", f"--data={prepared}",
                                          f"--out={out}", "--workers=2"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest, data = (json.loads((d / "manifest.json").read_text()) for d in (out, prepared))
    assert manifest["prepared"] == data["fingerprint"] and len(manifest["shards"]) > 3
    assert [s["documents"] for s in manifest["shards"]] == [s["documents"] for s in data["shards"] if s["documents"]]
    store = PrecomputedEntropies(str(out), EntropyModel(model_dir))
    train, val = build_sources(DataConfig(path=str(prepared), val_fraction=0.3))
    online = EntropyModel(model_dir)
    with monkeypatch.context() as patched:  # found from rows and offsets: no digest is read or hashed
        patched.setattr(DocumentSet, "digests", lambda self: pytest.fail("looked up by digest"))
        sources = [(part, store.source(part)) for part in (train[0].documents, val[0].documents)]
    for documents, source in sources:
        assert len(documents) > 2
        for index, document in enumerate(documents):
            assert np.array_equal(source.span(index, 0, len(document) + 2), online.document_entropies(document))
    # The same documents as a mixture of two sources are found by their stored digests instead.
    loader = PackedByteLoader([train[0], val[0]], 24, 2, 0, 1, seed=1)
    mixed = store.source(loader.documents)
    last = len(loader.documents) - 1
    assert np.array_equal(mixed.span(last, 1, 9), online.document_entropies(val[0].documents[-1])[1:9])


@pytest.mark.slow
def test_precompute_killed_with_sigkill_and_restarted_ends_identical(tmp_path, trained_entropy_model):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("textwrap.py", "csv.py", "json/decoder.py", "json/encoder.py", "string.py", "bisect.py",
                 "shlex.py", "fnmatch.py", "heapq.py", "glob.py", "colorsys.py", "keyword.py"):  # fmt: skip
        (data / name.replace("/", "_")).write_bytes((stdlib_root() / name).read_bytes())
    args = ["precompute", f"--entropy-model={trained_entropy_model}", f"--data={data}", "--shard-tokens=6000",
            "--workers=2"]  # fmt: skip
    # One worker here, two in the killed run: the output depends on neither.
    clean = run_module("bltdist.patch", [*args[:-1], "--workers=1", f"--out={tmp_path / 'clean'}"])
    assert clean.returncode == 0, clean.stderr
    total = json.loads(clean.stdout.splitlines()[-1])["shards"]
    assert total >= 10

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "bltdist.patch", *args, f"--out={killed}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(killed.glob("shard-*.safetensors")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its worker processes, mid-write
    process.wait()
    written_before_kill = len(list(killed.glob("shard-*.safetensors")))
    assert 1 <= written_before_kill < total

    resumed = run_module("bltdist.patch", [*args, f"--out={killed}"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written_before_kill} of {total} shard(s) already written" in resumed.stdout
    assert json.loads(resumed.stdout.splitlines()[-1])["written"] == total - written_before_kill
    clean_files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert sorted(p.name for p in killed.iterdir()) == clean_files
    for name in clean_files:
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


# Calibration


@pytest.fixture(scope="module")
def embedded_sample_rows(trained_entropy_model):
    documents = [document for _, document in load_documents(None)]
    sample = entropy_sample(EntropyModel(trained_entropy_model), documents, sample_bytes=150_000, seed=0)
    return packed_rows(sample, seq_len=512)


@pytest.mark.parametrize("mode", ["global", "monotonic"])
@pytest.mark.parametrize("target", [3.0, 4.5, 6.0])
def test_calibration_hits_the_target_within_2_percent_on_the_embedded_corpus(
    embedded_sample_rows, trained_entropy_model, target, mode
):
    threshold, achieved = calibrate_threshold(embedded_sample_rows, target, mode, max_patch_length=None)
    assert abs(achieved - target) / target < 0.02
    # What training does with that threshold: the same average on the same rows.
    tokens = patches = 0
    cfg = load_config(None, []).patching
    cfg.mode, cfg.threshold, cfg.threshold_mode = "entropy", threshold, mode
    cfg.entropy_model = str(trained_entropy_model)
    for rows, entropies in embedded_sample_rows:
        lengths = Patcher(cfg)(rows, entropies)
        tokens += rows.numel()
        patches += int((lengths > 0).sum())
    assert tokens / patches == pytest.approx(achieved, rel=1e-12)


def test_calibration_with_max_patch_length_and_unreachable_targets(embedded_sample_rows):
    _, achieved = calibrate_threshold(embedded_sample_rows, 4.5, "global", max_patch_length=8)
    assert abs(achieved - 4.5) / 4.5 < 0.02
    _, longest = calibrate_threshold(embedded_sample_rows, 50.0, "global", max_patch_length=8)
    assert 7.0 < longest <= 8.0, "no threshold gives patches longer than max_patch_length"
    _, shortest = calibrate_threshold(embedded_sample_rows, 1.0, "monotonic", max_patch_length=None)
    assert shortest == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_calibrate_command_prints_the_threshold_as_its_last_json_line(trained_entropy_model):
    result = run_module("bltdist.patch", ["calibrate", f"--entropy-model={trained_entropy_model}",
                                          "--target-patch-size=4.5", "--mode=monotonic", "--sample-bytes=100000",
                                          "--seq-len=512"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.splitlines()[-1])
    assert line["mode"] == "monotonic" and line["target_patch_size"] == 4.5
    assert abs(line["achieved_patch_size"] - 4.5) < 0.09 and isinstance(line["threshold"], float)
    assert f"--patching.threshold {line['threshold']!r}" in result.stdout


# Stats


@pytest.mark.slow
def test_stats_show_prose_cut_into_shorter_patches_than_code(tmp_path, trained_entropy_model):
    """The model learned Python code: English prose surprises it more, so it gets shorter patches."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "prose_LICENSE.txt").write_bytes((stdlib_root() / "LICENSE.txt").read_bytes())
    for name in CODE_FILES:
        (data / f"code_{name.replace('/', '_')}").write_bytes((stdlib_root() / name).read_bytes())
    png = tmp_path / "stats.png"
    result = run_module("bltdist.patch", ["stats", f"--entropy-model={trained_entropy_model}", f"--data={data}",
                                          "--threshold=3.4", "--max-patch-length=16", f"--png={png}"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout.splitlines()[-1])["groups"]
    prose = groups.pop("prose_LICENSE.txt")
    assert len(groups) == len(CODE_FILES)
    for name, code in groups.items():
        assert prose["mean_entropy"] > code["mean_entropy"], name
        assert prose["avg_patch_len"] < code["avg_patch_len"], name
        assert 0 < code["share_at_max_patch_length"] < 1
    assert f"{prose['avg_patch_len']:.3f}" in result.stdout  # the table
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.05


# Bad input


def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    blt_dir = tmp_path / "blt_model"
    blt_dir.mkdir()
    (blt_dir / "config.yaml").write_text("model:\n  arch: blt\n")
    (blt_dir / "model.safetensors").write_bytes(b"")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    model = seeded_entropy_model(tmp_path / "em", context=16)
    cases = [
        (["calibrate", f"--entropy-model={not_a_model}", "--target-patch-size=4"], [str(not_a_model), "missing config.yaml"]),
        (["stats", f"--entropy-model={blt_dir}", "--threshold=1"], [str(blt_dir), "not an entropy model"]),
        (["calibrate", f"--entropy-model={model}", "--target-patch-size=0.5"], ["--target-patch-size", ">= 1", "0.5"]),
        (["precompute", f"--entropy-model={model}", f"--data={empty}", f"--out={tmp_path / 'o'}"], [str(empty), "empty"]),
        (["calibrate", f"--entropy-model={model}", "--data=", "--target-patch-size=4"], ["--data", "empty path"]),
    ]  # fmt: skip
    for args, fragments in cases:
        with pytest.raises(SystemExit) as exit_info:
            patch_main(args)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, stderr)
        assert stderr.startswith(f"python -m bltdist.patch {args[0]}: error: ")
        for fragment in fragments:
            assert fragment in stderr, (fragment, stderr)
    # The command line itself: a subprocess exits with code 2 and no traceback.
    result = run_module("bltdist.patch", cases[2][0])
    assert result.returncode == 2 and "--target-patch-size" in result.stderr and "Traceback" not in result.stderr


# Training


@pytest.mark.slow
def test_training_on_precomputed_entropies_equals_training_with_online_patching(tmp_path, trained_entropy_model):
    from test_train import SMALL

    data = tmp_path / "data"
    data.mkdir()
    (data / "prose.txt").write_bytes((stdlib_root() / "LICENSE.txt").read_bytes()[:6000])
    for name in CODE_FILES:
        (data / name.replace("/", "_")).write_bytes((stdlib_root() / name).read_bytes()[:6000])
    documents = [document for _, document in load_documents(str(data))]
    precompute(str(trained_entropy_model), documents, str(tmp_path / "pre"), shard_tokens=5000, workers=1,
               log=lambda _: None)  # fmt: skip
    rows = packed_rows(entropy_sample(EntropyModel(trained_entropy_model), documents, None, seed=0), seq_len=64)
    threshold, _ = calibrate_threshold(rows, 4.0, "global", max_patch_length=8)
    args = [*SMALL, "--train.steps=3", f"--data.path={data}", "--data.val_fraction=0.3", "--patching.mode=entropy",
            f"--patching.entropy_model={trained_entropy_model}", f"--patching.threshold={threshold!r}",
            "--patching.max_patch_length=8"]  # fmt: skip
    runs = {"online": [], "precomputed": [f"--patching.entropies={tmp_path / 'pre'}"]}

    def train(name: str) -> subprocess.CompletedProcess:
        return run_module("bltdist.train", [*args, *runs[name], f"--output_dir={tmp_path / name}"])

    results = side_by_side(train, *((name,) for name in runs))
    records = {}
    for name, result in zip(runs, results):
        assert result.returncode == 0, result.stderr
        records[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for online, offline in zip(records["online"], records["precomputed"], strict=True):
        for key in ("loss", "avg_patch_len", "grad_norm", "val_loss"):
            assert online.get(key) == offline.get(key), key
    patch_lengths_seen = [r["avg_patch_len"] for r in records["online"] if "avg_patch_len" in r]
    # Calibrated for 4 bytes on the same documents; 3 steps of 256 bytes land near it on average.
    assert 2.5 < sum(patch_lengths_seen) / len(patch_lengths_seen) < 5.5, patch_lengths_seen
