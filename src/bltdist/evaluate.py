"""Evaluate a BLT model directory: ``python -m bltdist.evaluate MODEL_DIR --data PATH [--data NAME=PATH ...]``.

Per data source: bits per byte (as training's val_bpb: the summed next-token loss in nats over the
predicted tokens, / ln 2), the average patch length, the inference FLOPs per byte
(``bltdist.flops``: the BLT forward plus, in entropy mode, the entropy model's), and the bits per
byte of noised copies of the text (seeded: case changes, dropped, repeated or swapped characters
at ``--noise-rate``). Documents are tokenised ([BOS] + bytes + [EOS]), packed in order into rows of
``--seq-len`` and patched with the model's training rule, entropies computed as in training.
Prints a table and writes JSON (``--out``, else the last stdout line). Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

from bltdist.config import PatchingConfig, load_config
from bltdist.data import load_documents
from bltdist.errors import UserError
from bltdist.flops import blt_forward_flops_per_byte, byte_lm_forward_flops_per_byte
from bltdist.generate import load_for_generation, rule_settings
from bltdist.model import BLT
from bltdist.model.loss import byte_loss_sum
from bltdist.model_dir import CONFIG_FILE
from bltdist.patching.entropy import EntropyModel
from bltdist.patching.rules import patch_lengths, patch_starts
from bltdist.patching.tokens import document_tokens

PROGRAM = "python -m bltdist.evaluate"
NOISE_KINDS = ("case", "drop", "repeat", "swap")


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


class Evaluator:
    """Loss and patch counts of documents under one model, patched as in training."""

    def __init__(self, model: BLT, patching: PatchingConfig, entropy_model: EntropyModel | None, seq_len: int):
        self.model, self.patching, self.entropy_model, self.seq_len = model, patching, entropy_model, seq_len

    @torch.no_grad()
    def measure(self, documents: list[bytes], batch_size: int) -> dict:
        tokens = torch.from_numpy(np.concatenate([document_tokens(d) for d in documents])).long()
        entropies = None
        if self.entropy_model is not None:
            entropies = torch.from_numpy(np.concatenate([self.entropy_model.document_entropies(d) for d in documents]))
        loss, predicted, patches = 0.0, 0, 0
        # Rows of seq_len + 1 tokens overlapping by one: inputs [:-1], targets [1:].
        starts = list(range(0, len(tokens) - 1, self.seq_len))
        for first in range(0, len(starts), batch_size):
            for rows in self._equal_length_groups(starts[first : first + batch_size], len(tokens)):
                inputs = torch.stack([tokens[s : s + length] for s, length in rows])
                targets = torch.stack([tokens[s + 1 : s + 1 + length] for s, length in rows])
                row_entropies = None if entropies is None else torch.stack([entropies[s : s + n] for s, n in rows])
                lengths = patch_lengths(patch_starts(inputs, self.patching.mode, entropies=row_entropies,
                                                     **rule_settings(self.patching)))  # fmt: skip
                loss += float(byte_loss_sum(self.model(inputs, lengths), targets))
                predicted += targets.numel()
                patches += int((lengths > 0).sum())
        return {"tokens": predicted, "bpb": loss / predicted / math.log(2), "avg_patch_len": predicted / patches}

    def _equal_length_groups(self, starts: list[int], total: int) -> list[list[tuple[int, int]]]:
        """(start, length) rows grouped by length: only the stream's last row is shorter."""
        rows = [(start, min(self.seq_len, total - 1 - start)) for start in starts]
        return [[row for row in rows if row[1] == length] for length in sorted({n for _, n in rows})]

    def flops_per_byte(self, avg_patch_len: float) -> float:
        flops = blt_forward_flops_per_byte(self.model.cfg, self.seq_len, avg_patch_len)
        if self.entropy_model is not None:
            flops += byte_lm_forward_flops_per_byte(self.entropy_model.config, self.entropy_model.context)
        return flops


def evaluate_source(evaluator: Evaluator, documents: list[bytes], args: argparse.Namespace) -> dict:
    """The figures of one data source: clean, then one noised copy per noise kind."""
    clean = evaluator.measure(documents, args.batch_size)
    result = {**clean, "flops_per_byte": evaluator.flops_per_byte(clean["avg_patch_len"])}
    for kind in NOISE_KINDS:
        rng = random.Random(f"bltdist-evaluate:{args.seed}:{kind}")
        copies = [noised(document, kind, args.noise_rate, rng) for document in documents]
        result[f"bpb_{kind}"] = evaluator.measure(copies, args.batch_size)["bpb"]
    return result


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


def read_source(path: str, max_bytes: int) -> list[bytes]:
    """The documents of ``path``, cut to ``max_bytes`` bytes in all."""
    if not Path(path).exists():
        raise UserError(f"--data: {path} not found")
    documents, budget = [], max_bytes
    for _, document in load_documents(path):
        if budget <= 0:
            break
        documents.append(document[:budget])
        budget -= len(documents[-1])
    return documents


def print_table(results: dict) -> None:
    columns = ["tokens", "bpb", "avg_patch_len", "flops_per_byte", *(f"bpb_{kind}" for kind in NOISE_KINDS)]
    width = max(len("source"), *(len(name) for name in results))
    print(f"{'source':<{width}}  " + "  ".join(f"{column:>14}" for column in columns))
    for name, row in results.items():
        cells = [f"{row[c]:>14d}" if isinstance(row[c], int) else f"{row[c]:>14.4g}" for c in columns]
        print(f"{name:<{width}}  " + "  ".join(cells))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", help="a BLT model directory")
    parser.add_argument("--data", action="append", required=True, help="PATH or NAME=PATH; repeat for several sources")
    parser.add_argument("--seq-len", type=int, default=None, help="bytes per row; default the model's train.seq_len")
    parser.add_argument("--max-bytes", type=int, default=200_000, help="bytes read per source at most")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--noise-rate", type=float, default=0.05, help="share of characters each noise changes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON here as well")
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--max-bytes", args.max_bytes, 1),
                             ("--batch-size", args.batch_size, 1)):  # fmt: skip
        if value is not None and value < low:
            raise UserError(f"{flag}: must be >= {low}, got {value}")
    if not 0 <= args.noise_rate <= 1:
        raise UserError(f"--noise-rate: must be in [0, 1], got {args.noise_rate}")


def run(args: argparse.Namespace) -> dict:
    check_numbers(args)
    sources = parse_sources(args.data)
    model, patching, entropy_model = load_for_generation(args.model_dir)
    seq_len = args.seq_len or load_config(str(Path(args.model_dir) / CONFIG_FILE), []).train.seq_len
    evaluator = Evaluator(model, patching, entropy_model, seq_len)
    results = {name: evaluate_source(evaluator, read_source(path, args.max_bytes), args) for name, path in sources}
    print_table(results)
    summary = {"model_dir": str(args.model_dir), "seq_len": seq_len, "noise_rate": args.noise_rate,
               "seed": args.seed, "patching": patching.mode, "sources": results}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except UserError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
