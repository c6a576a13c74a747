"""Context parallelism against a single-process run: real gloo processes on the CPU, fp32 (the ring
attention alone also in bf16)."""

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bltdist.config import BLTConfig, Config, OptimConfig
from bltdist.errors import ConfigError
from bltdist.model import BLT
from bltdist.model.attention import SelfAttentionMask
from bltdist.model.loss import byte_loss_sum
from bltdist.parallel import ParallelDims
from bltdist.parallel.context import ContextParallelLayout
from bltdist.parallel.context.layout import chunk_order
from bltdist.parallel.context import ring
from bltdist.parallel.context.ring import RingPatchMask
from bltdist.patching import patch_lengths

TOLERANCE = 1e-5
BF16_TOLERANCE = 1e-2  # bf16 rounds the output, the incoming gradient and the gradients: 1e-3 to 3e-3 measured


def run_processes(worker, world_size: int, *args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(worker, args=(world_size, f"{scratch}/rendezvous", *args), nprocs=world_size, join=True)


def init_process(rank: int, world_size: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Ring attention alone


def ring_attention_worker(rank: int, world_size: int, rendezvous: str, dtype: torch.dtype) -> None:
    """The ring on ``dtype`` inputs against SDPA in fp32 on the same values (bf16 values are exact
    in fp32, so only the ring's bf16 output and gradients are rounded)."""
    init_process(rank, world_size, rendezvous)
    batch, heads, kv_heads, head_dim = 2, 4, 2, 8
    chunk = 3 if world_size > 1 else 5  # at least 10 patches for the documents below
    num_patches = 2 * world_size * chunk
    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(batch, num_patches, h, head_dim, generator=generator).to(dtype).float().requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )
    weights = torch.randn(batch, num_patches, heads, head_dim, generator=generator)
    # Documents that end inside chunks, at chunk edges, and trailing padding patches (-1).
    docs = torch.tensor([
        [0] * 2 + [1] * 5 + [2] * (num_patches - 9) + [-1] * 2,
        [0] * 3 + [1] * (num_patches - 4) + [2],
    ])  # fmt: skip
    reference = SelfAttentionMask(docs, None, "sdpa").attend(q, k, v)
    (reference * weights).sum().backward()

    order = torch.tensor(chunk_order(world_size)).view(world_size, 2)
    positions = (order[..., None] * chunk + torch.arange(chunk)).flatten(1)
    mask = RingPatchMask(dist.group.WORLD, rank, world_size, chunk, positions, docs[:, positions].permute(1, 0, 2))
    mine = positions[rank]
    local_q, local_k, local_v = (x.detach()[:, mine].to(dtype).requires_grad_() for x in (q, k, v))
    shifted = []
    start_ring_shift = ring.start_ring_shift  # the real send, its dtypes recorded

    def recording_shift(tensor, group):
        shifted.append(tensor.dtype)
        return start_ring_shift(tensor, group)

    ring.start_ring_shift = recording_shift
    out = mask.attend(local_q, local_k, local_v)
    forward_shifts = list(shifted)
    (out * weights[:, mine]).sum().backward()
    ring.start_ring_shift = start_ring_shift

    tolerance = TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    error = relative_error(out.float(), reference[:, mine])
    assert out.dtype == dtype and error < tolerance, f"rank {rank}: output off by {error:.2e}"
    for name, local, full in (("q", local_q, q), ("k", local_k, k), ("v", local_v, v)):
        assert local.grad.dtype == dtype
        error = relative_error(local.grad.float(), full.grad[:, mine])
        assert error < tolerance, f"rank {rank}: grad {name} off by {error:.2e}"
    # Keys and values travel in the inputs' dtype (every step but the last); the gradient sums that go
    # round the ring with them in fp32 (every step).
    assert forward_shifts == [dtype] * (world_size - 1)
    if world_size > 1:
        backward_shifts = [[dtype, torch.float32]] * (world_size - 1) + [[torch.float32]]
        assert shifted[len(forward_shifts):] == sum(backward_shifts, [])
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ring_attention_matches_full_attention(world_size, dtype):
    run_processes(ring_attention_worker, world_size, dtype)


# ---------------------------------------------------------------------------------------------
# The whole model


def tiny_config(**overrides) -> BLTConfig:
    base = dict(
        local_dim=32, local_heads=4, local_kv_heads=2, encoder_layers=2, decoder_layers=2, local_window=12,
        global_dim=48, global_layers=2, global_heads=4, global_kv_heads=2, cross_attn_k=2,
        hash_ngram_sizes=[3, 4, 5], hash_functions=2, hash_vocab=97, rope_theta=10000.0,
    )  # fmt: skip
    base.update(overrides)
    return BLTConfig(**base)


def batch_with_documents(seq_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows with several documents, runs of one-byte patches and long patches."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, 260, (2, seq_len), generator=generator)
    starts = torch.rand(2, seq_len, generator=generator) < 0.35
    starts[1] = torch.arange(seq_len) % 2 == 1  # two-byte patches: bytes that read across chunk edges
    tokens[:, 0] = 1
    for row, bos_positions in enumerate(([20, 37], [29])):
        for position in bos_positions:
            tokens[row, position - 1], tokens[row, position] = 2, 1
    starts[0, 40:52] = True  # a run of one-byte patches: chunks shorter than the window
    starts[1, 3:15] = False  # a 12-byte patch, longer than the window and than a chunk
    starts[:, :2] = True
    starts |= (tokens == 1) | F.pad(tokens == 1, (1, 0))[:, :-1]
    return tokens, patch_lengths(starts)


def build_model(cfg: BLTConfig) -> BLT:
    with torch.device("meta"):
        model = BLT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def model_worker(rank: int, world_size: int, rendezvous: str, overrides: dict) -> None:
    init_process(rank, world_size, rendezvous)
    cfg = tiny_config(**overrides)
    tokens, lengths = batch_with_documents()
    targets = torch.roll(tokens, -1, dims=1)
    reference_model = build_model(cfg)
    model = copy.deepcopy(reference_model)

    reference_loss = F.cross_entropy(reference_model(tokens, lengths).flatten(0, 1), targets.flatten(), reduction="sum")
    reference_loss.backward()
    reference_loss = reference_loss.detach()

    layout = ContextParallelLayout.build(tokens, lengths, cfg.local_window, dist.group.WORLD)
    loss = byte_loss_sum(model(tokens, lengths, layout=layout), layout.local_targets(targets))
    loss.backward()
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss)
    for param in model.parameters():
        dist.all_reduce(param.grad)

    assert abs(float(total_loss / reference_loss) - 1) < TOLERANCE, (float(total_loss), float(reference_loss))
    for (name, param), reference_param in zip(model.named_parameters(), reference_model.parameters()):
        error = relative_error(param.grad, reference_param.grad)
        assert error < TOLERANCE, f"rank {rank}: grad of {name} off by {error:.2e}"

    # The project's AdamW at its full peak lr. Adam's first step is lr * g / (|g| + eps): about
    # lr * sign(g), so where g is as small as the rounding noise of the summation order its sign, and
    # the step, is a coin flip on any machine. Weights are compared where the step is well
    # conditioned (|g| far above eps and the noise); the gradients above are the strict check.
    optim = OptimConfig()
    well_conditioned = [
        p.grad.abs() > max(1000 * optim.eps, 1e-3 * float(p.grad.abs().max())) for p in reference_model.parameters()
    ]
    for net in (model, reference_model):
        betas = (optim.beta1, optim.beta2)
        torch.optim.AdamW(net.parameters(), optim.lr, betas, optim.eps, optim.weight_decay).step()
    compared = sum(int(mask.sum()) for mask in well_conditioned) / sum(p.numel() for p in model.parameters())
    assert compared > 0.5, f"only {compared:.0%} of the weights have a well-conditioned first step"
    for (name, param), reference_param, mask in zip(model.named_parameters(), reference_model.parameters(),
                                                    well_conditioned):  # fmt: skip
        error = relative_error(param.detach()[mask], reference_param.detach()[mask])
        assert error < TOLERANCE, f"rank {rank}: {name} after one step off by {error:.2e}"
    dist.destroy_process_group()


def test_batch_exercises_the_hard_cases():
    """The model test's batch must hold what makes cp hard, for cp = 2 and 3 (4 and 6 chunks)."""
    tokens, lengths = batch_with_documents()
    assert (lengths == 1).sum() > 10 and int(lengths.max()) > tiny_config().local_window
    for cp in (2, 3):
        padded = F.pad(lengths, (0, -lengths.shape[1] % (2 * cp)))
        chunk_bytes = padded.unflatten(1, (2 * cp, -1)).sum(-1)
        assert int(chunk_bytes.min()) < tiny_config().local_window - 1  # a halo that spans chunks
        assert int(chunk_bytes.max()) > int(chunk_bytes.min())  # padded chunks
        edges = padded[:, padded.shape[1] // (2 * cp) :: padded.shape[1] // (2 * cp)]
        assert bool((edges == 1).any())  # a one-byte patch right at a chunk edge
        # In every chunk after the first, some row's first bytes read the previous chunk's last patch.
        assert bool((edges > 1).any(dim=0).all())


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size, overrides",
    [
        (2, {}),
        (2, {"encoder_cross_attn_all_layers": True, "decoder_cross_attn_all_layers": False, "cross_attn_k": 3}),
        (3, {"local_window": None, "global_final_norm": False}),
    ],
)
def test_context_parallel_matches_single_process(world_size, overrides):
    run_processes(model_worker, world_size, overrides)


# ---------------------------------------------------------------------------------------------
# Validation


def test_sequences_cp_cannot_split_are_config_errors():
    cfg = Config()
    cfg.parallel.cp, cfg.train.seq_len = 4, 7
    with pytest.raises(ConfigError, match=r"train\.seq_len.*parallel\.cp 4"):
        ParallelDims.from_config(cfg, world_size=4)
    cfg.model.arch = "entropy"  # a plain LM splits its positions the same way: the same one problem
    with pytest.raises(ConfigError, match=r"train\.seq_len.*parallel\.cp 4") as raised:
        ParallelDims.from_config(cfg, world_size=4)
    assert len(raised.value.problems) == 1
    cfg.model.arch, cfg.train.seq_len = "blt", 8
    ParallelDims.from_config(cfg, world_size=4)
