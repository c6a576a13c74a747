"""BLT model code: plain PyTorch modules, buildable on the meta device, no parallelism inside."""

from bltdist.model.blt import BLT, ByteLM, PatchLayout

__all__ = ["BLT", "ByteLM", "PatchLayout"]
