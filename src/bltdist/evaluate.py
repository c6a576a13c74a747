"""Evaluate a BLT model directory: ``python -m bltdist.evaluate MODEL_DIR --data PATH [--data NAME=PATH ...]``.

Per data source: bits per byte (as training's val_bpb: the summed next-token loss in nats over the
predicted tokens, / ln 2), the average patch length, the inference FLOPs per byte
(``bltdist.flops``: the BLT forward plus, in entropy mode, the entropy model's), and the bits per
byte of noised copies of the text (seeded: case changes, dropped, repeated or swapped characters
at ``--noise-rate``). Documents are tokenised ([BOS] + bytes + [EOS]), packed in order into rows of
``--seq-len`` and patched with the model's training rule, entropies computed as in training.

``--split heldout`` evaluates what training validates on instead: each source's held-out documents
(the model config's ``data.val_fraction`` split) and the first ``--val-batches`` global batches
(``train.global_batch_size`` rows) of their packed held-out stream, so its bpb is the val_bpb
training logs on that source. ``--rows N`` with ``--split all`` takes the first N rows of the
documents' packed stream in the same way: the rows a training run's ``eval.sets`` are evaluated on.

``--group-by suffix|directory`` (``--split all``) also reports each source's documents grouped by
file suffix or by top-level directory under the source path, from the documents' keys; each group is
packed and noised on its own, so its figures are those of evaluating its files alone.

Under ``torchrun --nproc_per_node N`` the rows are shared out (row i to rank i % N), the sums are
added over the ranks and rank 0 alone prints and writes. Prints a table and writes JSON (``--out``,
else the last stdout line). Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bltdist.config import Config, PatchingConfig, load_config
from bltdist.data import DocumentSet, PackedByteLoader, build_datasets, load_documents
from bltdist.data.sources import JSON_LINES_SUFFIXES, PARQUET_SUFFIX, content_suffix
from bltdist.errors import UserError
from bltdist.flops import blt_forward_flops_per_byte, byte_lm_forward_flops_per_byte
from bltdist.generate import load_for_generation, rule_settings
from bltdist.model import BLT
from bltdist.model.loss import byte_loss_sum
from bltdist.model_dir import CONFIG_FILE
from bltdist.patching.entropy import EntropyModel, OnlineEntropies
from bltdist.patching.rules import (
    FLEX_BUCKET_BITS, entropy_super_patch_lengths, pad_patch_lengths, patch_lengths, patch_starts,
)  # fmt: skip
from bltdist.patching.tokens import document_tokens
from bltdist.training.step import Reporter

PROGRAM = "python -m bltdist.evaluate"
NOISE_KINDS = ("case", "drop", "repeat", "swap")
DEFAULT_SEED = 0  # of the noise; training's eval.sets use it too, so their figures match this tool's
GROUP_BYS = ("suffix", "directory")
SUM_KEYS = ("loss", "tokens", "patches")  # what each rank adds up per source and text variant

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, targets, entropies or None
RowReader = Callable[[Sequence[bytes]], Iterator[Batch]]  # documents -> this rank's batches of rows


def noised(document: bytes, kind: str, rate: float, rng: random.Random) -> bytes:
    """``document`` with a share ``rate`` of its characters changed by ``kind``; bytes that are not
    UTF-8 count as characters of their own."""
    text, out, i = document.decode("utf-8", errors="surrogateescape"), [], 0
    while i < len(text):
        char, hit = text[i], rng.random() < rate
        if not hit:
            out.append(char)
        elif kind == "case":
            out.append(char.swapcase())
        elif kind == "repeat":
            out.append(char * 2)
        elif kind == "swap" and i + 1 < len(text):
            out.append(text[i + 1] + char)
            i += 1
        elif kind == "swap":
            out.append(char)
        i += 1  # "drop" appends nothing
    return "".join(out).encode("utf-8", errors="surrogateescape")


def noised_documents(documents: Sequence[bytes], kind: str, rate: float, seed: int) -> list[bytes]:
    """``documents`` noised by ``kind``, from a random stream that starts afresh for every call."""
    rng = random.Random(f"bltdist-evaluate:{seed}:{kind}")
    return [noised(document, kind, rate, rng) for document in documents]


@dataclass(frozen=True)
class Share:
    """This process's part of the rows: row i belongs to rank i % world_size."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def packed_rows(documents: Sequence[bytes], seq_len: int, entropy_model: EntropyModel | None, share: Share,
                batch_size: int) -> Iterator[Batch]:  # fmt: skip
    """This rank's rows of ``documents`` packed in order, in batches; only the last row is shorter."""
    tokens = torch.from_numpy(np.concatenate([document_tokens(d) for d in documents])).long()
    entropies = None
    if entropy_model is not None:
        entropies = torch.from_numpy(np.concatenate([entropy_model.document_entropies(d) for d in documents]))
    # Rows of seq_len + 1 tokens overlapping by one: inputs [:-1], targets [1:].
    starts = list(range(0, len(tokens) - 1, seq_len))[share.rank :: share.world_size]
    for first in range(0, len(starts), batch_size):
        rows = [(start, min(seq_len, len(tokens) - 1 - start)) for start in starts[first : first + batch_size]]
        for length in sorted({n for _, n in rows}):  # a batch holds rows of one length
            group = [start for start, n in rows if n == length]
            yield (torch.stack([tokens[s : s + length] for s in group]),
                   torch.stack([tokens[s + 1 : s + 1 + length] for s in group]),
                   None if entropies is None else torch.stack([entropies[s : s + length] for s in group]))  # fmt: skip


