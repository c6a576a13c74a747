"""Interchange with the Hugging Face BLT port: numerical parity, bit-exact round trips, bad input.

The reference models are random tiny ``transformers`` BLTs saved with ``save_pretrained``; their
weights are perturbed after init so that every norm weight differs from 1 and a swapped or
misnamed tensor changes the logits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BltConfig, BltForCausalLM, BltPatcher, BltPatcherConfig

import bltdist
from bltdist.config import BLTConfig, Config, EntropyModelConfig, load_config
from bltdist.convert import from_hf, main, to_hf
from bltdist.errors import UserError
from bltdist.model import BLT, ByteLM
from bltdist.model_dir import save_weights_dir
from bltdist.patching import patch_starts

REPO = Path(__file__).resolve().parents[1]

# Tiny configs that differ in cross_attn_k, n-gram sizes, hash functions, cross-attention on all
# layers or one, GQA, the global input projection (k * local != global), window, theta and eps.
VARIANTS = {
    "k1-gqa-projection": dict(
        k=1, ngrams=[3, 4], functions=1, encoder_all=False, decoder_all=True, local_heads=4, local_kv=2,
        global_dim=24, global_heads=4, global_kv=1, window=8, encoder_layers=1, decoder_layers=2,
    ),
    "k2-two-functions-encoder-all-layers": dict(
        k=2, ngrams=[2, 5, 6], functions=2, encoder_all=True, decoder_all=False, local_heads=2, local_kv=2,
        global_dim=32, global_heads=2, global_kv=2, window=None, encoder_layers=2, decoder_layers=2,
    ),
    "k3-three-functions-all-layers-gqa": dict(
        k=3, ngrams=[3], functions=3, encoder_all=True, decoder_all=True, local_heads=4, local_kv=1,
        global_dim=32, global_heads=2, global_kv=2, window=16, encoder_layers=2, decoder_layers=3, eps=1e-6,
    ),
    "k2-released-ngrams-first-layer-only": dict(
        k=2, ngrams=[3, 4, 5, 6, 7, 8], functions=1, encoder_all=False, decoder_all=False, local_heads=2,
        local_kv=2, global_dim=32, global_heads=4, global_kv=2, window=12, encoder_layers=1, decoder_layers=1,
        theta=10000.0,
    ),
}  # fmt: skip

LOCAL_DIM = 16


def hf_blt_config(variant: dict, with_patcher: bool = False) -> BltConfig:
    rope = {"rope_type": "default", "rope_theta": variant.get("theta", 500000.0)}
    eps = variant.get("eps", 1e-5)
    local = dict(
        hidden_size=LOCAL_DIM, num_attention_heads=variant["local_heads"], num_key_value_heads=variant["local_kv"],
        cross_attn_k=variant["k"], hidden_size_global=variant["global_dim"], rope_parameters=rope,
        rms_norm_eps=eps, intermediate_size=40,
    )  # fmt: skip
    return BltConfig(
        patch_in_forward=with_patcher,
        patching_mode="entropy",
        patching_threshold=2.5,
        local_attention_window_len=variant["window"],
        cross_attn_k=variant["k"],
        encoder_hash_byte_group_size=variant["ngrams"],
        encoder_hash_byte_group_vocab=13,
        encoder_hash_byte_group_nb_functions=variant["functions"],
        encoder_config=dict(
            local, num_hidden_layers=variant["encoder_layers"], cross_attn_all_layers=variant["encoder_all"]
        ),
        decoder_config=dict(
            local, num_hidden_layers=variant["decoder_layers"], cross_attn_all_layers=variant["decoder_all"]
        ),
        global_config=dict(
            hidden_size=variant["global_dim"], num_attention_heads=variant["global_heads"],
            num_key_value_heads=variant["global_kv"], num_hidden_layers=2, intermediate_size=48,
            rope_parameters=rope, rms_norm_eps=eps,
        ),  # fmt: skip
        patcher_config=PATCHER_SHAPE,
    )


PATCHER_SHAPE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
    sliding_window=16,
)  # fmt: skip


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def saved_hf_blt(
    tmp_path: Path, variant: dict, seed: int = 0, with_patcher: bool = False
) -> tuple[BltForCausalLM, Path]:
    torch.manual_seed(seed)
    model = perturbed(BltForCausalLM(hf_blt_config(variant, with_patcher)), seed)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def random_documents(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """One document per row: BOS, then random bytes (as ids)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 260, (batch, seq_len), generator=generator)
    tokens[:, 0] = 1
    return tokens


