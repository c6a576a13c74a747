"""The FLOP-matched baselines beside BLT: model.arch bytelm (the byte-level transformer) and tokenlm (the
same over byte-level BPE tokens), trained by the same trainer on the same rows, bits per byte counted
over bytes for both."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_parallel import train_lines, write_corpus
from test_train import run_trainer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bltdist.config import load_config
from bltdist.data import PackedByteLoader
from bltdist.errors import ConfigError
from bltdist.flops import training_flops_per_byte
from bltdist.model import ByteLM
from bltdist.model.loss import IGNORE_INDEX
from bltdist.parallel import ParallelDims
from bltdist.patching.tokens import BYTE_OFFSET
from bltdist.tokenizer import BPETokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
SHAPE = [
    "--model.entropy.dim=32", "--model.entropy.layers=2", "--model.entropy.heads=2", "--model.entropy.ffn_dim=64",
    "--model.entropy.window=32", "--model.tokenlm.vocab_size=300",
]  # fmt: skip
TRAIN = [
    "--train.seq_len=64", "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.val_batches=1",
    "--train.val_interval=0", "--logging.interval=1", "--optim.warmup_steps=2", "--optim.grad_clip=0.5",
]  # fmt: skip
ARCHS = ("bytelm", "tokenlm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = write_corpus(tmp_path_factory.mktemp("corpus"), 12)
    (root / "latin1.txt").write_bytes("café naïve résumé ".encode("latin-1") * 20)  # not UTF-8
    return root


def train(arch: str, corpus: Path, out: Path, extra: list[str] = (), nproc: int = 1) -> Path:
    args = [f"--model.arch={arch}", *SHAPE, *TRAIN, f"--data.path={corpus}", f"--output_dir={out}", *extra]
    result = run_trainer(args, nproc, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_baseline_trains_loss_falls_and_reports_its_flops(arch, corpus, tmp_path):
    out = train(arch, corpus, tmp_path / arch, ["--train.steps=30", "--optim.lr=3e-3", "--logging.interval=5"])
    losses = [line["loss"] for line in train_lines(out)]
    assert losses[-1] < 0.8 * losses[0], losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_bytes"] == 30 * 8 * 64
    cfg = load_config(str(out / "config.yaml"), [])
    bytes_per_token = [line["avg_patch_len"] for line in train_lines(out)]
    if arch == "tokenlm":
        assert all(1.0 < length < 64 for length in bytes_per_token)  # BPE tokens are its patches
        assert (out / "model" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    else:
        assert bytes_per_token == [None] * len(bytes_per_token)
    # Every logged interval spent its own FLOPs per byte (tokenlm: at its own bytes per token).
    per_byte = [training_flops_per_byte(cfg.model, 64, length or 1.0) for length in bytes_per_token]
    assert summary["train_flops"] == pytest.approx(sum(per_byte) / len(per_byte) * summary["train_bytes"], rel=1e-9)


def test_bpe_rows_predict_every_byte_of_the_stream_exactly_once(corpus):
    """Token targets stand for exactly the byte rows' targets, and consecutive rows tile the stream."""
    documents = [path.read_bytes() for path in sorted(corpus.iterdir())]
    tokenizer = BPETokenizer(train_bpe(documents, 300))
    loader = PackedByteLoader(documents, 64, 4, 0, 1, seed=0, shuffle=False)
    stream_targets, covered = [], []
    for _ in range(12):
        inputs, targets = loader.next_batch()
        token_inputs, token_targets, count = tokenizer.encode_rows(inputs, targets)
        assert count == int((token_targets != IGNORE_INDEX).sum()) < targets.numel()
        assert token_inputs.shape == token_targets.shape
        for row_targets, row_tokens, row_inputs in zip(targets, token_targets, token_inputs):
            real = row_tokens[row_tokens != IGNORE_INDEX].tolist()
            assert row_inputs[1 : len(real)].tolist() == real[:-1]  # inputs are the targets shifted by one
            covered.extend(piece for token in real for piece in token_ids_as_units(tokenizer, token))
            stream_targets.extend(row_targets.tolist())
    assert covered == stream_targets


def token_ids_as_units(tokenizer: BPETokenizer, token: int) -> list[int]:
    """The byte-path ids a token id stands for: a special as itself, a BPE token as its bytes."""
    if token < BYTE_OFFSET:
        return [token]
    return [byte + BYTE_OFFSET for byte in tokenizer.token_bytes(token)]


TRAIN_TOKENIZER = """
import hashlib, sys
from pathlib import Path
from bltdist.tokenizer import train_bpe
documents = [path.read_bytes() for path in sorted(Path(sys.argv[1]).iterdir())]
print(hashlib.sha256(train_bpe(documents, 320).to_str().encode()).hexdigest())
"""


