"""Per-rank parameter + optimizer memory under FSDP2 for dp_shard = 1, 2, 4 (gloo on CPU).

For each dp_shard = N it launches N processes that build the model exactly as the trainer does
(same parallelisation, same AdamW), take one optimizer step so that Adam's two moment buffers
exist, and count the bytes each rank holds: its parameter shards plus its optimizer state. Ideal
FSDP gives (dp_shard=1 bytes) / N; the figure ``ratio_to_ideal`` is measured / ideal for each N
(1.0 = perfect; FSDP pads uneven shards, so slightly above 1).

    python benchmarks/fsdp_memory.py [--config configs/tiny_static.yaml] [--sizes 1 2 4] [overrides...]

Writes benchmarks/results/fsdp_memory-cpu-<date>.json and prints one line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results import write_results

REPO = Path(__file__).resolve().parents[1]


def rank_bytes(config: str, overrides: list[str]) -> None:
    """Worker: runs inside torchrun; rank 0 prints the max over ranks of the bytes held."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from bltdist.config import load_config
    from bltdist.training.state import build_training_state

    state = build_training_state(load_config(config, overrides))
    model_parts, optimizer = state.model_parts, state.optimizer
    parameters = [p for part in model_parts for p in part.parameters()]
    for param in parameters:
        param.grad = torch.zeros_like(param)
    optimizer.step()

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    params = sum(local_bytes(p) for p in parameters)
    states = sum(
        local_bytes(value) for slots in optimizer.state.values() for value in slots.values() if value.dim() > 0
    )
    figures = torch.tensor([params, states], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if state.rank == 0:
        print(json.dumps({"param_bytes": int(figures[0]), "optimizer_bytes": int(figures[1])}))
    state.close()


def measure(config: str, size: int, overrides: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = [str(Path(__file__).resolve()), "--worker", "--config", config, *overrides, f"--parallel.dp_shard={size}"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={size}"] if size > 1 else []
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [sys.executable, *launcher, *worker], capture_output=True, text=True, env=env, cwd=scratch, check=False
        )
    if result.returncode != 0:
        raise SystemExit(f"dp_shard={size} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--worker" in sys.argv:
        args = sys.argv[sys.argv.index("--worker") + 1 :]
        rank_bytes(args[1], args[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_static.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    args, overrides = parser.parse_known_args()
    args.config = str(Path(args.config).resolve())
    rows = []
    for size in args.sizes:
        figures = measure(args.config, size, [*overrides, f"--train.global_batch_size={4 * size}", "--train.micro_batch_size=1"])
        rows.append({"dp_shard": size, **figures, "total_bytes": figures["param_bytes"] + figures["optimizer_bytes"]})
    base = rows[0]["total_bytes"] * args.sizes[0]
    for row in rows:
        row["ratio_to_ideal"] = row["total_bytes"] / (base / row["dp_shard"])
        print(f"dp_shard={row['dp_shard']}: {row['total_bytes'] / 2**20:.2f} MiB per rank "
              f"(params {row['param_bytes'] / 2**20:.2f}, optimizer {row['optimizer_bytes'] / 2**20:.2f}), "
              f"ratio_to_ideal={row['ratio_to_ideal']:.3f}")  # fmt: skip
    config = {"path": os.path.relpath(args.config, REPO), "overrides": overrides}
    figures = {"rows": rows, "max_ratio_to_ideal": max(row["ratio_to_ideal"] for row in rows)}
    out = write_results("fsdp_memory", "cpu", config, figures)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
