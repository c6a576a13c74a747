"""Patches of patches (model.blt.super_patch): the grouping rule, causality, the FLOP formula, the
layouts it runs under (FSDP x TP against one process) and the ones refused before the start."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_model import (
    build,
    counted_training_flops_per_byte,
    make_tokens,
    static_lengths,
    tiny_blt_config,
)
from test_parallel import write_corpus
from test_train import run_trainer

from bltdist.config import SuperPatchConfig, load_config
from bltdist.errors import ConfigError
from bltdist.flops import blt_forward_flops_per_byte
from bltdist.model.super_patch import SuperPatchGlobal, SuperPatchLayout
from bltdist.parallel import ParallelDims

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def two_level(n: int = 3, slots: int = 1, **overrides):
    return tiny_blt_config(**overrides, super_patch=SuperPatchConfig(enabled=True, patches_per_super_patch=n,
                                                                     cross_attn_k=slots, decoder_layers=2))  # fmt: skip


def test_super_patches_start_at_documents_never_cross_them_and_pad_to_a_multiple():
    # Row 0: documents start at patches 0 and 6; patches 11.. are padding (-1). Row 1: one document.
    docs = torch.tensor([[0] * 6 + [1] * 5 + [-1] * 5, [0] * 16])
    layout = SuperPatchLayout.build(docs, patches_per_super_patch=3, backend="sdpa")
    # A document start is a super-patch of its own, the patch after it starts one, then every 3.
    assert layout.super_ids[0].tolist() == [0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5, 6, 7, 7, 7, 8]
    assert layout.super_ids[1].tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    for row in range(2):  # never two documents in one super-patch
        for s in layout.super_ids[row].unique():
            assert len(docs[row][layout.super_ids[row] == s].unique()) == 1
    # Patch q reads the last super-patch ending at or before q; the last patch reads its own.
    assert layout.source_super[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    # 9 super-patches padded to a multiple of gcd(16 patches, 16); padding ones are a document of their own.
    assert layout.num_supers == 16 and layout.super_mask.doc_ids[0].tolist() == [0] * 3 + [1] * 3 + [-1] * 10


def test_two_level_blt_is_causal():
    """Changing bytes from position k on leaves every logit before k (predicting bytes <= k) as it was."""
    model = build(two_level(slots=2))
    assert isinstance(model.global_model, SuperPatchGlobal)
    generator = torch.Generator().manual_seed(0)
    tokens = make_tokens(2, 96, docs_at=(30,), generator=generator)
    logits = model(tokens, static_lengths(tokens, 3))
    for k in (2, 13, 31, 47, 80, 95):
        changed = tokens.clone()
        changed[:, k:] = torch.randint(4, 260, changed[:, k:].shape, generator=generator)
        changed[:, 30] = tokens[:, 30]  # the document start stays, so the patch count does too
        changed_logits = model(changed, static_lengths(changed, 3))
        torch.testing.assert_close(changed_logits[:, :k], logits[:, :k], rtol=0, atol=1e-6)
        assert not torch.allclose(changed_logits[:, k + 1 :], logits[:, k + 1 :]) or k == 95


@pytest.mark.parametrize("patch_size, n, slots", [(4, 4, 1), (3, 2, 2)])
def test_flop_formula_covers_the_second_level(patch_size, n, slots):
    cfg = two_level(n, slots, local_dim=64, local_heads=2, global_dim=128, global_heads=4, global_layers=3,
                    local_window=None)  # fmt: skip
    tokens = make_tokens(2, 128)
    lengths = static_lengths(tokens, patch_size)
    formula = 3 * blt_forward_flops_per_byte(cfg, 128, tokens.numel() / int((lengths > 0).sum()))
    counted = counted_training_flops_per_byte(build(cfg), tokens, lengths)
    assert abs(formula - counted) / counted < 0.10, (formula, counted)


@pytest.mark.parametrize("parallel, message", [
    (["--parallel.cp=2"], "parallel.cp: model.blt.super_patch with cp = 2 is not supported"),
    (["--parallel.pp=2"], "parallel.pp: model.blt.super_patch with pp = 2 is not supported"),
    (["--parallel.tp=3", "--model.blt.global_heads=3", "--model.blt.local_heads=3", "--model.blt.local_dim=36",
      "--model.blt.global_dim=72", "--model.blt.encoder_ffn_dim=96", "--model.blt.decoder_ffn_dim=96",
      "--model.blt.global_ffn_dim=192"], "powers of two"),
])  # fmt: skip
def test_context_and_pipeline_parallelism_are_refused_before_the_start(parallel, message):
    cfg = load_config(None, ["--model.blt.super_patch.enabled=true", "--parallel.dp_shard=1", *parallel])
    with pytest.raises(ConfigError, match=message):
        ParallelDims.from_config(cfg, int(parallel[0][-1]))


SMALL = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.encoder_layers=1",
    "--model.blt.decoder_layers=2", "--model.blt.global_dim=64", "--model.blt.global_heads=2",
    "--model.blt.global_layers=2", "--model.blt.hash_vocab=64", "--model.blt.local_window=16",
    "--model.blt.hash_ngram_sizes=[3,4]", "--model.blt.encoder_ffn_dim=64", "--model.blt.decoder_ffn_dim=64",
    "--model.blt.global_ffn_dim=128", "--patching.patch_size=3", "--model.blt.super_patch.enabled=true",
    "--model.blt.super_patch.patches_per_super_patch=3", "--model.blt.super_patch.cross_attn_k=2",
    "--train.seq_len=64", "--train.global_batch_size=8", "--train.steps=4", "--train.val_batches=1",
    "--train.val_interval=0", "--logging.interval=1", "--optim.warmup_steps=2", "--optim.grad_clip=0.5",
]  # fmt: skip


def train_lines(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_level_blt_under_fsdp_and_tensor_parallel_matches_one_process(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus", 12)
    single, layout = tmp_path / "single", tmp_path / "dp_shard2_tp2"
    result = run_trainer([*SMALL, "--train.micro_batch_size=4", f"--data.path={corpus}", f"--output_dir={single}"])
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_trainer([*SMALL, "--train.micro_batch_size=2", "--parallel.dp_shard=2", "--parallel.tp=2",
                          f"--data.path={corpus}", f"--output_dir={layout}"], nproc=4)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    expected, got = train_lines(single), train_lines(layout)
    assert len(got) == len(expected) == 4
    for a, b in zip(expected, got):
        for key in ("loss", "grad_norm"):  # the gradient norm would show a wrongly scaled or lost gradient
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    one, four = load_file(single / "model" / "model.safetensors"), load_file(layout / "model" / "model.safetensors")
    assert one.keys() == four.keys() and any(".patch_encoder." in name for name in one)
    for name, tensor in one.items():  # 4 AdamW steps of 2e-3 at most: a flipped sign would show
        torch.testing.assert_close(four[name], tensor, rtol=0, atol=2e-3, msg=lambda m: f"{name}: {m}")


def test_tiny_2level_config_trains_on_cpu(tmp_path):
    result = run_trainer(["configs/tiny_2level.yaml", "--train.steps=3", "--train.seq_len=128", "--train.val_batches=1",
                          "--logging.interval=1", "--optim.warmup_steps=1", f"--output_dir={tmp_path}"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = train_lines(tmp_path)
    assert lines[-1]["loss"] < lines[0]["loss"]
