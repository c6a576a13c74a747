"""Forward+backward time of the Triton kernels against the eager PyTorch reference and, for
cross-attention, against compiled FlexAttention, with a correctness check in the same run.

Shapes of the 1B model: local dim 1024, 16 heads (head dim 64), k = 2 slots per patch, hash
n-grams 3..8 with one function and 500002 rows each (fp32 table), one sequence of 8k, 16k and
24k bytes cut into patches of 1 to 8 bytes (4.5 on average) after a 1-byte BOS patch.
Cross-attention runs in bf16; the reference of the correctness check runs in fp32 on the same
inputs (bf16 kernels within 1e-2 relative of it, fp32 within 1e-5). FlexAttention gets its block
mask built outside the timed region, as a model would build it once per batch for all layers.

    python benchmarks/kernels.py [--seq-lens 8192 16384 24576] [--iters 20] [--warmup 5]
    python benchmarks/kernels.py --interpret-check   # CPU: correctness on small shapes only

On CUDA it writes benchmarks/results/kernels-<device>-<date>.json and .md. Without CUDA it
exits with status 2 and writes nothing: interpreter timings say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys

import torch
from results import RESULTS_DIR, write_results

FULL_SHAPE = dict(dim=1024, heads=16, slots=2, ngram_sizes=[3, 4, 5, 6, 7, 8], hash_functions=1,
                  hash_vocab=500002, max_patch=8)  # fmt: skip
CHECK_SHAPE = dict(dim=64, heads=4, slots=2, ngram_sizes=[3, 4, 5, 6, 7, 8], hash_functions=1,
                   hash_vocab=1009, max_patch=8)  # fmt: skip
CHECK_SEQ_LEN = 100
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 24576])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--interpret-check", action="store_true",
                        help="check correctness on small shapes under TRITON_INTERPRET=1 (CPU); no timings")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args()


def random_layout(seq_len: int, max_patch: int, generator: torch.Generator, device: str):
    """Tokens (1, T) with BOS first and patch lengths (1, P): BOS alone, then 1..max_patch bytes."""
    from bltdist.model import PatchLayout

    tokens = torch.randint(4, 260, (1, seq_len), generator=generator)
    tokens[0, 0] = 1
    lengths = [1]
    while sum(lengths) < seq_len:
        lengths.append(min(int(torch.randint(1, max_patch + 1, (1,), generator=generator)), seq_len - sum(lengths)))
    lengths = torch.tensor([lengths])
    tokens, lengths = tokens.to(device), lengths.to(device)
    return tokens, lengths, PatchLayout.build(tokens, lengths, None, "sdpa")


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def forward_backward(fn, inputs, grad_out):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad_out)
    return out, grads


def errors_against(reference_fn, candidate_fn, inputs, grad_out) -> float:
    """Largest relative error of output and input gradients, reference in fp32 on the same inputs."""
    upcast = [x.detach().float().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in inputs]
    expected = forward_backward(reference_fn, upcast, grad_out.float())
    actual = forward_backward(candidate_fn, inputs, grad_out)
    pairs = [(actual[0], expected[0]), *zip(actual[1], expected[1])]
    return max(max_relative_error(a, e) for a, e in pairs)


def cuda_ms(fn, inputs, grad_out, iters: int, warmup: int) -> float:
    """Median milliseconds of one forward+backward."""
    for _ in range(warmup):
        forward_backward(fn, inputs, grad_out)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(fn, inputs, grad_out)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def flex_cross_attention(layout, slots: int, batch: int, device: str):
    """Both directions as FlexAttention over (slots x bytes) with a block-sparse mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    patch_ids, source_patch = layout.patch_ids, layout.source_patch
    num_slots, seq_len = layout.num_patches * slots, patch_ids.shape[1]
    pool_mask = create_block_mask(lambda b, h, q, kv: patch_ids[b, kv] == q // slots,
                                  batch, None, num_slots, seq_len, device=device)  # fmt: skip
    unpool_mask = create_block_mask(lambda b, h, q, kv: source_patch[b, q] == kv // slots,
                                    batch, None, seq_len, num_slots, device=device)  # fmt: skip

    def pool(slot_q, byte_k, byte_v):
        out = compiled(slot_q.flatten(1, 2).transpose(1, 2), byte_k.transpose(1, 2), byte_v.transpose(1, 2),
                       block_mask=pool_mask)  # fmt: skip
        return out.transpose(1, 2).unflatten(1, (layout.num_patches, slots))

    def unpool(byte_q, slot_k, slot_v):
        out = compiled(byte_q.transpose(1, 2), slot_k.flatten(1, 2).transpose(1, 2),
                       slot_v.flatten(1, 2).transpose(1, 2), block_mask=unpool_mask)  # fmt: skip
        return out.transpose(1, 2)

    return pool, unpool