def test_tokenizer_training_is_deterministic_across_processes(corpus):
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", TRAIN_TOKENIZER, str(corpus)], capture_output=True, text=True,
                                env=env, timeout=300, check=True)  # fmt: skip
        digests.add(result.stdout.strip())
    assert len(digests) == 1


def test_tokenizer_is_kept_on_resume_never_retrained(corpus, tmp_path):
    out = train("tokenlm", corpus, tmp_path / "run", ["--train.steps=2", "--checkpoint.interval=1"])
    tokenizer = out / "tokenizer.json"
    before = hashlib.sha256(tokenizer.read_bytes()).hexdigest(), tokenizer.stat().st_mtime_ns
    # A different sample would train a different tokenizer: the resumed run must not train one at all.
    train("tokenlm", corpus, out, ["--train.steps=4", "--checkpoint.resume=auto", "--model.tokenlm.sample_bytes=50"])
    assert (hashlib.sha256(tokenizer.read_bytes()).hexdigest(), tokenizer.stat().st_mtime_ns) == before
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(event.get("event") == "resume" for event in events)
    assert [line["step"] for line in train_lines(out)][-2:] == [3, 4]


def counted_flops(model: torch.nn.Module, rows: list[torch.Tensor]) -> int:
    """Training FLOPs of every row on its own (no padding), the math SDPA backend exposing attention."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        for row in rows:
            logits = model(row[None])
            F.cross_entropy(logits.flatten(0, 1), row).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_per_byte_match_the_flop_counter(arch, corpus):
    seq_len = 256
    cfg = load_config(None, [f"--model.arch={arch}", "--model.entropy.dim=128", "--model.entropy.layers=2",
                             "--model.entropy.heads=4", "--model.entropy.ffn_dim=352", "--model.entropy.window=null",
                             "--model.tokenlm.vocab_size=400"])  # fmt: skip
    documents = [path.read_bytes() for path in sorted(corpus.iterdir())]
    inputs, targets = PackedByteLoader(documents, seq_len, 4, 0, 1, seed=0).next_batch()
    rows, bytes_per_token = list(inputs), 1.0
    if arch == "tokenlm":
        token_inputs, token_targets, count = BPETokenizer(train_bpe(documents, 400)).encode_rows(inputs, targets)
        rows = [row[target != IGNORE_INDEX] for row, target in zip(token_inputs, token_targets)]
        bytes_per_token = inputs.numel() / count
    model = ByteLM(cfg.model.plain_lm())
    counted = counted_flops(model, rows) / inputs.numel()
    formula = training_flops_per_byte(cfg.model, seq_len, bytes_per_token)
    assert abs(formula - counted) / counted < 0.10, (formula, counted)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["cp=2", "pp=2"])
def test_layouts_the_baselines_lack_are_refused_before_the_start(arch, layout):
    degree = {"cp=2": ["--parallel.cp=2"], "pp=2": ["--parallel.pp=2"]}[layout]
    cfg = load_config(None, [f"--model.arch={arch}", *degree, "--parallel.dp_shard=1"])
    with pytest.raises(ConfigError, match=f"parallel.{layout[:2]}: .*{arch}"):
        ParallelDims.from_config(cfg, 2)


@pytest.fixture(scope="module", params=ARCHS)
def single_process_run(request, corpus, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, train(arch, corpus, tmp_path_factory.mktemp(f"single_{arch}"), ["--train.steps=4"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.tp=2", "--parallel.dp_shard=1"]],
                         ids=["dp_shard=2", "tp=2"])  # fmt: skip
def test_parallel_layouts_match_one_process(layout, single_process_run, tmp_path):
    """Losses and global gradient norms of every step, and the bytes per token, as one process."""
    arch, reference = single_process_run
    out = train(arch, corpus_of(reference), tmp_path / "parallel", ["--train.steps=4", *layout], nproc=2)
    expected, got = train_lines(reference), train_lines(out)
    assert len(got) == len(expected) == 4
    for a, b in zip(expected, got):
        assert b["avg_patch_len"] == a["avg_patch_len"]  # bytes per token (tokenlm), None for bytelm
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), f"{key} at step {a['step']}: {b[key]} vs {a[key]}"
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line]
    val_reference = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()
                     if "val_bpb" in line]  # fmt: skip
    assert [v["val_bpb"] for v in val] == pytest.approx([v["val_bpb"] for v in val_reference], rel=1e-5)


def corpus_of(run: Path) -> Path:
    return Path(load_config(str(run / "config.yaml"), []).data.path)
