"""``python -m bltdist.data prepare INPUT... --out DIR``: turn text, JSONL and Parquet files into a prepared dataset.

A prepared directory (format in ``bltdist.data.prepared``) is what ``data.path`` or a
``data.sources`` path should point at for large corpora: every rank memory-maps it instead of
reading the files into memory. Rerunning an interrupted command finishes it, keeping the shards
already written; the result is byte-identical to an uninterrupted run with any ``--workers``.

Under ``torchrun`` (or with RANK and WORLD_SIZE set by hand, on a filesystem every rank shares) each
rank writes its share of the shards, every rank with its own ``--workers`` processes, and rank 0
writes the manifest once all are there: the same bytes as one process writes. No process group is
started; ranks meet through the files only.
"""

from __future__ import annotations

import argparse
import os
import sys

from bltdist.data.prepared import DEFAULT_SHARD_BYTES, prepare
from bltdist.errors import UserError

PROGRAM = "python -m bltdist.data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write a prepared dataset directory")
    prepare_parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="text, .json/.jsonl or .parquet files (.gz/.zst compressed too), directories or globs",
    )  # fmt: skip
    prepare_parser.add_argument("--out", required=True, help="the prepared dataset directory")
    prepare_parser.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    prepare_parser.add_argument("--text-field", default="text", help="JSONL / Parquet field holding the text")
    prepare_parser.add_argument(
        "--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
        help=f"input bytes per shard (default {DEFAULT_SHARD_BYTES}); a larger file is a shard alone",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers < 1 or args.shard_bytes < 1:
        parser.error("--workers and --shard-bytes must be >= 1")
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        prepare(args.inputs, args.out, args.workers, args.text_field, args.shard_bytes, rank=rank, world_size=world_size)
    except UserError as error:
        where = f"[rank {rank}] " if world_size > 1 else ""
        print(f"{PROGRAM} {args.command}: error: {where}{error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
