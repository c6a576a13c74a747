"""Frozen against jointly trained entropy models on the tiny config: patch-length drift, held-out bpb,
and bpb on noised text.

Trains the tiny entropy model (configs/entropy_tiny.yaml, --entropy-steps steps), calibrates a
threshold for --target-patch-size bytes (``python -m bltdist.patch calibrate``), then trains the tiny
BLT (configs/tiny.yaml) three times from the same seed and threshold:

- ``frozen``: the entropy model as trained (patching.entropy_model_training: frozen);
- ``joint``: the entropy model trains alongside the BLT (joint, patching.entropy_lr), the threshold fixed;
- ``joint_target``: joint, with patching.target_patch_size holding the average patch length.

Per run: the average patch length of every logged interval (its drift: last minus first), the
held-out val_bpb at the end, and bpb on an evaluation set (this repository's Python sources, not in
the training corpus) clean and noised by each kind of ``bltdist.evaluate`` (eval.sets, at
eval.noise_rate). Writes benchmarks/results/entropy_joint-<device>-<date>.json.

    python benchmarks/entropy_joint.py [--steps 150] [--entropy-steps 100] [--seq-len 256] [--work-dir DIR]
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

RUNS = {
    "frozen": [],
    "joint": ["--patching.entropy_model_training=joint"],
    "joint_target": ["--patching.entropy_model_training=joint", "--patching.recalibrate_interval=10"],
}
EVAL_SET = "src/bltdist"


def run(module: str, args: list[str], threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-m", module, *args], check=False, capture_output=True, text=True,
                            cwd=REPO, env=env)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def train_blt(name: str, entropy_model: Path, threshold: float, args: argparse.Namespace, out: Path) -> list[dict]:
    extra = list(RUNS[name])
    if name == "joint_target":
        extra.append(f"--patching.target_patch_size={args.target_patch_size}")
    run("bltdist.train", [
        "configs/tiny.yaml", f"--patching.entropy_model={entropy_model}", f"--patching.threshold={threshold}",
        f"--patching.entropy_lr={args.entropy_lr}", f"--train.steps={args.steps}", f"--train.seq_len={args.seq_len}",
        "--train.val_interval=0", f"--train.val_batches={args.val_batches}", f"--logging.interval={args.log_interval}",
        f"--eval.sets=[{{name: code, path: {EVAL_SET}}}]", f"--eval.batches={args.val_batches}",
        f"--output_dir={out}", "--checkpoint.resume=null", *extra,
    ], args.threads)  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def figures_of(records: list[dict]) -> dict:
    lines = [r for r in records if "loss" in r]
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    lengths = [(r["step"], r["avg_patch_len"]) for r in lines]
    figures = {
        "avg_patch_len_by_step": lengths,
        "patch_len_drift": lengths[-1][1] - lengths[0][1],
        "heldout_bpb": [r for r in records if "val_bpb" in r][-1]["val_bpb"],
        "eval_bpb": {key.removeprefix("eval/code/"): value for key, value in evals[-1].items() if key != "step"},
        "final_train_bpb": lines[-1]["bpb"],
    }
    if "entropy_loss" in lines[0]:
        figures["entropy_loss_first_last"] = [lines[0]["entropy_loss"], lines[-1]["entropy_loss"]]
    if "patch_threshold" in lines[0]:
        figures["patch_threshold_first_last"] = [lines[0]["patch_threshold"], lines[-1]["patch_threshold"]]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="BLT steps per run")
    parser.add_argument("--entropy-steps", type=int, default=100, help="steps of the entropy model before the BLT")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--target-patch-size", type=float, default=4.5)
    parser.add_argument("--entropy-lr", type=float, default=5e-4)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="where the runs go; default a temporary directory")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="entropy_joint_"))

    entropy_model = work / "entropy" / "model"
    if not (entropy_model / "model.safetensors").is_file():  # a --work-dir of an earlier run keeps its entropy model
        run("bltdist.train", ["configs/entropy_tiny.yaml", f"--train.steps={args.entropy_steps}",
                              "--train.val_interval=0", f"--output_dir={work / 'entropy'}", "--checkpoint.resume=null"],
            args.threads)  # fmt: skip
    calibrated = run("bltdist.patch", ["calibrate", f"--entropy-model={entropy_model}",
                                       f"--target-patch-size={args.target_patch_size}", f"--seq-len={args.seq_len}",
                                       "--max-patch-length=16", "--sample-bytes=200000"], args.threads)  # fmt: skip
    threshold = json.loads(calibrated.strip().splitlines()[-1])["threshold"]

    results = {name: figures_of(train_blt(name, entropy_model, threshold, args, work / name)) for name in RUNS}
    config = {"blt": "configs/tiny.yaml", "entropy_model": "configs/entropy_tiny.yaml", "steps": args.steps,
              "entropy_steps": args.entropy_steps, "seq_len": args.seq_len, "calibrated_threshold": threshold,
              "target_patch_size": args.target_patch_size, "entropy_lr": args.entropy_lr, "eval_set": EVAL_SET,
              "noise_rate": "eval.noise_rate default", "threads": args.threads,
              "note": "CPU, shared and loaded machine; short runs: a trend, not a converged comparison"}  # fmt: skip
    path = write_results("entropy_joint", "cpu", config, results)
    print(json.dumps({name: {k: v for k, v in figures.items() if k != "avg_patch_len_by_step"}
                      for name, figures in results.items()}))  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()
