"""Train a BLT (or its entropy model): ``python -m bltdist.train``, ``torchrun -m bltdist.train``
or ``bltdist-train``, each with ``[--config] configs/X.yaml [--dotted.key VALUE ...]``.

Everything the user can get wrong (config, data paths) is checked before any process group
starts; such problems print one message and exit with code 2.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch.distributed.elastic.multiprocessing.errors import record

from bltdist.checkpoint import load_model_weights
from bltdist.checkpointer import Checkpointer, check_resumable, consolidate
from bltdist.config import Config, grad_accum_steps, load_config, parse_args, save_config
from bltdist.data import PackedByteLoader, build_datasets
from bltdist.errors import ConfigError, UserError
from bltdist.flops import peak_tflops, training_flops_per_byte
from bltdist.metrics import (
    MetricsLogger,
    StepProfiler,
    StepTimer,
    build_sinks,
    format_summary,
    gather_peak_memory_gb,
    memory_snapshot_on_oom,
    missing_sink_packages,
    peak_memory_gb,
    run_summary,
    write_summary,
)
from bltdist.model import BLT, ByteLM
from bltdist.model.layers import TransformerBlock
from bltdist.parallel import (
    ParallelDims,
    apply_fsdp,
    apply_tensor_parallel,
    build_mesh,
    check_layout,
    clip_grad_norm,
    pad_patch_lengths,
)
from bltdist.parallel.context import ContextParallelLayout, local_loss_sum
from bltdist.parallel.pipeline import BLTPipeline, microbatch_count, split_model
from bltdist.patcher import Patcher


# Pipeline stages size their buffers by the padded patch count; padding it to a multiple of this
# keeps the number of distinct shapes, and so of pipeline schedules built, small.
PATCH_BUCKET = 64


def meta_model(cfg: Config) -> torch.nn.Module:
    """The configured model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return BLT(cfg.model.blt) if cfg.model.arch == "blt" else ByteLM(cfg.model.entropy)


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """Build on the meta device, then allocate on ``device`` and initialise from the seed.

    Every rank initialises the whole model from the same seed before it is sharded, so any
    layout starts from exactly the weights of a single-process run."""
    model = meta_model(cfg)
    model.to_empty(device=device)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    if cfg.checkpoint.init_from:
        load_model_weights(model, cfg.checkpoint.init_from)
    return model