def random_patch_lengths(seq_len: int, patch_counts: list[int], seed: int) -> torch.Tensor:
    """A BOS patch of 1, then count - 1 patches of random positive lengths per row; zero-padded."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for count in patch_counts:
        cuts = torch.randperm(seq_len - 2, generator=generator)[: count - 2].add(1).sort().values.tolist()
        edges = [0, *cuts, seq_len - 1]
        rows.append([1] + [b - a for a, b in zip(edges, edges[1:])] + [0] * (max(patch_counts) - count))
    return torch.tensor(rows)


def hf_logits(model: BltForCausalLM, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # The port lets the last byte read the last patch only when a zero-length patch follows it
    # (see bltdist.convert); bltdist always treats the sequence end as a patch boundary.
    closed = torch.cat([lengths, torch.zeros_like(lengths[:, :1])], dim=1)
    with torch.no_grad():
        return model(input_ids=tokens, patch_lengths=closed, use_cache=False).logits


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_the_hugging_face_port(tmp_path, name):
    variant = VARIANTS[name]
    reference, hf_dir = saved_hf_blt(tmp_path, variant, seed=len(name))
    from_hf(hf_dir, tmp_path / "ours")
    ours = bltdist.load_pretrained(tmp_path / "ours")
    assert not ours.training

    tokens = random_documents(3, 48, seed=1)
    lengths = random_patch_lengths(48, [9, 9, 9], seed=2)
    with torch.no_grad():
        logits = ours(tokens, lengths)
    expected = hf_logits(reference, tokens, lengths)
    assert logits.shape == expected.shape == (3, 48, 260) and logits.dtype == torch.float32
    assert relative_error(logits, expected) < 1e-4

    # Rows with fewer patches, right-padded with zero lengths. The port feeds the last byte of a
    # padded row from a padding patch (its decoder counts the padding as patch starts), so that one
    # position per padded row is not comparable; every other position must match.
    ragged = random_patch_lengths(48, [12, 5, 8], seed=3)
    with torch.no_grad():
        logits = ours(tokens, ragged)
    expected = hf_logits(reference, tokens, ragged)
    comparable = torch.ones(3, 48, dtype=torch.bool)
    comparable[1:, -1] = False
    assert relative_error(logits[comparable], expected[comparable]) < 1e-4


def test_without_the_converter_options_the_logits_differ(tmp_path):
    """The reference quirks the converter sets are needed: each one changes the logits."""
    variant = VARIANTS["k2-two-functions-encoder-all-layers"]
    reference, hf_dir = saved_hf_blt(tmp_path, variant)
    from_hf(hf_dir, tmp_path / "ours")
    tokens = random_documents(2, 32, seed=4)
    lengths = random_patch_lengths(32, [6, 6], seed=5)
    expected = hf_logits(reference, tokens, lengths)
    converted = load_config(str(tmp_path / "ours" / "config.yaml"), [])
    weights = load_file(tmp_path / "ours" / "model.safetensors")
    for option, clean_value in [("cross_attn_double_residual", False), ("encoder_cross_attn_repool", False)]:
        cfg = BLTConfig(**{**vars(converted.model.blt), option: clean_value})
        model = BLT(cfg).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            assert relative_error(model(tokens, lengths), expected) > 1e-2, option


def sharpened_patcher(seed: int) -> BltPatcher:
    """A random entropy model whose predictions are peaked enough for entropies to spread out."""
    torch.manual_seed(seed)
    patcher = perturbed(BltPatcher(BltPatcherConfig(**PATCHER_SHAPE)), seed)
    with torch.no_grad():
        patcher.lm_head.weight.mul_(8.0)
    return patcher


def threshold_in_widest_gap(values: torch.Tensor) -> float:
    """A threshold near the median of ``values`` that is far from all of them, so that the
    float-level differences between two implementations cannot move a boundary."""
    ordered = values.flatten().sort().values
    middle = ordered[len(ordered) // 4 : 3 * len(ordered) // 4 + 1]
    gaps = middle[1:] - middle[:-1]
    widest = int(gaps.argmax())
    assert gaps[widest] > 1e-3, "entropies too close together for an exact boundary comparison"
    return float((middle[widest] + middle[widest + 1]) / 2)


def hf_patch_starts(lengths: torch.Tensor, seq_len: int) -> list[set[int]]:
    """Start positions from the port's patch lengths (trailing zero or negative entries from its
    batch padding repeat a start or point past the sequence; as positions they drop out)."""
    starts = torch.cumsum(lengths, dim=1) - lengths
    return [{int(s) for s in row if 0 <= s < seq_len} for row in starts]


def our_patch_starts(starts: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in starts]


def reference_monotonic_starts(entropies: torch.Tensor, threshold: float) -> list[set[int]]:
    """facebookresearch/blt ``find_entropy_patch_start_ids(monotonicity=True)``, written as a loop:
    positions 0, 1 and 2 start patches; byte t+1 (t >= 2) starts one when H(t) - H(t-1) > threshold."""
    seq_len = entropies.shape[1]
    rows = []
    for row in entropies.tolist():
        starts = {0, 1, 2}
        starts |= {t + 1 for t in range(2, seq_len - 1) if row[t] - row[t - 1] > threshold}
        rows.append(starts)
    return rows


def test_entropy_patching_matches_the_port_and_the_reference(tmp_path):
    patcher = sharpened_patcher(seed=7)
    patcher.save_pretrained(tmp_path / "hf_patcher")
    from_hf(tmp_path / "hf_patcher", tmp_path / "entropy")
    ours = bltdist.load_pretrained(tmp_path / "entropy")
    assert isinstance(ours, ByteLM)

    seq_len = 64
    tokens = random_documents(4, seq_len, seed=8)
    with torch.no_grad():
        their_entropies, _, _ = patcher(tokens, use_cache=False)
    our_entropies = ours.entropies(tokens)
    assert relative_error(our_entropies, their_entropies) < 1e-4

    threshold = threshold_in_widest_gap(their_entropies[:, 1:-1])
    with torch.no_grad():
        _, their_lengths, _ = patcher(tokens, patch_size=4, threshold=threshold, use_cache=False)
    ours_global = our_patch_starts(patch_starts(tokens, "entropy", entropies=our_entropies, threshold=threshold))
    assert ours_global == hf_patch_starts(their_lengths, seq_len)
    assert all(4 < len(row) < seq_len - 4 for row in ours_global), "threshold should cut some patches, not all"

    rises = their_entropies[:, 2:-1] - their_entropies[:, 1:-2]
    threshold = threshold_in_widest_gap(rises)
    ours_monotonic = our_patch_starts(
        patch_starts(tokens, "entropy", entropies=our_entropies, threshold=threshold, threshold_mode="monotonic")
    )
    assert ours_monotonic == reference_monotonic_starts(their_entropies, threshold)
    assert all(4 < len(row) < seq_len - 4 for row in ours_monotonic)


def assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype, name
        assert torch.equal(tensor, second[name]), name


def test_round_trip_from_hf_is_bit_exact_with_patcher_shards_and_bf16(tmp_path):
    variant = VARIANTS["k3-three-functions-all-layers-gqa"]
    torch.manual_seed(0)
    original = perturbed(BltForCausalLM(hf_blt_config(variant, with_patcher=True)), 0).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"
    original_tensors = {}
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        original_tensors.update(load_file(shard))

    from_hf(tmp_path / "hf", tmp_path / "ours")
    converted = load_config(str(tmp_path / "ours" / "config.yaml"), [])
    assert converted.patching.mode == "entropy" and converted.patching.threshold == 2.5
    assert Path(converted.patching.entropy_model) == tmp_path / "ours" / "entropy_model"
    to_hf(tmp_path / "ours", tmp_path / "hf_again")
    assert_same_tensors(original_tensors, load_file(tmp_path / "hf_again" / "model.safetensors"))

    reloaded, info = BltForCausalLM.from_pretrained(tmp_path / "hf_again", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.patch_in_forward and reloaded.config.patching_threshold == 2.5
    for part in ("encoder_config", "decoder_config", "global_config", "patcher_config"):
        theirs, again = getattr(original.config, part).to_dict(), getattr(reloaded.config, part).to_dict()
        shape_keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                      "intermediate_size", "rms_norm_eps", "rope_parameters", "cross_attn_all_layers")  # fmt: skip
        assert {k: theirs.get(k) for k in shape_keys} == {k: again.get(k) for k in shape_keys}, part


def test_round_trip_from_bltdist_is_bit_exact(tmp_path):
    cfg = Config()
    cfg.model.blt = BLTConfig(
        local_dim=16, local_heads=4, local_kv_heads=2, encoder_layers=2, decoder_layers=2, local_window=8,
        global_dim=24, global_layers=1, global_heads=2, cross_attn_k=2, encoder_cross_attn_all_layers=True,
        encoder_cross_attn_repool=True, hash_ngram_sizes=[3, 5], hash_functions=2, hash_vocab=17,
        global_final_norm=False, cross_attn_double_residual=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BLT(cfg.model.blt)
    model.init_weights()
    save_weights_dir(model.state_dict(), cfg, tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "again")
    assert_same_tensors(
        load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    )
    assert load_config(str(tmp_path / "again" / "config.yaml"), []).model.blt == cfg.model.blt

    # The exported model computes what ours computes (HF loads it offline from the directory).
    reference = BltForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = random_documents(2, 40, seed=9)
    lengths = random_patch_lengths(40, [7, 7], seed=10)
    with torch.no_grad():
        assert relative_error(model.eval()(tokens, lengths), hf_logits(reference, tokens, lengths)) < 1e-4

    entropy_cfg = Config()
    entropy_cfg.model.arch = "entropy"
    entropy_cfg.model.entropy = EntropyModelConfig(dim=16, layers=1, heads=2, ffn_dim=24, window=8)
    entropy_model = ByteLM(entropy_cfg.model.entropy)
    entropy_model.init_weights()
    save_weights_dir(entropy_model.state_dict(), entropy_cfg, tmp_path / "entropy")
    to_hf(tmp_path / "entropy", tmp_path / "hf_patcher")
    assert BltPatcher.from_pretrained(tmp_path / "hf_patcher").config.sliding_window == 8
    from_hf(tmp_path / "hf_patcher", tmp_path / "entropy_again")
    assert_same_tensors(
        load_file(tmp_path / "entropy" / "model.safetensors"),
        load_file(tmp_path / "entropy_again" / "model.safetensors"),
    )
    assert load_config(str(tmp_path / "entropy_again" / "config.yaml"), []).model.entropy == entropy_cfg.model.entropy


def test_to_hf_refuses_options_the_port_cannot_compute(tmp_path):
    cfg = Config()
    cfg.model.blt = BLTConfig(local_dim=16, local_heads=2, decoder_layers=1, global_dim=32, global_layers=1,
                              global_heads=2, hash_vocab=7)  # fmt: skip
    save_weights_dir(BLT(cfg.model.blt).state_dict(), cfg, tmp_path / "ours")
    with pytest.raises(UserError, match="global_final_norm.*\n.*cross_attn_double_residual"):
        to_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file or tensor, and the command line exits with code 2.


def convert_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return saved_hf_blt(tmp_path, VARIANTS["k1-gqa-projection"])[1]


def test_a_directory_that_is_not_a_blt_checkpoint(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    error = convert_error(capsys, "from-hf", str(tmp_path / "llama"), str(tmp_path / "out"))
    assert "llama/config.json" in error and "not a BLT checkpoint" in error

    (tmp_path / "empty").mkdir()
    error = convert_error(capsys, "from-hf", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert "no config.json" in error
    error = convert_error(capsys, "to-hf", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert "no config.yaml" in error and "not a bltdist model directory" in error
    assert not (tmp_path / "out").exists()


def test_an_output_directory_that_is_not_empty_is_left_alone(hf_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    error = convert_error(capsys, "from-hf", str(hf_dir), str(tmp_path / "out"))
    assert str(tmp_path / "out") in error and "not empty" in error
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_missing_and_truncated_weights(hf_dir, tmp_path, capsys):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    error = convert_error(capsys, "from-hf", str(hf_dir), str(tmp_path / "out"))
    assert str(weights) in error and "truncated" in error

    weights.unlink()
    error = convert_error(capsys, "from-hf", str(hf_dir), str(tmp_path / "out"))
    assert str(hf_dir) in error and "model.safetensors" in error


def test_a_shard_missing_from_a_sharded_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    BltForCausalLM(hf_blt_config(VARIANTS["k1-gqa-projection"])).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    error = convert_error(capsys, "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert str(shard) in error and "not found" in error


def test_config_shapes_that_do_not_match_the_weights(hf_dir, tmp_path, capsys):
    config_file = hf_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["encoder_hash_byte_group_vocab"] = 14
    config["global_config"]["intermediate_size"] = 50
    config_file.write_text(json.dumps(config))
    error = convert_error(capsys, "from-hf", str(hf_dir), str(tmp_path / "out"))
    assert "model.encoder_hash_tok_embedding.weight" in error and "(26, 16)" in error and "(28, 16)" in error
    assert "model.global_transformer.layers.0.mlp.up_proj.weight" in error and str(config_file) in error

    config["encoder_hash_byte_group_vocab"] = 13
    config["decoder_config"]["hidden_size"] = 8
    del config["global_config"]["num_hidden_layers"]
    config_file.write_text(json.dumps(config))
    error = convert_error(capsys, "from-hf", str(hf_dir), str(tmp_path / "out"))
    assert "encoder_config.hidden_size=16 and decoder_config.hidden_size=8 differ" in error
    assert "global_config.num_hidden_layers: missing" in error


def test_a_bltdist_directory_whose_config_does_not_match_its_weights(tmp_path, capsys):
    cfg = Config()
    cfg.model.arch = "entropy"
    cfg.model.entropy = EntropyModelConfig(dim=16, layers=1, heads=2, ffn_dim=24)
    save_weights_dir(ByteLM(cfg.model.entropy).state_dict(), cfg, tmp_path / "ours")
    cfg.model.entropy.ffn_dim = 32
    from bltdist.config import save_config

    save_config(cfg, tmp_path / "ours" / "config.yaml")
    error = convert_error(capsys, "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert "layers.0.ffn.up_proj.weight" in error and "(24, 16)" in error and "(32, 16)" in error


@pytest.mark.slow
def test_command_line_converts_and_reports_bad_input_with_exit_code_2(hf_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "bltdist.convert"]
    result = subprocess.run(
        [*command, "from-hf", str(hf_dir), str(tmp_path / "ours")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ours" / "config.yaml").is_file() and (tmp_path / "ours" / "model.safetensors").is_file()

    result = subprocess.run(
        [*command, "from-hf", str(tmp_path), str(tmp_path / "other")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2 and "bltdist-convert: error:" in result.stderr and "config.json" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_training_a_converted_model_with_its_converted_entropy_model(tmp_path):
    variant = dict(VARIANTS["k2-released-ngrams-first-layer-only"], window=32)
    _, hf_dir = saved_hf_blt(tmp_path, variant, with_patcher=True)
    from_hf(hf_dir, tmp_path / "ours")
    # The random patcher's entropies sit near ln(260); the median over some text cuts about half the bytes.
    entropy_model = bltdist.load_pretrained(tmp_path / "ours" / "entropy_model")
    text = torch.tensor([[1, *(byte + 4 for byte in Path(__file__).read_bytes()[:256])]])
    threshold = float(entropy_model.entropies(text).median())
    out = tmp_path / "run"
    settings = [
        "--train.seq_len=64", "--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.steps=25",
        "--train.val_interval=0", "--train.val_batches=1", "--logging.interval=1", "--optim.warmup_steps=2",
        "--optim.lr=3e-3", f"--patching.threshold={threshold}", f"--checkpoint.init_from={tmp_path / 'ours'}",
        f"--output_dir={out}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "bltdist.train", str(tmp_path / "ours" / "config.yaml"), *settings],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    patch_lengths = [line["avg_patch_len"] for line in lines if "avg_patch_len" in line]
    assert all(length > 1.2 for length in patch_lengths), f"the converted entropy model should patch: {patch_lengths}"
