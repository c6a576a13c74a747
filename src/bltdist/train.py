"""Train a BLT (or its entropy model): ``python -m bltdist.train``, ``torchrun -m bltdist.train``
or ``bltdist-train``, each with ``[--config] configs/X.yaml [--dotted.key VALUE ...]``.

Everything the user can get wrong (config, layout, data paths, the checkpoint to resume) is checked
before any process group starts; such problems print one message and exit with code 2.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from bltdist.config import Config, config_to_dict, load_config, parse_args, save_config
from bltdist.data import DocumentSet, MixtureSource, PackedByteLoader, build_sources, open_table
from bltdist.errors import ConfigError, DataError, RunFailed, TrainingDiverged, UserError
from bltdist.evaluate import DEFAULT_SEED, NOISE_KINDS, noised_documents
from bltdist.flops import peak_tflops, training_flops_per_byte
from bltdist.metrics import (
    MetricsLogger,
    RecompilationCounter,
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
from bltdist.parallel.pipeline import torch_schedule_problems
from bltdist.tokenizer import prepare_run_tokenizer
from bltdist.training.checkpoint import Checkpointer, check_resumable, consolidate
from bltdist.training.parallelize import meta_model
from bltdist.training.state import TrainingState, build_training_state, training_device
from bltdist.training.step import NonFiniteGuard, Reporter, optimizer_step


class Trainer:
    """A training run: ``Trainer(cfg, train_docs, val_docs, build_eval_sets(cfg)).run()``."""

    def __init__(self, cfg: Config, train_docs: list[MixtureSource], val_docs: list[MixtureSource],
                 eval_sets: dict[str, dict[str, list[MixtureSource]]] | None = None):  # fmt: skip
        self.cfg, self.val_docs, self.eval_sets = cfg, val_docs, eval_sets or {}
        self.state = state = build_training_state(cfg)
        self.output_dir, dims = Path(cfg.output_dir), state.dims
        self.is_main = state.rank == 0
        # Built before anything is written: it verifies the checkpoint to resume.
        self.checkpointer = Checkpointer(cfg.checkpoint, self.output_dir, config_to_dict(cfg), cfg.train.steps,
                                         dims.sizes(), state.dp_rank, state.device)  # fmt: skip
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        sinks = build_sinks(cfg.logging, self.output_dir, config_to_dict(cfg), self.is_main)
        self.logger = MetricsLogger(self.output_dir, cfg.train.steps, self.is_main, sinks)
        self.timer = StepTimer(state.device)
        self.profiler = StepProfiler(cfg.logging.profile_steps, self.output_dir, state.rank, state.device)
        self.loader = data_loader(train_docs, cfg, state, shuffle=True, prefetch=cfg.data.prefetch)
        self.accum = dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        self.meter = Throughput(cfg, state, peak_tflops(device_name(state.device), cfg.logging.peak_tflops))
        self.guard, self.step = NonFiniteGuard(cfg.train), 0
        self.recompilations = RecompilationCounter()
        self.logger.info(
            f"bltdist: {cfg.model.arch} model, {state.parameter_count / 1e6:.2f}M parameters, {dims.world_size} "
            f"process(es) on {state.device.type} ({dims}), global batch {cfg.train.global_batch_size} x "
            f"{cfg.train.seq_len} bytes, {self.accum} accumulation step(s), output in {self.output_dir}"
        )

    def run(self) -> None:
        try:
            preempted = self.train()
        except RunFailed as error:
            event = "nonfinite" if isinstance(error, TrainingDiverged) else "failed"
            self.logger.log({"step": self.step, "event": event, "message": str(error)})
            self.close()
            raise
        if not preempted:
            self.validate(self.cfg.train.steps)
            if self.is_main and self.cfg.checkpoint.final:
                self.logger.info(f"model written: {consolidate(self.checkpointer.latest(), self.output_dir / 'model')}")
        summary = run_summary(
            self.logger.train_records, self.timer.breakdown(), gather_peak_memory_gb(self.state.device),
            world_size=self.state.dims.world_size, layout=self.state.dims.sizes(), device_type=self.state.device.type,
            peak_tflops=self.meter.peak,
        )  # fmt: skip
        summary["data"] = self.loader.consumed()
        summary["recompilations"] = self.recompilations.count
        summary["graph_breaks"] = self.recompilations.graph_breaks
        summary.update(self.meter.training_flops(self.step))
        if self.is_main:
            self.logger.info(format_summary(summary))
            self.logger.info(f"summary written: {write_summary(summary, self.output_dir)}")
        self.close()

    def train(self) -> bool:
        """The training loop; True when a preemption signal stopped it (after a checkpoint)."""
        cfg, state, timer = self.cfg, self.state, self.timer
        start_step = self.checkpointer.restore(state.model_parts, state.optimizer, state.scheduler, self.loader,
                                               state.stepper.entropy_training)  # fmt: skip
        if start_step:
            if self.checkpointer.resume_note:
                self.logger.info(self.checkpointer.resume_note)
            self.logger.info(f"resumed from {self.checkpointer.resume_from} after step {start_step}")
            # Steps after this line repeat step numbers of the interrupted run: readers keep the later ones.
            self.logger.log({"step": start_step, "event": "resume", "from": str(self.checkpointer.resume_from)})
        else:
            self.validate(0)
        run_start = time.perf_counter()
        for self.step in range(start_step + 1, cfg.train.steps + 1):
            self.profiler.start_step(self.step)
            timer.start_step()
            lr = state.scheduler.get_last_lr()[0]
            loss_sum, patches, grad_norm = optimizer_step(
                state.stepper, lambda: next_batch(self.loader, state.device), self.accum, state.dims, state.optimizer,
                state.scheduler, cfg.optim.grad_clip, timer,
            )  # fmt: skip
            applied = self.guard.applied(self.step, grad_norm, state.stepper, loss_sum, state.optimizer)
            timer.end_step()
            trace = self.profiler.end_step(self.step)
            if trace is not None:
                self.logger.info(f"profiler trace of step {self.step} written: {trace} (and one per rank)")
            self.meter.add(loss_sum if applied else None, patches)
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
                record = self.meter.record(self.step, grad_norm, lr, self.guard.skipped)
                if state.stepper.entropy_training is not None:
                    record.update(state.stepper.entropy_training.record())
                self.logger.train_line(record, (time.perf_counter() - run_start) / (self.step - start_step))
            if state.stepper.entropy_training is not None:  # after the line: it logs the threshold the step used
                state.stepper.entropy_training.after_step(self.step)
            if cfg.train.val_interval and self.step % cfg.train.val_interval == 0 and self.step != cfg.train.steps:
                self.validate(self.step)
            if self.checkpointer.after_step(self.step):
                self.logger.info(f"stopping on a signal: checkpoint of step {self.step} written")
                return True
        return False

    def validate(self, step: int) -> None:
        val_loss = evaluate(self.state, self.val_docs, self.cfg, self.accum)
        record = {"step": step, "val_loss": val_loss, "val_bpb": val_loss / math.log(2)}
        if len(self.val_docs) > 1:  # a mixture: each source's held-out lines on their own as well
            for source in self.val_docs:
                record[f"val_bpb/{source.name}"] = evaluate(self.state, [source], self.cfg, self.accum) / math.log(2)
        self.logger.val_line(record)
        if self.eval_sets:
            self.logger.log(self.eval_record(step))

    def eval_record(self, step: int) -> dict:
        """Each eval set's bpb, clean and per noise kind, on the first eval.batches global batches of its rows."""
        record = {"step": step}
        for name, variants in self.eval_sets.items():
            for variant, sources in variants.items():
                key = f"eval/{name}/bpb" if variant == "clean" else f"eval/{name}/bpb_{variant}"
                record[key] = evaluate(self.state, sources, self.cfg, self.accum, self.cfg.eval.batches) / math.log(2)
        return record

    def close(self) -> None:
        self.loader.close()
        self.checkpointer.close()
        self.logger.close()
        self.state.close()


