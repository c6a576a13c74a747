"""The Triton kernels against the PyTorch reference (on CPU under TRITON_INTERPRET=1, see conftest).

Every comparison uses fresh random inputs; the reference runs in fp32 on the same (rounded)
inputs, so a bf16 kernel is held to 1e-2 and an fp32 kernel to 1e-5, relative.
"""

import pytest
import torch
from bltdist.kernels.cross_attention import byte_to_slot_attention, patch_pool_attention
from bltdist.kernels.hash_embedding import hash_ngram_embedding
from test_model import make_tokens

from bltdist import kernels
from bltdist.config import ConfigError, load_config
from bltdist.memtrack import PeakTensorMemory
from bltdist.metrics import RecompilationCounter
from bltdist.model import BLT, PatchLayout
from bltdist.model import attention as reference
from bltdist.model.hash_embedding import HashNgramEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float | None = None):
    """Elementwise relative error within the dtype's tolerance, with an absolute floor at the
    same fraction of ``scale`` (default: the tensor's largest entry; entries near zero have no
    relative scale)."""
    tolerance = TOLERANCE[dtype]
    expected = expected.float()
    floor = tolerance * (expected.abs().max().item() if scale is None else scale)
    torch.testing.assert_close(actual.float(), expected, rtol=tolerance, atol=floor)


