"""Weight interchange with the Hugging Face BLT port (``transformers.models.blt``).

    python -m bltdist.convert from-hf HF_DIR OUT_DIR
    python -m bltdist.convert to-hf BLTDIST_DIR HF_DIR
    python -m bltdist.convert consolidate CKPT_DIR OUT_DIR

``BltForCausalLM`` (with its entropy model when it carries one) and ``BltPatcher`` convert to and
from bltdist model directories; ``consolidate`` turns a sharded training checkpoint into one. Every
tensor is copied bit for bit, only names change; what the port computes differently is a model
option that from-hf sets and to-hf requires. README "Start from released BLT weights" has the details.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bltdist.atomic import atomic_directory
from bltdist.config import BLTConfig, Config, EntropyModelConfig, load_config, validate
from bltdist.errors import UserError
from bltdist.model import BLT, ByteLM
from bltdist.model.blt import default_ffn_dim
from bltdist.model_dir import CONFIG_FILE, WEIGHTS_FILE, read_safetensors, write_model_files
from bltdist.training.checkpoint import consolidate

PROGRAM = "bltdist-convert"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
ENTROPY_MODEL_DIR = "entropy_model"
HF_PATCHER_PREFIX = "model.patcher."

# Renames inside one transformer block / one cross-attention, bltdist -> Hugging Face.
_BLOCK_LEAVES = (
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.", "self_attn."),
    ("ffn.", "mlp."),
)
_CROSS_LEAVES = (("kv_norm.", "k_norm."),)

# (bltdist prefix, Hugging Face prefix, renames of the leaf after a layer index).
_BLT_PARTS = (
    ("encoder.byte_embedding.", "model.local_encoder.embed_tokens.", None),
    ("encoder.hash_embedding.", "model.encoder_hash_tok_embedding.", None),
    ("encoder.slot_proj.", "model.local_encoder.patch_embedding_projection.", None),
    ("encoder.cross_attn.", "model.local_encoder.cross_attn_layers.", _CROSS_LEAVES),
    ("encoder.layers.", "model.local_encoder.layers.", _BLOCK_LEAVES),
    ("global_model.in_proj.", "model.global_transformer.token_embedding_projection.", None),
    ("global_model.layers.", "model.global_transformer.layers.", _BLOCK_LEAVES),
    ("decoder.slot_proj.", "model.local_decoder.patch_embedding_projection.", None),
    ("decoder.cross_attn.", "model.local_decoder.cross_attn_layers.", _CROSS_LEAVES),
    ("decoder.layers.", "model.local_decoder.layers.", _BLOCK_LEAVES),
    ("decoder.norm.", "model.local_decoder.norm.", None),
    ("decoder.output.", "lm_head.", None),
)
_ENTROPY_PARTS = (
    ("embedding.", "embed_tokens.", None),
    ("layers.", "layers.", _BLOCK_LEAVES),
    ("norm.", "norm.", None),
    ("output.", "lm_head.", None),
)


def _hf_name(name: str, parts, hf_prefix: str = "") -> str:
    for ours, theirs, leaves in parts:
        if not name.startswith(ours):
            continue
        rest = name[len(ours) :]
        if leaves is not None:
            index, leaf = rest.split(".", 1)
            for our_leaf, their_leaf in leaves:
                if leaf.startswith(our_leaf):
                    leaf = their_leaf + leaf[len(our_leaf) :]
                    break
            rest = f"{index}.{leaf}"
        return hf_prefix + theirs + rest
    raise AssertionError(f"no Hugging Face name for bltdist tensor {name}")


def blt_tensor_names(cfg: BLTConfig) -> dict[str, tuple[str, torch.Size]]:
    """bltdist tensor name -> (Hugging Face name, shape) for a BLT of this config."""
    with torch.device("meta"):
        model = BLT(cfg)
    return {name: (_hf_name(name, _BLT_PARTS), t.shape) for name, t in model.state_dict().items()}


def entropy_tensor_names(cfg: EntropyModelConfig, hf_prefix: str = "") -> dict[str, tuple[str, torch.Size]]:
    """bltdist tensor name -> (Hugging Face name, shape) for an entropy model of this config."""
    with torch.device("meta"):
        model = ByteLM(cfg)
    return {name: (_hf_name(name, _ENTROPY_PARTS, hf_prefix), t.shape) for name, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Reading Hugging Face directories


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error}); the file may be truncated, re-copy it") from None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: not a directory; give a Hugging Face BLT checkpoint directory")
    config_file = hf_dir / HF_CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{hf_dir}: no {HF_CONFIG_FILE}; not a Hugging Face BLT checkpoint directory")
    config = _read_json(config_file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ("blt", "blt_patcher"):
        raise UserError(
            f"{config_file}: model_type is {model_type!r}, not a BLT checkpoint "
            "(expected 'blt' for BltForCausalLM or 'blt_patcher' for BltPatcher)"
        )
    return config


def read_hf_tensors(hf_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a Hugging Face checkpoint and the file each came from (one file or shards)."""
    single, index = hf_dir / HF_WEIGHTS_FILE, hf_dir / HF_INDEX_FILE
    if single.is_file():
        tensors = read_safetensors(single)
        return tensors, dict.fromkeys(tensors, single)
    if not index.is_file():
        raise UserError(f"{hf_dir}: neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE}; the weights are missing")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: has no 'weight_map' of tensor name -> shard file; re-copy it")
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = hf_dir / shard_name
        for name, tensor in read_safetensors(shard).items():
            tensors[name], sources[name] = tensor, shard
    missing = sorted(name for name in weight_map if name not in tensors)
    if missing:
        raise UserError(f"{index}: lists tensors that its shards do not hold: {', '.join(missing[:10])}")
    return tensors, sources


