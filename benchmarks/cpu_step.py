"""Forward+backward bytes/s of bltdist's BLT against transformers.BltForCausalLM, same shapes, same run.

Shapes (BLT_NOTES section 4): local dim 256 with 1 encoder and 4 decoder layers, global 512 x 6
layers, cross_attn_k 2, hash n-grams 3..8 with 500002 rows each, batch 4 x 1024 bytes, static
patches of 4 (BOS patch first). Both models get the same bytes and the same patch lengths; the
timed region is one forward, the byte cross-entropy and one backward, gradients dropped between
iterations.

The machine may be shared, so the two models alternate step by step (with an fp32 2048^3 matmul
between them, the yardstick of what these cores do) and every figure is a median over --iters
rounds: load that comes and goes hits both sides alike. Each round also runs both models with their
hash n-gram tables frozen: the dense gradient of those 3M x 256 rows (allocated and zero-filled every
step, identical work in both models) is then left out, which shows how much of a step it costs and
how fast the rest of the model runs (``*_without_hash_grad``). Model FLOP/s count by bltdist's formula
(``bltdist.flops``, 3 x forward) for both models, which compute the same function. Writes
benchmarks/results/cpu_step-<device>-<date>.json and prints ``ratio_vs_hf=X`` as its last line.
``--profile`` adds where one bltdist step spends its time (``profile``: self time per op, and each
matrix-product shape's GFLOP/s against the 2048^3 yardstick) and ``fraction_of_matmul_ceiling``: the
fraction the step would reach if it spent no time but its matrix products at the yardstick's speed,
torch's attention kernels and the hash gradient's zero-fill.

    python benchmarks/cpu_step.py [--iters 7] [--warmup 1] [--threads N] [--profile]
"""

from __future__ import annotations

import os

# The hash tables' dense gradient (6 x 500002 x 256 fp32, 3 GB) is allocated afresh every step on
# CPU (no caching allocator): on 4 KiB pages its first touch cost 1.8-4 s a step on this machine,
# on transparent huge pages 0.3-0.6 s. torch reads this when it first allocates a large block.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from results import write_results

from bltdist.config import BLTConfig
from bltdist.flops import blt_forward_flops_per_byte
from bltdist.model import BLT
from bltdist.patching import patch_lengths, patch_starts

SHAPE = dict(
    local_dim=256, local_heads=4, encoder_layers=1, decoder_layers=4, local_window=512,
    global_dim=512, global_heads=8, global_layers=6, cross_attn_k=2,
    hash_ngram_sizes=[3, 4, 5, 6, 7, 8], hash_functions=1, hash_vocab=500002,
    encoder_cross_attn_all_layers=False, decoder_cross_attn_all_layers=True,
)  # fmt: skip
BATCH, SEQ_LEN, PATCH_SIZE = 4, 1024, 4


def hf_model():
    from transformers import BltConfig, BltForCausalLM

    local = dict(hidden_size=SHAPE["local_dim"], num_attention_heads=SHAPE["local_heads"], cross_attn_k=2,
                 hidden_size_global=SHAPE["global_dim"], rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config = BltConfig(
        patch_in_forward=False,
        patching_mode="static",
        patch_size=PATCH_SIZE,
        local_attention_window_len=SHAPE["local_window"],
        cross_attn_k=2,
        encoder_hash_byte_group_size=SHAPE["hash_ngram_sizes"],
        encoder_hash_byte_group_vocab=SHAPE["hash_vocab"],
        encoder_hash_byte_group_nb_functions=1,
        encoder_config=dict(local, num_hidden_layers=SHAPE["encoder_layers"], cross_attn_all_layers=False,
                            intermediate_size=int(8 * SHAPE["local_dim"] / 3), sliding_window=SHAPE["local_window"]),
        decoder_config=dict(local, num_hidden_layers=SHAPE["decoder_layers"], cross_attn_all_layers=True,
                            intermediate_size=int(8 * SHAPE["local_dim"] / 3), sliding_window=SHAPE["local_window"]),
        global_config=dict(hidden_size=SHAPE["global_dim"], num_attention_heads=SHAPE["global_heads"],
                           num_hidden_layers=SHAPE["global_layers"], intermediate_size=int(8 * SHAPE["global_dim"] / 3),
                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        patcher_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2),
    )
    config._attn_implementation = "sdpa"
    return BltForCausalLM(config)


MATMUL_SIZE = 2048


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_seconds(steps: dict, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each step per round; every round runs each step once, in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for round_index in range(iters):
        for name, step in steps.items():
            times[name].append(seconds(step))
        print(f"round {round_index + 1}/{iters}: " + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()),
              file=sys.stderr, flush=True)  # fmt: skip
    return times


def matmul_step():
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE) for _ in range(2))
    return lambda: torch.mm(a, b)


