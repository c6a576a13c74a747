"""Worker for tests/test_parallel.py: the real trainer, except that on rank 1 the data loader
raises at its third batch, as a failing disk or a corrupt shard would on one node."""

import os

from bltdist.data import PackedByteLoader
from bltdist.train import main

if os.environ.get("RANK") == "1":
    serve = PackedByteLoader.next_batch

    def failing_next_batch(self):
        if self._batches_served == 2:
            raise RuntimeError("simulated read failure on rank 1")
        return serve(self)

    PackedByteLoader.next_batch = failing_next_batch

main()
