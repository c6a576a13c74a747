"""Memory per rank of candidate parallel layouts, and the fastest one that fits:
``python -m bltdist.plan --config X --gpus N --gpu-mem-gb M [--section.key VALUE ...]``.

The estimate per rank is the larger of the two moments a step peaks at: the start of backward
(states, all activations, FSDP buffers, gradients under accumulation) and the optimizer step
(states, sharded gradients, the step's temporaries). Activations are measured by probes on the CPU,
not guessed; speed is a stated heuristic. README "Which layout" gives every term and why, and
``bltdist.memtrack`` the measured quantity it is tested against.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from bltdist.atomic import atomic_write
from bltdist.config import Config, ParallelConfig, load_config, parse_args
from bltdist.errors import ConfigError, UserError
from bltdist.memtrack import PeakTensorMemory
from bltdist.model.layers import CrossAttention, TransformerBlock
from bltdist.parallel import ParallelDims
from bltdist.tokenizer import TOKENIZER_FILE, train_bpe
from bltdist.training.parallelize import meta_model
from bltdist.training.state import build_training_state

FP32 = 4
PROBE_SEQ_LEN = 1024


@dataclass
class ParameterCounts:
    """Parameters by FSDP unit: each transformer block and cross-attention is one, the rest is root."""

    root: int
    units: list[int]
    unit_norms: int  # norm gains inside units: not split by tensor parallelism

    @property
    def total(self) -> int:
        return self.root + sum(self.units)


def count_parameters(cfg: Config) -> ParameterCounts:
    model = meta_model(cfg.model)
    units = [m for m in model.modules() if isinstance(m, (TransformerBlock, CrossAttention))]
    in_units = {id(p) for m in units for p in m.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    norms = sum(p.numel() for m in units for p in m.parameters() if p.ndim == 1)
    return ParameterCounts(root, [sum(p.numel() for p in m.parameters()) for m in units], norms)


def _layer_keys(cfg: Config) -> tuple[str, ...]:
    return ("encoder_layers", "decoder_layers", "global_layers") if cfg.model.arch == "blt" else ("layers",)


def _section(cfg: Config):
    return cfg.model.blt if cfg.model.arch == "blt" else cfg.model.entropy


def _probe_activation_bytes(cfg: Config, layers: dict[str, int], seq_len: int) -> int:
    """Peak tensor bytes above the parameters of one forward+backward, micro-batch 1, on CPU."""
    probe = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, entropy=dataclasses.replace(cfg.model.entropy), blt=dataclasses.replace(
            cfg.model.blt, hash_vocab=min(cfg.model.blt.hash_vocab, 1024), kernels="torch")),
        # Static patches: an entropy model is not needed to measure what a layer holds per byte.
        patching=dataclasses.replace(cfg.patching, mode="static"),
        train=dataclasses.replace(cfg.train, micro_batch_size=1, global_batch_size=1, seq_len=seq_len, device="cpu",
                                  dtype="float32", compile=False),  # checkpointing as configured
        parallel=ParallelConfig(),
        checkpoint=dataclasses.replace(cfg.checkpoint, init_from=None),
    )  # fmt: skip
    for key, count in layers.items():
        setattr(_section(probe), key, count)
    with tempfile.TemporaryDirectory() as scratch:
        probe.output_dir = scratch
        if cfg.model.arch == "tokenlm":
            # The probe's random bytes would meet few merges of a trained tokenizer; the 256 single
            # bytes alone make one token per byte: the most positions per byte, an upper bound.
            atomic_write(Path(scratch) / TOKENIZER_FILE, train_bpe([], cfg.model.tokenlm.vocab_size).to_str())
        state = build_training_state(probe, world_size=1)
    for parameter in state.parameters:
        # Gradients are states, estimated separately: drop each as soon as it is complete.
        parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    tokens = torch.randint(4, 260, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    parameter_bytes = sum(p.numel() * p.element_size() for p in state.parameters)
    tracker = PeakTensorMemory()
    with tracker:
        tracker.track(state.parameters)
        state.stepper.forward_backward(tokens[:, :-1], tokens[:, 1:], None)
    return tracker.peak_bytes - parameter_bytes


@dataclass
class ActivationModel:
    """Activation bytes of one micro-batch row of ``seq_len`` bytes: base + per-layer terms."""

    base_per_byte: float
    per_layer_per_byte: dict[str, float]
    seq_len: int

    @classmethod
    def probe(cls, cfg: Config) -> ActivationModel:
        seq_len = min(cfg.train.seq_len, PROBE_SEQ_LEN)
        ones = dict.fromkeys(_layer_keys(cfg), 1)
        base = _probe_activation_bytes(cfg, ones, seq_len)
        per_layer = {}
        for key in ones:
            per_layer[key] = (_probe_activation_bytes(cfg, {**ones, key: 2}, seq_len) - base) / seq_len
        base_per_byte = base / seq_len - sum(per_layer.values())
        return cls(base_per_byte, per_layer, seq_len)

    def bytes_per_rank(self, cfg: Config, layout: ParallelDims, pipeline_microbatches: int) -> float:
        section = _section(cfg)
        layers = sum(self.per_layer_per_byte[key] * getattr(section, key) for key in self.per_layer_per_byte)
        # A pipeline microbatch is 1 / pipeline_microbatches of the micro-batch; GPipe runs every
        # forward before the first backward, the other schedules at most one per stage ahead.
        gpipe = layout.pp > 1 and cfg.parallel.pp_schedule == "GPipe"
        in_flight = pipeline_microbatches if gpipe else min(layout.pp, pipeline_microbatches)
        rows_in_flight = cfg.train.micro_batch_size * in_flight / pipeline_microbatches
        return rows_in_flight * cfg.train.seq_len / layout.cp * (self.base_per_byte + layers / layout.pp / layout.tp)


@dataclass
class Estimate:
    """Per-rank bytes at the larger of the two peaks of a step (see the module docstring):
    ``states`` (parameters + AdamW moments) are alive at both; ``gradients`` and ``fsdp_buffers``
    are what is alive with the activations at the start of backward; ``step_extra`` is what the
    optimizer step adds to the states instead (sharded gradients and the step's temporaries)."""

    layout: ParallelDims
    micro_batch: int
    states: float
    gradients: float
    fsdp_buffers: float
    activations: float
    step_extra: float
    relative_speed: float
    speed_notes: list[str]

    @property
    def backward_start(self) -> float:
        return self.states + self.gradients + self.fsdp_buffers + self.activations

    @property
    def optimizer_step(self) -> float:
        return self.states + self.step_extra

    @property
    def total(self) -> float:
        return max(self.backward_start, self.optimizer_step)


def estimate(cfg: Config, layout: ParallelDims, counts: ParameterCounts, activations: ActivationModel,
             gpus_per_node: int, compute_bytes: int) -> Estimate:  # fmt: skip
    """Per-rank memory (bytes) of ``layout`` and its speed relative to an ideal layout (1.0)."""
    shard = layout.dp_shard * layout.cp
    stage_units = counts.units[: math.ceil(len(counts.units) / layout.pp)] if counts.units else []
    # Stage 0 is the heaviest: it holds the embeddings and hash tables, the largest root part.
    unit_params = sum(stage_units)
    tp_split = (unit_params - counts.unit_norms / layout.pp) / layout.tp + counts.unit_norms / layout.pp
    unsharded_params = counts.root + tp_split
    local_params = unsharded_params / shard
    states = local_params * FP32 * 3  # parameters and two AdamW moments
    uses_fsdp = layout.dp_replicate * shard > 1
    microbatches = layout.pp_microbatches if layout.pp > 1 else 1
    accumulates = layout.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size) > 1 or microbatches > 1
    gradients = 0.0
    if accumulates:
        # Earlier micro-batches' gradients wait for the last one; FSDP keeps them unreduced.
        gradients = (unsharded_params if uses_fsdp else local_params) * FP32
    fsdp_buffers = 0.0
    if uses_fsdp:
        largest_unit = max(stage_units, default=0) / layout.tp
        # An all-gather over > 1 rank lands in a flat output before it is copied into the unsharded
        # parameters; with no sharding (dp_replicate only) FSDP2 copies the local shard directly.
        gathered_copies = 2 if shard > 1 else 1
        root_gathered = counts.root * compute_bytes
        root_flat_output = root_gathered * (gathered_copies - 1)  # the root's re-gather in its pre-backward
        prefetched_unit = gathered_copies * largest_unit * compute_bytes  # next, once that flat output is freed
        fsdp_buffers = root_gathered + max(root_flat_output, prefetched_unit)
    step_extra = local_params * FP32  # sharded gradients
    act = activations.bytes_per_rank(cfg, layout, microbatches)

    speed, notes = 1.0, []
    if layout.pp > 1:
        bubble = (layout.pp - 1) / (microbatches + layout.pp - 1)
        speed *= 1 - bubble
        notes.append(f"pipeline bubble {100 * bubble:.0f}% ({microbatches} microbatches)")
    if layout.tp > 1:
        across = layout.tp > gpus_per_node
        loss = (0.30 if across else 0.10) * math.log2(layout.tp)
        speed *= 1 - min(loss, 0.9)
        notes.append(f"tensor-parallel all-reduces {'across nodes' if across else 'in a node'} (~{100 * loss:.0f}%)")
    if layout.cp > 1:
        loss = 0.05 * math.log2(layout.cp)
        speed *= 1 - loss
        notes.append(f"context-parallel ring passes (~{100 * loss:.0f}%)")
    if not notes:
        notes.append("data parallel only: FSDP collectives overlap compute")
    return Estimate(layout, cfg.train.micro_batch_size, states, gradients, fsdp_buffers, act, step_extra, speed, notes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_config(cfg: Config, layout: ParallelDims) -> tuple[ParallelDims, Config] | None:
    """``cfg`` run as ``layout`` (its degrees), with the micro-batch lowered if the data-parallel
    ranks need it to share the global batch, and the layout as the trainer resolves it; None when
    the model shape or the batch does not allow the layout."""
    if cfg.train.global_batch_size % layout.dp:
        return None
    micro_batch = min(cfg.train.micro_batch_size, cfg.train.global_batch_size // layout.dp)
    parallel = dataclasses.replace(cfg.parallel, **layout.sizes())
    candidate = dataclasses.replace(cfg, parallel=parallel, train=dataclasses.replace(cfg.train, micro_batch_size=micro_batch))
    try:
        dims = ParallelDims.from_config(candidate, layout.world_size)
    except ConfigError:
        return None
    if layout.cp > 1 and cfg.train.seq_len % (2 * layout.cp * layout.tp):
        return None  # CP cuts each sequence into 2 x cp chunks (ParallelDims checks each stage's layers)
    return dims, candidate


def candidate_layouts(cfg: Config, gpus: int) -> list[tuple[ParallelDims, Config]]:
    """Every layout of ``gpus`` ranks that the model shape and the batch allow, with its config."""
    found = []
    for pp in _divisors(gpus):
        for tp in _divisors(gpus // pp):
            for cp in _divisors(gpus // pp // tp):
                for dp_replicate in _divisors(gpus // pp // tp // cp):
                    layout = ParallelDims(pp, dp_replicate, gpus // (pp * tp * cp * dp_replicate), cp, tp)
                    resolved = layout_config(cfg, layout)
                    if resolved is not None:
                        found.append(resolved)
    return found


def plan(cfg: Config, gpus: int, gpu_mem_gb: float, gpus_per_node: int, dtype_bytes: int) -> tuple[list[Estimate], str]:
    counts = count_parameters(cfg)
    activations = ActivationModel.probe(cfg)
    estimates = [estimate(candidate, dims, counts, activations, gpus_per_node, dtype_bytes)
                 for dims, candidate in candidate_layouts(cfg, gpus)]  # fmt: skip
    budget = gpu_mem_gb * 1e9
    fitting = [e for e in estimates if e.total <= budget]
    # Among equally fast layouts, prefer less replication (more sharding frees memory for batch).
    fitting.sort(key=lambda e: (-e.relative_speed, e.layout.dp_replicate, e.total))
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total, default=None)
        why = "no layout of the model and batch fits"
        if smallest is not None:
            why += (f"; the smallest is {smallest.layout} at {smallest.total / 1e9:.1f} GB per rank. Lower "
                    "train.micro_batch_size, turn on train.activation_checkpointing, or use more GPUs")
        return estimates, why
    best = fitting[0]
    why = (f"recommended: {best.layout} ({best.total / 1e9:.1f} of {gpu_mem_gb:g} GB per rank, "
           f"relative speed {best.relative_speed:.2f}: {'; '.join(best.speed_notes)})")
    return estimates, why


def format_table(estimates: list[Estimate], gpu_mem_gb: float) -> str:
    header = (f"{'layout':<40} {'micro':>5} {'states':>8} {'grads':>8} {'fsdp':>8} {'activ.':>8} {'step':>8} "
              f"{'total':>8} {'fits':>5} {'speed':>6}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for e in sorted(estimates, key=lambda e: e.total):
        gb = [x / 1e9 for x in (e.states, e.gradients, e.fsdp_buffers, e.activations, e.step_extra, e.total)]
        fits = "yes" if e.total <= gpu_mem_gb * 1e9 else "no"
        lines.append(f"{str(e.layout):<40} {e.micro_batch:>5} " + " ".join(f"{x:8.2f}" for x in gb) + f" {fits:>5} {e.relative_speed:6.2f}")
    lines.append("(GB per rank; states = parameters + AdamW moments in fp32; total = the larger of the start of backward "
                 "(states + grads + fsdp + activ.) and the optimizer step (states + step: sharded grads, temporaries))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bltdist.plan",
        description="Estimate memory per rank of every layout of N GPUs and recommend the fastest that fits. "
        "Further --section.key VALUE arguments override the config.",
    )
    parser.add_argument("--config", required=True, help="a bltdist YAML config")
    parser.add_argument("--gpus", type=int, required=True, help="total number of GPUs (ranks)")
    parser.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU in GB (e.g. 80 for H100)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (tensor parallel stays inside)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype of gathered weights")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.gpus < 1 or args.gpu_mem_gb <= 0 or args.gpus_per_node < 1:
            raise UserError("--gpus and --gpus-per-node must be >= 1 and --gpu-mem-gb > 0")
        config_path, rest = parse_args(["--config", args.config, *overrides])
        cfg = load_config(config_path, rest)
        estimates, why = plan(cfg, args.gpus, args.gpu_mem_gb, args.gpus_per_node, 2 if args.dtype == "bf16" else 4)
    except (UserError, ConfigError) as error:
        print(f"bltdist.plan: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_table(estimates, args.gpu_mem_gb))
    print(why)


if __name__ == "__main__":
    main()