class _HFConfig:
    """Reads fields of one (sub-)config of a config.json and collects every problem, naming its key."""

    def __init__(self, data: Any, config_file: Path, prefix: str = "", problems: list[str] | None = None):
        self.data = data if isinstance(data, dict) else {}
        self.file, self.prefix = config_file, prefix
        self.problems = [] if problems is None else problems

    def sub(self, section: str) -> _HFConfig:
        return _HFConfig(self.data.get(section), self.file, f"{self.prefix}{section}.", self.problems)

    def get(self, key: str, kinds: tuple[type, ...], *, nullable: bool = False, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                self.problems.append(f"{self.prefix}{key}: missing")
                return None
            return default
        value = self.data[key]
        if value is None and nullable:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            expected = " or ".join(kind.__name__ for kind in kinds) + (" or null" if nullable else "")
            self.problems.append(f"{self.prefix}{key}: expected {expected}, got {value!r}")
            return None
        return value

    def rope_theta(self, default: float) -> float | None:
        """The port's rope_parameters (or the older rope_theta / rope_scaling keys); only plain RoPE converts."""
        parameters = self.get("rope_parameters", (dict,), nullable=True, default=None) or {}
        scaling = self.get("rope_scaling", (dict,), nullable=True, default=None) or {}
        rope_type = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            self.problems.append(
                f"{self.prefix}rope_parameters: rope_type {rope_type!r} is not supported (only 'default')"
            )
        theta = parameters.get("rope_theta", self.get("rope_theta", (int, float), default=default))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            self.problems.append(f"{self.prefix}rope_parameters.rope_theta: expected a number, got {theta!r}")
            return None
        return float(theta)

    def ffn_dim(self, dim: int | None) -> int | None:
        """intermediate_size, or None (bltdist's "int(8 * dim / 3)") when it is that or unset."""
        width = self.get("intermediate_size", (int,), nullable=True)
        return None if dim is not None and width in (None, default_ffn_dim(dim)) else width

    def kv_heads(self, heads: int | None) -> int | None:
        """num_key_value_heads, or None (bltdist's "same as heads") when it equals heads or is unset."""
        kv_heads = self.get("num_key_value_heads", (int,), nullable=True, default=None)
        return None if kv_heads == heads else kv_heads

    def check_silu(self) -> None:
        activation = self.get("hidden_act", (str,), default="silu")
        if activation != "silu":
            self.problems.append(
                f"{self.prefix}hidden_act: {activation!r} is not supported (bltdist uses SwiGLU with silu)"
            )

    def raise_problems(self) -> None:
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise UserError(f"{self.file}: cannot be converted ({len(self.problems)} problem(s)):\n{lines}")


def _agreed(meaning: str, *readings: tuple[_HFConfig, Any]) -> Any:
    """One value that bltdist keeps once but the port stores in several sub-configs, which must agree."""
    (first_config, first), *others = readings
    for config, value in others:
        if value != first:
            config.problems.append(
                f"{first_config.prefix}{meaning}={first!r} and {config.prefix}{meaning}={value!r} differ, "
                f"but bltdist has one value for both"
            )
    return first


def blt_config_from_hf(hf: _HFConfig) -> BLTConfig:
    """The bltdist BLT config that computes what BltForCausalLM computes with this config.json."""
    encoder, decoder, global_ = hf.sub("encoder_config"), hf.sub("decoder_config"), hf.sub("global_config")
    for part in (encoder, decoder, global_):
        part.check_silu()
    local = (encoder, decoder)
    local_dim = _agreed("hidden_size", *((c, c.get("hidden_size", (int,))) for c in local))
    local_heads = _agreed("num_attention_heads", *((c, c.get("num_attention_heads", (int,))) for c in local))
    local_kv_heads = _agreed("num_key_value_heads", *((c, c.kv_heads(local_heads)) for c in local))
    global_dim = global_.get("hidden_size", (int,))
    global_heads = global_.get("num_attention_heads", (int,))
    decoder_global_dim = decoder.get("hidden_size_global", (int,))
    if None not in (global_dim, decoder_global_dim) and decoder_global_dim != global_dim:
        decoder.problems.append(
            f"decoder_config.hidden_size_global={decoder_global_dim} differs from "
            f"global_config.hidden_size={global_dim}"
        )
    encoder_all_layers = encoder.get("cross_attn_all_layers", (bool,))
    return BLTConfig(
        vocab_size=_agreed("vocab_size", *((c, c.get("vocab_size", (int,))) for c in (hf, encoder, decoder))),
        local_dim=local_dim,
        local_heads=local_heads,
        local_kv_heads=local_kv_heads,
        encoder_layers=encoder.get("num_hidden_layers", (int,)),
        decoder_layers=decoder.get("num_hidden_layers", (int,)),
        encoder_ffn_dim=encoder.ffn_dim(local_dim),
        decoder_ffn_dim=decoder.ffn_dim(local_dim),
        local_window=hf.get("local_attention_window_len", (int,), nullable=True),
        global_dim=global_dim,
        global_layers=global_.get("num_hidden_layers", (int,)),
        global_heads=global_heads,
        global_kv_heads=global_.kv_heads(global_heads),
        global_ffn_dim=global_.ffn_dim(global_dim),
        cross_attn_k=_agreed("cross_attn_k", *((c, c.get("cross_attn_k", (int,))) for c in (hf, encoder, decoder))),
        encoder_cross_attn_all_layers=encoder_all_layers,
        decoder_cross_attn_all_layers=decoder.get("cross_attn_all_layers", (bool,)),
        encoder_cross_attn_repool=bool(encoder_all_layers),
        hash_ngram_sizes=hf.get("encoder_hash_byte_group_size", (list,), nullable=True) or [3, 4, 5, 6, 7, 8],
        hash_functions=hf.get("encoder_hash_byte_group_nb_functions", (int,)),
        hash_vocab=hf.get("encoder_hash_byte_group_vocab", (int,)),
        rope_theta=_agreed("rope_theta", *((c, c.rope_theta(500000.0)) for c in (encoder, decoder, global_))),
        norm_eps=_agreed(
            "rms_norm_eps", *((c, c.get("rms_norm_eps", (int, float))) for c in (encoder, decoder, global_))
        ),
        global_final_norm=False,
        cross_attn_double_residual=True,
    )


def entropy_config_from_hf(patcher: _HFConfig) -> EntropyModelConfig:
    """The bltdist entropy model config that computes what BltPatcher computes with this config."""
    patcher.check_silu()
    dim, heads = patcher.get("hidden_size", (int,)), patcher.get("num_attention_heads", (int,))
    return EntropyModelConfig(
        vocab_size=patcher.get("vocab_size", (int,)),
        dim=dim,
        layers=patcher.get("num_hidden_layers", (int,)),
        heads=heads,
        kv_heads=patcher.kv_heads(heads),
        ffn_dim=patcher.ffn_dim(dim),
        window=patcher.get("sliding_window", (int,), nullable=True),
        rope_theta=patcher.rope_theta(10000.0),
        norm_eps=patcher.get("rms_norm_eps", (int, float)),
    )


def _renamed(
    tensors: dict[str, torch.Tensor],
    sources: dict[str, Path],
    renames: dict[str, tuple[str, torch.Size]],
    described_by: Path,
) -> dict[str, torch.Tensor]:
    """``tensors`` under their new names; ``renames`` maps each expected name to (new name, shape
    that ``described_by`` implies). Every missing, unexpected or wrongly shaped tensor is reported
    with its name and the file it came from (``sources``)."""
    problems = []
    for name, (_, shape) in renames.items():
        if name not in tensors:
            problems.append(f"tensor {name} (shape {tuple(shape)}) is missing")
        elif tensors[name].shape != shape:
            problems.append(
                f"tensor {name} in {sources[name]} has shape {tuple(tensors[name].shape)}, "
                f"but {described_by} implies {tuple(shape)}"
            )
    problems += [
        f"tensor {name} in {sources[name]} is not part of this model" for name in tensors if name not in renames
    ]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UserError(f"the weights do not match {described_by} ({len(problems)} problem(s)):\n{listed}{more}")
    return {new_name: tensors[name] for name, (new_name, _) in renames.items()}


def _from_hf_names(names: dict[str, tuple[str, torch.Size]]) -> dict[str, tuple[str, torch.Size]]:
    """bltdist name -> (HF name, shape) turned into HF name -> (bltdist name, shape)."""
    return {theirs: (ours, shape) for ours, (theirs, shape) in names.items()}


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not empty; choose a new output directory or remove it")


# ---------------------------------------------------------------------------------------------
# from-hf


def from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face BltForCausalLM or BltPatcher directory into a bltdist model directory."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    raw_config = read_hf_config(hf_dir)
    config_file = hf_dir / HF_CONFIG_FILE
    hf = _HFConfig(raw_config, config_file)
    _refuse_existing(out_dir)
    cfg = Config(output_dir=f"runs/{out_dir.name}")
    entropy_cfg = None
    if raw_config["model_type"] == "blt_patcher":
        cfg.model.arch = "entropy"
        cfg.model.entropy = entropy_config_from_hf(hf)
    else:
        cfg.model.blt = blt_config_from_hf(hf)
        has_patcher = hf.get("patch_in_forward", (bool,), default=False)
        _set_patching_from_hf(cfg, hf, has_patcher, out_dir / ENTROPY_MODEL_DIR)
        if has_patcher:
            entropy_cfg = Config(output_dir=f"runs/{out_dir.name}_{ENTROPY_MODEL_DIR}")
            entropy_cfg.model.arch = "entropy"
            entropy_cfg.model.entropy = entropy_config_from_hf(hf.sub("patcher_config"))
    hf.raise_problems()
    for converted in (cfg, entropy_cfg):
        if converted is not None:
            _validate_converted(converted, config_file)

    tensors, sources = read_hf_tensors(hf_dir)
    if cfg.model.arch == "entropy":
        model_names = entropy_tensor_names(cfg.model.entropy)
    else:
        model_names = blt_tensor_names(cfg.model.blt)
    if entropy_cfg is not None:
        patcher_names = entropy_tensor_names(entropy_cfg.model.entropy, HF_PATCHER_PREFIX)
        patcher_part = {name: t for name, t in tensors.items() if name.startswith(HF_PATCHER_PREFIX)}
        patcher_tensors = _renamed(patcher_part, sources, _from_hf_names(patcher_names), config_file)
        tensors = {name: t for name, t in tensors.items() if name not in patcher_part}
    model_tensors = _renamed(tensors, sources, _from_hf_names(model_names), config_file)
    with atomic_directory(out_dir) as staging:
        write_model_files(model_tensors, cfg, staging)
        if entropy_cfg is not None:
            (staging / ENTROPY_MODEL_DIR).mkdir()
            write_model_files(patcher_tensors, entropy_cfg, staging / ENTROPY_MODEL_DIR)
    return out_dir


def _set_patching_from_hf(cfg: Config, hf: _HFConfig, has_patcher: bool, entropy_model_dir: Path) -> None:
    """Patch like the port: by entropy with its own patcher when it has one, else statically."""
    patching = cfg.patching
    patching.patch_size = hf.get("patch_size", (int,), nullable=True, default=None) or patching.patch_size
    patching.max_patch_length = hf.get("max_patch_length", (int,), nullable=True, default=None)
    if has_patcher and hf.get("patching_mode", (str,), nullable=True, default=None) == "entropy":
        patching.mode = "entropy"
        patching.threshold_mode = "global"
        patching.entropy_model = str(entropy_model_dir)
        threshold = hf.get("patching_threshold", (int, float))
        if threshold is not None:
            patching.threshold = float(threshold)


def _validate_converted(cfg: Config, config_file: Path) -> None:
    try:
        validate(cfg)
    except UserError as error:
        raise UserError(f"{config_file}: describes a model bltdist cannot build: {error}") from None


# ---------------------------------------------------------------------------------------------
# to-hf


def _read_model_dir(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; not a bltdist model directory (config.yaml + {WEIGHTS_FILE})")
    return load_config(str(config_file), []), read_safetensors(path / WEIGHTS_FILE)


def _renamed_for_hf(
    model_dir: Path, tensors: dict[str, torch.Tensor], names: dict[str, tuple[str, torch.Size]]
) -> dict[str, torch.Tensor]:
    """The tensors of a bltdist model directory under their Hugging Face names, checked against its config."""
    return _renamed(tensors, dict.fromkeys(tensors, model_dir / WEIGHTS_FILE), names, model_dir / CONFIG_FILE)


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    widest = max(dtypes, key=lambda dtype: torch.finfo(dtype).bits)
    return str(widest).removeprefix("torch.")


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def hf_patcher_config(cfg: EntropyModelConfig) -> dict[str, Any]:
    return {
        "model_type": "blt_patcher",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads or cfg.heads,
        "intermediate_size": cfg.ffn_dim or default_ffn_dim(cfg.dim),
        "sliding_window": cfg.window,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _rope(cfg.rope_theta),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }


def hf_blt_config(cfg: BLTConfig, model_file: Path) -> dict[str, Any]:
    """The BltForCausalLM config.json fields for a bltdist BLT; refuses options the port cannot compute."""
    problems = []
    if cfg.global_final_norm:
        problems.append("model.blt.global_final_norm: true, but the port's global transformer has no final norm")
    if not cfg.cross_attn_double_residual:
        problems.append("model.blt.cross_attn_double_residual: false, but the port always adds the residual twice")
    if cfg.encoder_cross_attn_all_layers and not cfg.encoder_cross_attn_repool:
        problems.append(
            "model.blt.encoder_cross_attn_repool: false with encoder_cross_attn_all_layers: true, but the port "
            "restarts the slots from max-pooling at every layer"
        )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"{model_file}: the Hugging Face port cannot compute this model:\n{lines}")
    local = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.local_dim,
        "num_attention_heads": cfg.local_heads,
        "num_key_value_heads": cfg.local_kv_heads or cfg.local_heads,
        "cross_attn_k": cfg.cross_attn_k,
        "hidden_size_global": cfg.global_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _rope(cfg.rope_theta),
        "hidden_act": "silu",
    }
    return {
        "model_type": "blt",
        "vocab_size": cfg.vocab_size,
        "cross_attn_k": cfg.cross_attn_k,
        "local_attention_window_len": cfg.local_window,
        "encoder_hash_byte_group_size": list(cfg.hash_ngram_sizes),
        "encoder_hash_byte_group_nb_functions": cfg.hash_functions,
        "encoder_hash_byte_group_vocab": cfg.hash_vocab,
        "rope_parameters": _rope(cfg.rope_theta),
        "tie_word_embeddings": False,
        "encoder_config": {
            **local,
            "model_type": "blt_local_encoder",
            "num_hidden_layers": cfg.encoder_layers,
            "intermediate_size": cfg.encoder_ffn_dim or default_ffn_dim(cfg.local_dim),
            "cross_attn_all_layers": cfg.encoder_cross_attn_all_layers,
            "sliding_window": cfg.local_window,
        },
        "decoder_config": {
            **local,
            "model_type": "blt_local_decoder",
            "num_hidden_layers": cfg.decoder_layers,
            "intermediate_size": cfg.decoder_ffn_dim or default_ffn_dim(cfg.local_dim),
            "cross_attn_all_layers": cfg.decoder_cross_attn_all_layers,
        },
        "global_config": {
            "model_type": "blt_global_transformer",
            "hidden_size": cfg.global_dim,
            "num_attention_heads": cfg.global_heads,
            "num_key_value_heads": cfg.global_kv_heads or cfg.global_heads,
            "num_hidden_layers": cfg.global_layers,
            "intermediate_size": cfg.global_ffn_dim or default_ffn_dim(cfg.global_dim),
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": _rope(cfg.rope_theta),
            "hidden_act": "silu",
        },
    }


