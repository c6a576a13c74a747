"""Train a BLT (or its entropy model): ``python -m bltdist.train``, ``torchrun -m bltdist.train``
or ``bltdist-train``, each with ``[--config] configs/X.yaml [--dotted.key VALUE ...]``.

Everything the user can get wrong (config, layout, data paths, the checkpoint to resume) is checked
before any process group starts; such problems print one message and exit with code 2.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from bltdist.config import Config, config_to_dict, load_config, parse_args, save_config
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
from bltdist.model_dir import check_model_dir
from bltdist.parallel import ParallelDims
from bltdist.training.checkpoint import Checkpointer, check_resumable, consolidate
from bltdist.training.parallelize import meta_model
from bltdist.training.state import TrainingState, build_training_state, training_device
from bltdist.training.step import Reporter, optimizer_step


def train(cfg: Config, train_docs: list[bytes], val_docs: list[bytes]) -> None:
    state = build_training_state(cfg)
    device, dims, output_dir = state.device, state.dims, Path(cfg.output_dir)
    is_main = state.rank == 0
    # Built before anything is written: it verifies the checkpoint to resume.
    checkpointer = Checkpointer(cfg.checkpoint, output_dir, config_to_dict(cfg), cfg.train.steps, dims.sizes(),
                                state.dp_rank, device)  # fmt: skip
    if is_main:
        save_config(cfg, output_dir / "config.yaml")
    logger = MetricsLogger(output_dir, cfg.train.steps, is_main,
                           build_sinks(cfg.logging, output_dir, config_to_dict(cfg), is_main))  # fmt: skip
    timer, profiler = StepTimer(device), StepProfiler(cfg.logging.profile_steps, output_dir, state.rank, device)
    loader = data_loader(train_docs, cfg, state, shuffle=True)
    accum = dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    meter = Throughput(cfg, state, peak_tflops(device_name(device), cfg.logging.peak_tflops))
    logger.info(
        f"bltdist: {cfg.model.arch} model, {state.parameter_count / 1e6:.2f}M parameters, {dims.world_size} "
        f"process(es) on {device.type} ({dims}), global batch {cfg.train.global_batch_size} x {cfg.train.seq_len} "
        f"bytes, {accum} accumulation step(s), output in {output_dir}"
    )

    def validate(step: int) -> None:
        val_loss = evaluate(state, val_docs, cfg, accum)
        logger.val_line({"step": step, "val_loss": val_loss, "val_bpb": val_loss / math.log(2)})

    start_step = checkpointer.restore(state.model_parts, state.optimizer, state.scheduler, loader)
    if start_step:
        logger.info(f"resumed from {checkpointer.resume_from} after step {start_step}")
    else:
        validate(0)
    run_start, preempted = time.perf_counter(), False
    for step in range(start_step + 1, cfg.train.steps + 1):
        profiler.start_step(step)
        timer.start_step()
        lr = state.scheduler.get_last_lr()[0]
        loss_sum, patches, grad_norm = optimizer_step(
            state.stepper, lambda: next_batch(loader, device), accum, dims, state.optimizer, state.scheduler,
            cfg.optim.grad_clip, timer,
        )  # fmt: skip
        timer.end_step()
        trace = profiler.end_step(step)
        if trace is not None:
            logger.info(f"profiler trace of step {step} written: {trace} (and one per rank)")
        meter.add(loss_sum, patches)
        if step % cfg.logging.interval == 0 or step == cfg.train.steps:
            logger.train_line(meter.record(step, grad_norm, lr), (time.perf_counter() - run_start) / (step - start_step))
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
        logger.train_records, timer.breakdown(), gather_peak_memory_gb(device), world_size=dims.world_size,
        layout=dims.sizes(), device_type=device.type, peak_tflops=meter.peak,
    )  # fmt: skip
    if is_main:
        logger.info(format_summary(summary))
        logger.info(f"summary written: {write_summary(summary, output_dir)}")
    logger.close()
    state.close()


class Throughput:
    """Adds up the steps between two metric lines and turns them into one line's figures."""

    def __init__(self, cfg: Config, state: TrainingState, peak: float | None):
        self.cfg, self.reporter, self.peak = cfg, Reporter(state.mesh, state.device), peak
        self.world_size, self.counts_patches = state.dims.world_size, state.patcher is not None
        self.device = state.device
        self._reset()

    def _reset(self) -> None:
        self.loss, self.patches, self.steps, self.start = 0.0, 0.0, 0, time.perf_counter()

    def add(self, loss_sum: float, patches: int) -> None:
        self.loss, self.patches, self.steps = self.loss + loss_sum, self.patches + patches, self.steps + 1

    def record(self, step: int, grad_norm: float, lr: float) -> dict:
        loss_total, patches_total = self.reporter.sum([self.loss, self.patches])
        elapsed = time.perf_counter() - self.start
        bytes_total = self.cfg.train.global_batch_size * self.cfg.train.seq_len * self.steps
        loss = loss_total / bytes_total
        avg_patch_len = bytes_total / patches_total if self.counts_patches else None
        flops_per_byte = training_flops_per_byte(self.cfg.model, self.cfg.train.seq_len, avg_patch_len or 1.0)
        tflops = flops_per_byte * bytes_total / elapsed / self.world_size / 1e12
        self._reset()
        return {
            "step": step,
            "loss": loss,
            "bpb": loss / math.log(2),
            "bytes_per_sec": bytes_total / elapsed,
            "patches_per_sec": patches_total / elapsed if self.counts_patches else None,
            "avg_patch_len": avg_patch_len,
            "grad_norm": grad_norm,
            "lr": lr,
            "mem_gb": peak_memory_gb(self.device),
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }


