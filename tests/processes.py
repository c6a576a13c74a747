"""How the tests start processes: the launcher of several ranks, and independent runs side by side."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

# torch 2.11 sets up a V schedule with a send from a rank to itself, which gloo refuses; bltdist names
# that before the start (bltdist.parallel.pipeline.torch_schedule_problems). CI runs these on 2.13.
v_schedule_on_gloo = pytest.mark.skipif(
    torch.__version__ < "2.13", reason=f"ZBVZeroBubble on gloo needs torch >= 2.13 (this is {torch.__version__})"
)


def launcher(nproc: int) -> list[str]:
    """What follows the interpreter to start ``nproc`` ranks: torchrun for several, nothing for one."""
    return [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def side_by_side(run, *calls: tuple) -> list:
    """``run(*call)`` for every call at once, results in order. Such runs are processes, mostly start-up
    or one core each, so on a few cores they end sooner together than one after the other; the threads
    only wait."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: run(*call), calls))