class Throughput:
    """Adds up the steps between two metric lines and turns them into one line's figures."""

    def __init__(self, cfg: Config, state: TrainingState, peak: float | None):
        self.cfg, self.reporter, self.peak = cfg, Reporter(state.mesh, state.device), peak
        # tokenlm counts its BPE tokens as patches: avg_patch_len is then its bytes per token.
        self.counts_patches = state.patcher is not None or cfg.model.arch == "tokenlm"
        self.patcher = state.patcher
        self.world_size, self.device = state.dims.world_size, state.device
        self.flops_total, self.bytes_total = 0.0, 0  # over every logged interval of this process
        self._reset()

    def _reset(self) -> None:
        self.loss, self.patches, self.steps, self.applied, self.start = 0.0, 0.0, 0, 0, time.perf_counter()

    def add(self, loss_sum: float | None, patches: int) -> None:
        """One step's figures; ``loss_sum`` None for a skipped step (its bytes were read, not learnt)."""
        self.patches, self.steps = self.patches + patches, self.steps + 1
        if loss_sum is not None:
            self.loss, self.applied = self.loss + loss_sum, self.applied + 1

    def record(self, step: int, grad_norm: float, lr: float, skipped_steps: int) -> dict:
        grouped = self.patcher.grouped_counts() if self.patcher is not None else [0, 0]
        totals = self.reporter.sum([self.loss, self.patches, *grouped])
        loss_total, patches_total, grouped_patches, super_patches = totals
        elapsed = time.perf_counter() - self.start
        step_bytes = self.cfg.train.global_batch_size * self.cfg.train.seq_len
        bytes_total = step_bytes * self.steps
        loss = loss_total / (step_bytes * self.applied) if self.applied else math.nan
        avg_patch_len = bytes_total / patches_total if self.counts_patches else None
        avg_super_patch_len = grouped_patches / super_patches if super_patches else None  # entropy-grouped only
        flops_per_byte = training_flops_per_byte(self.cfg.model, self.cfg.train.seq_len, avg_patch_len or 1.0,
                                                 avg_super_patch_len)  # fmt: skip
        tflops = flops_per_byte * bytes_total / elapsed / self.world_size / 1e12
        self.flops_total += flops_per_byte * bytes_total
        self.bytes_total += bytes_total
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
            "skipped_steps": skipped_steps,
        }


    def training_flops(self, steps: int) -> dict:
        """Summary figures: training FLOPs per byte (the mean of the logged intervals) and over the run's
        ``steps`` steps (steps resumed from a checkpoint counted at that mean)."""
        train_bytes = steps * self.cfg.train.global_batch_size * self.cfg.train.seq_len
        per_byte = self.flops_total / self.bytes_total if self.bytes_total else None
        return {"train_bytes": train_bytes, "train_flops_per_byte": per_byte,
                "train_flops": per_byte * train_bytes if per_byte is not None else None}  # fmt: skip


