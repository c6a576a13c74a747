"""Backward peak memory of the hash n-gram embedding: the Triton kernel (both backward modes, under
TRITON_INTERPRET=1 on CPU) against the PyTorch reference (one embedding_bag), for a table of
6 x 500002 rows of width 256 in fp32 and in bf16.

Each case runs in its own process, after a forward over one sequence of --seq-len bytes, and
reports two figures for the backward alone, beyond what was alive before it (table, forward
output, saved rows):
- ``backward_peak_tensor_bytes``: the peak of tensor storages alive (``bltdist.memtrack``);
- ``backward_peak_rss_bytes``: the rise of the process's resident-set high-water mark, which
  also sees scratch memory inside one operation (and allocator/interpreter overhead).
The gradient of the table itself is one table's size; ``gradient_bytes`` gives it per dtype.

    TRITON_INTERPRET=1 python benchmarks/hash_memory.py [--seq-len 2048]

Writes benchmarks/results/hash_memory-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from results import RESULTS_DIR, write_results

TABLES, TABLE_SIZE, DIM = 6, 500002, 256
NGRAM_SIZES = [3, 4, 5, 6, 7, 8]
IMPLEMENTATIONS = ("reference", "kernel_atomic", "kernel_sorted")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_case(implementation: str, dtype: torch.dtype, seq_len: int) -> dict:
    from bltdist.kernels.hash_embedding import hash_ngram_embedding

    from bltdist.memtrack import PeakTensorMemory
    from bltdist.model.hash_embedding import HashNgramEmbedding

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 260, (1, seq_len), generator=generator)
    module = HashNgramEmbedding(NGRAM_SIZES, 1, TABLE_SIZE, DIM, kernels="torch").to(dtype)
    torch.nn.init.normal_(module.weight, std=0.02)
    if implementation == "reference":
        out = module(tokens)
    else:
        mode = implementation.removeprefix("kernel_")
        out = hash_ngram_embedding(tokens, module.weight, NGRAM_SIZES, 1, TABLE_SIZE, mode)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    rss_before = rss_bytes()
    # Set-up may have left the high-water mark above today's resident set; a backward rise below
    # that slack is hidden, so the slack is reported with the figure.
    slack = max(0, peak_rss_bytes() - rss_before)
    with PeakTensorMemory() as tracker:
        out.backward(grad_out)
    assert module.weight.grad.dtype == dtype
    return {
        "backward_peak_tensor_bytes": tracker.peak_bytes,
        "backward_peak_rss_bytes": max(0, peak_rss_bytes() - rss_before),
        "rss_high_water_slack_bytes": slack,
    }


def run_case(implementation: str, dtype_name: str, seq_len: int) -> dict:
    command = [sys.executable, __file__, "--case", implementation, dtype_name, "--seq-len", str(seq_len)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"case {implementation} {dtype_name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.case:
        implementation, dtype_name = args.case
        print(json.dumps(measure_case(implementation, DTYPES[dtype_name], args.seq_len)))
        return
    figures = {}
    for dtype_name, dtype in DTYPES.items():
        gradient_bytes = TABLES * TABLE_SIZE * DIM * dtype.itemsize
        figures[dtype_name] = {"gradient_bytes": gradient_bytes}
        for implementation in IMPLEMENTATIONS:
            case = run_case(implementation, dtype_name, args.seq_len)
            figures[dtype_name][implementation] = case
            print(dtype_name, implementation, {k: f"{v / 2**30:.2f} GiB" for k, v in case.items()})
    config = {"tables": TABLES, "table_size": TABLE_SIZE, "dim": DIM, "seq_len": args.seq_len,
              "ngram_sizes": NGRAM_SIZES, "triton_interpret": True}  # fmt: skip
    path = write_results("hash_memory", "cpu", config, figures, results_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
