"""Attention backends: which one runs each call (auto never gives fp32 to flash-attn), flash-attn's
varlen translation through a stand-in package, and compiled FlexAttention on CPU against SDPA."""

from __future__ import annotations

import logging
import sys
import textwrap
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from bltdist.config import load_config
from bltdist.model import attention
from bltdist.model.attention import (
    SelfAttentionMask,
    _flash_attention,
    byte_to_slot_attention,
    patch_pool_attention,
    resolve_backend,
)
from bltdist.training.parallelize import meta_model

CUDA = torch.device("cuda")  # only a name here: resolving a backend touches no CUDA state
CPU = torch.device("cpu")

# A stand-in for flash-attn (which needs CUDA to install): the varlen entry point computes each
# sequence of the packed batch with SDPA and records how it was called.
FAKE_FLASH_ATTN = '''
import torch
import torch.nn.functional as F

calls = []


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=False, window_size=(-1, -1)):
    calls.append({"dtype": q.dtype, "cu_seqlens": cu_seqlens_q.tolist(), "max_seqlen": max_seqlen_q,
                  "causal": causal, "window_size": window_size})
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    out = torch.empty_like(q)
    edges = cu_seqlens_q.tolist()
    for start, end in zip(edges[:-1], edges[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], dim=0)
        vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], dim=0)
        delta = torch.arange(end - start)[:, None] - torch.arange(end - start)[None, :]
        visible = delta >= 0 if causal else torch.ones_like(delta, dtype=torch.bool)
        if window_size[0] >= 0:
            visible = visible & (delta <= window_size[0])
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible).transpose(0, 1)
    return out
'''


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """The stand-in importable as ``flash_attn`` for this test only."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_FLASH_ATTN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    attention.flash_attn_available.cache_clear()
    yield __import__("flash_attn")
    sys.modules.pop("flash_attn")
    attention.flash_attn_available.cache_clear()


@pytest.fixture(autouse=True)
def fresh_backend_log():
    attention._log_once.cache_clear()


def doc_ids(batch: int, length: int, starts: tuple[int, ...]) -> torch.Tensor:
    ids = torch.zeros(batch, length, dtype=torch.long)
    for start in starts:
        ids[:, start:] += 1
    return ids


def qkv(batch, length, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, length, heads, head_dim)] + [(batch, length, kv_heads, head_dim)] * 2
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def test_auto_picks_flash_only_for_half_precision(fake_flash_attn, caplog):
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert resolve_backend("auto", CUDA, torch.bfloat16) == "flash"
        assert resolve_backend("auto", CUDA, torch.float16) == "flash"
        # The fp32 entropy model (and train.dtype float32) never reaches flash-attn.
        assert resolve_backend("auto", CUDA, torch.float32) == "flex"
        assert resolve_backend("auto", CPU, torch.bfloat16) == "sdpa"
        for _ in range(3):
            resolve_backend("auto", CUDA, torch.bfloat16)
    choices = [r.getMessage() for r in caplog.records]
    # One line per distinct choice, however many calls make it.
    assert choices == [
        "attention backend flash (requested auto) for bfloat16 cuda inputs, head dim 16",
        "attention backend flash (requested auto) for float16 cuda inputs, head dim 16",
        "attention backend flex (requested auto) for float32 cuda inputs, head dim 16",
        "attention backend sdpa (requested auto) for bfloat16 cpu inputs, head dim 16",
    ]


def test_explicit_backends_fall_back_per_call_and_say_so_once(fake_flash_attn, caplog):
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert resolve_backend("flash", CUDA, torch.bfloat16) == "flash"
        assert resolve_backend("flash", CUDA, torch.float32) == "flex"
        assert resolve_backend("flash", CUDA, torch.float32) == "flex"
        assert resolve_backend("flex", CPU, torch.float32, needs_grad=False) == "flex"
        assert resolve_backend("flex", CPU, torch.float32, needs_grad=True) == "sdpa"
        assert resolve_backend("flex", CUDA, torch.float32, needs_grad=True) == "flex"
        assert resolve_backend("sdpa", CUDA, torch.bfloat16) == "sdpa"
        assert resolve_backend("flex", CUDA, torch.bfloat16, head_dim=8) == "sdpa"
        assert resolve_backend("flash", CUDA, torch.float32, head_dim=8) == "sdpa"
        assert resolve_backend("auto", CUDA, torch.bfloat16, head_dim=15) == "flash"
    fallbacks = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    small_heads = "compiled FlexAttention needs heads of at least 16 dims"
    assert fallbacks == [
        "attention backend flash falls back to flex for float32 cuda inputs, head dim 16: flash-attn computes only "
        "in bf16/fp16",
        "attention backend flex falls back to sdpa for float32 cpu inputs, head dim 16: torch has no FlexAttention "
        "backward on CPU",
        f"attention backend flex falls back to sdpa for bfloat16 cuda inputs, head dim 8: {small_heads}",
        f"attention backend flash falls back to sdpa for float32 cuda inputs, head dim 8: {small_heads}",
    ]  # fmt: skip


def test_auto_without_flash_attn_uses_flex_on_cuda():
    attention.flash_attn_available.cache_clear()
    try:
        if attention.flash_attn_available():
            pytest.skip("flash-attn is installed here: this test covers its absence")
        assert resolve_backend("auto", CUDA, torch.bfloat16) == "flex"
        assert resolve_backend("auto", CUDA, torch.bfloat16, head_dim=8) == "sdpa"
        with pytest.raises(ValueError, match="model.attention_backend 'flash' needs CUDA"):
            resolve_backend("flash", CUDA, torch.bfloat16)
        with pytest.raises(ValueError, match="model.attention_backend: unknown backend 'xformers'"):
            resolve_backend("xformers", CPU)
    finally:
        attention.flash_attn_available.cache_clear()


def test_patch_counts_are_bucketed_where_the_global_attention_is_compiled_flex(fake_flash_attn):
    """Training (bltdist.training.step.Stepper) and evaluation bucket patch counts exactly when the
    global model's attention is compiled FlexAttention, which compiles a graph per patch count."""
    def per_shape(overrides, device, dtype, needs_grad=True):
        model = meta_model(load_config("configs/blt_1b.yaml", overrides).model)
        return model.global_attention_compiles_per_shape(device, dtype, needs_grad)

    assert per_shape([], CUDA, torch.float32)  # fp32 never reaches flash-attn
    assert not per_shape([], CUDA, torch.bfloat16)  # flash-attn takes any length
    assert not per_shape([], CPU, torch.bfloat16)  # SDPA
    assert per_shape(["--model.attention_backend=flex"], CUDA, torch.bfloat16)
    assert per_shape(["--model.attention_backend=flex"], CPU, torch.float32, needs_grad=False)
    assert not per_shape(["--model.attention_backend=flex"], CPU, torch.float32, needs_grad=True)


