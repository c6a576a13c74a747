"""Model directories: ``config.yaml`` (the run's resolved config) + ``model.safetensors``.

What a finished run leaves in ``output_dir/model``, what ``--checkpoint.init_from DIR``,
``bltdist.load_pretrained`` and the converters read. (Training checkpoints, sharded and with
optimizer state, are ``bltdist.training.checkpoint``.) Writes are atomic (``bltdist.atomic``).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bltdist.atomic import atomic_directory
from bltdist.config import load_config, save_config
from bltdist.errors import UserError
from bltdist.model import BLT, ByteLM
from bltdist.tokenizer import TOKENIZER_FILE

WEIGHTS_FILE = "model.safetensors"
# The safetensors dtype names of the tensors a model directory holds.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
# Bytes read from a weights file at a time when a rank loads its slices.
READ_BYTES = 1 << 24
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
    if cfg.model.arch == "tokenlm":  # a BPE model is read with its tokenizer
        tokenizer = Path(cfg.output_dir) / TOKENIZER_FILE
        if not tokenizer.is_file():
            raise UserError(f"{tokenizer}: not found; a tokenlm model directory needs its run's tokenizer")
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)


def read_safetensors(weights_file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a missing or unreadable file is a UserError naming it."""
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: not found")
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_file}: cannot be read ({error}); the file may be truncated, re-copy it") from error


@dataclass
class WeightSlice:
    """What a process holds of the weight ``name``: ``target``, the block of the whole tensor that
    starts at index ``offset`` (all zeros for a whole tensor)."""

    name: str
    target: torch.Tensor
    offset: tuple[int, ...]


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``path/model.safetensors`` into ``model``; every mismatch is reported by tensor name."""
    expected = model.state_dict()  # detached aliases of the parameters: copying into them loads
    slices = [WeightSlice(name, tensor, (0,) * tensor.dim()) for name, tensor in expected.items()]
    load_weight_slices(path, {name: tensor.shape for name, tensor in expected.items()}, slices)


def load_weight_slices(path: str | Path, expected_shapes: dict[str, torch.Size], slices: list[WeightSlice]) -> None:
    """Fill each slice's target from ``path/model.safetensors``, reading only the rows it holds, so a
    rank that holds 1/N of a model reads 1/N of the file (no memory map either: mapped pages count
    as the process's memory). ``expected_shapes`` names every weight of the whole model: the file
    must hold exactly these, with these shapes."""
    weights_file = Path(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: not found; expected a bltdist model directory (config.yaml + {WEIGHTS_FILE})")
    try:
        with open(weights_file, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
            header.pop("__metadata__", None)
            _check_shapes(weights_file, expected_shapes, {name: tuple(entry["shape"]) for name, entry in header.items()})
            with torch.no_grad():
                for piece in slices:
                    _read_rows(file, 8 + header_size, header[piece.name], piece)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{weights_file}: cannot be read ({error}); the file may be truncated, re-copy it") from error


def _read_rows(file, data_start: int, entry: dict, piece: WeightSlice) -> None:
    """Copy ``piece``'s block of one tensor of an open safetensors file into its target, a few MB of
    whole rows at a time."""
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    target = piece.target if piece.target.dim() else piece.target.view(1)  # a scalar is one row
    if target.numel() == 0:  # an uneven shard may hold no rows
        return
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    first = piece.offset[0] if shape else 0
    inner = tuple(slice(start, start + size) for start, size in zip(piece.offset[1:], target.shape[1:]))
    rows_per_read = max(1, READ_BYTES // row_bytes)
    for row in range(first, first + target.shape[0], rows_per_read):
        rows = min(rows_per_read, first + target.shape[0] - row)
        buffer = bytearray(rows * row_bytes)
        file.seek(data_start + entry["data_offsets"][0] + row * row_bytes)
        if file.readinto(buffer) != len(buffer):
            raise ValueError("the file ends inside a tensor")
        block = torch.frombuffer(buffer, dtype=dtype).view(rows, *shape[1:])
        target[row - first : row - first + rows].copy_(block[(slice(None), *inner)])


def _check_shapes(weights_file: Path, expected: dict[str, torch.Size], in_file: dict[str, tuple[int, ...]]) -> None:
    problems = [f"missing tensor {name}" for name in expected if name not in in_file]
    problems += [f"unexpected tensor {name}" for name in in_file if name not in expected]
    problems += [
        f"tensor {name}: shape {in_file[name]} in file, {tuple(shape)} in model"
        for name, shape in expected.items()
        if name in in_file and in_file[name] != tuple(shape)
    ]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        raise UserError(f"{weights_file} does not match the configured model:\n{listed}")


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
        else:  # entropy, bytelm, or tokenlm (over the ids of the directory's tokenizer.json)
            model = ByteLM(cfg.model.plain_lm(), attention_backend)
    model.to_empty(device="cpu")
    load_model_weights(model, path)
    return model.eval()


def check_model_dir(key: str, path: str) -> None:
    """UserError naming the config ``key`` when ``path`` is not a model directory."""
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (Path(path) / name).is_file()]
    if missing:
        raise UserError(f"{key}: {path} is not a bltdist model directory (missing {', '.join(missing)})")
