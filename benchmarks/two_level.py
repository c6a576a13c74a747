"""Held-out bpb of the two-level BLT (configs/tiny_2level.yaml) against the one-level tiny BLT
(configs/tiny_static.yaml, the same model without model.blt.super_patch) at equal training FLOPs.

The one-level run trains --steps steps; the two-level run trains as many steps as the same training
FLOPs buy at its own FLOPs per byte (``bltdist.flops``, at the average patch length the one-level run
logged: both cut the same static patches). Both runs are real trainer runs on the embedded corpus
with the same seed, batch and schedule shape; each ends with a validation over --val-batches global
batches of the held-out split. Writes benchmarks/results/two_level-<device>-<date>.json.

    python benchmarks/two_level.py [--steps 100] [--seq-len 256] [--val-batches 8] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results import REPO, write_results

from bltdist.config import load_config
from bltdist.flops import training_flops_per_byte

CONFIGS = {"one_level": "configs/tiny_static.yaml", "two_level": "configs/tiny_2level.yaml"}


def train(config: str, steps: int, args: argparse.Namespace, out: Path) -> list[dict]:
    overrides = [f"--train.steps={steps}", f"--train.seq_len={args.seq_len}", f"--train.val_batches={args.val_batches}",
                 "--train.val_interval=0", f"--logging.interval={max(1, steps // 10)}", f"--output_dir={out}",
                 "--checkpoint.resume=null"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run([sys.executable, "-m", "bltdist.train", config, *overrides], check=False, capture_output=True,
                            text=True, cwd=REPO, env=env)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{config}: training failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict], steps: int, flops_per_byte: float, step_bytes: int) -> dict:
    train_lines = [r for r in records if "loss" in r]
    val = [r for r in records if "val_bpb" in r][-1]
    patch_lengths = [r["avg_patch_len"] for r in train_lines]
    return {
        "steps": steps,
        "train_flops_per_byte": flops_per_byte,
        "train_flops": flops_per_byte * step_bytes * steps,
        "final_train_bpb": train_lines[-1]["bpb"],
        "heldout_bpb": val["val_bpb"],
        "avg_patch_len": sum(patch_lengths) / len(patch_lengths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="steps of the one-level run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="where the runs go; default a temporary directory")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="two_level_"))
    one_cfg = load_config(CONFIGS["one_level"], [f"--train.seq_len={args.seq_len}"])
    two_cfg = load_config(CONFIGS["two_level"], [f"--train.seq_len={args.seq_len}"])
    step_bytes = one_cfg.train.global_batch_size * args.seq_len

    one_records = train(CONFIGS["one_level"], args.steps, args, work / "one_level")
    lengths = [r["avg_patch_len"] for r in one_records if "loss" in r]
    avg_patch_len = sum(lengths) / len(lengths)
    one_flops = training_flops_per_byte(one_cfg.model, args.seq_len, avg_patch_len)
    two_flops = training_flops_per_byte(two_cfg.model, args.seq_len, avg_patch_len)
    two_steps = round(args.steps * one_flops / two_flops)
    two_records = train(CONFIGS["two_level"], two_steps, args, work / "two_level")

    one = summary(one_records, args.steps, one_flops, step_bytes)
    two = summary(two_records, two_steps, two_flops, step_bytes)
    config = {"configs": CONFIGS, "seq_len": args.seq_len, "global_batch_size": one_cfg.train.global_batch_size,
              "val_batches": args.val_batches, "threads": args.threads, "data": "embedded corpus (Python stdlib)",
              "note": "CPU, shared and loaded machine; small runs: a trend, not a converged comparison"}  # fmt: skip
    figures = {"one_level": one, "two_level": two,
               "heldout_bpb_two_minus_one": two["heldout_bpb"] - one["heldout_bpb"]}  # fmt: skip
    path = write_results("two_level", "cpu", config, figures)
    print(json.dumps(figures))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