@pytest.mark.parametrize("backward_mode", ["atomic", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_embedding_kernel_matches_reference(dtype, backward_mode):
    generator = torch.Generator().manual_seed(1)
    # 37 positions (not a multiple of the 16-position block), two documents per row, a small
    # table so that many n-grams share rows (colliding gradient updates), dim 40 (not a power of 2).
    tokens = make_tokens(2, 37, docs_at=(19,), generator=generator).to(DEVICE)
    module = HashNgramEmbedding([3, 4, 5, 6, 7, 8], num_functions=2, table_size=31, dim=40, kernels="torch")
    weight = torch.randn(module.weight.shape, generator=generator).to(DEVICE, dtype)
    module = module.to(DEVICE)
    module.weight.data = weight.float()
    expected = module(tokens)
    grad_out = torch.randn(expected.shape, generator=generator).to(DEVICE)
    expected.backward(grad_out)

    fused_weight = weight.clone().requires_grad_()
    out = hash_ngram_embedding(tokens, fused_weight, module.ngram_sizes, 2, 31, backward_mode)
    out.backward(grad_out.to(dtype))
    assert out.dtype == dtype
    assert_matches(out, expected, dtype)
    assert_matches(fused_weight.grad, module.weight.grad, dtype)


@pytest.mark.parametrize("backward_mode", ["atomic", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_embedding_backward_holds_no_table_sized_buffer_beside_the_gradient(dtype, backward_mode):
    """The backward's tensors at their peak: the table's gradient plus position-sized scratch,
    never a dense fp32 copy of the table (for blt_1b's table that copy alone is 12 GB)."""
    tokens = make_tokens(1, 64, docs_at=(30,)).to(DEVICE)
    weight = torch.randn(6 * 20011, 32, device=DEVICE).to(dtype).requires_grad_()
    out = hash_ngram_embedding(tokens, weight, [3, 4, 5, 6, 7, 8], 1, 20011, backward_mode)
    grad_out = torch.randn_like(out)
    with PeakTensorMemory() as tracker:
        out.backward(grad_out)
    gradient_bytes = weight.numel() * weight.element_size()
    # Scratch: sorted rows, order, segments (int64 per (position, table)) and fp32 positions' grads.
    scratch_bytes = 8 * 6 * tokens.numel() * 8 + out.numel() * 4
    assert gradient_bytes <= tracker.peak_bytes <= gradient_bytes + scratch_bytes
    assert weight.grad.dtype == dtype


def test_hash_embedding_kernel_reuses_primes_and_keeps_the_table_order_of_unsorted_sizes():
    generator = torch.Generator().manual_seed(2)
    # 12 functions: the 12th reuses the first prime; sizes out of order and a 1-gram and a 9-gram.
    sizes, functions, table_size = [5, 1, 9], 12, 100003
    tokens = make_tokens(1, 11, generator=generator).to(DEVICE)
    module = HashNgramEmbedding(sizes, functions, table_size, dim=3, kernels="torch").to(DEVICE)
    torch.nn.init.normal_(module.weight, generator=torch.Generator(DEVICE).manual_seed(3))
    weight = module.weight.detach().clone().requires_grad_()
    out = hash_ngram_embedding(tokens, weight, sizes, functions, table_size)
    expected = module(tokens)
    assert_matches(out, expected, torch.float32)
    out.sum().backward()
    expected.sum().backward()
    touched = module.weight.grad.abs().sum(-1) > 0
    assert torch.equal(weight.grad.abs().sum(-1) > 0, touched)
    assert_matches(weight.grad, module.weight.grad, torch.float32)


# Patch lengths per row (each row sums to the sequence length; the first patch is the BOS byte).
LAYOUTS = {
    "single_byte_patches": [[1] * 21, [1] * 21],
    "patches_at_max_patch_length": [[1] + [8] * 5, [1, 8, 8, 8, 8, 8]],
    "one_very_long_patch": [[1, 40], [1, 40]],
    # several documents per row (BOS at 0, 17 and 30), mixed lengths, zero-length padding patches
    "documents_and_padding": [[1, 3, 8, 5, 1, 12, 1, 2, 4, 0, 0], [1, 16, 1, 5, 7, 1, 3, 1, 2, 0, 0]],
}
DOCUMENT_STARTS = {"documents_and_padding": (17, 30)}


def build_layout(name: str, seed: int) -> tuple[PatchLayout, torch.Generator]:
    """The named layout and the generator that drew its tokens, for the test's further inputs."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LAYOUTS[name])
    seq_len = int(lengths[0].sum())
    tokens = make_tokens(lengths.shape[0], seq_len, docs_at=DOCUMENT_STARTS.get(name, ()), generator=generator)
    return PatchLayout.build(tokens.to(DEVICE), lengths.to(DEVICE), None, "sdpa"), generator


def assert_kernel_matches_reference(reference_fn, kernel_fn, shapes, index, dtype, generator) -> torch.Tensor:
    """Outputs and input gradients of the kernel (dtype) match the reference's (fp32); returns the
    kernel's output."""
    inputs = [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes]
    expected_inputs = [x.float().detach().requires_grad_() for x in inputs]
    kernel_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    expected = reference_fn(*expected_inputs, index)
    out = kernel_fn(*kernel_inputs, index)
    grad_out = torch.randn(expected.shape, generator=generator).to(DEVICE, dtype)
    expected.backward(grad_out.float())
    out.backward(grad_out)
    assert out.dtype == dtype
    assert_matches(out, expected, dtype)
    # A gradient can be zero in exact arithmetic (queries of one-byte patches: softmax over one
    # key), which leaves it no scale of its own; GPU rounding is then measured against the
    # largest gradient of the call.
    scale = max(x.grad.abs().max().item() for x in expected_inputs)
    for kernel_input, expected_input in zip(kernel_inputs, expected_inputs):
        assert_matches(kernel_input.grad, expected_input.grad, dtype, scale)
    return out


HEADS, KV_HEADS, HEAD_DIM = 4, 2, 24  # grouped key/value heads, head dim not a power of 2
SLOTS = 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_patch_pool_kernel_matches_reference(layout_name, dtype):
    layout, generator = build_layout(layout_name, seed=4)
    batch, seq_len = layout.patch_ids.shape
    byte_kv_shape = (batch, seq_len, KV_HEADS, HEAD_DIM)
    shapes = [(batch, layout.num_patches, SLOTS, HEADS, HEAD_DIM), byte_kv_shape, byte_kv_shape]
    assert_kernel_matches_reference(
        reference.patch_pool_attention, patch_pool_attention, shapes, layout.patch_ids, dtype, generator
    )


def test_patch_pool_kernel_handles_bytes_of_a_patch_that_are_not_contiguous():
    generator = torch.Generator().manual_seed(5)
    patch_ids = torch.randint(0, 6, (2, 29), generator=generator).to(DEVICE)
    shapes = [(2, 7, 3, HEADS, HEAD_DIM), (2, 29, KV_HEADS, HEAD_DIM), (2, 29, KV_HEADS, HEAD_DIM)]
    out = assert_kernel_matches_reference(
        reference.patch_pool_attention, patch_pool_attention, shapes, patch_ids, torch.float32, generator
    )
    assert out[:, 6].abs().max() == 0  # patch 6 has no bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_byte_to_slot_kernel_matches_reference(layout_name, dtype):
    layout, generator = build_layout(layout_name, seed=6)
    batch, seq_len = layout.patch_ids.shape
    slot_kv_shape = (batch, layout.num_patches, SLOTS, KV_HEADS, HEAD_DIM)
    shapes = [(batch, seq_len, HEADS, HEAD_DIM), slot_kv_shape, slot_kv_shape]
    assert_kernel_matches_reference(
        reference.byte_to_slot_attention, byte_to_slot_attention, shapes, layout.source_patch, dtype, generator
    )


def tiny_model(kernels_mode: str) -> BLT:
    from bltdist.config import BLTConfig

    cfg = BLTConfig(
        local_dim=32, local_heads=4, local_kv_heads=2, encoder_layers=1, decoder_layers=2, local_window=8,
        global_dim=64, global_layers=1, global_heads=4, cross_attn_k=2, hash_ngram_sizes=[3, 4, 5],
        hash_functions=2, hash_vocab=97, rope_theta=10000.0, kernels=kernels_mode,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BLT(cfg).to(DEVICE)
    model.init_weights()
    return model


def test_model_with_kernels_matches_model_with_reference():
    generator = torch.Generator().manual_seed(7)
    tokens = make_tokens(2, 24, docs_at=(13,), generator=generator).to(DEVICE)
    lengths = torch.tensor([[1, 4, 4, 3, 1, 5, 6], [1, 11, 1, 1, 4, 6, 0]], device=DEVICE)
    results = {}
    for mode in ("triton", "torch"):
        model = tiny_model(mode)
        model(tokens, lengths).square().mean().backward()
        results[mode] = (model(tokens, lengths), {n: p.grad for n, p in model.named_parameters()})
    assert_matches(results["triton"][0], results["torch"][0], torch.float32)
    for name, grad in results["triton"][1].items():
        assert_matches(grad, results["torch"][1][name], torch.float32)


def test_kernels_are_chosen_by_mode_and_device(monkeypatch):
    q = torch.randn(1, 5, 2, 8)
    k = v = torch.randn(1, 3, 2, 2, 8)
    source = torch.tensor([[0, 0, 1, 1, 2]])
    on_device = [x.to(DEVICE) for x in (q, k, v, source)]
    assert kernels.fused("torch", "byte_to_slot_attention", *on_device) is None
    assert torch.is_tensor(kernels.fused("triton", "byte_to_slot_attention", *on_device))
    assert kernels.fused("auto", "byte_to_slot_attention", q, k, v, source) is None  # CPU: reference
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="Triton needs CUDA"):
        assert kernels.fused("triton", "byte_to_slot_attention", q, k, v, source) is None
    with pytest.raises(ValueError, match="unknown kernels mode"):
        kernels.fused("cuda", "byte_to_slot_attention", q, k, v, source)


def test_unsupported_shapes_fall_back_with_one_warning(recwarn):
    kernels._warn_once.cache_clear()
    q = torch.randn(1, 5, 1, 300, device=DEVICE)  # head dim above the kernel's limit
    k = v = torch.randn(1, 3, 2, 1, 300, device=DEVICE)
    source = torch.tensor([[0, 0, 1, 1, 2]], device=DEVICE)
    for _ in range(3):
        assert kernels.fused("triton", "byte_to_slot_attention", q, k, v, source) is None
    assert [str(w.message) for w in recwarn.list] == [
        "bltdist.kernels: byte_to_slot_attention falls back to the PyTorch reference: head dim 300 > 256"
    ]
    table = torch.randn(20, 4, dtype=torch.float64, device=DEVICE)
    tokens = torch.randint(0, 260, (1, 6), device=DEVICE)
    assert kernels.fused("triton", "hash_ngram_embedding", tokens, table, [3], 1, 20) is None
    assert "table dtype torch.float64" in str(recwarn.list[-1].message)


def test_kernels_mode_is_a_checked_config_choice():
    assert load_config(None, ["--model.blt.kernels", "torch"]).model.blt.kernels == "torch"
    with pytest.raises(ConfigError, match="kernels"):
        load_config(None, ["--model.blt.kernels", "cuda"])



def test_kernels_inside_torch_compile_match_the_reference_across_shapes():
    """Under torch.compile the kernels are opaque custom ops whose fake implementations give the
    shapes: outputs and gradients equal the eager reference for two inputs of different sizes, and
    the second reuses the dynamic graph (on torch 2.11 CUDA, kernels traced into the graph failed
    to compile their backward)."""
    torch._dynamo.reset()
    recompilations = RecompilationCounter()
    pool, unpool = (torch.compile(fn, dynamic=True) for fn in (patch_pool_attention, byte_to_slot_attention))
    for seed, layout_name in enumerate(("patches_at_max_patch_length", "documents_and_padding")):
        layout, generator = build_layout(layout_name, seed=seed)
        batch, seq_len = layout.patch_ids.shape
        slot_shape = (batch, layout.num_patches, SLOTS, HEADS, HEAD_DIM)
        slot_kv_shape = (batch, layout.num_patches, SLOTS, KV_HEADS, HEAD_DIM)
        byte_shape, byte_kv_shape = (batch, seq_len, HEADS, HEAD_DIM), (batch, seq_len, KV_HEADS, HEAD_DIM)
        assert_kernel_matches_reference(reference.patch_pool_attention, pool, [slot_shape, byte_kv_shape, byte_kv_shape],
                                        layout.patch_ids, torch.float32, generator)  # fmt: skip
        assert_kernel_matches_reference(reference.byte_to_slot_attention, unpool,
                                        [byte_shape, slot_kv_shape, slot_kv_shape], layout.source_patch,
                                        torch.float32, generator)  # fmt: skip
    embed = torch.compile(hash_ngram_embedding, dynamic=True)
    for seq_len in (37, 45):
        generator = torch.Generator().manual_seed(seq_len)
        tokens = make_tokens(2, seq_len, docs_at=(19,), generator=generator).to(DEVICE)
        module = HashNgramEmbedding([3, 4, 5], num_functions=2, table_size=31, dim=40, kernels="torch").to(DEVICE)
        expected = module(tokens)
        grad_out = torch.randn(expected.shape, generator=generator).to(DEVICE)
        expected.backward(grad_out)
        weight = module.weight.detach().clone().requires_grad_()
        embed(tokens, weight, module.ngram_sizes, 2, 31, "atomic").backward(grad_out)
        assert_matches(weight.grad, module.weight.grad, torch.float32)
    assert recompilations.count == 0
