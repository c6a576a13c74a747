"""Model directories: ``config.yaml`` (the run's resolved config) + ``model.safetensors``.

A training run writes one under ``output_dir/checkpoints/step_N`` and the trainer can start from
one with ``--checkpoint.init_from DIR``. Writes are atomic: everything goes into a temporary
sibling directory that is fsynced and then renamed, so a crash mid-save leaves the previous
checkpoint untouched and never a half-written one under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bltdist.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_dir(model: torch.nn.Module, cfg, path: str | Path) -> Path:
    """Write ``model``'s weights and ``cfg`` to ``path`` atomically; returns the final path."""
    return save_weights_dir(model.state_dict(), cfg, path)


def save_weights_dir(tensors: dict[str, torch.Tensor], cfg, path: str | Path) -> Path:
    """Write full (gathered) weights by name and ``cfg`` to ``path`` atomically; returns the final path."""
    from bltdist.config import save_config

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(tensors, staging / WEIGHTS_FILE)
        save_config(cfg, staging / CONFIG_FILE)
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``path/model.safetensors`` into ``model``; every mismatch is reported by tensor name."""
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: not found; expected a bltdist model directory (config.yaml + {WEIGHTS_FILE})")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_file}: cannot be read ({error}); the file may be truncated, re-copy it") from error
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
