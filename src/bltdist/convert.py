"""Checkpoint and model conversions: ``python -m bltdist.convert SUBCOMMAND ...``.

- ``consolidate CKPT_DIR OUT_DIR``: the model weights of a sharded training checkpoint
  (``output_dir/checkpoints/step_N``) as one bltdist model directory (config.yaml +
  model.safetensors), the format ``--checkpoint.init_from`` reads.

Bad input prints one message and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from bltdist.errors import UserError


def _consolidate(args: argparse.Namespace) -> None:
    from bltdist.checkpointer import consolidate

    print(f"model written: {consolidate(args.checkpoint, args.out_dir)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bltdist.convert", description=__doc__.split("\n")[0])
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    consolidate = subcommands.add_parser("consolidate", help="sharded training checkpoint -> bltdist model directory")
    consolidate.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_1000")
    consolidate.add_argument("out_dir", help="the model directory to write")
    consolidate.set_defaults(run=_consolidate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        print(f"bltdist.convert {args.subcommand}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
