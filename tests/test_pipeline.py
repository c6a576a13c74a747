"""Pipeline parallelism: real gloo processes on the CPU against a single-process run of the same
model, seed and batch (fp32)."""

import socket
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.torch_version import TorchVersion

from bltdist.config import BLTConfig, load_config
from bltdist.errors import ConfigError
from bltdist.model import BLT
from bltdist.patching.tokens import BOS_ID
from bltdist.parallel import ParallelDims
from bltdist.parallel.grads import clip_grad_norm
from bltdist.parallel.pipeline import BLTPipeline, split_model, torch_schedule_problems
from bltdist.parallel.pipeline.schedule import SCHEDULES
from bltdist.parallel.pipeline.stage import layer_split, stage_indices
from bltdist.patching import BYTE_OFFSET, patch_lengths, patch_starts
from processes import v_schedule_on_gloo

STEPS = 5
ACCUMULATION = 2
MAX_NORM = 0.05  # below the tiny model's gradient norm, so clipping acts in every step
LR = 1e-2


def tiny_config() -> BLTConfig:
    # global_dim != cross_attn_k * local_dim, so the first stage also holds the global in_proj.
    return BLTConfig(
        local_dim=16, local_heads=2, encoder_layers=1, decoder_layers=1, local_window=8, global_dim=24,
        global_layers=4, global_heads=2, hash_ngram_sizes=[3, 4], hash_functions=1, hash_vocab=31,
    )  # fmt: skip


def build_tiny_model() -> BLT:
    with torch.device("meta"):
        model = BLT(tiny_config())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def make_batches(rows: int = 4, seq_len: int = 24) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens, patch lengths, targets) per step: text with spaces, so that rows and steps have
    different patch counts, and a document boundary inside some rows."""
    generator = torch.Generator().manual_seed(1)
    alphabet = torch.tensor([ord(c) + BYTE_OFFSET for c in "ab c"])
    batches = []
    for _ in range(STEPS):
        stream = alphabet[torch.randint(len(alphabet), (rows, seq_len + 1), generator=generator)]
        stream[:, 0] = BOS_ID
        stream[0, seq_len // 2] = BOS_ID
        tokens, targets = stream[:, :-1], stream[:, 1:]
        batches.append((tokens, patch_lengths(patch_starts(tokens, "space")), targets))
    return batches


def optimizer_for(parameters) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameters, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def single_process_run(batches):
    """Losses per step; gradients, clipped norm and parameters of step 1; after the last step, the
    state dict and the summed cross-entropy of the first batch (forward only)."""
    model = build_tiny_model()
    optimizer = optimizer_for(model.parameters())
    losses, first = [], {}
    for step, (tokens, lengths, targets) in enumerate(batches):
        logits = model(tokens, lengths)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / targets.numel()
        loss.backward()
        if step == 0:
            first["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            first["norm"] = norm.item()
            first["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens, lengths, targets = batches[0]
    with torch.no_grad():
        final_ce = F.cross_entropy(model(tokens, lengths).flatten(0, 1), targets.flatten(), reduction="sum").item()
    final_state = {name: value.clone() for name, value in model.state_dict().items()}
    return losses, first, final_ce, final_state


def assert_tensors_close(actual: dict, expected: dict, what: str, atol_of_scale: float = 1e-5) -> None:
    for name, value in actual.items():
        # Relative to the tensor's own scale: entries near zero carry only rounding noise.
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=atol_of_scale * scale, msg=f"{what} {name}")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective over its mesh); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_full_state_dict(parts, pp_group) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on pipeline rank 0 (None elsewhere), under the unsplit model's names."""
    local = {name: full(value).detach().cpu() for part in parts for name, value in part.state_dict().items()}
    is_root = dist.get_rank(pp_group) == 0
    gathered = [None] * dist.get_world_size(pp_group) if is_root else None
    dist.gather_object(local, gathered, dst=dist.get_global_rank(pp_group, 0), group=pp_group)
    return {name: value for rank_dict in gathered for name, value in rank_dict.items()} if is_root else None


