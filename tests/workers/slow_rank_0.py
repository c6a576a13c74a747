"""Worker for tests/test_parallel.py: the real trainer, with local rank 0 starting 5 s after the others,
as a loaded node may start it, so that the other ranks meet a bad config's error first.

``slow_rank_0.py [trainer args]``"""

import os
import sys
import time

if os.environ.get("LOCAL_RANK") == "0":
    time.sleep(5)

from bltdist.train import main  # noqa: E402 (after the delay: importing is part of starting)

main(sys.argv[1:])