def run_case(seq_len: int, shape: dict, args, device: str, timed: bool) -> dict:
    from bltdist.kernels import cross_attention, hash_embedding

    from bltdist.model import attention
    from bltdist.model.hash_embedding import HashNgramEmbedding

    generator = torch.Generator().manual_seed(seq_len)
    tokens, _, layout = random_layout(seq_len, shape["max_patch"], generator, device)
    dim, heads, slots = shape["dim"], shape["heads"], shape["slots"]
    head_dim, num_patches = dim // heads, layout.num_patches
    result = {"seq_len": seq_len, "patches": num_patches, "avg_patch_length": seq_len / num_patches}

    def randn(*size, dtype=torch.bfloat16, requires_grad=True):
        return torch.randn(size, generator=generator).to(device, dtype).requires_grad_(requires_grad)

    # Hash n-gram embedding, fp32 table as in training (parameters stay fp32 under autocast).
    reference_hash = HashNgramEmbedding(shape["ngram_sizes"], shape["hash_functions"], shape["hash_vocab"], dim,
                                        kernels="torch")  # fmt: skip
    table = randn(*reference_hash.weight.shape, dtype=torch.float32)
    hash_args = (shape["ngram_sizes"], shape["hash_functions"], shape["hash_vocab"])

    def eager_hash(tokens, weight):
        return torch.nn.functional.embedding_bag(
            reference_hash.table_rows(tokens).flatten(0, 1), weight, mode="sum"
        ).unflatten(0, tokens.shape)

    def fused_hash(mode):
        return lambda tokens, weight: hash_embedding.hash_ngram_embedding(tokens, weight, *hash_args, mode)

    grad_hash = randn(1, seq_len, dim, dtype=torch.float32, requires_grad=False)
    hash_result = {}
    for mode in hash_embedding.BACKWARD_MODES:
        hash_result[f"{mode}_max_rel_error"] = errors_against(eager_hash, fused_hash(mode), (tokens, table), grad_hash)
    if timed:
        hash_result["eager_ms"] = cuda_ms(eager_hash, (tokens, table), grad_hash, args.iters, args.warmup)
        for mode in hash_embedding.BACKWARD_MODES:
            hash_result[f"{mode}_ms"] = cuda_ms(fused_hash(mode), (tokens, table), grad_hash, args.iters, args.warmup)
            hash_result[f"{mode}_speedup"] = hash_result["eager_ms"] / hash_result[f"{mode}_ms"]
        hash_result["speedup"] = max(hash_result[f"{m}_speedup"] for m in hash_embedding.BACKWARD_MODES)
    result["hash_embedding"] = hash_result
    del table

    patch_ids, source_patch = layout.patch_ids, layout.source_patch
    pool_inputs = (randn(1, num_patches, slots, heads, head_dim), randn(1, seq_len, heads, head_dim),
                   randn(1, seq_len, heads, head_dim))  # fmt: skip
    unpool_inputs = (randn(1, seq_len, heads, head_dim), randn(1, num_patches, slots, heads, head_dim),
                     randn(1, num_patches, slots, heads, head_dim))  # fmt: skip
    pool_grad = randn(1, num_patches, slots, heads, head_dim, requires_grad=False)
    unpool_grad = randn(1, seq_len, heads, head_dim, requires_grad=False)
    directions = {
        "patch_pool_attention": (attention.patch_pool_attention, cross_attention.patch_pool_attention,
                                 patch_ids, pool_inputs, pool_grad),
        "byte_to_slot_attention": (attention.byte_to_slot_attention, cross_attention.byte_to_slot_attention,
                                   source_patch, unpool_inputs, unpool_grad),
    }  # fmt: skip
    flex = dict(zip(directions, flex_cross_attention(layout, slots, 1, device))) if timed else {}
    for name, (reference_fn, kernel_fn, index, inputs, grad_out) in directions.items():
        eager = lambda *x, fn=reference_fn, index=index: fn(*x, index)  # noqa: E731
        fused = lambda *x, fn=kernel_fn, index=index: fn(*x, index)  # noqa: E731
        direction = {"triton_max_rel_error": errors_against(eager, fused, inputs, grad_out)}
        if timed:
            direction["flex_max_rel_error"] = errors_against(eager, flex[name], inputs, grad_out)
            direction["eager_ms"] = cuda_ms(eager, inputs, grad_out, args.iters, args.warmup)
            direction["flex_ms"] = cuda_ms(flex[name], inputs, grad_out, args.iters, args.warmup)
            direction["triton_ms"] = cuda_ms(fused, inputs, grad_out, args.iters, args.warmup)
            direction["speedup_vs_eager"] = direction["eager_ms"] / direction["triton_ms"]
            direction["speedup_vs_flex"] = direction["flex_ms"] / direction["triton_ms"]
        result[name] = direction
    return result


