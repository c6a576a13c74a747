import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bltdist.config import BLTConfig, EntropyModelConfig
from bltdist.flops import blt_forward_flops_per_byte, byte_lm_forward_flops_per_byte
from bltdist.model import BLT, ByteLM
from bltdist.model.attention import SelfAttentionMask, resolve_backend
from bltdist.model.hash_embedding import HASH_PRIMES, HashNgramEmbedding, ngram_hash
from bltdist.patching import patch_lengths, patch_starts


def tiny_blt_config(**overrides) -> BLTConfig:
    base = dict(
        local_dim=32, local_heads=4, local_kv_heads=2, encoder_layers=2, decoder_layers=2, local_window=8,
        global_dim=48, global_layers=2, global_heads=4, cross_attn_k=2, hash_ngram_sizes=[3, 4, 5],
        hash_functions=2, hash_vocab=97, rope_theta=10000.0,
    )  # fmt: skip
    base.update(overrides)
    return BLTConfig(**base)


def build(cfg, cls=BLT):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def make_tokens(
    batch: int, seq_len: int, seed: int = 0, docs_at=(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random bytes with a BOS opening each row and a document starting at each of ``docs_at``; drawn
    from ``generator`` when given (the caller goes on drawing from it), else from a fresh one seeded
    with ``seed``."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 260, (batch, seq_len), generator=generator)
    tokens[:, 0] = 1
    for position in docs_at:
        tokens[:, position - 1] = 2
        tokens[:, position] = 1
    return tokens


def static_lengths(tokens: torch.Tensor, size: int = 3) -> torch.Tensor:
    return patch_lengths(patch_starts(tokens, "static", patch_size=size))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"encoder_cross_attn_all_layers": True, "decoder_cross_attn_all_layers": False, "cross_attn_k": 3},
        {"local_window": None, "global_final_norm": False, "cross_attn_double_residual": True},
    ],
)
def test_changing_byte_t_never_changes_earlier_logits(overrides):
    model = build(tiny_blt_config(**overrides))
    tokens = make_tokens(2, 40, docs_at=(21,))
    lengths = static_lengths(tokens)
    reference = model(tokens, lengths)
    assert reference.shape == (2, 40, 260) and reference.dtype == torch.float32
    # Positions on patch starts, patch middles, patch ends and the last byte.
    for t in (1, 2, 3, 4, 7, 13, 20, 22, 30, 39):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] - 4 + 17) % 256 + 4
        logits = model(changed, lengths)
        assert torch.equal(logits[:, :t], reference[:, :t]), f"byte {t} leaked into earlier positions"
        assert not torch.equal(logits[:, t:], reference[:, t:])


def test_documents_do_not_see_each_other():
    model = build(tiny_blt_config(local_window=None))
    tokens = make_tokens(1, 48, docs_at=(24,))
    lengths = static_lengths(tokens)
    reference = model(tokens, lengths)
    changed = tokens.clone()
    changed[:, 5:20] = (changed[:, 5:20] - 4 + 101) % 256 + 4
    logits = model(changed, lengths)
    # The second document (from its BOS at 24) must not notice the first one changed.
    assert torch.allclose(logits[:, 24:], reference[:, 24:], atol=1e-6)


def test_every_parameter_gets_a_gradient():
    model = build(tiny_blt_config(encoder_cross_attn_all_layers=True))
    tokens = make_tokens(2, 32)
    logits = model(tokens, static_lengths(tokens))
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_patch_lengths_must_cover_the_sequence():
    model = build(tiny_blt_config())
    tokens = make_tokens(1, 16)
    with pytest.raises(ValueError, match="sum to the sequence length 16"):
        model(tokens, torch.tensor([[1, 4, 4]]))


def test_ragged_patch_counts_in_one_batch_match_separate_rows():
    model = build(tiny_blt_config())
    tokens = make_tokens(2, 24)
    short = patch_lengths(patch_starts(tokens[:1], "static", patch_size=2))
    long = patch_lengths(patch_starts(tokens[1:], "static", patch_size=6))
    padded = torch.zeros(2, short.shape[1], dtype=torch.long)
    padded[0] = short[0]
    padded[1, : long.shape[1]] = long[0]
    together = model(tokens, padded)
    assert torch.allclose(together[:1], model(tokens[:1], short), atol=1e-5)
    assert torch.allclose(together[1:], model(tokens[1:], long), atol=1e-5)