def summed(ce: torch.Tensor | None, *groups) -> float:
    """A cross-entropy sum (None off the last stage: 0) added up over the ranks of ``groups`` that
    are set: ranks that split a batch between them."""
    total = torch.zeros((), dtype=torch.float64) if ce is None else ce.double()
    for group in groups:
        if group is not None:
            dist.all_reduce(total, group=group)
    return total.item()


def train_and_compare(pipeline: BLTPipeline, expected, dp_group=None, check_first_params: bool = True) -> None:
    """single_process_run through ``pipeline``, checked against its numbers: every step's loss on
    the last stage, step 1's gradients, clipped norm and parameters, the final evaluation and the
    final state gathered over the pipeline. The ranks of ``dp_group`` split each batch's rows
    (FSDP averages their gradients); those of the pipeline's cp group split each row's bytes."""
    expected_losses, expected_first, expected_final_ce, expected_final_state = expected
    cp_group = pipeline.cp_group
    stage_size = dist.get_world_size() // dist.get_world_size(pipeline.group)  # ranks per pipeline stage
    parameters = {name: p for part in pipeline.parts for name, p in part.named_parameters()}
    optimizer = optimizer_for(parameters.values())
    batches = make_batches()
    rows = torch.arange(batches[0][0].shape[0])
    if dp_group is not None:
        rows = rows.chunk(dist.get_world_size(dp_group))[dist.get_rank(dp_group)]
    for step, (tokens, lengths, targets) in enumerate(batches):
        ce_sum = torch.zeros((), dtype=torch.float64)
        for half in rows.chunk(ACCUMULATION):
            # Divided by the bytes of this rank's rows, as FSDP averages the gradients over dp ranks.
            half_ce = pipeline.step(tokens[half], lengths[half], targets[half], loss_divisor=targets[rows].numel())
            assert (half_ce is None) == (not pipeline.holds_last_stage)
            ce_sum += 0.0 if half_ce is None else half_ce.item()
        loss = summed(ce_sum, dp_group, cp_group) / targets.numel()
        if cp_group is not None:
            # A cp rank's gradients are those of its own bytes; the sequence's are their sum.
            for p in parameters.values():
                dist.all_reduce(p.grad, group=cp_group)
        if pipeline.holds_last_stage:
            assert loss == pytest.approx(expected_losses[step], rel=1e-5), f"step {step + 1} loss"
        if step == 0:
            grads = {name: full(p.grad) for name, p in parameters.items()}
            assert_tensors_close(grads, expected_first["grads"], "gradient of")
        norm = clip_grad_norm(list(parameters.values()), MAX_NORM, stage_size)
        if step == 0:
            assert norm == pytest.approx(expected_first["norm"], rel=1e-5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 and check_first_params:
            after = {name: full(p.detach()) for name, p in parameters.items()}
            assert_tensors_close(after, expected_first["params"], "after step 1, parameter")
    tokens, lengths, targets = batches[0]
    final_ce = summed(pipeline.evaluate(tokens[rows], lengths[rows], targets[rows]), dp_group, cp_group)
    if pipeline.holds_last_stage:
        assert final_ce == pytest.approx(expected_final_ce, rel=1e-5)
    full_state = gather_full_state_dict(pipeline.parts, pipeline.group)
    if full_state is not None:
        assert set(full_state) == set(expected_final_state)
        # Five AdamW steps turn rounding noise in near-zero gradients into ~1e-6 steps: a looser
        # absolute bound here; the 1e-5 check of every parameter is the one after step 1.
        assert_tensors_close(full_state, expected_final_state, "after the last step, gathered", atol_of_scale=1e-4)


@contextmanager
def gloo_process_group(rank: int, world_size: int, port: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        yield
        # Every rank finishes its last collective before any tears the group down (gloo aborts a
        # process whose peer disappears while its transport threads still run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def pipeline_worker(rank: int, world_size: int, port: int, schedule_name: str, expected) -> None:
    with gloo_process_group(rank, world_size, port):
        parts = split_model(build_tiny_model(), rank, world_size, schedule_name)
        # patch_bucket 4 pads each accumulation half to its own patch count: several schedules get built.
        pipeline = BLTPipeline(parts, dist.group.WORLD, schedule_name, 2, torch.device("cpu"), patch_bucket=4)
        train_and_compare(pipeline, expected)


def fsdp_pipeline_worker(rank: int, world_size: int, port: int, schedule_name: str, expected) -> None:
    """pp=2 outer, dp_shard=2 inner: the stages are built on FSDP2-sharded parts."""
    with gloo_process_group(rank, world_size, port):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp_shard"))
        parts = split_model(build_tiny_model(), mesh["pp"].get_local_rank(), 2, schedule_name)
        # Parameters stay unsharded between forward and backward, as torchtitan does under PP: with
        # resharding, torch's split (input / weight) backward of the V's middle stages loses gradients.
        for part in parts:
            for layer in part.global_model.layers.values():
                fully_shard(layer, mesh=mesh["dp_shard"], reshard_after_forward=False)
            fully_shard(part, mesh=mesh["dp_shard"], reshard_after_forward=False)
        pipeline = BLTPipeline(parts, mesh["pp"].get_group(), schedule_name, 1, torch.device("cpu"), patch_bucket=4)
        train_and_compare(pipeline, expected, dp_group=mesh["dp_shard"].get_group())


def cp_pipeline_worker(rank: int, world_size: int, port: int, schedule_name: str, expected) -> None:
    """pp=2 outer, cp=2 inner: every stage runs its cp rank's share of each microbatch. Space
    patches make the chunk widths, and so the stages' byte shapes, differ from step to step; chunks
    shorter than the local window make the halo reach across several chunks."""
    with gloo_process_group(rank, world_size, port):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "cp"))
        cp_group = mesh["cp"].get_group()
        parts = split_model(build_tiny_model(), mesh["pp"].get_local_rank(), 2, schedule_name, cp_group)
        pipeline = BLTPipeline(parts, mesh["pp"].get_group(), schedule_name, 2, torch.device("cpu"), patch_bucket=4)
        # Summed over the cp ranks, gradients near zero round differently, and Adam's first update
        # g / (|g| + eps) magnifies that to the edge of the 1e-5 bound (0.97 of it): the cp run's
        # parameters are compared after the last step only.
        train_and_compare(pipeline, expected, check_first_params=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, args: tuple, nprocs: int) -> None:
    """mp.spawn, run once more if a worker was killed by SIGABRT.

    gloo's transport on CPU sometimes aborts a process from one of its own threads ("terminate called
    without an active exception") under the point-to-point traffic of torch's pipeline schedules;
    that is an abort of the transport, not a wrong result. Wrong numbers raise in the worker
    (ProcessRaisedException) and fail at once; a second abort fails too.
    """
    try:
        mp.spawn(worker, args=(nprocs, free_port(), *args), nprocs=nprocs)
    except mp.ProcessExitedException as error:
        if error.signal_name != "SIGABRT":
            raise
        mp.spawn(worker, args=(nprocs, free_port(), *args), nprocs=nprocs)