def without_hash_grad(step, table: torch.nn.Parameter):
    """``step`` with the hash table frozen: the same forward, no table gradient."""

    def frozen_step():
        table.requires_grad_(False)
        try:
            step()
        finally:
            table.requires_grad_(True)

    return frozen_step


def profile_step(step) -> dict:
    """One profiled call of ``step``: self CPU ms of its costliest ops, and each matrix product's shape
    with its count, ms and GFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    products = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::bmm") or event.self_cpu_time_total == 0:
            continue
        a, b = event.input_shapes[:2]
        flops = 2 * math.prod(a) * b[-1] * event.count
        products.append({"shapes": [a, b], "count": event.count, "ms": event.self_cpu_time_total / 1e3,
                         "gflop": flops / 1e9, "gflops_per_sec": flops / event.self_cpu_time_total / 1e3})  # fmt: skip
    return {
        "step_ms": sum(e.self_cpu_time_total for e in ops) / 1e3,
        "self_ms_by_op": {e.key: e.self_cpu_time_total / 1e3 for e in ops[:12]},
        "matrix_product_gflop": sum(p["gflop"] for p in products),
        "matrix_product_ms": sum(p["ms"] for p in products),
        "attention_kernel_ms": sum(e.self_cpu_time_total for e in ops if "scaled_dot_product" in e.key) / 1e3,
        "matrix_products": sorted(products, key=lambda p: p["ms"], reverse=True)[:12],
    }


def fraction_ceiling(profile: dict, matmul: float, step_flops: float, table: torch.Tensor) -> dict:
    """The best fraction of the matmul this step could reach if every matrix product ran at the
    yardstick's speed and nothing took time but them, torch's attention kernels (as profiled) and
    zero-filling the hash tables' fresh dense gradient (timed here): a bound on what tuning the rest
    (norms, rotary, copies, the loss) can give."""
    zero_fill = statistics.median(seconds(lambda: torch.zeros(table.shape)) for _ in range(5))
    floor = profile["matrix_product_gflop"] / matmul + profile["attention_kernel_ms"] / 1e3 + zero_fill
    return {"hash_grad_zero_fill_seconds": zero_fill, "seconds_per_step_floor": floor,
            "fraction_of_matmul_ceiling": step_flops / floor / 1e9 / matmul}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="add one profiled bltdist step to the results")
    parser.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    tokens = torch.randint(4, 260, (BATCH, SEQ_LEN))
    tokens[:, 0] = 1
    targets = torch.randint(4, 260, (BATCH, SEQ_LEN))
    lengths = patch_lengths(patch_starts(tokens, "static", patch_size=PATCH_SIZE))

    ours = BLT(BLTConfig(**SHAPE))
    ours.init_weights()
    reference = hf_model()

    def our_step():
        logits = ours(tokens, lengths)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        ours.zero_grad(set_to_none=True)

    def hf_step():
        logits = reference(input_ids=tokens, patch_lengths=lengths, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        reference.zero_grad(set_to_none=True)

    load_before = os.getloadavg()[0]
    steps = {
        "bltdist": our_step,
        "bltdist_without_hash_grad": without_hash_grad(our_step, ours.encoder.hash_embedding.weight),
        "matmul": matmul_step(),
        "transformers": hf_step,
        "transformers_without_hash_grad": without_hash_grad(hf_step, reference.model.encoder_hash_tok_embedding.weight),
    }
    times = interleaved_seconds(steps, args.iters, args.warmup)
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(values) for name, values in times.items()}
    step_bytes = BATCH * SEQ_LEN
    avg_patch_len = step_bytes / int((lengths > 0).sum())
    step_flops = 3 * blt_forward_flops_per_byte(BLTConfig(**SHAPE), SEQ_LEN, avg_patch_len) * step_bytes
    matmul_gflops = 2 * MATMUL_SIZE**3 / medians["matmul"] / 1e9
    our_gflops = step_flops / medians["bltdist"] / 1e9
    import transformers

    config = {**asdict(BLTConfig(**SHAPE)), "batch": BATCH, "seq_len": SEQ_LEN, "patch_size": PATCH_SIZE,
              "iters": args.iters, "warmup": args.warmup, "schedule": "interleaved rounds, medians"}  # fmt: skip
    result = {
        "threads": torch.get_num_threads(),
        "thp_mem_alloc_enable": os.environ["THP_MEM_ALLOC_ENABLE"],
        # Other work on the machine slows both models and the matmul alike, but not exactly equally.
        "load_average_1min_before": load_before,
        "load_average_1min_after": load_after,
        "transformers": transformers.__version__,
        "seconds_per_step": medians["bltdist"],
        "hf_seconds_per_step": medians["transformers"],
        "bytes_per_sec": step_bytes / medians["bltdist"],
        "hf_bytes_per_sec": step_bytes / medians["transformers"],
        "ratio_vs_hf": medians["transformers"] / medians["bltdist"],
        "ratio_vs_hf_per_round_median": statistics.median(
            hf / ours for ours, hf in zip(times["bltdist"], times["transformers"])
        ),
        "avg_patch_len": avg_patch_len,
        "model_gflop_per_step": step_flops / 1e9,
        "model_gflops_per_sec": our_gflops,
        "hf_model_gflops_per_sec": step_flops / medians["transformers"] / 1e9,
        "matmul_fp32_2048_gflops_per_sec": matmul_gflops,
        "fraction_of_matmul": our_gflops / matmul_gflops,
        "seconds_per_step_without_hash_grad": medians["bltdist_without_hash_grad"],
        "hf_seconds_per_step_without_hash_grad": medians["transformers_without_hash_grad"],
        "ratio_vs_hf_without_hash_grad": medians["transformers_without_hash_grad"] / medians["bltdist_without_hash_grad"],
        "fraction_of_matmul_without_hash_grad": step_flops / medians["bltdist_without_hash_grad"] / 1e9 / matmul_gflops,
        "seconds_per_round": times,
    }
    if args.profile:
        result["profile"] = profile_step(our_step)
        table = ours.encoder.hash_embedding.weight
        result.update(fraction_ceiling(result["profile"], matmul_gflops, step_flops, table))
    out = write_results("cpu_step", "cpu", config, result, out=args.out)
    print(f"bltdist: {result['bytes_per_sec']:.0f} bytes/s ({medians['bltdist']:.3f} s/step), "
          f"{our_gflops:.1f} GFLOP/s = {result['fraction_of_matmul']:.0%} of the fp32 matmul's "
          f"{matmul_gflops:.1f}", file=sys.stderr)  # fmt: skip
    print(f"transformers: {result['hf_bytes_per_sec']:.0f} bytes/s ({medians['transformers']:.3f} s/step)",
          file=sys.stderr)  # fmt: skip
    print(f"hash tables frozen: bltdist {medians['bltdist_without_hash_grad']:.3f} s/step "
          f"({result['fraction_of_matmul_without_hash_grad']:.0%} of the matmul), transformers "
          f"{medians['transformers_without_hash_grad']:.3f} s/step, ratio {result['ratio_vs_hf_without_hash_grad']:.2f}",
          file=sys.stderr)  # fmt: skip
    if args.profile:
        print(f"ceiling: {result['fraction_of_matmul_ceiling']:.0%} of the matmul with every matrix product at its speed "
              f"and no time but theirs, the attention kernels' and the hash gradient's zero-fill "
              f"({result['seconds_per_step_floor']:.3f} s/step)", file=sys.stderr)  # fmt: skip
    print(f"results: {out}", file=sys.stderr)
    print(f"ratio_vs_hf={result['ratio_vs_hf']:.2f}")


if __name__ == "__main__":
    main()