def first_rows(documents: Sequence[bytes], seq_len: int, row_count: int, entropy_model: EntropyModel | None,
               share: Share, batch_size: int, seed: int) -> Iterator[Batch]:  # fmt: skip
    """This rank's share of the first ``row_count`` rows of ``documents`` packed in order, as training
    validates: read by the training loader itself (unshuffled, wrapping round the documents if need be)."""
    # One row per loader batch: the loader then gives global row i to rank i % world_size.
    loader = PackedByteLoader(documents, seq_len, 1, share.rank, share.world_size, seed, shuffle=False)
    if entropy_model is not None:
        loader.entropy_source = OnlineEntropies(entropy_model, loader.documents)
    my_rows = len(range(share.rank, row_count, share.world_size))
    for first in range(0, my_rows, batch_size):
        if entropy_model is None:
            rows = [(*loader.next_batch(), None) for _ in range(min(batch_size, my_rows - first))]
        else:
            rows = [loader.next_batch_with_entropies() for _ in range(min(batch_size, my_rows - first))]
        yield tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*rows))


class Evaluator:
    """Loss and patch counts of rows under one model, patched as in training."""

    def __init__(self, model: BLT, patching: PatchingConfig, entropy_model: EntropyModel | None, seq_len: int,
                 device: torch.device):  # fmt: skip
        self.model, self.patching, self.entropy_model = model.to(device), patching, entropy_model
        self.seq_len, self.device = seq_len, device
        # As in training (bltdist.training.step): bucket patch counts where FlexAttention compiles per shape.
        dtype = next(model.parameters()).dtype
        per_shape = model.global_attention_compiles_per_shape(device, dtype, needs_grad=False)
        self.bucket_bits = FLEX_BUCKET_BITS if per_shape else None

    @torch.no_grad()
    def sums(self, batches: Iterator[Batch]) -> dict:
        """Loss in nats, predicted tokens and patches of ``batches``: this rank's part of the figures."""
        loss, predicted, patches = 0.0, 0, 0
        for inputs, targets, entropies in batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            entropies = None if entropies is None else entropies.to(self.device)
            lengths = patch_lengths(patch_starts(inputs, self.patching.mode, entropies=entropies,
                                                 **rule_settings(self.patching)))  # fmt: skip
            grouped = entropy_super_patch_lengths(self.model.cfg.super_patch, inputs, lengths, entropies)
            padded = pad_patch_lengths(lengths, 1, self.bucket_bits)
            logits = self.model(inputs, padded, super_patch_lengths=grouped, bucket_bits=self.bucket_bits)
            loss += float(byte_loss_sum(logits, targets))
            predicted += targets.numel()
            patches += int((lengths > 0).sum())
        return {"loss": loss, "tokens": predicted, "patches": patches}

    def flops_per_byte(self, avg_patch_len: float) -> float:
        flops = blt_forward_flops_per_byte(self.model.cfg, self.seq_len, avg_patch_len)
        if self.entropy_model is not None:
            flops += byte_lm_forward_flops_per_byte(self.entropy_model.config, self.entropy_model.context)
        return flops


def figures(sums: dict) -> dict:
    return {"tokens": int(sums["tokens"]), "bpb": sums["loss"] / sums["tokens"] / math.log(2),
            "avg_patch_len": sums["tokens"] / sums["patches"]}  # fmt: skip