def brute_force_hash(sequence: list[int], n: int, prime: int, table_size: int) -> list[int]:
    """The formula of BLT_NOTES section 1 in Python integers, wrapped to signed 64 bits."""
    padded = [0] * (n - 1) + sequence
    out = []
    for j in range(len(sequence)):
        value = sum(padded[j + i] * prime**i for i in range(n))
        value = (value + 2**63) % 2**64 - 2**63
        out.append(value % table_size)
    return out


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("prime", [HASH_PRIMES[0], HASH_PRIMES[6]])
def test_ngram_hash_matches_the_formula(n, prime):
    tokens = make_tokens(2, 30, seed=n)
    hashed = ngram_hash(tokens, n, prime, 500002)
    for row in range(2):
        assert hashed[row].tolist() == brute_force_hash(tokens[row].tolist(), n, prime, 500002)


def test_hash_embedding_sums_one_row_per_table():
    embedding = HashNgramEmbedding([3, 4], num_functions=2, table_size=11, dim=5)
    torch.nn.init.normal_(embedding.weight)
    tokens = make_tokens(1, 9)
    expected = torch.zeros(1, 9, 5)
    table = 0
    for function in range(2):
        for n in (3, 4):
            rows = torch.tensor(brute_force_hash(tokens[0].tolist(), n, HASH_PRIMES[function], 11)) + table * 11
            expected[0] += embedding.weight[rows]
            table += 1
    assert torch.allclose(embedding(tokens), expected, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5, 200])
def test_blocked_sdpa_equals_dense_reference(window):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 300, 4, 8, generator=generator)
    k = torch.randn(2, 300, 2, 8, generator=generator)
    v = torch.randn(2, 300, 2, 8, generator=generator)
    tokens = make_tokens(2, 300, docs_at=(77, 250))
    mask = SelfAttentionMask(torch.cumsum(tokens == 1, dim=1), window, "sdpa")
    positions = torch.arange(300)
    dense = mask.visible(positions, positions)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=dense,
    ).transpose(1, 2)
    assert torch.allclose(mask.attend(q, k, v), expected, atol=1e-5)


def test_flex_backend_agrees_with_sdpa_backend():
    model = build(tiny_blt_config())
    tokens = make_tokens(1, 32, docs_at=(17,))
    lengths = static_lengths(tokens)
    # FlexAttention has no backward on CPU (its eager path is the reference); compare forwards.
    with torch.no_grad():
        sdpa_logits = model(tokens, lengths)
        model.attention_backend = "flex"
        flex_logits = model(tokens, lengths)
    assert torch.allclose(flex_logits, sdpa_logits, atol=1e-4)


def test_backend_selection_falls_back_without_flash_attn():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_backend("flash", torch.device("cpu"))


def counted_training_flops_per_byte(model, tokens, *forward_args) -> float:
    # The math SDPA backend decomposes attention into matmuls that the counter sees.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(tokens, *forward_args)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return counter.get_total_flops() / tokens.numel()


@pytest.mark.parametrize(
    "overrides, patch_size",
    [
        (dict(local_dim=128, local_heads=4, global_dim=256, global_heads=4, local_window=128, hash_vocab=101), 4),
        (dict(local_dim=192, local_heads=6, local_kv_heads=2, global_dim=320, global_heads=5, global_layers=3,
              cross_attn_k=3, local_window=None, decoder_cross_attn_all_layers=False), 6),
        (dict(local_dim=64, local_heads=2, global_dim=512, global_heads=8, global_layers=4, encoder_layers=3,
              encoder_cross_attn_all_layers=True, local_window=256, encoder_ffn_dim=96, decoder_ffn_dim=200), 3),
    ],
)  # fmt: skip
def test_flop_formula_matches_flop_counter(overrides, patch_size):
    cfg = tiny_blt_config(**overrides)
    model = build(cfg)
    tokens = make_tokens(2, 128)
    lengths = static_lengths(tokens, patch_size)
    avg_patch_len = tokens.numel() / int((lengths > 0).sum())
    formula = 3 * blt_forward_flops_per_byte(cfg, 128, avg_patch_len)
    counted = counted_training_flops_per_byte(model, tokens, lengths)
    assert abs(formula - counted) / counted < 0.10


def test_entropy_model_flops_and_entropies():
    cfg = EntropyModelConfig(dim=64, layers=2, heads=4, ffn_dim=128, window=None)
    model = build(cfg, ByteLM)
    tokens = make_tokens(2, 64)
    formula = 3 * byte_lm_forward_flops_per_byte(cfg, 64)
    counted = counted_training_flops_per_byte(model, tokens)
    assert abs(formula - counted) / counted < 0.10
    entropies = model.entropies(tokens)
    assert entropies.shape == (2, 64)
    assert bool((entropies >= 0).all()) and bool((entropies <= torch.log(torch.tensor(260.0)) + 1e-4).all())
