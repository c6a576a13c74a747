import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the kernel tests run Triton's CPU interpreter, which Triton reads when a
    # kernel module is imported; that happens only in kernel tests, so other tests are unaffected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
