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
from test_train import run_trainer, run_trainers_together

from bltdist.config import SuperPatchConfig, load_config
from bltdist.errors import ConfigError
from bltdist.flops import blt_forward_flops_per_byte
from bltdist.model.blt import ByteLM, PatchLayout
from bltdist.model.super_patch import SuperPatchGlobal, SuperPatchLayout, starts_of_lengths, static_starts
from bltdist.model_dir import save_weights_dir
from bltdist.parallel import ParallelDims
from bltdist.patching.rules import patch_lengths, patch_starts, super_patch_lengths

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def two_level(n: int = 3, slots: int = 1, mode: str = "static", **overrides):
    return tiny_blt_config(**overrides, super_patch=SuperPatchConfig(enabled=True, patches_per_super_patch=n,
                                                                     cross_attn_k=slots, decoder_layers=2,
                                                                     mode=mode))  # fmt: skip


def causal_entropies(tokens: torch.Tensor) -> torch.Tensor:
    """Stand-in next-byte entropies: H(t) from byte t alone, so causal like an entropy model's."""
    return ((tokens * 37) % 11).float() / 2


def entropy_grouped(tokens: torch.Tensor, threshold: float = 8.0, max_patches: int | None = 3):
    """Entropy patches and their entropy super-patches, as the patcher computes them."""
    entropies = causal_entropies(tokens)
    lengths = patch_lengths(patch_starts(tokens, "entropy", entropies=entropies, threshold=3.0))
    return lengths, super_patch_lengths(tokens, lengths, entropies, threshold, max_patches)


def seeded_entropy_model(directory) -> str:
    """An untrained entropy model with large weights: its entropies (about 3.8 to 4.8 nats) vary from
    byte to byte, so patches and super-patches vary in size. Saved like a trained one."""
    cfg = load_config(None, ["--model.arch=entropy", "--model.entropy.dim=16", "--model.entropy.layers=1",
                             "--model.entropy.heads=2", "--model.entropy.ffn_dim=32", "--model.entropy.window=16",
                             "--model.entropy.init_std=0.4", "--train.seq_len=64"])  # fmt: skip
    torch.manual_seed(0)
    model = ByteLM(cfg.model.entropy)
    model.init_weights()
    return str(save_weights_dir(model.state_dict(), cfg, directory))


def entropy_grouping(directory) -> list[str]:
    return ["--patching.mode=entropy", f"--patching.entropy_model={seeded_entropy_model(directory)}",
            "--patching.threshold=4.6", "--model.blt.super_patch.mode=entropy",
            "--model.blt.super_patch.entropy_threshold=12",
            "--model.blt.super_patch.max_patches_per_super_patch=3"]  # fmt: skip


def test_super_patches_start_at_documents_never_cross_them_and_pad_to_a_multiple():
    # Row 0: documents start at patches 0 and 6; patches 11.. are padding (-1). Row 1: one document.
    docs = torch.tensor([[0] * 6 + [1] * 5 + [-1] * 5, [0] * 16])
    layout = SuperPatchLayout.build(docs, static_starts(docs, 3), backend="sdpa")
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


