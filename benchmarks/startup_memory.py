"""Per-rank peak memory of the trainer's set-up (``build_training_state``: process group, mesh,
model on the meta device, parallelisms, this rank's shards allocated and initialised, optimizer)
for dp_shard = 1, 2, 4 on CPU (gloo), once initialised from the seed and once loaded with
``checkpoint.init_from`` from a model directory written by the dp_shard = 1 run.

The figure is the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
just before the set-up) minus the resident set at that moment: everything the set-up added, torch's
allocator, gloo and Python included. Goal: at most 1/N of the whole model's fp32 bytes plus 10%.
No rank initialises for the others (every rank draws only its own shards), so the goal holds for
every rank. Linux only (/proc).

    python benchmarks/startup_memory.py [--config configs/blt_1b.yaml] [--sizes 1 2 4] [overrides...]

The default overrides shrink blt_1b to about 1.1B parameters (16 global layers, 20002-row hash
tables) so that the dp_shard = 1 run fits a small machine. Before each launch the script checks
that the machine has room (MemAvailable) for what it is about to allocate, and stops otherwise.
Writes benchmarks/results/startup_memory-cpu-<date>.json.
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
DEFAULT_OVERRIDES = ["--model.blt.global_layers=16", "--model.blt.hash_vocab=20002"]
PROCESS_OVERHEAD_BYTES = 1 << 29  # torch and gloo per process (measured about 0.4 GiB), for the room check only


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(config: str, overrides: list[str], write_model_to: str | None) -> None:
    """Runs in each process: measures the set-up; rank 0 prints every rank's figures as JSON."""
    import torch.distributed as dist

    from bltdist.config import load_config
    from bltdist.training.state import build_training_state

    cfg = load_config(config, overrides)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = status_bytes("VmRSS")
    state = build_training_state(cfg)
    added = status_bytes("VmHWM") - before
    local = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in state.parameters)
    rows = [{"rank": state.rank, "peak_added_bytes": added, "local_parameter_bytes": local}]
    if dist.is_initialized():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, {"rank": state.rank, "peak_added_bytes": added, "local_parameter_bytes": local})
    if state.rank == 0:
        print(json.dumps({"model_bytes": state.parameter_count * 4, "ranks": rows}))
    if write_model_to:
        (model,) = state.model_parts
        write_model_dir(model, cfg, Path(write_model_to))
    state.close()


def write_model_dir(model, cfg, directory: Path) -> None:
    """A model directory written one tensor at a time (safetensors' save_file would first copy the
    whole model into one buffer, which this machine may not have room for)."""
    import struct

    from bltdist.config import save_config
    from bltdist.model_dir import CONFIG_FILE, WEIGHTS_FILE

    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / WEIGHTS_FILE, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            file.write(tensor.numpy().tobytes())
    save_config(cfg, directory / CONFIG_FILE)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def measure(config: str, size: int, overrides: list[str], model_bytes: int, write_model_to: str | None) -> dict:
    needed = 1.1 * model_bytes + size * PROCESS_OVERHEAD_BYTES
    if available_bytes() < 1.5 * needed:
        raise SystemExit(f"dp_shard={size}: about {needed / 2**30:.1f} GiB needed, only "
                         f"{available_bytes() / 2**30:.1f} GiB available; stopped before launching")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [*overrides, f"--parallel.dp_shard={size}", f"--train.global_batch_size={size}", "--train.micro_batch_size=1"]
    worker_args = [str(Path(__file__).resolve()), "--worker", config, write_model_to or "-", *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={size}"] if size > 1 else []
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, *launcher, *worker_args], capture_output=True, text=True, env=env,
                                cwd=scratch, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"dp_shard={size} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_bytes_of(config: str, overrides: list[str]) -> int:
    from bltdist.config import load_config
    from bltdist.training.parallelize import meta_model

    return 4 * sum(p.numel() for p in meta_model(load_config(config, overrides).model).parameters())


def main() -> None:
    if "--worker" in sys.argv:
        config, write_model_to, *overrides = sys.argv[sys.argv.index("--worker") + 1 :]
        worker(config, overrides, None if write_model_to == "-" else write_model_to)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "blt_1b.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    args, overrides = parser.parse_known_args()
    args.config, overrides = str(Path(args.config).resolve()), [*DEFAULT_OVERRIDES, *overrides]
    model_bytes = model_bytes_of(args.config, overrides)
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        for mode in ("init", "init_from"):
            extra = [f"--checkpoint.init_from={model_dir}"] if mode == "init_from" else []
            for size in args.sizes:
                writes = model_dir if mode == "init" and size == 1 else None
                measured = measure(args.config, size, [*overrides, *extra], model_bytes, writes)
                peak = max(rank["peak_added_bytes"] for rank in measured["ranks"])
                goal = 1.1 * model_bytes / size
                rows.append({"mode": mode, "dp_shard": size, "model_bytes": model_bytes, "goal_bytes": int(goal),
                             "max_peak_added_bytes": peak, "peak_over_model_share": peak / (model_bytes / size),
                             "meets_goal": peak <= goal, "ranks": measured["ranks"]})  # fmt: skip
                print(f"{mode} dp_shard={size}: peak added per rank "
                      f"{[round(r['peak_added_bytes'] / 2**30, 3) for r in measured['ranks']]} GiB, "
                      f"model/N {model_bytes / size / 2**30:.3f} GiB, goal {goal / 2**30:.3f} GiB", flush=True)  # fmt: skip
    config = {"path": os.path.relpath(args.config, REPO), "overrides": overrides, "parameters": model_bytes // 4}
    figures = {"measure": "VmHWM - VmRSS at the start of build_training_state, per rank", "rows": rows,
               "all_meet_goal": all(row["meets_goal"] for row in rows)}  # fmt: skip
    print(f"results: {write_results('startup_memory', 'cpu', config, figures)}")


if __name__ == "__main__":
    main()