def data_loader(sources: list[MixtureSource], cfg: Config, state: TrainingState, shuffle: bool,
                prefetch: int = 0) -> PackedByteLoader:  # fmt: skip
    """This data-parallel rank's loader; it serves entropies too when patching needs them, patch
    lengths when they depend on the batch alone, and prepares ``prefetch`` batches ahead on a
    background thread."""
    loader = PackedByteLoader(sources, cfg.train.seq_len, cfg.train.micro_batch_size, state.dp_rank, state.dims.dp,
                              cfg.train.seed, shuffle=shuffle, prefetch=prefetch)  # fmt: skip
    patcher = state.patcher
    loader.entropy_source = patcher.entropy_source(loader.documents) if patcher else None
    loader.patch_lengths = patcher if patcher is not None and patcher.lengths_from_batch_alone else None
    return loader


def next_batch(loader: PackedByteLoader, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """(inputs, targets, entropies or None, patch lengths or None) on ``device``
    (``PackedByteLoader.next_training_batch``)."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in loader.next_training_batch())


@torch.no_grad()
def evaluate(state: TrainingState, documents: list[MixtureSource], cfg: Config, accum: int,
             batches: int | None = None) -> float:  # fmt: skip
    """Mean loss in nats per byte over the first ``batches`` (default ``train.val_batches``) global
    batches of the documents' unshuffled stream: the same sequences whatever the layout, split
    across ranks like training."""
    batches = batches or cfg.train.val_batches
    loader = data_loader(documents, cfg, state, shuffle=False)
    state.stepper.train(False)
    loss_sum = 0.0
    for _ in range(batches * accum):
        loss_sum += state.stepper.evaluate(*next_batch(loader, state.device))
    state.stepper.train(True)
    byte_count = batches * cfg.train.global_batch_size * cfg.train.seq_len
    return Reporter(state.mesh, state.device).sum([loss_sum])[0] / byte_count


def build_eval_sets(cfg: Config) -> dict[str, dict[str, list[MixtureSource]]]:
    """Per eval.sets entry, the sources of each variant: every document of its path in order ("clean")
    and one noised copy per noise kind, noised as ``bltdist.evaluate`` does with its default seed.
    A path that gives no documents is a ConfigError naming its key."""
    eval_sets = {}
    for index, eval_set in enumerate(cfg.eval.sets):
        try:
            table = open_table(eval_set.path, cfg.data.text_field)
        except DataError as error:
            raise ConfigError([f"eval.sets[{index}].path: {error}"]) from error
        documents = list(table.select(np.arange(len(table))))
        variants = {"clean": documents}
        variants.update({kind: noised_documents(documents, kind, cfg.eval.noise_rate, DEFAULT_SEED)
                         for kind in NOISE_KINDS})  # fmt: skip
        eval_sets[eval_set.name] = {variant: [MixtureSource(eval_set.name, DocumentSet.of(texts))]
                                    for variant, texts in variants.items()}  # fmt: skip
    return eval_sets


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_before_start(cfg: Config, world_size: int) -> None:
    """Every check that needs no process group; UserError (exit 2) naming what to fix."""
    ParallelDims.from_config(cfg, world_size)
    if cfg.patching.mode == "entropy" and cfg.model.arch == "blt":
        check_model_dir("patching.entropy_model", cfg.patching.entropy_model)
    if cfg.checkpoint.init_from:
        check_model_dir("checkpoint.init_from", cfg.checkpoint.init_from)
    check_resumable(cfg.checkpoint, cfg.output_dir, config_to_dict(cfg), meta_model(cfg.model))
    problems = missing_sink_packages(cfg.logging)
    if cfg.parallel.pp > 1:
        problems += torch_schedule_problems(cfg.parallel.pp_schedule, training_device(cfg.train))
    if problems:
        raise ConfigError(problems)


QUIET_RANK_EXIT_DELAY_S = 30.0


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # bltdist's library lines (which attention backend runs, its fallbacks) go to stderr: the
    # choices from rank 0, warnings from every rank.
    library_logger = logging.getLogger("bltdist")
    library_logger.addHandler(logging.StreamHandler(sys.stderr))
    library_logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    started = False
    try:
        cfg = load_config(*parse_args(argv))
        check_before_start(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        train_docs, val_docs = build_sources(cfg.data)
        if cfg.model.arch == "tokenlm":
            prepare_run_tokenizer(cfg, train_docs)
        eval_sets = build_eval_sets(cfg)
        snapshot = cfg.logging.memory_snapshot_on_oom and training_device(cfg.train).type == "cuda"
        with memory_snapshot_on_oom(snapshot, Path(cfg.output_dir), int(os.environ.get("RANK", "0"))):
            started = True
            Trainer(cfg, train_docs, val_docs, eval_sets).run()
    except (UserError, RunFailed) as error:
        # Every rank finds the same problems before the start and agrees on a RunFailed: one message
        # per node. A UserError after the start may be one rank's alone (a file it cannot read).
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 or (started and isinstance(error, UserError)):
            where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"bltdist-train: error: {where}{error}", file=sys.stderr, flush=True)
        elif not started:
            # torchrun stops a node's ranks as soon as one exits: a quiet rank that exited first
            # would take the node's message with it (seen under load). Local rank 0's exit ends the wait.
            time.sleep(QUIET_RANK_EXIT_DELAY_S)
        sys.exit(2 if isinstance(error, UserError) else 1)


if __name__ == "__main__":
    main()
