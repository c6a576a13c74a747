"""Model directories: ``config.yaml`` (the run's resolved config) + ``model.safetensors``.

What a finished run leaves in ``output_dir/model``, what ``--checkpoint.init_from DIR``,
``bltdist.load_pretrained`` and the converters read. (Training checkpoints, sharded and with
optimizer state, are ``bltdist.training.checkpoint``.) Writes are atomic (``bltdist.atomic``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bltdist.atomic import atomic_directory
from bltdist.config import load_config, save_config
from bltdist.errors import UserError
from bltdist.model import BLT, ByteLM

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def save_weights_dir(tensors: dict[str, torch.Tensor], cfg, path: str | Path) -> Path:
    """Write full (gathered) weights by name and ``cfg`` to ``path`` atomically; returns the final path."""
    with atomic_directory(path) as staging:
        write_model_files(tensors, cfg, staging)
    return Path(path)


def write_model_files(tensors: dict[str, torch.Tensor], cfg, directory: Path) -> None:
    """Write named tensors (each kept in its dtype) and ``cfg`` into ``directory`` as a model directory."""
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, directory / WEIGHTS_FILE)
    save_config(cfg, directory / CONFIG_FILE)


def read_safetensors(weights_file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a missing or unreadable file is a UserError naming it."""
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: not found")
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_file}: cannot be read ({error}); the file may be truncated, re-copy it") from error


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``path/model.safetensors`` into ``model``; every mismatch is reported by tensor name."""
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: not found; expected a bltdist model directory (config.yaml + {WEIGHTS_FILE})")
    tensors = read_safetensors(weights_file)
    expected = model.state_dict()
    problems = [f"missing tensor {name}" for name in expected if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in expected]
    problems += [
        f"tensor {name}: shape {tuple(tensors[name].shape)} in file, {tuple(t.shape)} in model"
        for name, t in expected.items()
        if name in tensors and tensors[name].shape != t.shape
    ]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        raise UserError(f"{weights_file} does not match the configured model:\n{listed}")
    model.load_state_dict(tensors)


def load_pretrained(path: str | Path, attention_backend: str = "auto") -> torch.nn.Module:
    """The model of a bltdist model directory, on the CPU in eval mode: a ``BLT`` (call it with byte
    ids (B, T) and patch lengths (B, P) for logits (B, T, 260)) or, for an entropy model, a ``ByteLM``."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(f"{config_file}: not found; expected a bltdist model directory (config.yaml + {WEIGHTS_FILE})")
    cfg = load_config(str(config_file), [])
    with torch.device("meta"):
        if cfg.model.arch == "blt":
            model = BLT(cfg.model.blt, attention_backend)
        else:
            model = ByteLM(cfg.model.entropy, attention_backend)
    model.to_empty(device="cpu")
    load_model_weights(model, path)
    return model.eval()


def check_model_dir(key: str, path: str) -> None:
    """UserError naming the config ``key`` when ``path`` is not a model directory."""
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (Path(path) / name).is_file()]
    if missing:
        raise UserError(f"{key}: {path} is not a bltdist model directory (missing {', '.join(missing)})")