def apply_activation_checkpointing_and_compile(model: torch.nn.Module, cfg: Config) -> None:
    """Per transformer block, in torchtitan's order: checkpoint first, then compile the result."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TransformerBlock):
                wrapped = checkpoint_wrapper(child) if cfg.train.activation_checkpointing else child
                parent.register_module(name, torch.compile(wrapped) if cfg.train.compile else wrapped)


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    optim, total = cfg.optim, cfg.train.steps
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "wsd":
        decay_start = total - int(optim.decay_fraction * total)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total - decay_start)
        return 1.0 - (1.0 - optim.min_lr_ratio) * progress
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model_parts: list[torch.nn.Module], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    parameters = [p for part in model_parts for p in part.parameters()]
    # Norm gains are not decayed: shrinking them towards zero only fights the normalisation.
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=fused,
    )


class Stepper:
    """Runs micro-batches through the parallelised model: patching, forward, loss, backward.

    Every rank of a context-parallel group gets the same micro-batch and patches it whole; the
    model then computes the logits of the rank's own bytes only (``bltdist.parallel.context``).
    Every rank of a pipeline group gets it too; the pipeline schedule splits it into microbatches
    and only the last stage sees a loss (``bltdist.parallel.pipeline``); with both, every stage
    runs the cp rank's share of each microbatch.

    Loss scaling: a rank's backward loss is its summed byte cross-entropy divided by the bytes of
    the whole global batch, times the number of ranks FSDP averages gradients over (dp x cp).
    That average is then the gradient of the global mean loss, whatever the layout and
    accumulation: context-parallel ranks hold disjoint bytes whose gradients must add up.
    """

    def __init__(self, model_parts: list[torch.nn.Module], cfg: Config, dims: ParallelDims, mesh,
                 patcher: Patcher | None, autocast, device: torch.device):  # fmt: skip
        self.model_parts, self.patcher, self.autocast = model_parts, patcher, autocast
        self.window = cfg.model.blt.local_window
        self.cp_group = mesh["cp"].get_group() if dims.cp > 1 else None
        # Sequence parallelism splits each cp rank's patches evenly over tp; cp chunks come in 2 x cp.
        self.patch_multiple = dims.tp * (2 * dims.cp if dims.cp > 1 else 1)
        self.counts_patches = dims.cp == 1 or mesh["cp"].get_local_rank() == 0
        self.loss_divisor = cfg.train.global_batch_size * cfg.train.seq_len / dims.dp_cp
        self.pipeline = None
        if dims.pp > 1:
            self.pipeline = BLTPipeline(
                model_parts, mesh["pp"].get_group(), cfg.parallel.pp_schedule, microbatch_count(cfg), device,
                patch_bucket=math.lcm(PATCH_BUCKET, self.patch_multiple),
            )  # fmt: skip
            # Patches are counted where the loss is: on the rank of the last stage.
            self.counts_patches = self.counts_patches and self.pipeline.holds_last_stage

    def train(self, mode: bool) -> None:
        for part in self.model_parts:
            part.train(mode)

    def forward_backward(self, tokens, targets, entropies) -> tuple[float, int]:
        """Summed byte cross-entropy (nats) of this rank's bytes of the micro-batch (0 on ranks
        without a loss), and the number of real patches it counts (each patch counted once)."""
        return self._run(tokens, targets, entropies, backward=True)

    @torch.no_grad()
    def evaluate(self, tokens, targets, entropies) -> float:
        return self._run(tokens, targets, entropies, backward=False)[0]

    def _run(self, tokens, targets, entropies, backward: bool) -> tuple[float, int]:
        """``entropies``: precomputed next-byte entropies of the tokens, or None (online patching)."""
        if self.patcher is None:
            lengths, num_patches = None, tokens.numel()
        else:
            lengths = self.patcher(tokens, entropies)
            num_patches = int((lengths > 0).sum()) if self.counts_patches else 0
            lengths = pad_patch_lengths(lengths, self.patch_multiple)
        if self.pipeline is not None:
            with self.autocast:
                if backward:
                    loss_sum = self.pipeline.step(tokens, lengths, targets, self.loss_divisor)
                else:
                    loss_sum = self.pipeline.evaluate(tokens, lengths, targets)
            return (0.0 if loss_sum is None else float(loss_sum)), num_patches
        (model,) = self.model_parts
        with self.autocast:
            if lengths is None:
                logits = model(tokens)
            elif self.cp_group is None:
                logits = model(tokens, lengths)
            else:
                layout = ContextParallelLayout.build(tokens, lengths, self.window, self.cp_group)
                logits = model(tokens, lengths, layout=layout)
        if self.cp_group is None:
            loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        else:
            loss_sum = local_loss_sum(logits, targets, layout)
        if backward:
            (loss_sum / self.loss_divisor).backward()
        return float(loss_sum.detach()), num_patches


def next_batch(loader: PackedByteLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, entropies or None) on ``device``; entropies when the loader has an entropy source."""
    if loader.entropy_source is None:
        return (*(t.to(device, non_blocking=True) for t in loader.next_batch()), None)
    return tuple(t.to(device, non_blocking=True) for t in loader.next_batch_with_entropies())


class Reporter:
    """Sums per-rank figures over the world, counting each data-parallel shard of the batch once:
    tensor-parallel ranks repeat the same loss, so only their first rank contributes."""

    def __init__(self, mesh, device: torch.device):
        self.device = device
        self.contributes = mesh is None or mesh["tp"].get_local_rank() == 0

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values if self.contributes else [0.0] * len(values), dtype=torch.float64)
        if dist.is_initialized():
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.tolist()


@torch.no_grad()
def evaluate(stepper: Stepper, reporter: Reporter, documents, cfg: Config, dp_rank: int, dp_size: int,
             accum: int, device) -> float:  # fmt: skip
    """Mean held-out loss in nats per byte over the first ``val_batches`` global batches of the
    held-out stream: the same sequences whatever the layout, split across ranks like training."""
    loader = PackedByteLoader(
        documents, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank, dp_size, cfg.train.seed, shuffle=False,
        entropy_source=stepper.patcher.entropy_source(documents) if stepper.patcher is not None else None,
    )  # fmt: skip
    stepper.train(False)
    loss_sum = 0.0
    for _ in range(cfg.train.val_batches * accum):
        loss_sum += stepper.evaluate(*next_batch(loader, device))
    stepper.train(True)
    byte_count = cfg.train.val_batches * cfg.train.global_batch_size * cfg.train.seq_len
    return reporter.sum([loss_sum])[0] / byte_count


