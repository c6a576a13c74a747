import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernel tests run Triton's CPU interpreter, which Triton reads when a
    # kernel module is imported; that happens only in kernel tests, so other tests are unaffected.
    os.environ.setdefault("TRITON_INTERPRET", "1")