def test_entropy_super_patches_close_past_the_threshold_at_documents_and_at_the_maximum():
    # Row 0: documents start at bytes 0 and 10 (patches 0 and 5); row 1: one document. 0 = padding patch.
    tokens = torch.full((2, 16), 40)
    tokens[:, 0], tokens[0, 9], tokens[0, 10] = 1, 2, 1
    lengths = torch.tensor([[1, 2, 2, 3, 2, 1, 2, 3, 0], [1, 3, 3, 3, 3, 3, 0, 0, 0]])
    entropies = torch.ones(2, 16)
    entropies[0, 3:5], entropies[0, 8:10] = 2.0, 5.0  # patch sums, row 0: 1, 2, 4, 3, 10, 1, 2, 3
    # Closes once the sum passes 5 (2 + 4; 3 + 10); 2 + 3 = 5 does not pass; the BOS patch 5 is alone.
    assert super_patch_lengths(tokens, lengths, entropies, 5.0).tolist() == [[1, 2, 2, 1, 2], [1, 2, 2, 1, 0]]
    # Without a reachable threshold only documents close super-patches, or the maximum does.
    assert super_patch_lengths(tokens, lengths, entropies, 100.0).tolist() == [[1, 4, 1, 2], [1, 5, 0, 0]]
    assert super_patch_lengths(tokens, lengths, entropies, 100.0, 2).tolist() == [[1, 2, 2, 1, 2], [1, 2, 2, 1, 0]]
    assert super_patch_lengths(tokens, lengths, entropies, 5.0, 1).tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    # The model takes them as given; padding patches (3 per row here) form super-patches of their own.
    grouped = super_patch_lengths(tokens, lengths, entropies, 5.0)
    docs = PatchLayout.build(tokens, torch.nn.functional.pad(lengths, (0, 3)), None, "sdpa").patch_mask.doc_ids
    layout = SuperPatchLayout.build(docs, starts_of_lengths(grouped, docs), "sdpa")
    assert layout.super_ids.tolist() == [[0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 6], [0, 1, 1, 2, 2, 3, 4, 5, 5, 5, 5, 5]]
    assert layout.source_super[0, :8].tolist() == [0, 0, 1, 1, 2, 3, 3, 4]  # one super-patch behind
    with pytest.raises(ValueError, match="super_patch_lengths must sum"):
        starts_of_lengths(grouped[:, :-1], docs)


def test_super_patch_counts_are_bucketed_like_the_callers_patch_counts():
    """The super-patch count moves with the documents per row; a caller that buckets the patch count (compiled
    shapes) gets it bucketed alike, so batches with ever other document counts meet few shapes."""
    generator = torch.Generator().manual_seed(0)
    shapes = {None: set(), 3: set()}
    for documents in range(0, 200, 8):
        docs = torch.zeros(1, 1024, dtype=torch.long)
        for start in torch.randperm(1023, generator=generator)[:documents] + 1:
            docs[0, start:] += 1
        starts = static_starts(docs, 2)
        real = int(starts.sum())
        for bits in shapes:
            layout = SuperPatchLayout.build(docs, starts, "sdpa", bits)
            assert layout.num_supers >= real and layout.num_supers % 16 == 0
            shapes[bits].add(layout.num_supers)
    assert len(shapes[3]) <= 3 < 8 <= len(shapes[None]), shapes  # 512 + 1-2 per document: 512, 640, 768


@pytest.mark.parametrize("mode", ["static", "entropy"])
def test_bucketed_super_patch_rows_change_no_logit(mode):
    model = build(two_level(slots=2, mode=mode))
    tokens = make_tokens(2, 96, docs_at=(30,))
    if mode == "static":
        lengths, grouped = static_lengths(tokens, 3), None
    else:
        lengths, grouped = entropy_grouped(tokens)
    layouts = [PatchLayout.build(tokens, lengths, None, "sdpa", grouped, bits) for bits in (None, 1)]
    rows = [SuperPatchLayout.build(layout.patch_mask.doc_ids, model.global_model._starts(layout), "sdpa",
                                   layout.bucket_bits).num_supers for layout in layouts]  # fmt: skip
    assert rows[0] < rows[1]  # one significant bit: a power of two, so padding rows are there
    plain = model(tokens, lengths, super_patch_lengths=grouped)
    bucketed = model(tokens, lengths, super_patch_lengths=grouped, bucket_bits=1)
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["static", "entropy"])
def test_two_level_blt_is_causal(mode):
    """Changing bytes from position k on leaves every logit before k (predicting bytes <= k) as it was.
    With entropy patches and super-patches the grouping itself changes after k, as the model's would."""
    model = build(two_level(slots=2, mode=mode))
    assert isinstance(model.global_model, SuperPatchGlobal)
    generator = torch.Generator().manual_seed(0)
    tokens = make_tokens(2, 96, docs_at=(30,), generator=generator)

    def forward(rows):
        if mode == "static":
            return model(rows, static_lengths(rows, 3))
        lengths, grouped = entropy_grouped(rows)
        return model(rows, lengths, super_patch_lengths=grouped)

    logits = forward(tokens)
    for k in (2, 13, 31, 47, 80, 95):
        changed = tokens.clone()
        changed[:, k:] = torch.randint(4, 260, changed[:, k:].shape, generator=generator)
        changed[:, 30] = tokens[:, 30]  # the document start stays, so the patch count does too
        changed_logits = forward(changed)
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