def row_reader(args: argparse.Namespace, cfg: Config, seq_len: int, entropy_model: EntropyModel | None,
               share: Share) -> RowReader:  # fmt: skip
    """The rows of a source's documents as ``--split`` asks."""
    row_count = args.rows
    if args.split == "heldout":  # a validation batch is a training batch: train.global_batch_size rows
        row_count = (args.val_batches or cfg.train.val_batches) * cfg.train.global_batch_size
    if row_count:
        return lambda documents: first_rows(documents, seq_len, row_count, entropy_model, share, args.batch_size,
                                            cfg.train.seed)  # fmt: skip
    return lambda documents: packed_rows(documents, seq_len, entropy_model, share, args.batch_size)


def source_sums(evaluator: Evaluator, documents: Sequence[bytes], rows: RowReader, args: argparse.Namespace) -> dict:
    """This rank's sums of one data source: clean ("clean"), then one noised copy per noise kind."""
    result = {"clean": evaluator.sums(rows(documents))}
    for kind in NOISE_KINDS:
        result[kind] = evaluator.sums(rows(noised_documents(documents, kind, args.noise_rate, args.seed)))
    return result


def add_over_ranks(per_unit: dict, share: Share) -> dict:
    """``per_unit`` (sources and groups) summed over all ranks, in one all-reduce (float64: counts stay exact)."""
    flat = [sums[key] for variants in per_unit.values() for sums in variants.values() for key in SUM_KEYS]
    totals = iter(Reporter(None, share.device).sum(flat))
    return {unit: {variant: {key: next(totals) for key in SUM_KEYS} for variant in variants}
            for unit, variants in per_unit.items()}  # fmt: skip


def source_results(evaluator: Evaluator, totals: dict, document_bytes: int) -> dict:
    """The reported figures of one source (or group) from its summed clean and noised variants."""
    clean = figures(totals["clean"])
    result = {"bytes": document_bytes, **clean, "flops_per_byte": evaluator.flops_per_byte(clean["avg_patch_len"])}
    result.update({f"bpb_{kind}": figures(totals[kind])["bpb"] for kind in NOISE_KINDS})
    return result


def document_group(key: str, group_by: str) -> str:
    """The group of the document keyed ``key`` ("relpath", "relpath:line" or "relpath:row"): its file's
    content suffix ("none" without one), or its top-level directory under the source path ("." at the top)."""
    relpath, _, number = key.rpartition(":")
    if not (number.isdigit() and content_suffix(Path(relpath)) in (*JSON_LINES_SUFFIXES, PARQUET_SUFFIX)):
        relpath = key  # a plain file: the key is its path, colons and all
    if group_by == "suffix":
        return content_suffix(Path(relpath)) or "none"
    parts = Path(relpath).parts
    return parts[0] if len(parts) > 1 else "."


def grouped(keyed: Sequence[tuple[str, bytes]], group_by: str) -> dict[str, list[bytes]]:
    """The documents of each group, in source order; groups sorted by name."""
    groups: dict[str, list[bytes]] = {}
    for key, document in keyed:
        groups.setdefault(document_group(key, group_by), []).append(document)
    return dict(sorted(groups.items()))


def parse_sources(values: list[str]) -> list[tuple[str, str]]:
    """``--data`` values as (name, path): ``NAME=PATH``, or a path named after its last component."""
    sources = []
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or "/" in name:
            name, path = Path(value).name or value, value
        if not path:
            raise UserError(f"--data {value}: empty path")
        sources.append((name, path))
    names = [name for name, _ in sources]
    if len(set(names)) != len(names):
        raise UserError(f"--data: source names repeat ({', '.join(names)}); name them with NAME=PATH")
    return sources


def read_source(path: str, args: argparse.Namespace, cfg: Config) -> tuple[list[str] | None, Sequence[bytes]]:
    """(keys, documents) of ``path`` to evaluate: the held-out split as training makes it (memory-mapped
    when prepared; no keys), or all of them cut to ``--max-bytes`` bytes in all."""
    if not Path(path).exists():
        raise UserError(f"--data: {path} not found")
    if args.split == "heldout":
        return None, build_datasets(path, cfg.data.text_field, cfg.data.val_fraction)[1]
    keys, documents, budget = [], [], args.max_bytes
    for key, document in load_documents(path, cfg.data.text_field):
        if budget <= 0:
            break
        keys.append(key)
        documents.append(document[:budget])
        budget -= len(documents[-1])
    return keys, documents


def unit_documents(sources: list[tuple[str, str]], args: argparse.Namespace, cfg: Config) -> dict:
    """The documents of every unit to report: (source, None) per source, and (source, group) per
    group of it with ``--group-by``."""
    units = {}
    for name, path in sources:
        keys, units[name, None] = read_source(path, args, cfg)
        if args.group_by:  # --split all: there are keys
            groups = grouped(list(zip(keys, units[name, None])), args.group_by)
            units.update({(name, group): documents for group, documents in groups.items()})
    return units


