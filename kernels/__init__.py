"""Triton kernels for BLT, importable as ``bltdist.kernels``.

The PyTorch implementations in ``bltdist.model`` are the specification; the kernels here match
them and are chosen by ``fused``, the one place that decides between a kernel and the reference.
Kernel modules are imported only when a kernel may run, so CPU runs never import Triton.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

MODES = ("auto", "triton", "torch")
# Kernels index raw storage: a sharded DTensor or another subclass must go through the reference.
_PLAIN = (torch.Tensor, torch.nn.Parameter)

# name -> (module, kernel function, function saying why a call is unsupported)
_KERNELS = {
    "hash_ngram_embedding": ("hash_embedding", "hash_ngram_embedding", "unsupported_reason"),
    "patch_pool_attention": ("cross_attention", "patch_pool_attention", "patch_pool_unsupported_reason"),
    "byte_to_slot_attention": ("cross_attention", "byte_to_slot_attention", "byte_to_slot_unsupported_reason"),
}


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be set before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused(mode: str, name: str, *args) -> torch.Tensor | None:
    """The kernel ``name`` applied to ``args``, or None where the PyTorch reference must run.

    ``mode``: ``auto`` = kernels on CUDA, ``triton`` = kernels wherever they can run (CUDA, or any
    device under ``TRITON_INTERPRET=1``), ``torch`` = always the reference. A call the kernel does
    not support falls back to the reference with a warning given once per reason.
    """
    if mode not in MODES:
        raise ValueError(f"unknown kernels mode {mode!r}; choose one of {MODES}")
    device = args[0].device
    if mode == "torch" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and not interpreting():
        _warn_once(name, f"tensors on {device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)")
        return None
    distributed = [type(arg).__name__ for arg in args if isinstance(arg, torch.Tensor) and type(arg) not in _PLAIN]
    if distributed:
        _warn_once(name, f"tensor subclass {distributed[0]}")
        return None
    module_name, kernel_name, reason_name = _KERNELS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    reason = getattr(module, reason_name)(*args)
    if reason is not None:
        _warn_once(name, reason)
        return None
    return getattr(module, kernel_name)(*args)


@functools.cache
def _warn_once(name: str, reason: str) -> None:
    warnings.warn(f"bltdist.kernels: {name} falls back to the PyTorch reference: {reason}", stacklevel=3)