def test_flop_formula_covers_super_patches_of_varying_size():
    """mode entropy: the formula at the measured average super-patch size, against FlopCounterMode."""
    cfg = two_level(mode="entropy", local_dim=64, local_heads=2, global_dim=128, global_heads=4, global_layers=3,
                    local_window=None)  # fmt: skip
    tokens = make_tokens(2, 128, docs_at=(70,))
    lengths, grouped = entropy_grouped(tokens, threshold=15.0, max_patches=None)
    sizes = grouped[grouped > 0]
    assert sizes[sizes > 1].unique().numel() >= 3  # super-patches of several sizes
    avg_patch_len, avg_super_patch_len = tokens.numel() / int((lengths > 0).sum()), sizes.float().mean().item()
    formula = 3 * blt_forward_flops_per_byte(cfg, 128, avg_patch_len, avg_super_patch_len)
    counted = counted_training_flops_per_byte(build(cfg), tokens, lengths, None, None, None, grouped)
    assert abs(formula - counted) / counted < 0.10, (formula, counted)


@pytest.mark.parametrize("overrides, message", [
    (["--model.blt.super_patch.mode=entropy", "--model.blt.super_patch.entropy_threshold=10"],
     "model.blt.super_patch.mode: entropy sums next-byte entropies, which only patching.mode: entropy computes "
     r"\(got patching.mode: static\); set patching.mode: entropy or model.blt.super_patch.mode: static"),
    (["--model.blt.super_patch.mode=entropy", "--patching.mode=entropy", "--patching.entropy_model=somewhere"],
     "model.blt.super_patch.entropy_threshold: required"),
    (["--model.blt.super_patch.max_patches_per_super_patch=4"], "applies to mode entropy only"),
])  # fmt: skip
def test_entropy_grouping_is_refused_without_entropies_or_threshold(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--model.blt.super_patch.enabled=true", *overrides])


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
@pytest.mark.parametrize("grouping", ["static", "entropy"])
def test_two_level_blt_under_fsdp_and_tensor_parallel_matches_one_process(tmp_path, grouping):
    """Entropy super-patches are grouped by every rank from its batch: tp ranks must agree."""
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus", 12)
    args = [*SMALL, f"--data.path={corpus}", *(entropy_grouping(tmp_path / "entropy") if grouping == "entropy" else [])]
    single, layout = tmp_path / "single", tmp_path / "dp_shard2_tp2"
    layout_args = ["--train.micro_batch_size=2", "--parallel.dp_shard=2", "--parallel.tp=2", f"--output_dir={layout}"]
    runs = [([*args, "--train.micro_batch_size=4", f"--output_dir={single}"], 1), ([*args, *layout_args], 4)]
    for result in run_trainers_together(runs):
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


@pytest.mark.parametrize("config", ["tiny_2level", "tiny_2level_entropy"])
def test_tiny_2level_config_trains_on_cpu(tmp_path, config):
    """tiny_2level_entropy.yaml with a stand-in entropy model (its thresholds set for that model's
    entropies, about 4.5 nats a byte), so that patches and super-patches vary in size."""
    grouping = entropy_grouping(tmp_path / "entropy") + ["--model.blt.super_patch.entropy_threshold=40"]
    result = run_trainer([f"configs/{config}.yaml", "--train.steps=3", "--train.seq_len=128", "--train.val_batches=1",
                          "--logging.interval=1", "--optim.warmup_steps=1", f"--output_dir={tmp_path / 'run'}",
                          *(grouping if config == "tiny_2level_entropy" else [])])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = train_lines(tmp_path / "run")
    assert lines[-1]["loss"] < lines[0]["loss"]
