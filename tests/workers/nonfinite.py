"""Worker for tests/test_train.py: the real trainer, except that this rank's loss is NaN in steps
FIRST..LAST (counted from the start of this process), as a bad batch or an overflow would make it.

``nonfinite.py FIRST LAST [trainer args]``; backward still runs on the real loss, so only the
loss is poisoned and the gradients stay finite: the non-finite policy must catch it all the same.
"""

import math
import sys

from bltdist import train

FIRST, LAST = int(sys.argv[1]), int(sys.argv[2])
real_optimizer_step = train.optimizer_step
steps_begun = 0


def poisoned_optimizer_step(stepper, *args, **kwargs):
    global steps_begun
    steps_begun += 1
    if not FIRST <= steps_begun <= LAST:
        return real_optimizer_step(stepper, *args, **kwargs)
    forward_backward = stepper.forward_backward
    stepper.forward_backward = lambda *batch: (math.nan, forward_backward(*batch)[1])
    try:
        return real_optimizer_step(stepper, *args, **kwargs)
    finally:
        del stepper.forward_backward


train.optimizer_step = poisoned_optimizer_step
train.main(sys.argv[3:])
