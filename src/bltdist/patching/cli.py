"""Entropy patching tools: ``python -m bltdist.patch {calibrate,precompute,stats} ...``.

The order of steps: train an entropy model (``bltdist.train`` with ``model.arch: entropy``), then
``calibrate`` a threshold for the average patch length you want, optionally ``precompute`` the
entropies of the training data, then train the BLT with ``patching.mode: entropy``,
``patching.entropy_model``, ``patching.threshold`` and ``patching.threshold_mode`` (and
``patching.entropies`` when precomputed). ``stats`` shows what a threshold does to a data set.

Patch lengths here are measured as in training: chunks of documents ([BOS] + bytes + [EOS]), with
the entropies training computes for them, are packed in order into rows of ``--seq-len`` tokens and
cut by ``bltdist.patching.patch_starts``; the average patch length is tokens / patches. Bad input
prints one message and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bltdist.data import (
    is_prepared,
    iter_documents,
    list_files,
    load_documents,
    open_table,
)
from bltdist.data.sources import source_root
from bltdist.errors import UserError
from bltdist.patching.entropy import EntropyModel
from bltdist.patching.rules import THRESHOLD_MODES, patch_lengths, patch_starts
from bltdist.patching.store import precompute
from bltdist.patching.tokens import document_tokens

PROGRAM = "python -m bltdist.patch"
DEFAULT_SEQ_LEN = 1024
DEFAULT_SAMPLE_BYTES = 1_000_000
HISTOGRAM_MAX_LENGTH = 32


@dataclass
class Sample:
    """Documents with their entropies, as token and entropy arrays of equal lengths."""

    tokens: list[np.ndarray]
    entropies: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def entropy_sample(model: EntropyModel, documents: list[bytes], sample_bytes: int | None, seed: int) -> Sample:
    """Entropies of about ``sample_bytes`` tokens of ``documents`` (None = every document whole), as
    training computes them: chunks of ``model.context`` tokens of a document's [BOS] + bytes + [EOS],
    each run on its own (as ``OnlineEntropies`` and precomputed entropies do), drawn by a seeded
    generator uniformly from all chunks of all documents.

    Chunks, not whole documents: in a corpus of long documents (the embedded one averages 16 kB) a
    budget spent on whole documents covers a few of them, and a threshold calibrated on a few
    documents misses the target on the rest (200 kB of whole documents gave 4.4 to 5.4 bytes per
    patch for one threshold, by seed); chunks spread the same budget over many documents."""
    if sample_bytes is None:
        return Sample([document_tokens(d) for d in documents], [model.document_entropies(d) for d in documents])
    context = model.context
    chunk_ends = np.cumsum([model.num_chunks(document) for document in documents])
    total = int(chunk_ends[-1]) if len(chunk_ends) else 0
    wanted = min(total, -(-sample_bytes // context))
    picks = np.sort(np.random.default_rng(seed).choice(total, size=wanted, replace=False))
    tokens, entropies = [], []
    for pick in picks.tolist():
        index = int(np.searchsorted(chunk_ends, pick, side="right"))
        chunk = pick - (int(chunk_ends[index - 1]) if index else 0)
        tokens.append(document_tokens(documents[index], chunk * context, (chunk + 1) * context))
        entropies.append(model.chunk_entropies(documents[index], chunk))
    return Sample(tokens, entropies)


def packed_rows(sample: Sample, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The sample packed into (tokens, entropies) rows of ``seq_len``; the remainder is a shorter last batch."""
    tokens = torch.from_numpy(np.concatenate(sample.tokens)).long()
    entropies = torch.from_numpy(np.concatenate(sample.entropies))
    full = len(tokens) // seq_len * seq_len
    batches = []
    if full:
        batches.append((tokens[:full].view(-1, seq_len), entropies[:full].view(-1, seq_len)))
    if full < len(tokens):
        batches.append((tokens[full:].unsqueeze(0), entropies[full:].unsqueeze(0)))
    return batches


def patch_length_counts(
    rows: list[tuple[torch.Tensor, torch.Tensor]], threshold: float, mode: str, max_patch_length: int | None
) -> torch.Tensor:
    """Histogram of patch lengths: counts[n] = number of patches of n tokens."""
    counts = torch.zeros(1, dtype=torch.long)
    for tokens, entropies in rows:
        starts = patch_starts(
            tokens, "entropy", entropies=entropies, threshold=threshold, threshold_mode=mode,
            max_patch_length=max_patch_length,
        )  # fmt: skip
        lengths = patch_lengths(starts)
        row_counts = torch.bincount(lengths[lengths > 0])
        if len(row_counts) > len(counts):
            counts = torch.nn.functional.pad(counts, (0, len(row_counts) - len(counts)))
        counts[: len(row_counts)] += row_counts
    return counts


def average_patch_length(counts: torch.Tensor) -> float:
    tokens = int((counts * torch.arange(len(counts))).sum())
    return tokens / int(counts.sum())


