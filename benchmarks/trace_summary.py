"""Where a profiled step's GPU time goes, from a trace that ``--logging.profile_steps`` wrote.

Prints the GPU kernels grouped into classes (matmul, attention, Triton, NCCL, elementwise, ...),
the top kernels by total time, the launch count, and GPU busy time against the step's wall time
(busy far below wall means the step waits on the host: launches, syncs, Python).

    python benchmarks/trace_summary.py runs/blt_1b/profile/rank0_step3.json [--top 25]

Writes benchmarks/results/<name>-<device>-<date>.json (name: --name, default profile; config: the run's
config.yaml beside the profile folder, and the step traced).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import yaml
from results import RESULTS_DIR, write_results

# First match wins: the order puts the specific names before the generic ones.
KERNEL_CLASSES = [
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "flex", "sdpa")),
    ("triton", ("triton",)),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "cublas")),
    ("reduction", ("reduce", "norm", "softmax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill", "cat", "index")),
]


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")


def summarize(trace: dict, top: int) -> dict:
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        raise SystemExit("trace_summary.py: error: the trace holds no GPU kernels (a CPU-only trace?)")
    by_name, by_class, launches = Counter(), Counter(), Counter()
    for e in kernels:
        label = kernel_class(e["name"])
        by_name[e["name"]] += e["dur"]
        by_class[label] += e["dur"]
        launches[label] += 1
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    wall_us = max(e["ts"] + e["dur"] for e in timed) - min(e["ts"] for e in timed)
    busy_us = sum(by_class.values())
    return {
        "wall_ms": wall_us / 1e3,
        "gpu_busy_ms": busy_us / 1e3,
        "gpu_busy_fraction": busy_us / wall_us,
        "launches": len(kernels),
        "classes_ms": {k: v / 1e3 for k, v in by_class.most_common()},
        "class_launches": dict(launches),
        "top_kernels_ms": [(name[:110], dur / 1e3) for name, dur in by_name.most_common(top)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="profile", help="benchmark name in the results file's name")
    args = parser.parse_args()
    trace = json.loads(args.trace.read_text())
    summary = summarize(trace, args.top)
    print(f"wall {summary['wall_ms']:.1f} ms, GPU busy {summary['gpu_busy_ms']:.1f} ms "
          f"({100 * summary['gpu_busy_fraction']:.0f}%), {summary['launches']} kernels")  # fmt: skip
    for label, ms in summary["classes_ms"].items():
        print(f"  {label:12s} {ms:9.1f} ms  {summary['class_launches'][label]:6d} launches")
    for name, ms in summary["top_kernels_ms"]:
        print(f"  {ms:9.2f} ms  {name}")
    device = trace["deviceProperties"][0]["name"]
    run_config = args.trace.parent.parent / "config.yaml"
    config = {"trace": args.trace.name, "run": yaml.safe_load(run_config.read_text()) if run_config.is_file() else None}
    out = write_results(args.name, device, config, summary, results_dir=args.results_dir,
                        file_device=device.replace(" ", "_"))  # fmt: skip
    print(f"written: {out}")


if __name__ == "__main__":
    main()
