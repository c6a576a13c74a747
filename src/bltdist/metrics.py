"""Metric lines: every one goes to ``output_dir/metrics.jsonl`` (and to TensorBoard / Weights &
Biases when switched on); rank 0 also prints a progress line. At the end of a run, rank 0 prints a
summary and writes ``output_dir/summary.json``."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bltdist.config import LoggingConfig

TRAIN_KEYS = (
    "step", "loss", "bpb", "bytes_per_sec", "patches_per_sec", "avg_patch_len",
    "grad_norm", "lr", "mem_gb", "tflops", "mfu", "skipped_steps",
)  # fmt: skip


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1e6


class RecompilationCounter:
    """Counts torch.compile recompilations in this process from the moment it is made: compilations
    of a function that was compiled before (its guards failed: a new shape, grad mode or state).
    ``summary.json`` reports rank 0's count as ``recompilations``, and its ``graph_breaks``."""

    def __init__(self):
        self.count = 0
        self._graph_breaks_before = self._graph_breaks_so_far()
        torch._dynamo.callback_handler.register_start_callback(self._on_compile_start)

    @property
    def graph_breaks(self) -> int:
        """Graph breaks since this counter was made: each splits a compiled block's graph and
        recompiles per shape, so a compiled run should report none (see bltdist.parallel.wrappers)."""
        return self._graph_breaks_so_far() - self._graph_breaks_before

    @staticmethod
    def _graph_breaks_so_far() -> int:
        return sum(torch._dynamo.utils.counters["graph_break"].values())

    def _on_compile_start(self, args) -> None:
        # Dynamo's compile ids read "frame/n", n counting the compilations of that frame from 0;
        # compiled-autograd ids start with "!" and are not recompilations of a frame.
        frame, _, attempt = str(args.compile_id).partition("/")
        if not frame.startswith("!") and int(attempt.split("_")[0]) > 0:
            self.count += 1


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
    def __init__(self, output_dir: str | Path, total_steps: int, is_main: bool, sinks: list | None = None):
        self.is_main = is_main
        self.total_steps = total_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if is_main else None
        self.sinks = sinks or []
        self.train_records: list[dict] = []

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.log(clean)

    def train_line(self, record: dict, seconds_per_step: float) -> None:
        self.log(record)
        self.train_records.append(record)
        if not self.is_main:
            return
        mfu = "-" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        eta = _format_duration(seconds_per_step * (self.total_steps - record["step"]))
        print(
            f"step {record['step']:>6}/{self.total_steps} | loss {record['loss']:.4f} | bpb {record['bpb']:.3f} | "
            f"{_format_rate(record['bytes_per_sec'])} B/s | {record['tflops']:.3g} TFLOP/s | MFU {mfu} | grad {record['grad_norm']:.2f} | "
            f"lr {record['lr']:.2e} | ETA {eta}" + (f" | skipped {record['skipped_steps']}" if record["skipped_steps"] else ""),
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
        for sink in self.sinks:
            sink.close()


# ---------------------------------------------------------------------------------------------
# Optional sinks, step timing, profiling, out-of-memory snapshots, end-of-run summary


OPTIONAL_SINKS = {
    # config key: (module that must import, what to install)
    "logging.tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "logging.wandb": ("wandb", "wandb"),
}


def missing_sink_packages(logging_cfg: LoggingConfig) -> list[str]:
    """One problem per sink that is switched on but whose package does not import."""
    problems = []
    for key, (module, package) in OPTIONAL_SINKS.items():
        if not getattr(logging_cfg, key.split(".")[1]):
            continue
        try:
            importlib.import_module(module)
        except ImportError as error:
            problems.append(
                f"{key}: is true but {package} is not installed ({error}); "
                f"pip install {package}, or set {key}: false"
            )
    return problems


class TensorBoardSink:
    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(project=project, name=run_name, config=config)

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg: LoggingConfig, output_dir: Path, run_config: dict, is_main: bool) -> list:
    """The optional sinks the config switches on (rank 0 only); check ``missing_sink_packages`` first."""
    if not is_main:
        return []
    sinks: list = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(output_dir))
    if cfg.wandb:
        sinks.append(WandbSink(cfg.wandb_project, output_dir.name, run_config))
    return sinks


STEP_PHASES = ("data_wait", "forward_backward", "grad_norm_allreduce", "optimizer")


class StepTimer:
    """Wall time of each phase of every optimizer step.

    On CUDA every phase boundary synchronises the device, so a phase owns the kernels it launched
    (costs a few microseconds per phase; without it the optimizer would be charged for backward).
    FSDP's all-gathers and reduce-scatters overlap compute and are counted in forward_backward;
    ``grad_norm_allreduce`` is the exposed communication the trainer itself issues: the gradient-norm
    all-reduce and clipping.
    """

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = {}
        self._step_start = 0.0

    def start_step(self) -> None:
        self.sync()
        self._current = dict.fromkeys(STEP_PHASES, 0.0)
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self._current[name] += time.perf_counter() - start

    def end_step(self) -> None:
        self.sync()
        self._current["step"] = time.perf_counter() - self._step_start
        self.steps.append(self._current)

    def breakdown(self) -> dict[str, float] | None:
        """Median seconds per phase over the steps after the first (which pays for warm-up)."""
        steps = self.steps[1:] if len(self.steps) > 1 else self.steps
        if not steps:
            return None
        result = {f"{name}_s": statistics.median(s[name] for s in steps) for name in (*STEP_PHASES, "step")}
        result["other_s"] = max(0.0, result["step_s"] - sum(result[f"{name}_s"] for name in STEP_PHASES))
        result["steps_measured"] = len(steps)
        return result


