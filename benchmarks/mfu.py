"""MFU and bytes/s per rank over a sweep of (model config x bytes per sequence x layout).

Each point is a real training run (``torchrun -m bltdist.train``) of a few steps whose
``summary.json`` gives median MFU, TFLOP/s and bytes/s per rank (first logged interval left out).
Layouts are comma-separated parallel degrees; dp_shard takes the remaining ranks, e.g. ``fsdp``
(all ranks FSDP), ``tp=2``, ``dp_replicate=2``, ``tp=2,dp_replicate=2``. Points whose layout does
not fit the ranks or the model are reported as skipped with the trainer's message; a run that
fails (e.g. out of memory) is recorded with its error.

Writes benchmarks/results/mfu-<device>-<date>.json (``--name`` replaces ``mfu``), .md (a table)
and .png (MFU and bytes/s per rank against bytes per sequence). MFU uses bltdist.flops (3 x
forward, attention without causal halving) against the device's dense bf16 peak; on CPU it is null
unless --peak-tflops is given, and CPU figures are never GPU performance.

    python benchmarks/mfu.py --configs configs/blt_1b.yaml --seq-lens 8192 16384 --layouts fsdp tp=2
    python benchmarks/mfu.py --nproc 2 --configs configs/tiny_static.yaml --seq-lens 256 512 --steps 3   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from results import RESULTS_DIR, write_results

REPO = Path(__file__).resolve().parents[1]


def parse_layout(text: str) -> list[str]:
    """Trainer overrides for a layout string; SystemExit(2) naming what is wrong."""
    if text == "fsdp":
        return ["--parallel.dp_shard=-1"]
    overrides = ["--parallel.dp_shard=-1"]
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("dp_replicate", "tp", "cp", "pp") or not value.isdigit():
            raise SystemExit(f"mfu.py: error: layout {text!r}: expected fsdp or KEY=N[,KEY=N] with KEY in "
                             "dp_replicate, tp, cp, pp")  # fmt: skip
        overrides.append(f"--parallel.{key}={value}")
    return overrides


def run_point(config: str, seq_len: int, layout: str, args, work: Path) -> dict:
    out = work / f"{Path(config).stem}-{seq_len}-{layout.replace(',', '_').replace('=', '')}"
    overrides = [*parse_layout(layout), f"--train.seq_len={seq_len}", f"--train.steps={args.steps}",
                 "--logging.interval=1", "--train.val_interval=0", "--train.val_batches=1",
                 "--checkpoint.interval=0", "--checkpoint.final=false", f"--output_dir={out}", *args.overrides]  # fmt: skip
    if args.peak_tflops is not None:
        overrides.append(f"--logging.peak_tflops={args.peak_tflops}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "bltdist.train", config, *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    point = {"config": config, "seq_len": seq_len, "layout": layout}
    summary_path = out / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        # torchrun's own lines ("error_file: <N/A>", "traceback : To enable ...") name no cause.
        lines = [line for line in result.stderr.splitlines() if "error" in line.lower()
                 and not line.lstrip().startswith(("error_file", "traceback :"))]  # fmt: skip
        point["error"] = (lines[-1] if lines else result.stderr[-300:]).strip()
        point["stderr_tail"] = result.stderr[-3000:]
        return point
    summary = json.loads(summary_path.read_text())
    return {
        **point,
        "mfu": summary["mfu"]["median"],
        "tflops_per_rank": summary["tflops_per_rank"]["median"],
        "bytes_per_sec_per_rank": summary["bytes_per_sec_per_rank"]["median"],
        "peak_memory_gb_max": max(summary["peak_memory_gb_per_rank"]),
        "recompilations": summary.get("recompilations"),
        "graph_breaks": summary.get("graph_breaks"),
        "step_time_breakdown": summary["step_time_breakdown"],
    }


def markdown_table(points: list[dict], device: str) -> str:
    lines = [f"MFU sweep on {device} (bltdist.flops convention: 3 x forward, no causal halving)", "",
             "| config | bytes/seq | layout | MFU | TFLOP/s per rank | bytes/s per rank | peak mem GB | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in points:
        if "error" in p:
            lines.append(f"| {p['config']} | {p['seq_len']} | {p['layout']} | | | | | {p['error'][:120]} |")
            continue
        mfu = "-" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
        lines.append(f"| {p['config']} | {p['seq_len']} | {p['layout']} | {mfu} | {p['tflops_per_rank']:.4g} | "
                     f"{p['bytes_per_sec_per_rank']:.4g} | {p['peak_memory_gb_max']:.2f} | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_png(points: list[dict], device: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (mfu_axis, rate_axis) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict]] = {}
    for p in points:
        if "error" not in p:
            series.setdefault(f"{Path(p['config']).stem} {p['layout']}", []).append(p)
    for label, items in series.items():
        items.sort(key=lambda p: p["seq_len"])
        x = [p["seq_len"] for p in items]
        if all(p["mfu"] is not None for p in items):
            mfu_axis.plot(x, [100 * p["mfu"] for p in items], marker="o", label=label)
        rate_axis.plot(x, [p["bytes_per_sec_per_rank"] for p in items], marker="o", label=label)
    mfu_axis.set(title=f"MFU ({device})", xlabel="bytes per sequence", ylabel="MFU %")
    if not mfu_axis.lines:
        mfu_axis.text(0.5, 0.5, "MFU unknown: no device peak\n(pass --peak-tflops)", ha="center", va="center",
                      transform=mfu_axis.transAxes)  # fmt: skip
    rate_axis.set(title=f"bytes/s per rank ({device})", xlabel="bytes per sequence", ylabel="bytes/s")
    for axis in (mfu_axis, rate_axis):
        axis.set_xscale("log", base=2)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/blt_1b.yaml"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 16384])
    parser.add_argument("--layouts", nargs="+", default=["fsdp", "tp=2"])
    parser.add_argument("--nproc", type=int, default=None, help="ranks; default: every GPU (required on CPU)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak; default: the built-in table")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="mfu", help="results file stem (a variant: mfu_compile)")
    parser.add_argument("--overrides", nargs=argparse.REMAINDER, default=[], help="further trainer overrides")
    args = parser.parse_args()
    for layout in args.layouts:
        parse_layout(layout)
    gpus = torch.cuda.device_count()
    if args.nproc is None:
        if gpus == 0:
            raise SystemExit("mfu.py: error: no GPU visible; give --nproc to run the sweep on CPU processes")
        args.nproc = gpus
    device = torch.cuda.get_device_name(0).replace(" ", "_") if gpus else "cpu"
    with tempfile.TemporaryDirectory(prefix="bltdist-mfu-") as work:
        points = [run_point(config, seq_len, layout, args, Path(work))
                  for config in args.configs for seq_len in args.seq_lens for layout in args.layouts]  # fmt: skip
    config = {"configs": args.configs, "seq_lens": args.seq_lens, "layouts": args.layouts, "steps": args.steps,
              "peak_tflops": args.peak_tflops, "overrides": args.overrides}  # fmt: skip
    figures = {
        "ranks": args.nproc,
        "flop_convention": "bltdist.flops: 3 x forward, attention scores without causal halving",
        "points": points,
    }
    out = write_results(args.name, device, config, figures, results_dir=args.results_dir,
                        extra_files={".md": markdown_table(points, device), ".png": plot_png(points, device)})  # fmt: skip
    print(markdown_table(points, device))
    print(f"written: {out}, .md, .png")


if __name__ == "__main__":
    main()
