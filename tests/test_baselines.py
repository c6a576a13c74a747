"""The FLOP-matched baselines beside BLT: model.arch bytelm (the byte-level transformer) and tokenlm (the
same over byte-level BPE tokens), trained by the same trainer on the same rows, bits per byte counted
over bytes for both."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_parallel import assert_first_step_weights_match, train_lines, write_corpus
from test_plan import measured_peaks
from test_train import run_trainer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bltdist.config import load_config
from bltdist.data import PackedByteLoader, build_sources
from bltdist.errors import ConfigError, UserError
from bltdist.flops import training_flops_per_byte
from bltdist.model import ByteLM
from bltdist.model.loss import IGNORE_INDEX
from bltdist.parallel import ParallelDims
from bltdist.patching.tokens import BYTE_OFFSET
from bltdist.plan import ActivationModel, count_parameters, estimate, layout_config, plan
from bltdist.tokenizer import ORIGIN_FILE, BPETokenizer, prepare_run_tokenizer, train_bpe

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
    # A resume whose settings would train another tokenizer stops before the start, naming what changed.
    args = ["--model.arch=tokenlm", *SHAPE, *TRAIN, f"--data.path={corpus}", f"--output_dir={out}",
            "--train.steps=4", "--checkpoint.resume=auto"]  # fmt: skip
    refused = run_trainer([*args, "--model.tokenlm.sample_bytes=50"], timeout=600)
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert f"{tokenizer}: cannot be reused" in refused.stderr and "model.tokenlm.sample_bytes" in refused.stderr
    assert [line["step"] for line in train_lines(out)][-1] == 2
    # The same settings: the resumed run keeps the tokenizer and does not train one at all.
    train("tokenlm", corpus, out, ["--train.steps=4", "--checkpoint.resume=auto"])
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
def test_a_pipeline_with_more_stages_than_layers_is_refused_before_the_start(arch):
    # Interleaved1F1B runs two stages per rank: 4 stages for the 2 layers of SHAPE.
    cfg = load_config(None, [f"--model.arch={arch}", *SHAPE, "--parallel.pp=2", "--parallel.dp_shard=1",
                             "--parallel.pp_schedule=Interleaved1F1B"])  # fmt: skip
    with pytest.raises(ConfigError, match="parallel.pp: .*4 pipeline stages, but model.entropy.layers is 2"):
        ParallelDims.from_config(cfg, 2)


# Every step saved, so that the weights after the first step can be compared.
CHECKPOINTS = ["--train.steps=4", "--checkpoint.interval=1", "--checkpoint.keep_last=0"]


@pytest.fixture(scope="module", params=ARCHS)
def single_process_run(request, corpus, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, train(arch, corpus, tmp_path_factory.mktemp(f"single_{arch}"), CHECKPOINTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.tp=2", "--parallel.dp_shard=1"],
                                    ["--parallel.cp=2", "--parallel.dp_shard=1"],
                                    ["--parallel.pp=2", "--parallel.dp_shard=1"]],
                         ids=["dp_shard=2", "tp=2", "cp=2", "pp=2"])  # fmt: skip
def test_parallel_layouts_match_one_process(layout, single_process_run, tmp_path):
    """Losses and global gradient norms of every step, the bytes per token, and the weights after the
    first step, as one process. bytelm's window (32) is shorter than its rows (64): under cp it runs
    the halo exchange; tokenlm's rows of at most 32 tokens run ring attention."""
    arch, reference = single_process_run
    out = train(arch, corpus_of(reference), tmp_path / "parallel", [*CHECKPOINTS, *layout], nproc=2)
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
    assert_first_step_weights_match(reference, out)


def corpus_of(run: Path) -> Path:
    return Path(load_config(str(run / "config.yaml"), []).data.path)


