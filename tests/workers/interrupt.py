"""Worker for tests/test_checkpoint.py: the trainer, interrupted on rank 0 at a chosen step.

``interrupt.py MODE STEP [trainer args]``, run plainly or under torchrun, with MODE one of

- ``kill-after-step``: SIGKILL right after step STEP's metrics line (a crash mid-training);
- ``kill-in-save``: SIGKILL while the checkpoint of step STEP is written, after every shard is
  on disk but before it is committed (a crash mid-save);
- ``sigterm-after-step``: SIGTERM to itself after step STEP (a preemption notice);
- ``disk-full-in-save``: writing the shards of step STEP's checkpoint fails with ENOSPC.

Only the trigger is patched in; the trainer, the signals and the processes are real.
"""

import errno
import os
import signal
import sys

from bltdist import metrics, train
from bltdist.training import checkpoint as checkpointer

MODE, STEP, TRAINER_ARGS = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ON_RANK_0 = int(os.environ.get("RANK", "0")) == 0


def patch_after_step(sig: signal.Signals) -> None:
    train_line = metrics.MetricsLogger.train_line

    def train_line_then_signal(self, record, seconds_per_step):
        train_line(self, record, seconds_per_step)
        if record["step"] == STEP and ON_RANK_0:
            os.kill(os.getpid(), sig)

    metrics.MetricsLogger.train_line = train_line_then_signal


def patch_commit() -> None:
    commit = checkpointer.Checkpointer._commit

    def killed_before_commit(self, staging, final, metadata):
        if metadata["step"] == STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        commit(self, staging, final, metadata)

    checkpointer.Checkpointer._commit = killed_before_commit


def patch_disk_full() -> None:
    class FullDiskWriter(checkpointer.HuggingFaceStorageWriter):
        def write_data(self, plan, planner):
            if f".step_{STEP}.tmp" in str(self.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return super().write_data(plan, planner)

    checkpointer.HuggingFaceStorageWriter = FullDiskWriter


if MODE == "kill-after-step":
    patch_after_step(signal.SIGKILL)
elif MODE == "sigterm-after-step":
    patch_after_step(signal.SIGTERM)
elif MODE == "kill-in-save":
    patch_commit()
elif MODE == "disk-full-in-save":
    patch_disk_full()
else:
    raise SystemExit(f"unknown mode {MODE}")
train.main(TRAINER_ARGS)
