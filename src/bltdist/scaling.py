"""FLOP-controlled comparison of BLT against its baselines: ``python -m bltdist.scaling --budget FLOPS
[--data PATH] [--out DIR] [--nproc N]``.

The paper's method (BLT section 3 / 6.1): every model trains on the same bytes (same data, rows,
held-out split, global batch, seq_len and steps) and spends the same training FLOPs per byte, so the
same total FLOPs. The BPE transformer of ``--dim`` x ``--layers`` is the reference: its tokenizer is
trained first, its bytes per token measured on training rows, and its training FLOPs per byte F
(``bltdist.flops``) fix everyone's. Every other model gets the shape of its family whose FLOPs per
byte come closest to F: the byte LM its width and depth; BLT at patch size p its global width and
depth, with small fixed local models (``--local-dim``; their per-byte cost is paid at any p, the
global model's divides by p, so larger patches buy a larger global model). Among shapes within 5% of
F the one closest to the reference's width/depth ratio wins. Steps = budget / (F x bytes per step).

Entropy patching needs an entropy model: the tool trains a small one (``--entropy-dim``, same
steps and data; its FLOPs are reported, not charged to the budget, as in the paper) and calibrates
the threshold for each target average patch length (``python -m bltdist.patch calibrate``). Each
entropy-patched BLT starts from that threshold and holds its target (``patching.target_patch_size``,
recalibrated RECALIBRATIONS times per run from the training batches): a small entropy model's
entropies vary little, so a fixed threshold calibrated on one sample misses the target on another.
``--no-entropy`` leaves those models out. Runs live in OUT/runs/<model> (``--jobs`` at a time); a
model whose run has a summary.json is not trained again, a calibrated threshold not calibrated again.
Results: OUT/scaling.json, scaling.md and scaling.png
(held-out bits per byte against training FLOPs, every validation of every run).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bltdist.config import load_config
from bltdist.data import PackedByteLoader, build_sources
from bltdist.errors import UserError
from bltdist.flops import training_flops_per_byte
from bltdist.tokenizer import BPETokenizer, prepare_run_tokenizer
from bltdist.training.parallelize import meta_model

PROGRAM = "bltdist-scaling"
MATCH_TOLERANCE = 0.05  # shapes within this share of the target FLOPs per byte count as matched
WIDTH_STEP = 16  # widths searched: multiples of this; heads of 32 channels where they fit, else of 16
RECALIBRATIONS = 20  # times an entropy-patched BLT recalibrates its threshold to its target patch size per run


def heads_for(dim: int) -> int:
    return dim // 32 if dim % 32 == 0 else max(1, dim // 16)


@dataclass
class Model:
    """One model of the study: its name, the trainer overrides that make it, and what it planned."""

    name: str
    overrides: list[str]
    planned_flops_per_byte: float = 0.0
    patch_size: float | None = None  # bytes per patch (BLT) or per token (the BPE LM) the plan assumed
    notes: dict = field(default_factory=dict)


def plain_lm_shape(dim: int, layers: int, window: int | None) -> list[str]:
    return [f"--model.entropy.dim={dim}", f"--model.entropy.layers={layers}",
            f"--model.entropy.heads={heads_for(dim)}", "--model.entropy.ffn_dim=null",
            f"--model.entropy.window={'null' if window is None else window}"]  # fmt: skip


def blt_shape(args: argparse.Namespace, global_dim: int, global_layers: int) -> list[str]:
    local_heads = heads_for(args.local_dim)
    return [f"--model.blt.local_dim={args.local_dim}", f"--model.blt.local_heads={local_heads}",
            "--model.blt.encoder_layers=1", "--model.blt.decoder_layers=2", "--model.blt.encoder_ffn_dim=null",
            "--model.blt.decoder_ffn_dim=null", f"--model.blt.local_window={args.seq_len}",
            f"--model.blt.global_dim={global_dim}", f"--model.blt.global_layers={global_layers}",
            f"--model.blt.global_heads={heads_for(global_dim)}", "--model.blt.global_ffn_dim=null",
            "--model.blt.cross_attn_k=2", "--model.blt.hash_ngram_sizes=[3,4,5,6]",
            "--model.blt.hash_vocab=4096"]  # fmt: skip


def flops_per_byte(overrides: list[str], seq_len: int, patch_size: float) -> float:
    return training_flops_per_byte(load_config(None, overrides).model, seq_len, patch_size)


def closest_shape(target: float, ratio: float, max_dim: int, max_layers: int, cost) -> tuple[int, int, float]:
    """(width, depth, FLOPs per byte) of the shape whose ``cost(width, depth)`` is closest to ``target``;
    among those within MATCH_TOLERANCE, the one whose width / depth is closest to ``ratio``."""
    candidates = [(dim, layers, cost(dim, layers)) for dim in range(WIDTH_STEP, max_dim + 1, WIDTH_STEP)
                  for layers in range(1, max_layers + 1)]  # fmt: skip
    matched = [c for c in candidates if abs(c[2] / target - 1) <= MATCH_TOLERANCE]
    if matched:
        return min(matched, key=lambda c: (abs(math.log(c[0] / c[1] / ratio)), abs(c[2] / target - 1)))
    return min(candidates, key=lambda c: abs(math.log(c[2] / target)))


def reference_model(args: argparse.Namespace) -> Model:
    """The BPE transformer of --dim x --layers, whose training FLOPs per byte every other model matches."""
    overrides = [*common_overrides(args), "--model.arch=tokenlm", *plain_lm_shape(args.dim, args.layers, None),
                 f"--model.tokenlm.vocab_size={args.vocab_size}"]  # fmt: skip
    bytes_per_token = bpe_bytes_per_token(args, overrides)
    return Model("bpe_lm", overrides, flops_per_byte(overrides, args.seq_len, bytes_per_token), bytes_per_token)


def plan_models(args: argparse.Namespace, reference: Model, entropy: dict[float, float]) -> list[Model]:
    """Every model of the study with its shape, FLOP-matched to the BPE reference."""
    base, target = common_overrides(args), reference.planned_flops_per_byte
    ratio, max_dim, max_layers = args.dim / args.layers, 4 * args.dim, 4 * args.layers + 4

    def byte_cost(dim, layers):
        shape = plain_lm_shape(dim, layers, args.seq_len)
        return flops_per_byte([*base, "--model.arch=bytelm", *shape], args.seq_len, 1.0)

    dim, layers, cost = closest_shape(target, ratio, max_dim, max_layers, byte_cost)
    models = [reference, Model("byte_lm", [*base, "--model.arch=bytelm", *plain_lm_shape(dim, layers, args.seq_len)],
                               cost)]  # fmt: skip
    patchings = [(f"blt_static_{size}", size, [f"--patching.patch_size={size}"]) for size in (4, 6)]
    patchings += [(f"blt_entropy_{size:g}", size, [
        "--patching.mode=entropy", f"--patching.entropy_model={args.out / 'runs' / 'entropy_model' / 'model'}",
        f"--patching.threshold={threshold!r}", "--patching.threshold_mode=global",
        f"--patching.max_patch_length={args.max_patch_length}", f"--patching.target_patch_size={size}",
        f"--patching.recalibrate_interval={max(1, args.steps // RECALIBRATIONS)}"])
        for size, threshold in entropy.items()]  # fmt: skip
    for name, size, patching in patchings:
        def blt_cost(dim, layers, size=size, patching=patching):
            return flops_per_byte([*base, *blt_shape(args, dim, layers), *patching], args.seq_len, size)

        dim, layers, cost = closest_shape(target, ratio, max_dim, max_layers, blt_cost)
        models.append(Model(name, [*base, "--model.arch=blt", *blt_shape(args, dim, layers), *patching], cost, size))
    for model in models:
        parameters = meta_model(load_config(None, model.overrides).model).parameters()
        model.notes["parameters"] = sum(p.numel() for p in parameters)
    return models


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Data, batch and schedule shared by every run (the steps follow from the budget)."""
    data = [f"--data.path={args.data}"] if args.data else []
    return [*data, f"--train.seq_len={args.seq_len}", f"--train.global_batch_size={args.batch}",
            f"--train.micro_batch_size={args.batch // args.nproc}", f"--train.val_batches={args.val_batches}",
            f"--optim.lr={args.lr}", "--optim.schedule=cosine", f"--train.seed={args.seed}",
            "--checkpoint.interval=0", "--checkpoint.keep_last=1"]  # fmt: skip