def failures(cases: list[dict]) -> list[str]:
    """Every error above its tolerance (the hash table is fp32, cross-attention bf16)."""
    found = []
    for case in cases:
        for op, figures in case.items():
            if not isinstance(figures, dict):
                continue
            limit = TOLERANCE[torch.float32 if op == "hash_embedding" else torch.bfloat16]
            for key, value in figures.items():
                if key.endswith("max_rel_error") and not key.startswith("flex") and value > limit:
                    found.append(f"seq_len {case['seq_len']} {op} {key} = {value:.2e} > {limit}")
    return found


def markdown(result: dict) -> str:
    lines = [
        f"# Kernel benchmark on {result['device']} ({result['date']}, commit {result['commit']})",
        "",
        "Forward+backward, median ms. Hash: fp32 table; cross-attention: bf16, 16 heads x 64, k = 2.",
        "",
        "| op | bytes | eager ms | FlexAttention ms | Triton ms | speedup vs eager | speedup vs Flex |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        hashed = case["hash_embedding"]
        best = min(hashed["atomic_ms"], hashed["sorted_ms"])
        lines.append(f"| hash embedding (atomic {hashed['atomic_ms']:.3f} / sorted {hashed['sorted_ms']:.3f}) "
                     f"| {case['seq_len']} | {hashed['eager_ms']:.3f} | - | {best:.3f} | {hashed['speedup']:.2f} | - |")
        for op in ("patch_pool_attention", "byte_to_slot_attention"):
            d = case[op]
            lines.append(f"| {op} | {case['seq_len']} | {d['eager_ms']:.3f} | {d['flex_ms']:.3f} | "
                         f"{d['triton_ms']:.3f} | {d['speedup_vs_eager']:.2f} | {d['speedup_vs_flex']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.interpret_check:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are imported, below
        cases = [run_case(CHECK_SEQ_LEN, CHECK_SHAPE, args, "cpu", timed=False)]
        problems = failures(cases)
        print(json.dumps(cases, indent=2))
        print("\n".join(problems) or "interpret check passed", file=sys.stderr)
        sys.exit(1 if problems else 0)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py times GPU kernels and needs CUDA; none found, nothing written "
              "(--interpret-check checks correctness on CPU)", file=sys.stderr)  # fmt: skip
        sys.exit(2)

    cases = [run_case(seq_len, FULL_SHAPE, args, "cuda", timed=True) for seq_len in args.seq_lens]
    problems = failures(cases)
    if problems:
        print("correctness check failed, nothing written:\n" + "\n".join(problems), file=sys.stderr)
        sys.exit(1)
    device_name = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    config = {**FULL_SHAPE, "seq_lens": args.seq_lens, "batch": 1, "cross_attention_dtype": "bfloat16",
              "hash_table_dtype": "float32", "iters": args.iters, "warmup": args.warmup}  # fmt: skip
    figures = {
        "date": date,
        "hash_embedding_speedup": min(c["hash_embedding"]["speedup"] for c in cases),
        "cross_attention_speedup_vs_flex": min(
            c[op]["speedup_vs_flex"] for c in cases for op in ("patch_pool_attention", "byte_to_slot_attention")
        ),
        "cases": cases,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = write_results("kernels", device_name, config, figures, results_dir=args.out_dir, file_device=slug,
                        date=date, extra_files={".md": markdown})  # fmt: skip
    print(out.with_suffix(".md").read_text())
    print(f"results: {out}, {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