@pytest.fixture(scope="module")
def single_process_reference():
    torch.manual_seed(0)
    return single_process_run(make_batches())


@pytest.mark.slow
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_pp2_matches_single_process(schedule_name, single_process_reference):
    """Five steps, each two accumulated pipeline steps of two microbatches, with clipping and AdamW;
    then a forward-only evaluation."""
    spawn(pipeline_worker, (schedule_name, single_process_reference), nprocs=2)


@pytest.mark.slow
@v_schedule_on_gloo
def test_fsdp2_by_pp2_v_schedule_matches_single_process(single_process_reference):
    """The V schedule, with its byte-state carry, on parts that FSDP2 sharded before the stages were built."""
    spawn(fsdp_pipeline_worker, ("ZBVZeroBubble", single_process_reference), nprocs=4)


@pytest.mark.slow
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_pp2_by_cp2_matches_single_process(schedule_name, single_process_reference):
    """Context parallelism inside every stage (ring attention, halo and decoder exchanges among the
    cp ranks of a stage), with the same steps, clipping, AdamW and evaluation as above."""
    spawn(cp_pipeline_worker, (schedule_name, single_process_reference), nprocs=4)


def test_parts_of_all_ranks_hold_every_parameter_once_under_its_own_name():
    for schedule_name in SCHEDULES:
        model = build_tiny_model()
        names = [name for rank in range(2) for part in split_model(model, rank, 2, schedule_name)
                 for name in part.state_dict()]  # fmt: skip
        assert sorted(names) == sorted(model.state_dict()), schedule_name


