"""Forward+backward of context parallelism's ring attention against the model's own attention, on one
device: one rank, so the ring computes one block (causal, within documents) and sends nothing.

The ring builds each block from fp32 products of its inputs (scores, log-sum-exp, merge); for bf16
inputs on a GPU those products run in TF32 (``bltdist.parallel.context.ring``). Three timings on the
same patch sequence, documents and values, each a median over --iters after --warmup:

- ``ring_ms``: the ring on --dtype inputs, as a --dtype run's ring computes;
- ``ring_fp32_inputs_ms``: the ring on the same values in fp32, every product in fp32 (what the ring
  did for bf16 runs before it used TF32);
- ``sdpa_ms``: the model's attention without cp (``SelfAttentionMask(..., "sdpa")``) on --dtype inputs.

``ring_block_tflops_per_sec`` counts the ring's seven block products (two forward, five backward:
the scores again, then the gradients of probabilities, values, queries and keys), 2 B H T^2 D each,
masked or not. Writes benchmarks/results/ring_block-<device>-<date>.json.

    python benchmarks/ring_block.py [--batch 8] [--patches 1820] [--heads 16] [--head-dim 128]

The defaults are BLT-1B's global model at 8192 bytes a row (about 4.5 bytes a patch) and micro batch
8. On CPU give a smaller shape (``--batch 1 --patches 512 --iters 3``): a check that it runs, not a
GPU figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from results import write_results

from bltdist.model.attention import SelfAttentionMask
from bltdist.parallel.context.ring import RingPatchMask


def documents(batch: int, patches: int, device: torch.device) -> torch.Tensor:
    """(B, T) document ids: each row cut into three documents at different places."""
    doc_ids = torch.zeros(batch, patches, dtype=torch.long, device=device)
    for row in range(batch):
        for fraction in (0.3 + 0.05 * (row % 4), 0.7):
            doc_ids[row, int(fraction * patches):] += 1
    return doc_ids


def median_ms(attend, inputs: list[torch.Tensor], grad_out: torch.Tensor, iters: int, warmup: int) -> float:
    times = []
    for i in range(warmup + iters):
        leaves = [x.detach().requires_grad_() for x in inputs]
        if grad_out.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        attend(*leaves).backward(grad_out)
        if grad_out.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patches", type=int, default=1820)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    batch, patches, heads, head_dim = args.batch, args.patches, args.heads, args.head_dim
    kv_heads = args.kv_heads or heads
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(batch, patches, h, head_dim, generator=generator, device=device, dtype=dtype)
              for h in (heads, kv_heads, kv_heads)]  # fmt: skip
    grad_out = torch.randn(batch, patches, heads, head_dim, generator=generator, device=device, dtype=dtype)
    doc_ids = documents(batch, patches, device)
    # One rank holds both chunks of the sequence, in order: the ring's single block is the whole causal square.
    positions = torch.arange(patches, device=device)[None]
    ring = RingPatchMask(None, 0, 1, patches // 2, positions, doc_ids[None])

    def sdpa(q, k, v):
        return SelfAttentionMask(doc_ids, None, "sdpa").attend(q, k, v)

    ring_ms = median_ms(ring.attend, inputs, grad_out, args.iters, args.warmup)
    fp32_ms = median_ms(ring.attend, [x.float() for x in inputs], grad_out.float(), args.iters, args.warmup)
    sdpa_ms = median_ms(sdpa, inputs, grad_out, args.iters, args.warmup)
    block_flops = 7 * 2 * batch * heads * patches**2 * head_dim
    figures = {
        "ring_ms": ring_ms,
        "ring_fp32_inputs_ms": fp32_ms,
        "sdpa_ms": sdpa_ms,
        "speedup_vs_fp32_inputs": fp32_ms / ring_ms,
        "ratio_vs_sdpa": ring_ms / sdpa_ms,
        "ring_block_tflops_per_sec": block_flops / ring_ms / 1e9,
        "ring_fp32_inputs_block_tflops_per_sec": block_flops / fp32_ms / 1e9,
    }
    config = {"batch": batch, "patches": patches, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup, "documents_per_row": 3}  # fmt: skip
    name = torch.cuda.get_device_name(0).replace(" ", "_") if device.type == "cuda" else "cpu"
    out = write_results("ring_block", name, config, figures, results_dir=args.results_dir)
    print(f"ring {ring_ms:.1f} ms ({figures['ring_block_tflops_per_sec']:.3g} TFLOP/s of block products), "
          f"fp32 inputs {fp32_ms:.1f} ms, sdpa {sdpa_ms:.1f} ms", file=sys.stderr)  # fmt: skip
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