def run_trainer(args: argparse.Namespace, name: str, overrides: list[str]) -> Path:
    """Trains one model in OUT/runs/<name> (skipped when that run finished before); returns the run dir."""
    out = args.out / "runs" / name
    if (out / "summary.json").is_file():
        print(f"{PROGRAM}: {name}: finished before, kept ({out})", flush=True)
        return out
    launcher = [sys.executable, "-m", "bltdist.train"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                    "-m", "bltdist.train"]  # fmt: skip
    interval = max(1, args.steps // 4)
    command = [*launcher, *overrides, f"--output_dir={out}", f"--train.steps={args.steps}",
               f"--train.val_interval={interval}", f"--logging.interval={max(1, args.steps // 10)}",
               f"--optim.warmup_steps={max(1, args.steps // 10)}"]  # fmt: skip
    print(f"{PROGRAM}: training {name} ({args.steps} steps) in {out}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"{name}: the trainer failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")
    return out


def bpe_bytes_per_token(args: argparse.Namespace, overrides: list[str]) -> float:
    """Trains (or keeps) the BPE reference's tokenizer in its run directory and measures its bytes per
    token on training rows, encoded as the trainer encodes them."""
    cfg = load_config(None, [*overrides, f"--output_dir={args.out / 'runs' / 'bpe_lm'}"])
    train_sources, _ = build_sources(cfg.data)
    tokenizer = BPETokenizer.from_file(prepare_run_tokenizer(cfg, train_sources))
    loader = PackedByteLoader(train_sources, args.seq_len, args.batch, 0, 1, args.seed)
    byte_count, token_count = 0, 0
    for _ in range(8):
        inputs, targets = loader.next_batch()
        byte_count, token_count = byte_count + targets.numel(), token_count + tokenizer.encode_rows(inputs, targets)[2]
    return byte_count / token_count


def entropy_thresholds(args: argparse.Namespace) -> dict[float, float]:
    """Trains the entropy model and calibrates a global threshold per target patch size."""
    if args.no_entropy:
        return {}
    overrides = [*common_overrides(args), "--model.arch=entropy",
                 *plain_lm_shape(args.entropy_dim, args.entropy_layers, args.seq_len)]  # fmt: skip
    model_dir = run_trainer(args, "entropy_model", overrides) / "model"
    thresholds = {}
    for size in args.entropy_patch_sizes:
        calibration = model_dir.parent / f"calibration_{size:g}.json"  # kept: calling the tool again reuses it
        if calibration.is_file():
            thresholds[size] = json.loads(calibration.read_text())["threshold"]
            continue
        command = [sys.executable, "-m", "bltdist.patch", "calibrate", "--entropy-model", str(model_dir),
                   "--target-patch-size", str(size), "--seq-len", str(args.seq_len),
                   "--max-patch-length", str(args.max_patch_length),
                   "--sample-bytes", str(args.calibration_bytes)]  # fmt: skip
        if args.data:
            command += ["--data", args.data]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise UserError(f"calibrating the entropy threshold for {size} bytes failed:\n{result.stderr[-3000:]}")
        calibration.write_text(result.stdout.strip().splitlines()[-1] + "\n")
        thresholds[size] = json.loads(calibration.read_text())["threshold"]
    return thresholds


def run_result(model: Model, run: Path, args: argparse.Namespace, target: float) -> dict:
    """What a finished run measured: FLOPs spent, bytes per patch, and held-out bpb at every validation."""
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_bytes = args.batch * args.seq_len
    per_byte = summary["train_flops_per_byte"]
    curve = {line["step"]: line["val_bpb"] for line in lines if "val_bpb" in line}  # a repeated step: the later
    patch_lengths = [line["avg_patch_len"] for line in lines if line.get("avg_patch_len") is not None]
    shape = {key.removeprefix("--model."): value for key, _, value in (o.partition("=") for o in model.overrides)
             if key.endswith((".dim", ".layers", ".global_dim", ".global_layers", ".local_dim"))}  # fmt: skip
    return {
        "name": model.name,
        "arch": load_config(str(run / "config.yaml"), []).model.arch,
        "shape": shape,
        "parameters": model.notes["parameters"],
        "planned_patch_size": model.patch_size,
        "measured_patch_size": sum(patch_lengths) / len(patch_lengths) if patch_lengths else None,
        "planned_train_flops_per_byte": model.planned_flops_per_byte,
        "flops_matched": abs(model.planned_flops_per_byte / target - 1) <= MATCH_TOLERANCE,
        "train_flops_per_byte": per_byte,
        "train_flops": summary["train_flops"],
        "train_bytes": summary["train_bytes"],
        "final_val_bpb": curve[max(curve)],
        "curve": [
            {"step": step, "train_flops": per_byte * step * step_bytes, "val_bpb": bpb}
            for step, bpb in sorted(curve.items())
        ],
        "run": str(run),
    }


def markdown_table(report: dict) -> str:
    lines = [
        f"# Held-out bits per byte at {report['config']['budget']:.3g} training FLOPs per model",
        "",
        (
            f"Data: {report['config']['data'] or 'embedded corpus'}; {report['config']['steps']} steps of "
            f"{report['config']['batch']} x {report['config']['seq_len']} bytes for every model; FLOPs per byte "
            f"matched to the BPE LM ({report['target_train_flops_per_byte']:.4g}, {report['bpe_bytes_per_token']:.3f} "
            f"bytes per token). Best: **{report['winner']}**."
        ),
        "",
        (
            "| model | shape | params | bytes/patch (plan, measured) | FLOPs/byte (plan, measured) | train FLOPs | "
            "held-out bpb |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for result in report["models"]:
        shape = ", ".join(f"{key.rpartition('.')[2]}={value}" for key, value in result["shape"].items())
        planned, measured = result["planned_patch_size"], result["measured_patch_size"]
        patch = "-" if planned is None else f"{planned:.3g}, {measured:.2f}"
        lines.append(
            f"| {result['name']} | {shape} | {result['parameters'] / 1e6:.2f}M | {patch} | "
            f"{result['planned_train_flops_per_byte']:.3g}, {result['train_flops_per_byte']:.3g} | "
            f"{result['train_flops']:.3g} | {result['final_val_bpb']:.4f} |"
        )
    unmatched = [r["name"] for r in report["models"] if not r["flops_matched"]]
    if unmatched:
        note = (f"No shape of {', '.join(unmatched)} came within {MATCH_TOLERANCE:.0%} of the target FLOPs per byte "
                "(the closest was trained): widen the reference (--dim, --layers) or lower --local-dim.")  # fmt: skip
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in report["models"]:
        points = [point for point in result["curve"] if point["train_flops"] > 0]
        axes.plot([p["train_flops"] for p in points], [p["val_bpb"] for p in points], marker="o", label=result["name"])
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("held-out bits per byte")
    axes.set_title(f"FLOP-matched models, budget {report['config']['budget']:.3g} FLOPs ({report['device']})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parent)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "commit": commit.stdout.strip() or None if commit.returncode == 0 else None}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """The whole study: tokenizer and reference, steps from the budget, entropy model, every run, the report."""
    args.out.mkdir(parents=True, exist_ok=True)
    reference = reference_model(args)
    step_bytes = args.batch * args.seq_len
    args.steps = max(1, round(args.budget / (reference.planned_flops_per_byte * step_bytes)))
    print(f"{PROGRAM}: {reference.planned_flops_per_byte:.4g} training FLOPs per byte for every model "
          f"(BPE LM at {reference.patch_size:.3f} bytes per token): {args.steps} steps", flush=True)  # fmt: skip
    thresholds = entropy_thresholds(args)
    models = plan_models(args, reference, thresholds)
    target = reference.planned_flops_per_byte
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own process; threads only wait for them
        runs = list(pool.map(lambda model: run_trainer(args, model.name, model.overrides), models))
    results = [run_result(model, run, args, target) for model, run in zip(models, runs)]
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    report = {"benchmark": "scaling", **versions(), "config": config,
              "target_train_flops_per_byte": reference.planned_flops_per_byte,
              "bpe_bytes_per_token": reference.patch_size, "entropy_thresholds": thresholds,
              "models": results, "winner": min(results, key=lambda r: r["final_val_bpb"])["name"]}  # fmt: skip
    if thresholds:
        report["entropy_model"] = json.loads((args.out / "runs" / "entropy_model" / "summary.json").read_text())[
            "train_flops"]  # trained FLOPs of the entropy model, not charged to the budget
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scaling.md").write_text(markdown_table(report))
    plot(report, args.out / "scaling.png")
    print(markdown_table(report), flush=True)
    print(f"{PROGRAM}: written {args.out / 'scaling.json'}, scaling.md, scaling.png", flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs of every model")
    parser.add_argument("--data", default=None, help="as data.path; omitted = the embedded corpus")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"), help="output directory")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) when above 1")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (CPU; one per GPU set)")
    parser.add_argument("--seq-len", type=int, default=512, help="bytes per row (train.seq_len)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (train.global_batch_size)")
    parser.add_argument("--dim", type=int, default=128, help="width of the BPE reference")
    parser.add_argument("--layers", type=int, default=2, help="depth of the BPE reference")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (model.tokenlm.vocab_size)")
    parser.add_argument("--local-dim", type=int, default=32, help="width of BLT's local encoder and decoder")
    parser.add_argument("--entropy-dim", type=int, default=64, help="width of the entropy model")
    parser.add_argument("--entropy-layers", type=int, default=2, help="depth of the entropy model")
    parser.add_argument("--entropy-patch-sizes", type=float, nargs="+", default=[4.5, 6.0],
                        help="average patch lengths of the entropy-patched BLTs")  # fmt: skip
    parser.add_argument("--max-patch-length", type=int, default=16, help="as patching.max_patch_length (entropy)")
    parser.add_argument("--calibration-bytes", type=int, default=200_000, help="bytes the thresholds are calibrated on")
    parser.add_argument("--no-entropy", action="store_true", help="leave out the entropy model and its BLTs")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every run")
    parser.add_argument("--val-batches", type=int, default=4, help="held-out global batches per validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.budget <= 0 or args.nproc < 1 or args.jobs < 1 or args.batch % args.nproc:
            raise UserError("--budget must be > 0, --nproc and --jobs >= 1 and --batch a multiple of --nproc "
                            f"(got {args.budget:g}, {args.nproc}, {args.jobs}, {args.batch})")  # fmt: skip
        run(args)
    except UserError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