def to_hf(model_dir: str | Path, hf_dir: str | Path) -> Path:
    """Convert a bltdist model directory into one that ``BltForCausalLM`` (or ``BltPatcher``) loads."""
    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    cfg, tensors = _read_model_dir(model_dir)
    _refuse_existing(hf_dir)
    if cfg.model.arch == "entropy":
        hf_config = {"architectures": ["BltPatcher"], **hf_patcher_config(cfg.model.entropy)}
        hf_tensors = _renamed_for_hf(model_dir, tensors, entropy_tensor_names(cfg.model.entropy))
    else:
        hf_config = {"architectures": ["BltForCausalLM"], **hf_blt_config(cfg.model.blt, model_dir / CONFIG_FILE)}
        hf_tensors = _renamed_for_hf(model_dir, tensors, blt_tensor_names(cfg.model.blt))
        hf_config.update(_hf_patching(cfg))
        if cfg.patching.mode == "entropy" and cfg.patching.threshold_mode == "global":
            entropy_dir = Path(cfg.patching.entropy_model)
            entropy_cfg, entropy_tensors = _read_model_dir(entropy_dir)
            if entropy_cfg.model.arch != "entropy":
                raise UserError(
                    f"patching.entropy_model: {entropy_dir} holds a {entropy_cfg.model.arch} model, "
                    "not an entropy model"
                )
            names = entropy_tensor_names(entropy_cfg.model.entropy, HF_PATCHER_PREFIX)
            hf_tensors.update(_renamed_for_hf(entropy_dir, entropy_tensors, names))
            hf_config["patcher_config"] = hf_patcher_config(entropy_cfg.model.entropy)
            hf_config["patch_in_forward"] = True
        elif cfg.patching.mode == "entropy":
            print(
                f"{PROGRAM}: note: the Hugging Face port has no monotonic entropy threshold, so the entropy model "
                "is not included; pass patch_lengths to the exported model",
                file=sys.stderr,
            )
    hf_config["dtype"] = _dtype_name(hf_tensors)
    with atomic_directory(hf_dir) as staging:
        (staging / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        contiguous = {name: t.contiguous() for name, t in hf_tensors.items()}
        save_file(contiguous, staging / HF_WEIGHTS_FILE, metadata={"format": "pt"})
    return hf_dir


def _hf_patching(cfg: Config) -> dict[str, Any]:
    patching = cfg.patching
    return {
        "patch_in_forward": False,
        "patching_mode": patching.mode,
        "patch_size": patching.patch_size,
        "patching_threshold": patching.threshold,
        "max_patch_length": patching.max_patch_length,
    }


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Convert model directories between bltdist and other formats."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = commands.add_parser(
        "from-hf",
        help="Hugging Face BLT checkpoint (BltForCausalLM or BltPatcher) -> bltdist model directory",
        description="Reads HF_DIR (config.json + model.safetensors or sharded safetensors) and writes OUT_DIR "
        "(config.yaml + model.safetensors, plus entropy_model/ when the checkpoint carries its patcher).",
    )
    command.add_argument("hf_dir", metavar="HF_DIR")
    command.add_argument("out_dir", metavar="OUT_DIR")
    command.set_defaults(run=lambda args: from_hf(args.hf_dir, args.out_dir))
    command = commands.add_parser(
        "to-hf",
        help="bltdist model directory -> Hugging Face BLT checkpoint",
        description="Reads BLTDIST_DIR and writes HF_DIR, loadable offline with BltForCausalLM.from_pretrained "
        "(or BltPatcher.from_pretrained for an entropy model).",
    )
    command.add_argument("model_dir", metavar="BLTDIST_DIR")
    command.add_argument("hf_dir", metavar="HF_DIR")
    command.set_defaults(run=lambda args: to_hf(args.model_dir, args.hf_dir))
    command = commands.add_parser(
        "consolidate",
        help="sharded training checkpoint -> bltdist model directory",
        description="Reads CKPT_DIR (e.g. runs/x/checkpoints/step_1000, checksums verified) and writes OUT_DIR.",
    )
    command.add_argument("checkpoint", metavar="CKPT_DIR")
    command.add_argument("out_dir", metavar="OUT_DIR")
    command.set_defaults(run=lambda args: consolidate(args.checkpoint, args.out_dir))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        written = args.run(args)
    except UserError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{PROGRAM}: wrote {written}")


if __name__ == "__main__":
    main()