def data_loader(documents: list[bytes], cfg: Config, state: TrainingState, shuffle: bool) -> PackedByteLoader:
    """This data-parallel rank's loader; it serves entropies too when patching needs them."""
    return PackedByteLoader(
        documents, cfg.train.seq_len, cfg.train.micro_batch_size, state.dp_rank, state.dims.dp, cfg.train.seed,
        shuffle=shuffle, entropy_source=state.patcher.entropy_source(documents) if state.patcher else None,
    )  # fmt: skip


def next_batch(loader: PackedByteLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, entropies or None) on ``device``; entropies when the loader has an entropy source."""
    if loader.entropy_source is None:
        return (*(t.to(device, non_blocking=True) for t in loader.next_batch()), None)
    return tuple(t.to(device, non_blocking=True) for t in loader.next_batch_with_entropies())


@torch.no_grad()
def evaluate(state: TrainingState, documents: list[bytes], cfg: Config, accum: int) -> float:
    """Mean held-out loss in nats per byte over the first ``val_batches`` global batches of the
    held-out stream: the same sequences whatever the layout, split across ranks like training."""
    loader = data_loader(documents, cfg, state, shuffle=False)
    state.stepper.train(False)
    loss_sum = 0.0
    for _ in range(cfg.train.val_batches * accum):
        loss_sum += state.stepper.evaluate(*next_batch(loader, state.device))
    state.stepper.train(True)
    byte_count = cfg.train.val_batches * cfg.train.global_batch_size * cfg.train.seq_len
    return Reporter(state.mesh, state.device).sum([loss_sum])[0] / byte_count


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_before_start(cfg: Config, world_size: int) -> None:
    """Every check that needs no process group; UserError (exit 2) naming what to fix."""
    ParallelDims.from_config(cfg, world_size)
    if cfg.patching.mode == "entropy" and cfg.model.arch == "blt":
        check_model_dir("patching.entropy_model", cfg.patching.entropy_model)
    if cfg.checkpoint.init_from:
        check_model_dir("checkpoint.init_from", cfg.checkpoint.init_from)
    check_resumable(cfg.checkpoint, cfg.output_dir, meta_model(cfg.model))
    sink_problems = missing_sink_packages(cfg.logging)
    if sink_problems:
        raise ConfigError(sink_problems)


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(*parse_args(argv))
        check_before_start(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        train_docs, val_docs = build_datasets(cfg.data.path, cfg.data.text_field, cfg.data.val_fraction)
        snapshot = cfg.logging.memory_snapshot_on_oom and training_device(cfg.train).type == "cuda"
        with memory_snapshot_on_oom(snapshot, Path(cfg.output_dir), int(os.environ.get("RANK", "0"))):
            train(cfg, train_docs, val_docs)
    except UserError as error:
        # Once per node: inputs such as data paths can differ between nodes.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"bltdist-train: error: {where}{error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