def calibrate_threshold(
    rows: list[tuple[torch.Tensor, torch.Tensor]], target: float, mode: str, max_patch_length: int | None
) -> tuple[float, float]:
    """(threshold, achieved average patch length) closest to ``target`` on ``rows``.

    The average patch length never falls when the threshold rises, and it only changes where the
    threshold crosses one of the compared values (H(t) in global mode, H(t) - H(t-1) in monotonic
    mode). So a bisection over those sorted values finds the best achievable threshold exactly; the
    threshold returned lies halfway between two neighbouring values, away from every one of them.
    """
    compared = []
    for _, entropies in rows:
        compared.append((entropies if mode == "global" else entropies[:, 1:] - entropies[:, :-1]).flatten())
    candidates = torch.unique(torch.cat(compared)).double()
    # Below every value every comparable position starts a patch; at the top value none does.
    thresholds = torch.cat([candidates[:1] - 1.0, candidates])

    def achieved(index: int) -> float:
        return average_patch_length(patch_length_counts(rows, float(thresholds[index]), mode, max_patch_length))

    low, high = 0, len(thresholds) - 1
    if achieved(high) <= target:
        return float(thresholds[high]), achieved(high)
    if achieved(low) >= target:
        return float(thresholds[low]), achieved(low)
    while high - low > 1:  # invariant: achieved(low) < target <= achieved(high)
        middle = (low + high) // 2
        if achieved(middle) < target:
            low = middle
        else:
            high = middle
    best = low if target - achieved(low) < achieved(high) - target else high
    # Halfway to the next higher value gives the same patches as thresholds[best] itself.
    threshold = float((thresholds[best] + thresholds[best + 1]) / 2)
    return threshold, average_patch_length(patch_length_counts(rows, threshold, mode, max_patch_length))


def group_documents(data: str | None, text_field: str, group_by: str) -> dict[str, list[bytes]]:
    """Documents of ``data`` by input file (its path relative to the data root) or by file suffix."""
    if is_prepared(data):
        raise UserError(f"--data: {data} is a prepared directory; stats groups by input file, so give its inputs")
    root = source_root(data)
    groups: dict[str, list[bytes]] = {}
    for file in list_files(data):
        documents = [document for _, document in iter_documents([file], text_field, root=root)]
        if not documents:
            continue
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.as_posix()
        if group_by == "suffix":
            name = file.suffix.lower() or "(no suffix)"
        groups.setdefault(name, []).extend(documents)
    if not groups:
        raise UserError(f"--data: {data} holds no documents (all files are empty); point it at text")
    return groups


def patch_statistics(
    model: EntropyModel,
    groups: dict[str, list[bytes]],
    threshold: float,
    mode: str,
    max_patch_length: int | None,
    seq_len: int,
    sample_bytes: int | None,
) -> dict[str, dict]:
    """Per group: bytes, patches, average patch length, mean entropy, share of patches cut at
    ``max_patch_length``, and the patch length histogram."""
    results = {}
    for name, documents in groups.items():
        sample = entropy_sample(model, documents, sample_bytes, seed=0)
        counts = patch_length_counts(packed_rows(sample, seq_len), threshold, mode, max_patch_length)
        patches = int(counts.sum())
        at_max = int(counts[max_patch_length]) if max_patch_length and max_patch_length < len(counts) else 0
        results[name] = {
            "tokens": sample.num_tokens,
            "patches": patches,
            "avg_patch_len": average_patch_length(counts),
            "mean_entropy": float(np.concatenate(sample.entropies).astype(np.float64).mean()),
            "share_at_max_patch_length": at_max / patches if max_patch_length else None,
            "histogram": counts.tolist(),
        }
    return results