def test_a_kept_tokenizer_is_reused_only_when_the_run_would_make_the_same_one(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    out = tmp_path / "run"

    def prepare(*extra: str) -> Path:
        cfg = load_config(None, ["--model.arch=tokenlm", *SHAPE, f"--data.path={data}", f"--output_dir={out}", *extra])
        return prepare_run_tokenizer(cfg, build_sources(cfg.data)[0])

    path = prepare()
    made = path.read_bytes(), path.stat().st_mtime_ns
    # The same training sample and vocabulary make the same tokenizer: kept, even under a sample_bytes
    # budget that still takes every training document.
    assert prepare() == prepare("--model.tokenlm.sample_bytes=100000000") == path
    changed = [(["--data.val_fraction=0.3"], "data.val_fraction 0.02 -> 0.3"),
               (["--model.tokenlm.sample_bytes=50"], "model.tokenlm.sample_bytes 16000000 -> 50"),
               (["--model.tokenlm.vocab_size=320"], "model.tokenlm.vocab_size 300 -> 320")]  # fmt: skip
    for extra, named in changed:
        with pytest.raises(UserError, match="cannot be reused") as refused:
            prepare(*extra)
        assert str(refused.value).startswith(f"{path}: ") and named in str(refused.value)
        assert "\n" not in str(refused.value)
    # Same settings, other bytes on disk: the sample's digest tells.
    for document in data.iterdir():
        document.write_bytes(document.read_bytes().replace(b"e", b"E"))
    with pytest.raises(UserError, match="training sample of .* sha256") as refused:
        prepare()
    assert "data.path" not in str(refused.value)
    (out / ORIGIN_FILE).unlink()
    with pytest.raises(UserError, match=f"{ORIGIN_FILE}.* is missing"):
        prepare()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == made  # never retrained nor rewritten


def test_the_planner_plans_a_bpe_baseline_before_its_tokenizer_exists(tmp_path):
    cfg = load_config(None, ["--model.arch=tokenlm", *SHAPE, *TRAIN, f"--output_dir={tmp_path / 'run'}"])
    estimates, why = plan(cfg, gpus=2, gpu_mem_gb=80, gpus_per_node=8, dtype_bytes=2)
    assert {str(e.layout) for e in estimates} >= {"cp=2", "pp=2", "tp=2", "dp_shard=2"}
    assert why.startswith("recommended: ") and all(e.activations > 0 for e in estimates)
    assert not (tmp_path / "run").exists()  # the probe's tokenizer is a scratch one, never the run's


@pytest.mark.slow
def test_planner_estimates_of_the_new_baseline_layouts_match_the_measured_peak(tmp_path):
    """Context and pipeline parallel bytelm layouts: the planner's memory per rank within 20% of the
    peak measured in a real gloo run (as tests/test_plan.py checks BLT's)."""
    args = ["--model.arch=bytelm", "--model.entropy.dim=256", "--model.entropy.layers=4", "--model.entropy.heads=4",
            "--model.entropy.ffn_dim=704", "--train.seq_len=512", "--train.global_batch_size=4",
            "--train.micro_batch_size=4", f"--output_dir={tmp_path / 'run'}"]  # fmt: skip
    cfg = load_config(None, args)
    counts, activations = count_parameters(cfg), ActivationModel.probe(cfg)
    runs = {}
    for layout in (ParallelDims(pp=2), ParallelDims(cp=2)):
        dims, candidate = layout_config(cfg, layout)
        predicted = estimate(candidate, dims, counts, activations, gpus_per_node=8, compute_bytes=4).total
        layout_args = [*args, *(f"--parallel.{k}={v}" for k, v in layout.sizes().items())]
        runs[layout] = predicted, layout_args, tmp_path / f"{layout}.json"
    # Both layouts have 2 ranks: one launch measures one, then the other (start-up is most of a launch).
    (first, (_, first_args, first_out)), (_, (_, second_args, second_out)) = runs.items()
    measured_peaks(first_args, first, first_out, (second_args, second_out))
    for layout, (predicted, _, out) in runs.items():
        peaks = json.loads(out.read_text())["peak_bytes_per_rank"]
        assert predicted == pytest.approx(max(peaks), rel=0.2), (layout, predicted, peaks)