def test_v_placement_puts_encoder_and_decoder_on_rank_0():
    assert stage_indices(0, 2, "ZBVZeroBubble") == [0, 3]
    assert stage_indices(1, 2, "ZBVZeroBubble") == [1, 2]
    assert stage_indices(1, 2, "Interleaved1F1B") == [1, 3]
    model = build_tiny_model()
    first, last = split_model(model, 0, 2, "ZBVZeroBubble")
    assert first.encoder is model.encoder and last.decoder is model.decoder


def test_layer_split_is_contiguous_and_favours_middle_stages():
    assert layer_split(4, 2) == [range(0, 2), range(2, 4)]
    assert layer_split(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert layer_split(5, 2) == [range(0, 3), range(3, 5)]


def pipeline_config(*overrides: str):
    return load_config(None, ["--model.blt.global_layers=4", "--train.micro_batch_size=4", *overrides])


def check_pipeline_layout(cfg) -> None:
    ParallelDims.from_config(cfg, world_size=cfg.parallel.pp)


def test_v_schedule_on_gloo_before_torch_2_13_is_named_before_the_start(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.11.0+cu130"))
    (problem,) = torch_schedule_problems("ZBVZeroBubble", cpu)
    assert problem.startswith("parallel.pp_schedule: ZBVZeroBubble") and "torch >= 2.13" in problem
    assert torch_schedule_problems("Interleaved1F1B", cpu) == torch_schedule_problems("ZBVZeroBubble", cuda) == []
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.13.0+cpu"))
    assert torch_schedule_problems("ZBVZeroBubble", cpu) == []


def test_more_stages_than_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="8 pipeline stages, but model.blt.global_layers is 4"):
        check_pipeline_layout(pipeline_config("--parallel.pp=4", "--parallel.pp_schedule=ZBVZeroBubble"))
    with pytest.raises(ConfigError, match="5 pipeline stages"):
        check_pipeline_layout(pipeline_config("--parallel.pp=5", "--parallel.pp_schedule=GPipe"))
    check_pipeline_layout(pipeline_config("--parallel.pp=4", "--parallel.pp_schedule=1F1B"))


def test_microbatch_problems_are_listed_together():
    cfg = pipeline_config("--parallel.pp=4", "--parallel.pp_schedule=1F1B", "--parallel.pp_microbatches=3")
    with pytest.raises(ConfigError) as error:
        check_pipeline_layout(cfg)
    assert len(error.value.problems) == 2
    assert "must divide train.micro_batch_size 4" in str(error.value)
    assert "1F1B needs at least parallel.pp = 4 microbatches" in str(error.value)


def test_entropy_model_stages_need_one_of_its_layers_each():
    check_pipeline_layout(pipeline_config("--parallel.pp=2", "--model.arch=entropy"))
    with pytest.raises(ConfigError, match="4 pipeline stages, but model.entropy.layers is 3"):
        check_pipeline_layout(pipeline_config("--parallel.pp=4", "--model.arch=entropy", "--model.entropy.layers=3"))
