"""How the tests start processes: the launcher of several ranks, and independent runs side by side."""

from concurrent.futures import ThreadPoolExecutor


def launcher(nproc: int) -> list[str]:
    """What follows the interpreter to start ``nproc`` ranks: torchrun for several, nothing for one."""
    return [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def side_by_side(run, *calls: tuple) -> list:
    """``run(*call)`` for every call at once, results in order. Such runs are processes, mostly start-up
    or one core each, so on a few cores they end sooner together than one after the other; the threads
    only wait."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: run(*call), calls))