class StepProfiler:
    """PyTorch profiler trace of each step in ``steps``: output_dir/profile/rank<R>_step<S>.json
    (open in chrome://tracing or Perfetto)."""

    def __init__(self, steps: list[int], output_dir: Path, rank: int, device: torch.device):
        self.steps = set(steps)
        self.directory = output_dir / "profile"
        self.rank = rank
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = None

    def start_step(self, step: int) -> None:
        if step in self.steps:
            self._profiler = torch.profiler.profile(activities=self.activities, record_shapes=True)
            self._profiler.__enter__()

    def end_step(self, step: int) -> Path | None:
        if self._profiler is None:
            return None
        self._profiler.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"rank{self.rank}_step{step}.json"
        self._profiler.export_chrome_trace(str(path))
        self._profiler = None
        return path


@contextlib.contextmanager
def memory_snapshot_on_oom(enabled: bool, output_dir: Path, rank: int):
    """When ``enabled`` (logging.memory_snapshot_on_oom, on CUDA): records allocation history and,
    when the body runs out of memory, writes output_dir/memory_snapshot_rank<R>.pickle (view it at
    https://pytorch.org/memory_viz) before re-raising. A no-op otherwise."""
    if not enabled:
        yield
        return
    # Before the first allocation, and on this rank's GPU rather than creating a context on GPU 0.
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
    except torch.OutOfMemoryError:
        path = output_dir / f"memory_snapshot_rank{rank}.pickle"
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        print(f"rank {rank}: out of memory; allocation history written to {path}", file=sys.stderr, flush=True)
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def _median_and_best(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "best": None}
    return {"median": statistics.median(known), "best": max(known)}


def run_summary(
    train_records: list[dict],
    step_breakdown: dict[str, float] | None,
    peak_memory_gb_per_rank: list[float],
    *,
    world_size: int,
    layout: dict[str, int],
    device_type: str,
    peak_tflops: float | None,
) -> dict:
    """What a user would script from metrics.jsonl, in one place.

    Throughput figures come from the logged intervals, leaving out the first interval when there
    are several (it pays for warm-up and compilation). Rates are per rank: one rank is one GPU on
    GPU machines, one process on CPU. MFU is null when the device peak is unknown.
    """
    measured = train_records[1:] if len(train_records) > 1 else train_records
    return {
        "steps": train_records[-1]["step"] if train_records else 0,
        "world_size": world_size,
        "layout": layout,
        "device": device_type,
        "peak_tflops_per_rank": peak_tflops,
        "flop_convention": "bltdist.flops: 3 x forward, attention scores without causal halving (torchtitan/picotron)",
        "intervals_measured": len(measured),
        "mfu": _median_and_best([r["mfu"] for r in measured]),
        "tflops_per_rank": _median_and_best([r["tflops"] for r in measured]),
        "bytes_per_sec_per_rank": _median_and_best([r["bytes_per_sec"] / world_size for r in measured]),
        "peak_memory_gb_per_rank": peak_memory_gb_per_rank,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device_type == "cuda" else "max resident set size",
        "step_time_breakdown": step_breakdown,
        "final_loss": train_records[-1]["loss"] if train_records else None,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def format_summary(summary: dict) -> str:
    """The summary as the few lines printed at the end of a run."""
    unit = "GPU" if summary["device"] == "cuda" else "rank"
    lines = [
        f"summary over {summary['steps']} steps on {summary['world_size']} rank(s) "
        f"({' x '.join(f'{k}={v}' for k, v in summary['layout'].items())}):",
        f"  MFU median {_percent(summary['mfu']['median'])}, best {_percent(summary['mfu']['best'])} | "
        f"TFLOP/s per {unit} median {_number(summary['tflops_per_rank']['median'])} | "
        f"bytes/s per {unit} median {_format_rate(summary['bytes_per_sec_per_rank']['median'] or 0.0)}",
        f"  peak memory per rank (GB, {summary['peak_memory_kind']}): "
        + ", ".join(f"{gb:.2f}" for gb in summary["peak_memory_gb_per_rank"]),
    ]
    breakdown = summary["step_time_breakdown"]
    if breakdown:
        parts = ", ".join(f"{name} {1000 * breakdown[f'{name}_s']:.1f}" for name in (*STEP_PHASES, "other"))
        lines.append(f"  step time median {1000 * breakdown['step_s']:.1f} ms (rank 0): {parts} ms")
    return "\n".join(lines)


def gather_peak_memory_gb(device: torch.device) -> list[float]:
    """Every rank's peak memory, in rank order (collective when a process group exists)."""
    mine = peak_memory_gb(device)
    if not dist.is_initialized():
        return [mine]
    gathered: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def write_summary(summary: dict, output_dir: Path) -> Path:
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path