def byte_count(documents: Sequence[bytes]) -> int:
    """Bytes of ``documents``; of a DocumentSet from its lengths, with nothing read."""
    return int(documents.lengths.sum()) if isinstance(documents, DocumentSet) else sum(map(len, documents))


def print_table(results: dict) -> None:
    columns = ["tokens", "bpb", "avg_patch_len", "flops_per_byte", *(f"bpb_{kind}" for kind in NOISE_KINDS)]
    lines = {}
    for name, row in results.items():  # a source, then its groups as "source/group"
        lines[name] = row
        lines.update({f"{name}/{group}": figures_of for group, figures_of in row.get("groups", {}).items()})
    width = max(len("source"), *(len(name) for name in lines))
    print(f"{'source':<{width}}  " + "  ".join(f"{column:>14}" for column in columns))
    for name, row in lines.items():
        cells = [f"{row[c]:>14d}" if isinstance(row[c], int) else f"{row[c]:>14.4g}" for c in columns]
        print(f"{name:<{width}}  " + "  ".join(cells))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", help="a BLT model directory")
    parser.add_argument("--data", action="append", required=True, help="PATH or NAME=PATH; repeat for several sources")
    parser.add_argument("--seq-len", type=int, default=None, help="bytes per row; default the model's train.seq_len")
    parser.add_argument("--split", choices=("all", "heldout"), default="all",
                        help="all: every document, packed in order; heldout: the rows training validates on")
    parser.add_argument("--val-batches", type=int, default=None,
                        help="with --split heldout: global batches of rows; default the model's train.val_batches")
    parser.add_argument("--rows", type=int, default=None,
                        help="with --split all: the first ROWS rows of --seq-len bytes (wrapping round the "
                             "documents), as training's eval.sets; default every row, the last one shorter")
    parser.add_argument("--group-by", choices=GROUP_BYS, default=None,
                        help="with --split all: also report per file suffix or top-level directory, under each "
                             "source's 'groups' (--split heldout is per source only)")
    parser.add_argument("--max-bytes", type=int, default=200_000,
                        help="with --split all: bytes read per source at most")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--noise-rate", type=float, default=0.05, help="share of characters each noise changes")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the noise")
    parser.add_argument("--out", default=None, help="write the JSON here as well")
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--max-bytes", args.max_bytes, 1),
                             ("--batch-size", args.batch_size, 1), ("--val-batches", args.val_batches, 1),
                             ("--rows", args.rows, 1)):  # fmt: skip
        if value is not None and value < low:
            raise UserError(f"{flag}: must be >= {low}, got {value}")
    if not 0 <= args.noise_rate <= 1:
        raise UserError(f"--noise-rate: must be in [0, 1], got {args.noise_rate}")
    if args.val_batches is not None and args.split != "heldout":
        raise UserError("--val-batches: counts held-out rows; give it with --split heldout")
    for flag, value in (("--rows", args.rows), ("--group-by", args.group_by)):
        if value is not None and args.split != "all":
            raise UserError(f"{flag}: works with --split all (--split heldout is per source only)")


def start_share() -> Share:
    """This process's share: under torchrun, one rank of a process group (NCCL on CUDA, else gloo)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Share(rank, world_size, device)


def run(args: argparse.Namespace, share: Share = Share()) -> dict:
    check_numbers(args)
    sources = parse_sources(args.data)
    model, patching, entropy_model = load_for_generation(args.model_dir)
    cfg = load_config(str(Path(args.model_dir) / CONFIG_FILE), [])
    seq_len = args.seq_len or cfg.train.seq_len
    evaluator = Evaluator(model, patching, entropy_model, seq_len, share.device)
    rows = row_reader(args, cfg, seq_len, entropy_model, share)
    units = unit_documents(sources, args, cfg)
    per_unit = {unit: source_sums(evaluator, documents, rows, args) for unit, documents in units.items()}
    results: dict = {}
    for (name, group), totals in add_over_ranks(per_unit, share).items():
        figures_of = source_results(evaluator, totals, byte_count(units[name, group]))
        if group is None:
            results[name] = figures_of
        else:
            results[name].setdefault("groups", {})[group] = figures_of
    summary = {"model_dir": str(args.model_dir), "seq_len": seq_len, "split": args.split,
               "rows": args.rows, "group_by": args.group_by, "noise_rate": args.noise_rate, "seed": args.seed,
               "patching": patching.mode,
               "sources": results}  # fmt: skip
    if share.rank == 0:
        print_table(results)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    share = start_share()
    try:
        run(args, share)
    except UserError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
