"""Worker for tests/test_parallel.py: the real trainer, except that on rank 1 the data loader
raises at its third batch, as a failing disk or a corrupt shard would on one node.

``fail_on_rank.py KIND [trainer args]``: KIND ``crash`` raises a RuntimeError (a bug, a lost
device), ``data`` a DataError (the trainer's error for bad input, exit code 2)."""

import os
import sys

from bltdist.data import PackedByteLoader
from bltdist.errors import DataError
from bltdist.train import main

KIND, TRAINER_ARGS = sys.argv[1], sys.argv[2:]

if os.environ.get("RANK") == "1":
    serve = PackedByteLoader.next_training_batch

    def failing_next_batch(self):
        if self._batches_served == 2:
            error = RuntimeError if KIND == "crash" else DataError
            raise error("simulated read failure on rank 1")
        return serve(self)

    PackedByteLoader.next_training_batch = failing_next_batch

main(TRAINER_ARGS)