def plot_histograms(results: dict[str, dict], png: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserError("--png needs matplotlib; run `pip install matplotlib` (it is in the dev extra)") from error
    figure, (axes, bars) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(2, 1))
    for name, stats in results.items():
        counts = np.array(stats["histogram"][: HISTOGRAM_MAX_LENGTH + 1], dtype=np.float64)
        lengths = np.arange(len(counts))
        axes.step(lengths[1:], counts[1:] / stats["patches"], where="mid",
                  label=f"{name}: avg {stats['avg_patch_len']:.2f} B, H {stats['mean_entropy']:.2f} nats")  # fmt: skip
    axes.set_xlabel(f"patch length in bytes (up to {HISTOGRAM_MAX_LENGTH})")
    axes.set_ylabel("share of patches")
    axes.set_title(title)
    axes.legend(fontsize=8)
    names = list(results)
    bars.barh(names, [results[name]["avg_patch_len"] for name in names])
    bars.invert_yaxis()
    bars.set_xlabel("average patch length (bytes)")
    bars.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--entropy-model", required=True, help="checkpoint directory of a trained entropy model")
        sub.add_argument("--data", default=None, help="file, directory or glob; omitted = the embedded corpus")
        sub.add_argument("--text-field", default="text", help="JSONL / Parquet column holding the text")

    def patching(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--mode", default="global", choices=THRESHOLD_MODES, help="threshold mode")
        sub.add_argument("--max-patch-length", type=_positive_int, default=None, help="as patching.max_patch_length")
        sub.add_argument("--seq-len", type=_positive_int, default=DEFAULT_SEQ_LEN, help="as train.seq_len")

    calibrate = commands.add_parser("calibrate", help="find the threshold for a target average patch length")
    common(calibrate)
    patching(calibrate)
    calibrate.add_argument("--target-patch-size", type=float, required=True, help="average patch length in bytes")
    calibrate.add_argument("--sample-bytes", type=_positive_int, default=DEFAULT_SAMPLE_BYTES, help="bytes sampled")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the chunk sample")

    precompute = commands.add_parser(
        "precompute", help="write the entropies of a data set as sharded files (--data may be a prepared directory)"
    )
    common(precompute)
    precompute.add_argument("--out", required=True, help="output directory (rerun the command to resume)")
    precompute.add_argument("--workers", type=_positive_int, default=1, help="processes")
    precompute.add_argument(
        "--shard-tokens", type=_positive_int, default=1 << 22,
        help="tokens per shard (about); a prepared --data keeps its own shards, one entropy shard each",
    )  # fmt: skip

    stats = commands.add_parser("stats", help="patch length statistics per input file or file suffix")
    common(stats)
    patching(stats)
    stats.add_argument("--threshold", type=float, required=True, help="as patching.threshold")
    stats.add_argument("--group-by", default="file", choices=("file", "suffix"), help="one row per file or suffix")
    stats.add_argument("--sample-bytes", type=_positive_int, default=DEFAULT_SAMPLE_BYTES, help="bytes per group")
    stats.add_argument("--png", default=None, help="write the patch length histograms to this PNG")
    return parser


def run_calibrate(args: argparse.Namespace) -> None:
    if not args.target_patch_size >= 1:
        raise UserError(
            f"--target-patch-size: must be >= 1 byte (a patch holds at least one byte), got {args.target_patch_size}"
        )
    model = EntropyModel(args.entropy_model)
    table = open_table(args.data, args.text_field)  # a prepared directory too
    documents = table.select(np.arange(len(table)))
    sample = entropy_sample(model, documents, args.sample_bytes, args.seed)
    rows = packed_rows(sample, args.seq_len)
    threshold, achieved = calibrate_threshold(rows, args.target_patch_size, args.mode, args.max_patch_length)
    print(f"calibrate: {sample.num_tokens} tokens in {len(sample.tokens)} chunks sampled")
    print(
        f"calibrate: threshold {threshold:.6g} ({args.mode}) gives an average patch length of {achieved:.4f} bytes "
        f"(target {args.target_patch_size}); train with --patching.mode entropy --patching.entropy_model "
        f"{args.entropy_model} --patching.threshold {threshold!r} --patching.threshold_mode {args.mode}"
    )
    print(json.dumps({
        "threshold": threshold, "mode": args.mode, "target_patch_size": args.target_patch_size,
        "achieved_patch_size": achieved, "sample_tokens": sample.num_tokens, "seq_len": args.seq_len,
        "max_patch_length": args.max_patch_length, "entropy_model": args.entropy_model,
    }))  # fmt: skip


def run_precompute(args: argparse.Namespace) -> None:
    # A prepared directory is read shard by shard in the workers, from its memory map; files are read here.
    documents = args.data if is_prepared(args.data) else [d for _, d in load_documents(args.data, args.text_field)]
    summary = precompute(args.entropy_model, documents, args.out, args.shard_tokens, args.workers)
    print(json.dumps(summary))


def run_stats(args: argparse.Namespace) -> None:
    model = EntropyModel(args.entropy_model)
    groups = group_documents(args.data, args.text_field, args.group_by)
    results = patch_statistics(
        model, groups, args.threshold, args.mode, args.max_patch_length, args.seq_len, args.sample_bytes
    )
    width = max(len(name) for name in results)
    print(f"{'group':<{width}}  {'tokens':>10}  {'patches':>9}  {'avg len':>7}  {'H nats':>6}  at max")
    for name, row in results.items():
        at_max = "-" if row["share_at_max_patch_length"] is None else f"{row['share_at_max_patch_length']:.1%}"
        print(f"{name:<{width}}  {row['tokens']:>10}  {row['patches']:>9}  {row['avg_patch_len']:>7.3f}  "
              f"{row['mean_entropy']:>6.3f}  {at_max}")  # fmt: skip
    if args.png:
        title = f"{args.mode} threshold {args.threshold:.4g}, model {Path(args.entropy_model).name}"
        plot_histograms(results, Path(args.png), title)
        print(f"stats: histograms written to {args.png}")
    summary = {name: {k: v for k, v in row.items() if k != "histogram"} for name, row in results.items()}
    print(json.dumps({"threshold": args.threshold, "mode": args.mode, "groups": summary}))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.data == "":
            raise UserError("--data: empty path; give a file, directory or glob, or leave --data out for the embedded corpus")
        {"calibrate": run_calibrate, "precompute": run_precompute, "stats": run_stats}[args.command](args)
    except UserError as error:
        print(f"{PROGRAM} {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
