"""Metric lines: every one goes to ``output_dir/metrics.jsonl``; rank 0 also prints a progress line."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

TRAIN_KEYS = (
    "step", "loss", "bpb", "bytes_per_sec", "patches_per_sec", "avg_patch_len",
    "grad_norm", "lr", "mem_gb", "tflops", "mfu",
)  # fmt: skip


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1e6


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _format_rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


class MetricsLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, is_main: bool):
        self.is_main = is_main
        self.total_steps = total_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if is_main else None

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def train_line(self, record: dict, seconds_per_step: float) -> None:
        self.log(record)
        if not self.is_main:
            return
        mfu = "-" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        eta = _format_duration(seconds_per_step * (self.total_steps - record["step"]))
        print(
            f"step {record['step']:>6}/{self.total_steps} | loss {record['loss']:.4f} | bpb {record['bpb']:.3f} | "
            f"{_format_rate(record['bytes_per_sec'])} B/s | MFU {mfu} | grad {record['grad_norm']:.2f} | "
            f"lr {record['lr']:.2e} | ETA {eta}",
            flush=True,
        )

    def val_line(self, record: dict) -> None:
        self.log(record)
        if self.is_main:
            print(f"step {record['step']:>6}/{self.total_steps} | val_loss {record['val_loss']:.4f} | "
                  f"val_bpb {record['val_bpb']:.3f}", flush=True)

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
