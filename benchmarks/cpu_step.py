"""Forward+backward bytes/s of bltdist's BLT against transformers.BltForCausalLM, same shapes, same run.

Shapes (BLT_NOTES section 4): local dim 256 with 1 encoder and 4 decoder layers, global 512 x 6
layers, cross_attn_k 2, hash n-grams 3..8 with 500002 rows each, batch 4 x 1024 bytes, static
patches of 4 (BOS patch first). Both models get the same bytes and the same patch lengths; the
timed region is one forward, the byte cross-entropy and one backward, gradients dropped between
iterations. Writes benchmarks/results/cpu_step-<device>-<date>.json and prints
``ratio_vs_hf=X`` as its last line.

    python benchmarks/cpu_step.py [--iters 5] [--warmup 1] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from results import write_results

from bltdist.config import BLTConfig
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


def time_steps(step, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
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

    def our_step():
        logits = ours(tokens, lengths)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        ours.zero_grad(set_to_none=True)

    our_seconds = time_steps(our_step, args.iters, args.warmup)
    del ours

    reference = hf_model()

    def hf_step():
        logits = reference(input_ids=tokens, patch_lengths=lengths, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        reference.zero_grad(set_to_none=True)

    hf_seconds = time_steps(hf_step, args.iters, args.warmup)

    step_bytes = BATCH * SEQ_LEN
    import transformers

    config = {**asdict(BLTConfig(**SHAPE)), "batch": BATCH, "seq_len": SEQ_LEN, "patch_size": PATCH_SIZE,
              "iters": args.iters, "warmup": args.warmup}  # fmt: skip
    result = {
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "seconds_per_step": our_seconds,
        "hf_seconds_per_step": hf_seconds,
        "bytes_per_sec": step_bytes / our_seconds,
        "hf_bytes_per_sec": step_bytes / hf_seconds,
        "ratio_vs_hf": hf_seconds / our_seconds,
    }
    out = write_results("cpu_step", "cpu", config, result, out=args.out)
    print(f"bltdist: {result['bytes_per_sec']:.0f} bytes/s ({our_seconds:.3f} s/step)", file=sys.stderr)
    print(f"transformers: {result['hf_bytes_per_sec']:.0f} bytes/s ({hf_seconds:.3f} s/step)", file=sys.stderr)
    print(f"results: {out}", file=sys.stderr)
    print(f"ratio_vs_hf={result['ratio_vs_hf']:.2f}")


if __name__ == "__main__":
    main()