@pytest.mark.parametrize("window", [None, 7])
def test_flash_varlen_translation_equals_sdpa(fake_flash_attn, window):
    """Documents become the varlen sequences and the window becomes window_size: through the
    stand-in, whose every sequence is plain SDPA, the result is the blocked-SDPA backend's."""
    q, k, v = qkv(2, 40, 4, 2, 8, dtype=torch.bfloat16)
    ids = doc_ids(2, 40, (9, 30))
    ids[1] = doc_ids(1, 40, (22,))[0]
    out = _flash_attention(q, k, v, SelfAttentionMask(ids, window, "flash"))
    expected = SelfAttentionMask(ids, window, "sdpa").attend(q.float(), k.float(), v.float())
    assert torch.allclose(out.float(), expected, atol=2e-2)
    (call,) = fake_flash_attn.calls
    assert call["dtype"] == torch.bfloat16 and call["causal"]
    assert call["cu_seqlens"] == [0, 9, 30, 40, 62, 80]  # row 1 starts at 40
    assert call["max_seqlen"] == 22
    assert call["window_size"] == ((-1, -1) if window is None else (window - 1, 0))


def flex_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_flex_equals_sdpa_on_byte_and_patch_masks():
    """The byte mask (causal, windowed, within documents, GQA) and the patch mask (causal within
    documents, right-padding patches a document of their own): compiled FlexAttention forward
    equals blocked SDPA; a new batch of the same shape reuses the compiled graph."""
    byte_ids = doc_ids(2, 160, (50, 120))
    patch_ids = torch.cat([doc_ids(2, 30, (11,)), torch.full((2, 6), -1)], dim=1)
    cases = [(byte_ids, 24, qkv(2, 160, 4, 2, 16)), (patch_ids, None, qkv(2, 36, 4, 4, 16, seed=1))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")
        for ids, window, (q, k, v) in cases:
            flex = SelfAttentionMask(ids, window, "flex").attend(q, k, v)
            sdpa = SelfAttentionMask(ids, window, "sdpa").attend(q, k, v)
            assert torch.allclose(flex, sdpa, atol=1e-5)
        graphs = flex_graphs()
        shifted = doc_ids(2, 160, (3, 90))  # other documents, same shape
        q, k, v = qkv(2, 160, 4, 2, 16, seed=2)
        flex = SelfAttentionMask(shifted, 24, "flex").attend(q, k, v)
        assert torch.allclose(flex, SelfAttentionMask(shifted, 24, "sdpa").attend(q, k, v), atol=1e-5)
        assert flex_graphs() == graphs


@pytest.mark.parametrize("backend, window", [("sdpa", 24), ("sdpa", None), ("flex", 24)])
def test_a_prepared_mask_attends_as_an_unprepared_one(backend, window):
    """The model prepares each mask before its blocks (backend resolved, masks built), so that no
    compiled block resolves or builds them; the attention stays the one built on first use."""
    ids = doc_ids(2, 160, (50, 120))
    q, k, v = qkv(2, 160, 4, 2, 16)
    with torch.no_grad():  # FlexAttention on CPU: forward only
        unprepared = SelfAttentionMask(ids, window, backend).attend(q, k, v)
        mask = SelfAttentionMask(ids, window, backend)
        mask.prepare(q.flatten(2), head_dim=16)
        assert mask._cache["backend"] == backend
        built = dict(mask._cache)
        assert torch.equal(mask.attend(q, k, v), unprepared)
    assert mask._cache.keys() == built.keys()  # attend built nothing more


def test_flex_on_cpu_with_gradients_runs_sdpa_and_its_backward():
    """torch has no FlexAttention backward on CPU: a training call falls back to SDPA, whose
    gradients equal those of the sdpa backend (the compiled Flex backward is in test_cuda.py)."""
    ids = doc_ids(1, 48, (20,))
    grads = {}
    for backend in ("flex", "sdpa"):
        q, k, v = (x.requires_grad_() for x in qkv(1, 48, 2, 2, 8, seed=3))
        SelfAttentionMask(ids, 16, backend).attend(q, k, v).square().sum().backward()
        grads[backend] = [x.grad for x in (q, k, v)]
    for flex_grad, sdpa_grad in zip(grads["flex"], grads["sdpa"]):
        assert torch.allclose(flex_grad, sdpa_grad, atol=1e-6)


@pytest.mark.slow  # two more FlexAttention compilations
def test_cross_attentions_equal_compiled_flex_with_their_masks():
    """Both byte-patch cross-attentions, computed with gathers and segment softmaxes, equal
    compiled FlexAttention given the same visibility as a mask (forward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len, num_patches, heads, head_dim = 1, 24, 6, 2, 16
    lengths = torch.tensor([1, 5, 3, 7, 4, 4])
    patch_ids = torch.repeat_interleave(torch.arange(num_patches), lengths)[None]
    generator = torch.Generator().manual_seed(4)
    slot_q = torch.randn(batch, num_patches, 1, heads, head_dim, generator=generator)
    byte_k, byte_v = (torch.randn(batch, seq_len, heads, head_dim, generator=generator) for _ in range(2))

    def pool_visible(b, h, q_idx, kv_idx):  # patch q_idx's slot sees the bytes of patch q_idx
        return patch_ids[b, kv_idx] == q_idx

    def unpool_visible(b, h, q_idx, kv_idx):  # byte q_idx sees the slot of patch patch_ids[q_idx]
        return patch_ids[b, q_idx] == kv_idx

    with torch.no_grad():
        pool_mask = create_block_mask(pool_visible, batch, None, num_patches, seq_len, device="cpu")
        pooled = attention._run_flex(
            slot_q[:, :, 0].transpose(1, 2), byte_k.transpose(1, 2), byte_v.transpose(1, 2), block_mask=pool_mask
        ).transpose(1, 2)
        assert torch.allclose(patch_pool_attention(slot_q, byte_k, byte_v, patch_ids)[:, :, 0], pooled, atol=1e-5)
        unpool_mask = create_block_mask(unpool_visible, batch, None, seq_len, num_patches, device="cpu")
        slot_k, slot_v = (slot_q.roll(shifts, dims=-1) for shifts in (1, 2))
        unpooled = attention._run_flex(
            byte_k.transpose(1, 2), slot_k[:, :, 0].transpose(1, 2), slot_v[:, :, 0].transpose(1, 2),
            block_mask=unpool_mask,
        ).transpose(1, 2)  # fmt: skip
        assert torch.allclose(byte_to_slot_attention(byte_k, slot_k, slot_v, patch_ids), unpooled, atol=1e-5)
