"""Train a BLT (or its entropy model): ``python -m bltdist.train``, ``torchrun -m bltdist.train``
or ``bltdist-train``, each with ``[--config] configs/X.yaml [--dotted.key VALUE ...]``.

Everything the user can get wrong (config, data paths) is checked before any process group
starts; such problems print one message and exit with code 2.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bltdist.checkpoint import load_model_weights, save_model_dir
from bltdist.config import Config, grad_accum_steps, data_parallel_size, load_config, parse_args, save_config, validate_world
from bltdist.data import PackedByteLoader, build_datasets
from bltdist.errors import UserError
from bltdist.flops import peak_tflops, training_flops_per_byte
from bltdist.metrics import MetricsLogger, peak_memory_gb
from bltdist.model import BLT, ByteLM
from bltdist.model.layers import TransformerBlock
from bltdist.patcher import Patcher


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """Build on the meta device, then allocate on ``device`` and initialise from the seed."""
    with torch.device("meta"):
        model = BLT(cfg.model.blt) if cfg.model.arch == "blt" else ByteLM(cfg.model.entropy)
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


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # Norm gains are not decayed: shrinking them towards zero only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=fused,
    )


def next_batch(loader: PackedByteLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, entropies or None) on ``device``; entropies when the loader has an entropy source."""
    if loader.entropy_source is None:
        return (*(t.to(device, non_blocking=True) for t in loader.next_batch()), None)
    return tuple(t.to(device, non_blocking=True) for t in loader.next_batch_with_entropies())


def forward_loss(
    model, tokens, targets, patcher: Patcher | None, autocast, entropies: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed byte cross-entropy in nats and the number of patches of the micro-batch."""
    if patcher is None:
        with autocast:
            logits = model(tokens)
        num_patches = tokens.numel()
    else:
        lengths = patcher(tokens, entropies)
        with autocast:
            logits = model(tokens, lengths)
        num_patches = int((lengths > 0).sum())
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return loss_sum, num_patches


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model, documents, cfg: Config, dp_rank: int, dp_size: int, accum: int, patcher, autocast, device) -> float:
    """Mean held-out loss in nats per byte over the first ``val_batches`` global batches of the
    held-out stream: the same sequences whatever the layout, split across ranks like training."""
    loader = PackedByteLoader(
        documents, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank, dp_size, cfg.train.seed, shuffle=False,
        entropy_source=patcher.entropy_source(documents) if patcher is not None else None,
    )  # fmt: skip
    model.eval()
    loss_sum = byte_count = 0.0
    for _ in range(cfg.train.val_batches * accum):
        tokens, targets, entropies = next_batch(loader, device)
        batch_loss, _ = forward_loss(model, tokens, targets, patcher, autocast, entropies)
        loss_sum += float(batch_loss)
        byte_count += targets.numel()
    model.train()
    loss_sum, byte_count = all_reduce_sum([loss_sum, byte_count], device)
    return loss_sum / byte_count


def train(cfg: Config, train_docs: list[bytes], val_docs: list[bytes]) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dp_size, dp_rank = data_parallel_size(cfg, world_size), rank
    accum = grad_accum_steps(cfg, world_size)
    is_main = rank == 0

    output_dir = Path(cfg.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    logger = MetricsLogger(output_dir, cfg.train.steps, is_main)

    model = build_model(cfg, device)
    param_count = sum(p.numel() for p in model.parameters())
    apply_activation_checkpointing_and_compile(model, cfg)
    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and use_cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    patcher = Patcher(cfg.patching, device) if cfg.model.arch == "blt" else None
    loader = PackedByteLoader(
        train_docs, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank, dp_size, cfg.train.seed,
        entropy_source=patcher.entropy_source(train_docs) if patcher is not None else None,
    )  # fmt: skip
    peak = peak_tflops(torch.cuda.get_device_name(device) if use_cuda else "cpu", cfg.logging.peak_tflops)
    logger.info(
        f"bltdist: {cfg.model.arch} model, {param_count / 1e6:.2f}M parameters, {world_size} process(es) on "
        f"{device.type}, global batch {cfg.train.global_batch_size} x {cfg.train.seq_len} bytes, "
        f"{accum} accumulation step(s), output in {output_dir}"
    )

    def validate(step: int) -> None:
        val_loss = evaluate(train_model, val_docs, cfg, dp_rank, dp_size, accum, patcher, autocast, device)
        logger.val_line({"step": step, "val_loss": val_loss, "val_bpb": val_loss / math.log(2)})

    def save(step: int) -> None:
        if is_main:
            path = save_model_dir(model, cfg, output_dir / "checkpoints" / f"step_{step}")
            logger.info(f"checkpoint written: {path}")

    validate(0)
    window = {"loss": 0.0, "bytes": 0.0, "patches": 0.0, "steps": 0, "start": time.perf_counter()}
    run_start = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        loss_sum = patch_count = 0.0
        for micro in range(accum):
            tokens, targets, entropies = next_batch(loader, device)
            last_micro = micro == accum - 1
            sync = contextlib.nullcontext() if last_micro or world_size == 1 else train_model.no_sync()
            with sync:
                batch_loss, num_patches = forward_loss(train_model, tokens, targets, patcher, autocast, entropies)
                # Mean over this rank's bytes of the step; DDP then averages over ranks, so the
                # gradient is that of the mean over the global batch, whatever the layout.
                (batch_loss / (targets.numel() * accum)).backward()
            loss_sum += float(batch_loss.detach())
            patch_count += num_patches
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_bytes = cfg.train.micro_batch_size * cfg.train.seq_len * accum
        window["loss"] += loss_sum
        window["bytes"] += step_bytes
        window["patches"] += patch_count
        window["steps"] += 1
        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            loss_total, bytes_total, patches_total = all_reduce_sum(
                [window["loss"], window["bytes"], window["patches"]], device
            )
            elapsed = time.perf_counter() - window["start"]
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
            logger.train_line(record, (time.perf_counter() - run_start) / step)
            window = {"loss": 0.0, "bytes": 0.0, "patches": 0.0, "steps": 0, "start": time.perf_counter()}
        if cfg.train.val_interval and step % cfg.train.val_interval == 0 and step != cfg.train.steps:
            validate(step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step != cfg.train.steps:
            save(step)

    validate(cfg.train.steps)
    save(cfg.train.steps)
    logger.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def check_model_dir(key: str, path: str) -> None:
    missing = [name for name in ("config.yaml", "model.safetensors") if not (Path(path) / name).is_file()]
    if missing:
        raise UserError(f"{key}: {path} is not a bltdist model directory (missing {', '.join(missing)})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
        validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg.patching.mode == "entropy" and cfg.model.arch == "blt":
            check_model_dir("patching.entropy_model", cfg.patching.entropy_model)
        if cfg.checkpoint.init_from:
            check_model_dir("checkpoint.init_from", cfg.checkpoint.init_from)
        train_docs, val_docs = build_datasets(cfg.data.path, cfg.data.text_field, cfg.data.val_fraction)
        train(cfg, train_docs, val_docs)
    except UserError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"bltdist-train: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
