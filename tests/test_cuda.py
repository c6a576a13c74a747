"""The CUDA paths that CPU tests cannot reach: flash-attn and compiled FlexAttention (forward and
backward) against SDPA, the ring attention's bf16 blocks against SDPA, the Triton kernels compiled
for the GPU against the PyTorch reference, 20 compiled bf16 training steps, and a 2-GPU NCCL layout.
Each test states why it is skipped where there is no GPU (or no second GPU, or no flash-attn); on a
GPU machine they all run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_model import build, make_tokens, static_lengths, tiny_blt_config
from test_train import read_metrics, run_trainer

from bltdist.model.attention import SelfAttentionMask, flash_attn_available

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for an NCCL layout (fewer here)"
)
needs_flash_attn = pytest.mark.skipif(
    not flash_attn_available(), reason="needs flash-attn (`pip install flash-attn`, CUDA only; not installed)"
)

# The tiny quickstart shape with static patches: no entropy model to train first.
STEPS = 20
TRAIN_ARGS = [
    "configs/tiny_static.yaml", f"--train.steps={STEPS}", "--train.val_interval=0", "--train.val_batches=1",
    "--logging.interval=1", "--optim.warmup_steps=5", "--train.device=cuda",
    "--train.dtype=bfloat16",
]  # fmt: skip


def random_attention_inputs(dtype: torch.dtype, heads=8, kv_heads=4, seq_len=1000, head_dim=64):
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2, seq_len, heads, head_dim)] + [(2, seq_len, kv_heads, head_dim)] * 2
    return [torch.randn(shape, generator=generator, device="cuda", dtype=dtype).requires_grad_() for shape in shapes]


def attend_with_grads(backend: str, doc_ids: torch.Tensor, window: int | None, inputs, grad_out: torch.Tensor):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = SelfAttentionMask(doc_ids, window, backend).attend(*inputs)
    out.backward(grad_out)
    return [out.detach(), *(x.grad for x in inputs)]


def cuda_doc_ids(seq_len: int = 1000) -> torch.Tensor:
    ids = torch.zeros(2, seq_len, dtype=torch.long, device="cuda")
    ids[0, 300:] += 1
    ids[0, 710:] += 1
    ids[1, 555:] += 1
    return ids


@needs_cuda
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_equals_sdpa_forward_and_backward(dtype, window):
    doc_ids = cuda_doc_ids()
    inputs = random_attention_inputs(dtype)
    grad_out = torch.randn_like(inputs[0])
    flex = attend_with_grads("flex", doc_ids, window, inputs, grad_out)
    sdpa = attend_with_grads("sdpa", doc_ids, window, inputs, grad_out)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for got, expected in zip(flex, sdpa):
        torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@needs_cuda
@needs_flash_attn
@pytest.mark.parametrize("window", [None, 128])
def test_flash_equals_sdpa_forward_and_backward(window):
    doc_ids = cuda_doc_ids()
    inputs = random_attention_inputs(torch.bfloat16)
    grad_out = torch.randn_like(inputs[0])
    flash = attend_with_grads("flash", doc_ids, window, inputs, grad_out)
    sdpa = attend_with_grads("sdpa", doc_ids, window, inputs, grad_out)
    for got, expected in zip(flash, sdpa):
        torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)


@needs_cuda
def test_auto_sends_fp32_to_flex_and_bf16_to_flash_when_installed():
    from bltdist.model.attention import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float32) == "flex"
    assert resolve_backend("auto", cuda, torch.bfloat16) == ("flash" if flash_attn_available() else "flex")


@needs_cuda
def test_ring_attention_in_bf16_equals_sdpa_and_restores_the_matmul_precision():
    """The ring's blocks on one GPU (one rank: no communication) run their fp32 products in TF32 for
    bf16 inputs: output and gradients within bf16 rounding of SDPA in fp32, and the process-wide
    matmul setting is put back after forward and backward."""
    from bltdist.parallel.context.ring import RingPatchMask

    inputs = random_attention_inputs(torch.bfloat16, seq_len=1024)
    doc_ids = cuda_doc_ids(1024)
    grad_out = torch.randn_like(inputs[0])
    expected = attend_with_grads("sdpa", doc_ids, None, [x.detach().float() for x in inputs], grad_out.float())
    precision = torch.backends.cuda.matmul.fp32_precision
    ring = RingPatchMask(None, 0, 1, 512, torch.arange(1024, device="cuda")[None], doc_ids[None])
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = ring.attend(*inputs)
    assert torch.backends.cuda.matmul.fp32_precision == precision
    out.backward(grad_out)
    assert torch.backends.cuda.matmul.fp32_precision == precision
    for got, want in zip([out, *(x.grad for x in inputs)], expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def model_logits_and_grads(kernels: str, compiled: bool):
    model = build(tiny_blt_config(kernels=kernels, hash_vocab=5003, local_window=64)).cuda()
    tokens = make_tokens(2, 300, docs_at=(120,)).cuda()
    lengths = static_lengths(tokens.cpu(), size=4).cuda()
    forward = torch.compile(model) if compiled else model
    logits = forward(tokens, lengths)
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_triton_kernels_equal_the_reference_in_the_model(compiled):
    """The hash-embedding and both cross-attention kernels, compiled for this GPU (and inside
    torch.compile), against the PyTorch reference: logits and every gradient."""
    logits, grads = model_logits_and_grads("triton", compiled)
    expected_logits, expected_grads = model_logits_and_grads("torch", compiled=False)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def train_losses(tmp_path, name: str, extra: list[str], nproc: int = 1) -> list[float]:
    out = tmp_path / name
    result = run_trainer([*TRAIN_ARGS, *extra, f"--output_dir={out}"], nproc=nproc, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [record["loss"] for record in read_metrics(out) if "loss" in record]


@needs_cuda
@pytest.mark.slow
def test_twenty_compiled_bf16_steps_have_finite_falling_losses(tmp_path):
    """With activation checkpointing, as the large configs train, and no graph break: one inside a
    checkpointed block runs it eagerly, and CUDA runs meet breaks that CPU runs do not (an H100 run
    broke on the flash-attn import check in every block)."""
    losses = train_losses(tmp_path, "compiled", ["--train.compile=true", "--train.activation_checkpointing=true"])
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["graph_breaks"] == 0


@needs_two_gpus
@pytest.mark.slow
def test_two_gpu_nccl_layout_matches_one_gpu(tmp_path):
    """dp_shard=2 over NCCL (FSDP's bf16 parameters, fp32 reduction) follows the one-GPU run
    (bf16 autocast over fp32 parameters): the same losses to bf16's precision over 20 steps."""
    single = train_losses(tmp_path, "single", ["--parallel.dp_shard=1"])
    sharded = train_losses(tmp_path, "sharded", ["--parallel.dp_shard=2"], nproc=2)
    assert all(math.isfinite(loss) for loss in sharded)
    for one, two in zip(single, sharded):
        assert two == pytest.approx(one, rel=5e-2)
