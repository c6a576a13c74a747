"""Run configuration: typed sections, YAML files, command-line overrides and validation.

A run is described by one ``Config``. ``load_config`` starts from the defaults below, merges a YAML
file onto them (a file may give only some keys of a section), applies ``--dotted.key VALUE``
overrides, and checks the result. Every problem found on the way is collected and raised as one
``ConfigError`` so that a user fixes a config in one round instead of one error per run.

All sections are handled generically from their dataclass fields and type hints; a field's range
and allowed values live next to it in ``setting(...)`` so that the help text and the checks cannot
drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bltdist.errors import ConfigError

PROGRAM = "bltdist-train"


def setting(
    default: Any,
    help_text: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field with its help text and the range its values must lie in."""
    metadata = {"help": help_text, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass
class SuperPatchConfig:
    """Patches of patches: a second latent level between the patches and the global transformer."""

    enabled: bool = setting(False, "group patches into super-patches; false = the one-level BLT, unchanged")
    patches_per_super_patch: int = setting(
        4, "mode static: patches per super-patch, counted from each document start (as static patching counts bytes)",
        ge=1,
    )
    encoder_layers: int = setting(1, "patch-level encoder layers (global_dim) before pooling into super-patches", ge=1)
    decoder_layers: int = setting(1, "patch-level decoder layers (global_dim) after the super-patch transformer", ge=1)
    cross_attn_k: int = setting(1, "query slots per super-patch; k * global_dim != global_dim adds a projection", ge=1)
    mode: str = setting(
        "static",
        "how patches group: static = every patches_per_super_patch patches; entropy = a super-patch closes after the "
        "patch at which the summed next-byte entropy of its bytes passes entropy_threshold (needs patching.mode "
        "entropy); both start a super-patch at every document start",
        choices=("static", "entropy"),
    )
    entropy_threshold: float | None = setting(
        None, "mode entropy: summed next-byte entropy (nats) of a super-patch's bytes that closes it; required", gt=0
    )
    max_patches_per_super_patch: int | None = setting(
        None, "mode entropy: a super-patch closes at this many patches whatever its entropy; null = no limit", ge=1
    )


@dataclasses.dataclass
class BLTConfig:
    """Byte Latent Transformer shape (defaults: a small model)."""

    vocab_size: int = setting(260, "byte ids: 256 bytes shifted by 4 special ids", ge=260)
    local_dim: int = setting(256, "width of the byte-level encoder and decoder", ge=1)
    local_heads: int = setting(4, "attention heads of the local layers", ge=1)
    local_kv_heads: int | None = setting(None, "key/value heads (GQA when fewer); null = local_heads", ge=1)
    encoder_layers: int = setting(1, "local encoder layers", ge=1)
    decoder_layers: int = setting(4, "local decoder layers", ge=1)
    encoder_ffn_dim: int | None = setting(None, "encoder SwiGLU width; null = int(8 * local_dim / 3)", ge=1)
    decoder_ffn_dim: int | None = setting(None, "decoder SwiGLU width; null = int(8 * local_dim / 3)", ge=1)
    local_window: int | None = setting(512, "causal sliding window of the local layers in bytes; null = full", ge=1)
    global_dim: int = setting(512, "width of the global (patch-level) transformer", ge=1)
    global_layers: int = setting(6, "global transformer layers", ge=1)
    global_heads: int = setting(8, "global attention heads", ge=1)
    global_kv_heads: int | None = setting(None, "global key/value heads; null = global_heads", ge=1)
    global_ffn_dim: int | None = setting(None, "global SwiGLU width; null = int(8 * global_dim / 3)", ge=1)
    cross_attn_k: int = setting(2, "query slots per patch; k * local_dim != global_dim adds a projection", ge=1)
    encoder_cross_attn_all_layers: bool = setting(False, "encoder cross-attention after each layer, not just the last")
    decoder_cross_attn_all_layers: bool = setting(True, "decoder cross-attention before each layer, not just the first")
    encoder_cross_attn_repool: bool = setting(
        False,
        "with encoder cross-attention on all layers, restart the slots from max-pooling at every layer instead of "
        "refining them (the Hugging Face port's behaviour; the BLT reference pools once)",
    )
    hash_ngram_sizes: list[int] = setting([3, 4, 5, 6, 7, 8], "byte n-gram lengths with hash embeddings")
    hash_functions: int = setting(1, "hash functions per n-gram size (11 primes known; more reuse them)", ge=1)
    hash_vocab: int = setting(500002, "rows of each (function, n) hash table", ge=1)
    rope_theta: float = setting(500000.0, "rotary embedding base", gt=0)
    norm_eps: float = setting(1e-5, "RMSNorm epsilon", gt=0)
    global_final_norm: bool = setting(True, "RMSNorm after the global transformer (the released model has none)")
    cross_attn_double_residual: bool = setting(False, "add the cross-attention residual twice (released-model quirk)")
    init_std: float = setting(0.02, "standard deviation of the weight init", gt=0)
    kernels: str = setting(
        "auto",
        "hash embedding and cross-attention: auto = Triton kernels on CUDA, triton = kernels wherever they run, "
        "torch = the PyTorch reference",
        choices=("auto", "triton", "torch"),
    )
    super_patch: SuperPatchConfig = section(SuperPatchConfig)


@dataclasses.dataclass
class EntropyModelConfig:
    """Plain Llama-style transformer: the entropy model (whose next-byte entropy places patch boundaries),
    and the shape of the bytelm and tokenlm baselines (positions are bytes, or BPE tokens for tokenlm)."""

    vocab_size: int = setting(260, "byte ids: 256 bytes shifted by 4 special ids", ge=260)
    dim: int = setting(768, "model width", ge=1)
    layers: int = setting(14, "transformer layers", ge=1)
    heads: int = setting(12, "attention heads", ge=1)
    kv_heads: int | None = setting(None, "key/value heads (GQA when fewer); null = heads", ge=1)
    ffn_dim: int | None = setting(2048, "SwiGLU width; null = int(8 * dim / 3)", ge=1)
    window: int | None = setting(512, "causal sliding window in bytes; null = full causal", ge=1)
    rope_theta: float = setting(10000.0, "rotary embedding base", gt=0)
    norm_eps: float = setting(1e-5, "RMSNorm epsilon", gt=0)
    init_std: float = setting(0.02, "standard deviation of the weight init", gt=0)


@dataclasses.dataclass
class TokenLMConfig:
    """The BPE baseline's tokenizer (its transformer's shape is model.entropy)."""

    vocab_size: int = setting(4096, "byte-level BPE vocabulary: 256 single bytes plus merges", ge=257)
    sample_bytes: int = setting(
        16_000_000, "training-split bytes (documents in order, whole ones) the tokenizer is trained on", ge=1
    )


@dataclasses.dataclass
class ModelConfig:
    """Which model to train, and the shapes of every kind."""

    arch: str = setting(
        "blt",
        "blt; entropy (the entropy model) or bytelm (the same byte transformer as a baseline); tokenlm (that "
        "transformer over byte-level BPE tokens, a baseline)",
        choices=("blt", "entropy", "bytelm", "tokenlm"),
    )
    blt: BLTConfig = section(BLTConfig)
    entropy: EntropyModelConfig = section(EntropyModelConfig)
    tokenlm: TokenLMConfig = section(TokenLMConfig)
    attention_backend: str = setting(
        "auto",
        "self-attention: auto = flash-attn for bf16/fp16 on CUDA when installed, else FlexAttention on CUDA, "
        "SDPA on CPU; flash and flex fall back per call where they cannot run (fp32; CPU backward), logged once",
        choices=("auto", "flash", "flex", "sdpa"),
    )

    def plain_lm(self) -> EntropyModelConfig:
        """The shape of the plain transformer of arch entropy, bytelm or tokenlm: model.entropy, whose
        vocabulary is, for tokenlm, the BPE vocabulary after the 4 special ids (BOE, BOS, EOS, reserved)."""
        if self.arch == "tokenlm":
            return dataclasses.replace(self.entropy, vocab_size=self.tokenlm.vocab_size + 4)
        return self.entropy


@dataclasses.dataclass
class PatchingConfig:
    """How byte sequences are cut into patches for the global model."""

    mode: str = setting("static", "patch boundaries", choices=("static", "space", "entropy"))
    patch_size: int = setting(4, "bytes per patch in static mode", ge=1)
    threshold: float = setting(1.3354, "entropy mode: next-byte entropy (nats) that starts a patch")
    threshold_mode: str = setting("global", "compare H(t), or its rise H(t) - H(t-1)", choices=("global", "monotonic"))
    max_patch_length: int | None = setting(None, "split longer patches; null = no limit", ge=1)
    entropy_model: str | None = setting(None, "directory of a trained entropy model; required in entropy mode")
    entropies: str | None = setting(
        None, "entropy mode: output of `python -m bltdist.patch precompute`; null = run the entropy model online"
    )
    target_patch_size: float | None = setting(
        None,
        "entropy mode: recalibrate the threshold during training (after step 1 and every recalibrate_interval "
        "steps, from that step's global batch, the same on every rank) so that patches average this many bytes; "
        "null = keep patching.threshold",
        gt=1,
    )
    recalibrate_interval: int = setting(50, "with target_patch_size: steps between recalibrations", ge=1)
    entropy_model_training: str = setting(
        "frozen",
        "entropy mode: frozen = the entropy model as loaded; joint = it trains alongside the BLT on the same "
        "batches with its own AdamW (optim.* settings, patching.entropy_lr) and places the boundaries as it learns",
        choices=("frozen", "joint"),
    )
    entropy_lr: float | None = setting(None, "joint: the entropy model's peak learning rate; null = optim.lr", gt=0)


@dataclasses.dataclass
class DataSourceConfig:
    """One source of a data mixture: ``{name: web, path: DIR, weight: 0.7}``."""

    name: str = setting("", "the source's name in metrics and checkpoints")
    path: str = setting("", "file, directory, glob or prepared directory (python -m bltdist.data prepare)")
    weight: float = setting(1.0, "share of training sequences; weights are normalised to sum to 1")


@dataclasses.dataclass
class DataConfig:
    """Training text."""

    path: str | None = setting(
        None, "file, directory, glob or prepared directory; null = embedded corpus (Python stdlib sources)"
    )
    sources: list[DataSourceConfig] = setting(
        [], "a mixture: list of {name, path, weight}, sampled by weight; data.path is the one-source shorthand"
    )
    text_field: str = setting("text", "JSONL / Parquet column holding the text")
    val_fraction: float = setting(0.02, "share of documents held out for validation", ge=0, lt=1)
    prefetch: int = setting(
        2, "training batches prepared ahead on a background thread while a step runs; 0 = on the training thread", ge=0
    )


@dataclasses.dataclass
class EvalSetConfig:
    """One evaluation set: ``{name: code, path: DIR}``."""

    name: str = setting("", "the set's name in metric keys eval/<name>/...")
    path: str = setting("", "file, directory, glob or prepared directory; every document, packed in order")


@dataclasses.dataclass
class EvalConfig:
    """Evaluation sets scored at every validation, clean and noised as by python -m bltdist.evaluate."""

    sets: list[EvalSetConfig] = setting([], "list of {name, path}; each logs eval/<name>/bpb and bpb_<noise kind>")
    noise_rate: float = setting(0.05, "share of characters each noise kind changes", ge=0, le=1)
    batches: int | None = setting(
        None, "global batches (train.global_batch_size rows) per set; null = train.val_batches", ge=1
    )


@dataclasses.dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = setting(3e-4, "peak learning rate", gt=0)
    min_lr_ratio: float = setting(0.1, "final learning rate as a share of lr", ge=0, le=1)
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only)", ge=0)
    beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = setting(1.0, "gradient norm clip; 0 disables", ge=0)
    schedule: str = setting("cosine", "decay after warmup", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = setting(100, "linear warmup steps", ge=0)
    decay_fraction: float = setting(0.2, "wsd: share of steps spent decaying", gt=0, le=1)
    fused: bool | None = setting(None, "fused AdamW; null = where available")


@dataclasses.dataclass
class TrainConfig:
    """Steps, batch and numerics."""

    steps: int = setting(1000, "optimizer steps", ge=1)
    global_batch_size: int = setting(8, "sequences per optimizer step across all data-parallel ranks", ge=1)
    micro_batch_size: int = setting(4, "sequences per rank per microstep; accumulation is derived", ge=1)
    seq_len: int = setting(1024, "bytes per sequence", ge=2)
    seed: int = setting(0, "seed of weights and data order", ge=0)
    device: str = setting("auto", "auto = cuda when available", choices=("auto", "cpu", "cuda"))
    dtype: str = setting(
        "auto", "auto = bf16 autocast on cuda, fp32 on cpu", choices=("auto", "float32", "bfloat16")
    )
    activation_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    activation_checkpointing_interval: int = setting(
        1, "checkpoint the transformer blocks whose index in their stack is a multiple of this (1 = all); "
        "the others keep their activations: less recompute for more memory", ge=1,
    )
    compile: bool = setting(False, "torch.compile the blocks")
    nonfinite: str = setting(
        "stop", "a step whose loss or gradient norm is NaN or infinite: stop the run, or skip the update",
        choices=("stop", "skip"),
    )
    max_skipped_steps: int = setting(10, "with nonfinite skip: consecutive skipped steps that stop the run", ge=1)
    val_interval: int = setting(100, "steps between validations; 0 = only at start and end", ge=0)
    val_batches: int = setting(8, "global batches (train.global_batch_size sequences) per validation", ge=1)


@dataclasses.dataclass
class ParallelConfig:
    """Device mesh degrees; their product is the world size."""

    dp_replicate: int = setting(1, "replicated data parallel (HSDP outer)", ge=1)
    dp_shard: int = setting(-1, "sharded data parallel (FSDP); -1 = the rest of the world size")
    cp: int = setting(1, "context parallel", ge=1)
    tp: int = setting(1, "tensor parallel", ge=1)
    pp: int = setting(1, "pipeline parallel", ge=1)
    pp_schedule: str = setting(
        "1F1B", "pipeline schedule", choices=("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")
    )
    pp_microbatches: int | None = setting(None, "pipeline microbatches; null = the schedule's default", ge=1)
    timeout_seconds: float = setting(600.0, "collective timeout: a rank waiting longer fails the run", gt=0)


@dataclasses.dataclass
class CheckpointConfig:
    """Sharded training checkpoints under output_dir/checkpoints, and the model to start from."""

    interval: int = setting(0, "steps between checkpoints; 0 = only at the end (and on SIGTERM / SIGUSR1)", ge=0)
    init_from: str | None = setting(None, "a bltdist model directory to start from")
    resume: str | None = setting(
        None, "auto = the latest checkpoint in output_dir (a fresh start when there is none), or a checkpoint directory"
    )
    keep_last: int = setting(3, "complete checkpoints kept (older ones deleted after a save completes); 0 = all", ge=0)
    async_save: bool = setting(False, "write checkpoints in a background thread while training goes on")
    final: bool = setting(
        True, "after the last step, save a checkpoint and write output_dir/model from it; false for benchmarks "
        "(a 1B model's checkpoint with its optimizer state is about 50 GB)"
    )


@dataclasses.dataclass
class LoggingConfig:
    """Metric lines."""

    interval: int = setting(10, "steps between metric lines", ge=1)
    peak_tflops: float | None = setting(None, "device peak for MFU; null = the built-in table", gt=0)
    tensorboard: bool = setting(False, "also write metrics as TensorBoard events under output_dir/tensorboard")
    wandb: bool = setting(False, "also send metrics to Weights & Biases (needs the wandb package and a login)")
    wandb_project: str = setting("bltdist", "Weights & Biases project")
    profile_steps: list[int] = setting([], "steps to trace with the PyTorch profiler into output_dir/profile/")
    memory_snapshot_on_oom: bool = setting(
        False, "CUDA: record allocation history and dump output_dir/memory_snapshot_rank<R>.pickle on out-of-memory"
    )


@dataclasses.dataclass
class Config:
    """A whole run."""

    output_dir: str = setting("runs/default", "run directory")
    model: ModelConfig = section(ModelConfig)
    patching: PatchingConfig = section(PatchingConfig)
    data: DataConfig = section(DataConfig)
    eval: EvalConfig = section(EvalConfig)
    optim: OptimConfig = section(OptimConfig)
    train: TrainConfig = section(TrainConfig)
    parallel: ParallelConfig = section(ParallelConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    logging: LoggingConfig = section(LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Types


class _WrongType(Exception):
    """A value that does not fit its field's type; the caller names the field."""


_INTEGER_TEXT = re.compile(r"\s*[-+]?\d+\s*")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _optional_inner(hint: Any) -> Any | None:
    """X for ``X | None``, else None (``X | None`` is the only union the config uses)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner
    return None


def _coerce(value: Any, hint: Any, parse_strings: bool) -> Any:
    """``value`` converted to ``hint``, or _WrongType. With ``parse_strings``, numbers may come as
    text ("3", "3e-4"): PyYAML (YAML 1.1) reads 3e-4 as a string, and users quote numbers."""
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _coerce(value, inner, parse_strings)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise _WrongType
        (element,) = typing.get_args(hint)
        return [_coerce(item, element, parse_strings) for item in value]
    if _is_section(hint):
        return _coerce_record(value, hint, parse_strings)
    if isinstance(value, bool):
        if hint is bool:
            return value
        raise _WrongType  # bool is an int subclass, but true is never meant as 1
    if hint is int:
        if isinstance(value, int):
            return value
        if parse_strings and isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)):
            return float(value)
        if parse_strings and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise _WrongType


def _coerce_record(value: Any, hint: type, parse_strings: bool) -> Any:
    """A mapping (or an instance) as the dataclass ``hint``, for list elements such as data.sources."""
    if isinstance(value, hint):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict) or not set(value) <= set(_hints(hint)):
        raise _WrongType
    return hint(**{key: _coerce(item, _hints(hint)[key], parse_strings) for key, item in value.items()})


def _type_name(hint: Any) -> str:
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_type_name(inner)} | null"
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return hint.__name__


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
               bool: ("a boolean (true/false)", "booleans")}  # fmt: skip


def _describe(hint: Any) -> str:
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if typing.get_origin(hint) is list:
        (element,) = typing.get_args(hint)
        if _is_section(element):
            return f"a list of mappings with keys {', '.join(_hints(element))}"
        return f"a list of {_TYPE_WORDS[element][1]}"
    return _TYPE_WORDS[hint][0]


def _show(value: Any) -> str:
    """A value as the user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _wrong_type_problem(path: str, value: Any, hint: Any) -> str:
    problem = f"{path}: expected {_describe(hint)}, got {_show(value)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str in (hint, _optional_inner(hint)):
        problem += " (quote it to make it a string)"
    return problem


# ---------------------------------------------------------------------------------------------
# Keys


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


@functools.cache
def _all_key_paths() -> dict[str, list[str]]:
    """Every dotted key of Config (sections included), grouped by its last name."""
    paths: dict[str, list[str]] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, hint in _hints(cls).items():
            path = _join(prefix, name)
            paths.setdefault(name, []).append(path)
            if _is_section(hint):
                walk(hint, path)

    walk(Config, "")
    return paths


def _unknown_key_problem(path: str, key: str, section_cls: type) -> str:
    siblings = list(_hints(section_cls))
    parent = path.rpartition(".")[0]
    # A key put into the wrong section (optim.steps) is the common mistake, so an exact name in
    # another section beats a near name in this one.
    suggestions = _all_key_paths().get(key)
    if not suggestions:
        close = difflib.get_close_matches(key, siblings, n=1)
        suggestions = [_join(parent, close[0])] if close else None
    if not suggestions:
        close = difflib.get_close_matches(key, list(_all_key_paths()), n=1)
        suggestions = _all_key_paths()[close[0]] if close else None
    if suggestions:
        return f"{path}: unknown key; did you mean {' or '.join(suggestions)}?"
    where = f"in {parent}" if parent else "at the top level"
    return f"{path}: unknown key; known keys {where}: {', '.join(siblings)}"


def _hint_at(dotted: str) -> Any | None:
    """The type hint of a dotted key, or None if there is no such key."""
    hint: Any = Config
    for name in dotted.split("."):
        if not _is_section(hint) or name not in _hints(hint):
            return None
        hint = _hints(hint)[name]
    return hint


# ---------------------------------------------------------------------------------------------
# Merging YAML data and overrides


def _merge(target: Any, data: Any, prefix: str, problems: list[str]) -> None:
    """Writes a mapping onto a section in place; bad keys and values are collected into
    ``problems`` and skipped, so one run reports all of them."""
    if data is None:  # an empty section in YAML ("optim:") means nothing to change
        return
    if not isinstance(data, dict):
        problems.append(f"{prefix or '(top level)'}: expected a mapping of keys, got {_show(data)}")
        return
    hints = _hints(type(target))
    for key, value in data.items():
        path = _join(prefix, str(key))
        if key not in hints:
            problems.append(_unknown_key_problem(path, str(key), type(target)))
            continue
        hint = hints[key]
        if _is_section(hint):
            _merge(getattr(target, key), value, path, problems)
            continue
        try:
            setattr(target, key, _coerce(value, hint, parse_strings=True))
        except _WrongType:
            problems.append(_wrong_type_problem(path, value, hint))


def _read_yaml(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"config: cannot read {path}: {error.strerror or error}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"config: {path} is not valid YAML: {error}"]) from None


def _split_overrides(tokens: list[str], problems: list[str]) -> list[tuple[str, str]]:
    """(dotted key, raw value) pairs from ``--key VALUE`` and ``--key=VALUE`` tokens."""
    pairs = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--") or token in ("--", "--="):
            problems.append(f"{token}: unexpected argument; set keys with --section.key VALUE or --section.key=VALUE")
            continue
        key, has_equals, raw = token[2:].partition("=")
        if not has_equals:
            if index == len(tokens) or tokens[index].startswith("--"):
                problems.append(f"{key}: missing value after --{key}")
                continue
            raw = tokens[index]
            index += 1
        pairs.append((key, raw))
    return pairs


def _parse_override_value(raw: str, hint: Any | None) -> Any:
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # e.g. a glob such as *.jsonl; typed fields then report the mismatch
    accepts_text = hint is str or _optional_inner(hint) is str
    if accepts_text and parsed is not None and not isinstance(parsed, str):
        return raw  # keep a path such as 2024 or 1.10 exactly as typed
    return parsed


def _apply_override(cfg: Config, dotted: str, raw: str, problems: list[str]) -> None:
    nested: Any = _parse_override_value(raw, _hint_at(dotted))
    for name in reversed(dotted.split(".")):
        nested = {name: nested}
    _merge(cfg, nested, "", problems)


# ---------------------------------------------------------------------------------------------
# Validation


def _leaves(section_obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any, dataclasses.Field]]:
    """(dotted key, value, type hint, field) of every non-section field, in declaration order."""
    hints = _hints(type(section_obj))
    for field in dataclasses.fields(section_obj):
        path = _join(prefix, field.name)
        value = getattr(section_obj, field.name)
        if _is_section(hints[field.name]):
            yield from _leaves(value, path)
        else:
            yield path, value, hints[field.name], field


_BOUNDS = ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))
_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _range_problem(path: str, value: Any, metadata: typing.Mapping[str, Any]) -> str | None:
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{path}: must be one of {', '.join(choices)}, got {_show(value)}{hint}"
    if isinstance(value, str) and not value:
        return f"{path}: must not be empty (use null for none where allowed)"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    bounds = [(symbol, metadata.get(name)) for symbol, name in _BOUNDS if metadata.get(name) is not None]
    if all(_COMPARISONS[symbol](value, limit) for symbol, limit in bounds):
        return None
    if len(bounds) == 2:  # one lower and one upper bound: write it as an interval
        (low_symbol, low), (high_symbol, high) = bounds
        interval = f"{'[' if low_symbol == '>=' else '('}{low}, {high}{']' if high_symbol == '<=' else ')'}"
        return f"{path}: must be in {interval}, got {_show(value)}"
    return f"{path}: must be {' and '.join(f'{symbol} {limit}' for symbol, limit in bounds)}, got {_show(value)}"


def _positive_ints(*values: Any) -> bool:
    """True when every value is a usable count; bad ones are reported by their own range check."""
    return all(isinstance(value, int) and value >= 1 for value in values)


def _combination_problems(values: dict[str, Any]) -> list[str]:
    """Checks between fields; ``values`` holds only the fields whose type is right."""
    problems = []
    attention_shapes = (
        ("model.blt", "local_dim", "local_heads", "local_kv_heads"),
        ("model.blt", "global_dim", "global_heads", "global_kv_heads"),
        ("model.entropy", "dim", "heads", "kv_heads"),
    )
    for prefix, dim_key, heads_key, kv_key in attention_shapes:
        dim, heads, kv_heads = (values.get(f"{prefix}.{key}") for key in (dim_key, heads_key, kv_key))
        if not _positive_ints(dim, heads):
            continue
        if dim % heads:
            problems.append(f"{prefix}.{heads_key}: must divide {prefix}.{dim_key} ({dim}), got {heads}")
        elif (dim // heads) % 2:
            problems.append(
                f"{prefix}.{heads_key}: head size {dim_key} / {heads_key} = {dim // heads} must be even "
                "(rotary embeddings rotate channel pairs)"
            )
        if _positive_ints(kv_heads) and heads % kv_heads:
            problems.append(f"{prefix}.{kv_key}: must divide {prefix}.{heads_key} ({heads}), got {kv_heads}")

    ngram_sizes = values.get("model.blt.hash_ngram_sizes")
    if ngram_sizes is not None:
        if not ngram_sizes:
            problems.append("model.blt.hash_ngram_sizes: must not be empty")
        if any(size < 2 for size in ngram_sizes):
            problems.append(f"model.blt.hash_ngram_sizes: every size must be >= 2, got {ngram_sizes}")
        if len(set(ngram_sizes)) != len(ngram_sizes):
            problems.append(f"model.blt.hash_ngram_sizes: sizes must be unique, got {ngram_sizes}")

    global_batch, micro_batch = values.get("train.global_batch_size"), values.get("train.micro_batch_size")
    if _positive_ints(global_batch, micro_batch) and global_batch % micro_batch:
        problems.append(
            f"train.global_batch_size: must be divisible by train.micro_batch_size ({micro_batch}), got {global_batch}"
        )

    interval = values.get("train.activation_checkpointing_interval")
    if _positive_ints(interval) and interval > 1 and values.get("train.activation_checkpointing") is False:
        problems.append(f"train.activation_checkpointing_interval: {interval} chooses which blocks are checkpointed, "
                        "but train.activation_checkpointing is false; set it to true, or leave the interval at 1")  # fmt: skip

    if values.get("patching.mode") == "entropy" and values.get("patching.entropy_model") is None:
        problems.append(
            "patching.entropy_model: required when patching.mode is entropy; give the directory of a trained "
            "entropy model (train one with model.arch: entropy, e.g. configs/entropy_tiny.yaml)"
        )

    problems += _entropy_training_problems(values)
    problems += _super_patch_problems(values)
    problems += _data_source_problems(values.get("data.sources"), values.get("data.path"))
    problems += _eval_set_problems(values.get("eval.sets") or [])
    if values.get("eval.sets") and values.get("patching.mode") == "entropy" and values.get("patching.entropies"):
        problems.append("eval.sets: needs online entropies (noised text has none stored); set patching.entropies "
                        "to null or leave eval.sets out")  # fmt: skip

    dp_shard = values.get("parallel.dp_shard")
    if dp_shard is not None and dp_shard != -1 and dp_shard < 1:
        problems.append(f"parallel.dp_shard: must be >= 1, or -1 for the rest of the world size, got {dp_shard}")
    return problems


def _entropy_training_problems(values: dict[str, Any]) -> list[str]:
    """A patch size held at its target and joint training both need entropy patching; joint
    training computes entropies as the model learns, so none can be stored."""
    problems = []
    entropy_mode = values.get("patching.mode") == "entropy"
    if values.get("patching.target_patch_size") is not None and not entropy_mode:
        problems.append("patching.target_patch_size: needs patching.mode entropy (other modes have no threshold)")
    if values.get("patching.entropy_model_training") == "joint":
        if not entropy_mode:
            problems.append("patching.entropy_model_training: joint needs patching.mode entropy")
        if values.get("patching.entropies") is not None:
            problems.append("patching.entropies: precomputed entropies go stale when the entropy model trains "
                            "(entropy_model_training joint); set patching.entropies to null")  # fmt: skip
    return problems


def _super_patch_problems(values: dict[str, Any]) -> list[str]:
    """Entropy-grouped super-patches sum the entropies that only entropy patching computes."""
    if not values.get("model.blt.super_patch.enabled") or values.get("model.arch") != "blt":
        return []
    entropy_grouping = values.get("model.blt.super_patch.mode") == "entropy"
    problems = []
    if entropy_grouping and values.get("patching.mode") != "entropy":
        problems.append(
            f"model.blt.super_patch.mode: entropy sums next-byte entropies, which only patching.mode: entropy "
            f"computes (got patching.mode: {values.get('patching.mode')}); set patching.mode: entropy or "
            "model.blt.super_patch.mode: static"
        )
    if entropy_grouping and values.get("model.blt.super_patch.entropy_threshold") is None:
        problems.append("model.blt.super_patch.entropy_threshold: required with model.blt.super_patch.mode: entropy "
                        "(nats summed over a super-patch's bytes)")  # fmt: skip
    if not entropy_grouping and values.get("model.blt.super_patch.max_patches_per_super_patch") is not None:
        problems.append("model.blt.super_patch.max_patches_per_super_patch: applies to mode entropy only; static "
                        "super-patches hold patches_per_super_patch patches")  # fmt: skip
    return problems


def _data_source_problems(sources: list | None, path: str | None) -> list[str]:
    """data.sources: named, unique, with a path and a positive weight, and not together with data.path."""
    if not sources:
        return []
    problems = [] if path is None else ["data.sources: give data.path (one source) or data.sources, not both"]
    for index, source in enumerate(sources):
        where = f"data.sources[{index}]"
        if not source.name:
            problems.append(f"{where}.name: must not be empty")
        if not source.path:
            problems.append(f"{where}.path: must not be empty; give a file, directory, glob or prepared directory")
        if not source.weight > 0:
            problems.append(f"{where}.weight: must be > 0, got {_show(source.weight)}; drop the source to leave it out")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"data.sources: names must be unique, {', '.join(map(repr, repeated))} repeated")
    return problems


def _eval_set_problems(sets: list) -> list[str]:
    """eval.sets: named, unique, each with a path (whether it exists is checked before the start)."""
    problems = []
    for index, eval_set in enumerate(sets):
        if not eval_set.name:
            problems.append(f"eval.sets[{index}].name: must not be empty")
        if not eval_set.path:
            problems.append(f"eval.sets[{index}].path: must not be empty; give a file, directory, glob or prepared "
                            "directory")  # fmt: skip
    names = [eval_set.name for eval_set in sets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"eval.sets: names must be unique, {', '.join(map(repr, repeated))} repeated")
    return problems


def _problems(cfg: Config) -> list[str]:
    problems = []
    well_typed: dict[str, Any] = {}
    for path, value, hint, field in _leaves(cfg):
        try:
            well_typed[path] = _coerce(value, hint, parse_strings=False)
        except _WrongType:
            problems.append(_wrong_type_problem(path, value, hint))
            continue
        if value is not None:
            range_problem = _range_problem(path, value, field.metadata)
            if range_problem:
                problems.append(range_problem)
    return problems + _combination_problems(well_typed)


def validate(cfg: Config) -> None:
    """Raises one ConfigError listing every wrong type, out-of-range value and impossible combination."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------
# Loading, saving, command line


def load_config(path: str | None, overrides: list[str]) -> Config:
    """Defaults, then the YAML file at ``path`` (None = none), then ``--key VALUE`` overrides; validated."""
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        try:
            _merge(cfg, _read_yaml(path), "", problems)
        except ConfigError as error:  # the overrides are still checked: every problem in one round
            problems += error.problems
    for dotted, raw in _split_overrides(overrides, problems):
        _apply_override(cfg, dotted, raw, problems)
    problems += _problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """The Config a saved dict describes (e.g. a checkpoint's metadata); problems name ``source``."""
    cfg = Config()
    problems: list[str] = []
    _merge(cfg, data, "", problems)
    problems += _problems(cfg)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML; load_config on the file gives an equal Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def usage() -> str:
    """Help text listing every key with its type and default, generated from the dataclasses."""
    rows: list[tuple[str, str, str, str] | str] = []

    def walk(section_obj: Any, prefix: str) -> None:
        hints = _hints(type(section_obj))
        for field in dataclasses.fields(section_obj):
            path = _join(prefix, field.name)
            value = getattr(section_obj, field.name)
            if _is_section(hints[field.name]):
                rows.append(f"\n{path}: {type(value).__doc__}")
                walk(value, path)
                continue
            help_text = field.metadata["help"]
            if field.metadata["choices"]:
                help_text += f" ({' | '.join(field.metadata['choices'])})"
            default = value if isinstance(value, str) else _show(value)
            rows.append((f"--{path}", _type_name(hints[field.name]), default, help_text))

    walk(Config(), "")
    columns = [row for row in rows if isinstance(row, tuple)]
    widths = [max(len(row[column]) for row in columns) for column in range(3)]
    lines = [
        f"usage: {PROGRAM} [--config PATH | PATH.yaml] [--section.key VALUE | --section.key=VALUE ...]",
        "",
        "Trains a Byte Latent Transformer (or its entropy model). Settings come from the defaults below,",
        "then the YAML file, then the command line. Values are YAML: null, true, 3e-4, [3, 4, 5].",
        "",
        f"  {'key':<{widths[0]}}  {'type':<{widths[1]}}  {'default':<{widths[2]}}  meaning",
    ]
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
        else:
            key, type_name, default, help_text = row
            lines.append(f"  {key:<{widths[0]}}  {type_name:<{widths[1]}}  {default:<{widths[2]}}  {help_text}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Splits ``[--config PATH | PATH.yaml] [--key VALUE | --key=VALUE ...]`` into the config path and
    the override tokens (checked later by load_config). ``-h``/``--help`` prints usage and exits 0."""
    if "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0)
    tokens = list(argv)
    config_paths: list[str] = []
    problems: list[str] = []
    if tokens and not tokens[0].startswith("-") and tokens[0].endswith((".yaml", ".yml")):
        config_paths.append(tokens.pop(0))
    overrides = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token == "--config":
            if index == len(tokens) or tokens[index].startswith("--"):
                problems.append("config: --config needs a path")
                continue
            config_paths.append(tokens[index])
            index += 1
        elif token.startswith("--config="):
            path = token.partition("=")[2]
            if path:
                config_paths.append(path)
            else:
                problems.append("config: --config= needs a path")
        else:
            overrides.append(token)
    if len(config_paths) > 1:
        problems.append(f"config: given more than once ({', '.join(config_paths)}); give one file")
    if problems:
        raise ConfigError(problems)
    return (config_paths[0] if config_paths else None), overrides