def parallelize(model: torch.nn.Module, cfg: Config, dims: ParallelDims, mesh, bf16: bool) -> list[torch.nn.Module]:
    """The model parts of this rank: the pipeline split first, then in torchtitan's order on each
    part tensor parallel, activation checkpointing and compile, then FSDP."""
    parts = [model]
    if dims.pp > 1:
        cp_group = mesh["cp"].get_group() if dims.cp > 1 else None
        parts = split_model(model, mesh["pp"].get_local_rank(), dims.pp, cfg.parallel.pp_schedule, cp_group)
    for part in parts:
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"])
        apply_activation_checkpointing_and_compile(part, cfg)
        if dims.uses_fsdp:
            # Under a pipeline, torch's zero-bubble schedules split each backward in two; FSDP must
            # keep the gathered weights between the halves (torchtitan does the same).
            apply_fsdp(part, mesh.fsdp, bf16=bf16, reshard_after_forward=dims.pp == 1)
    return parts


def train(cfg: Config, train_docs: list[bytes], val_docs: list[bytes]) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dims = ParallelDims.from_config(cfg, world_size)
    mesh = None
    if world_size > 1:
        timeout = datetime.timedelta(seconds=cfg.parallel.timeout_seconds)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        mesh = build_mesh(dims, device.type)
    dp_rank = mesh.dp.get_local_rank() if mesh is not None else 0
    accum = grad_accum_steps(cfg, world_size)
    is_main = rank == 0
    layout_sizes = dict(zip(("pp", "dp_replicate", "dp_shard", "cp", "tp"), dims.sizes()))
    checkpointer = Checkpointer(cfg, layout_sizes, dp_rank, device)

    output_dir = Path(cfg.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    logger = MetricsLogger(output_dir, cfg.train.steps, is_main, build_sinks(cfg, output_dir, is_main))
    timer = StepTimer(device)
    profiler = StepProfiler(cfg.logging.profile_steps, output_dir, rank, device)

    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and use_cuda)
    model = build_model(cfg, device)
    param_count = sum(p.numel() for p in model.parameters())
    model_parts = parallelize(model, cfg, dims, mesh, bf16)
    del model  # a pipeline rank keeps only its own parts
    parameters = [p for part in model_parts for p in part.parameters()]
    optimizer = build_optimizer(model_parts, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    # With FSDP, its mixed-precision policy casts parameters to bf16; autocast covers the rest.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not dims.uses_fsdp)
    patcher = Patcher(cfg.patching, device) if cfg.model.arch == "blt" else None
    stepper = Stepper(model_parts, cfg, dims, mesh, patcher, autocast, device)
    reporter = Reporter(mesh, device)
    loader = PackedByteLoader(
        train_docs, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank, dims.dp, cfg.train.seed,
        entropy_source=patcher.entropy_source(train_docs) if patcher is not None else None,
    )  # fmt: skip
    peak = peak_tflops(torch.cuda.get_device_name(device) if use_cuda else "cpu", cfg.logging.peak_tflops)
    layout = " x ".join(f"{name}={size}" for name, size in layout_sizes.items())
    logger.info(
        f"bltdist: {cfg.model.arch} model, {param_count / 1e6:.2f}M parameters, {world_size} process(es) on "
        f"{device.type} ({layout}), global batch {cfg.train.global_batch_size} x {cfg.train.seq_len} bytes, "
        f"{accum} accumulation step(s), output in {output_dir}"
    )

    def validate(step: int) -> None:
        val_loss = evaluate(stepper, reporter, val_docs, cfg, dp_rank, dims.dp, accum, device)
        logger.val_line({"step": step, "val_loss": val_loss, "val_bpb": val_loss / math.log(2)})

    start_step = checkpointer.restore(model_parts, optimizer, scheduler, loader)
    if start_step:
        logger.info(f"resumed from {checkpointer.resume_from} after step {start_step}")
    else:
        validate(0)
    step_bytes = cfg.train.global_batch_size * cfg.train.seq_len
    window = {"loss": 0.0, "patches": 0.0, "steps": 0, "start": time.perf_counter()}
    run_start = time.perf_counter()
    preempted = False
    for step in range(start_step + 1, cfg.train.steps + 1):
        profiler.start_step(step)
        timer.start_step()
        for micro in range(accum):
            with timer.phase("data_wait"):
                tokens, targets, entropies = next_batch(loader, device)
            if dims.uses_fsdp:
                # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
                for part in model_parts:
                    part.set_requires_gradient_sync(micro == accum - 1)
            with timer.phase("forward_backward"):
                loss_sum, num_patches = stepper.forward_backward(tokens, targets, entropies)
            window["loss"] += loss_sum
            window["patches"] += num_patches
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        with timer.phase("grad_norm_allreduce"):
            grad_norm = clip_grad_norm(parameters, clip, world_size // dims.pp)
        lr = scheduler.get_last_lr()[0]
        with timer.phase("optimizer"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        timer.end_step()
        trace = profiler.end_step(step)
        if trace is not None and is_main:
            logger.info(f"profiler trace of step {step} written: {trace} (and one per rank)")
        window["steps"] += 1

        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            loss_total, patches_total = reporter.sum([window["loss"], window["patches"]])
            elapsed = time.perf_counter() - window["start"]
            bytes_total = step_bytes * window["steps"]
            loss = loss_total / bytes_total
            avg_patch_len = bytes_total / patches_total if patcher is not None else None
            bytes_per_sec = bytes_total / elapsed
            flops_per_byte = training_flops_per_byte(cfg.model, cfg.train.seq_len, avg_patch_len or 1.0)
            tflops = flops_per_byte * bytes_per_sec / world_size / 1e12
            record = {
                "step": step,
                "loss": loss,
                "bpb": loss / math.log(2),
                "bytes_per_sec": bytes_per_sec,
                "patches_per_sec": patches_total / elapsed if patcher is not None else None,
                "avg_patch_len": avg_patch_len,
                "grad_norm": grad_norm,
                "lr": lr,
                "mem_gb": peak_memory_gb(device),
                "tflops": tflops,
                "mfu": tflops / peak if peak else None,
            }
            logger.train_line(record, (time.perf_counter() - run_start) / (step - start_step))
            window = {"loss": 0.0, "patches": 0.0, "steps": 0, "start": time.perf_counter()}
        if cfg.train.val_interval and step % cfg.train.val_interval == 0 and step != cfg.train.steps:
            validate(step)
        preempted = checkpointer.after_step(step)
        if preempted:
            logger.info(f"stopping on a signal: checkpoint of step {step} written")
            break

    checkpointer.close()
    if not preempted:
        validate(cfg.train.steps)
        if is_main:
            logger.info(f"model written: {consolidate(checkpointer.latest(), output_dir / 'model')}")
    summary = run_summary(
        logger.train_records, timer.breakdown(), gather_peak_memory_gb(device), world_size=world_size,
        layout=layout_sizes, device_type=device.type, peak_tflops=peak,
    )  # fmt: skip
    if is_main:
        logger.info(format_summary(summary))
        logger.info(f"summary written: {write_summary(summary, output_dir)}")
    logger.close()
    if dist.is_initialized():
        # No rank tears the group down while another still talks to it (rank 0 consolidates last).
        dist.barrier()
        dist.destroy_process_group()


def check_model_dir(key: str, path: str) -> None:
    missing = [name for name in ("config.yaml", "model.safetensors") if not (Path(path) / name).is_file()]
    if missing:
        raise UserError(f"{key}: {path} is not a bltdist model directory (missing {', '.join(missing)})")


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
        check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg.patching.mode == "entropy" and cfg.model.arch == "blt":
            check_model_dir("patching.entropy_model", cfg.patching.entropy_model)
        if cfg.checkpoint.init_from:
            check_model_dir("checkpoint.init_from", cfg.checkpoint.init_from)
        check_resumable(cfg, meta_model(cfg))
        sink_problems = missing_sink_packages(cfg.logging)
        if sink_problems:
            raise ConfigError(sink_problems)
        train_docs, val_docs = build_datasets(cfg.data.path, cfg.data.text_field, cfg.data.val_fraction)
        with memory_snapshot_on_oom(cfg, int(os.environ.get("RANK", "0"))):
            train(cfg, train_docs, val_docs)
    except UserError as error:
        # Once per node: inputs such as data paths can differ between nodes.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"bltdist-train: error: {where}{error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
