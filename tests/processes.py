"""How the tests start processes: the launcher of several ranks, independent runs side by side, and
which multi-process runs the installed torch can do."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bltdist.parallel.pipeline import torch_schedule_problems

# The trainer refuses what the installed torch cannot run (a V schedule on gloo before 2.13); CI has 2.13.
_v_schedule_problems = torch_schedule_problems("ZBVZeroBubble", torch.device("cpu"))
v_schedule_on_gloo = pytest.mark.skipif(bool(_v_schedule_problems), reason="; ".join(_v_schedule_problems))


def launcher(nproc: int) -> list[str]:
    """What follows the interpreter to start ``nproc`` ranks: torchrun for several, nothing for one."""
    return [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def side_by_side(run, *calls: tuple) -> list:
    """``run(*call)`` for every call at once, results in order. Such runs are processes, mostly start-up
    or one core each, so on a few cores they end sooner together than one after the other; the threads
    only wait."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: run(*call), calls))
