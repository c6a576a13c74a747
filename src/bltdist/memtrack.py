"""Measured peak tensor memory of a process, the quantity ``bltdist.plan`` estimates.

Definition (the same on CPU and GPU): the largest total size, over the tracked region, of the
distinct tensor storages alive in the process, sampled after every dispatched ATen operation
(forward, backward, collectives, optimizer). Storages that exist before tracking starts
(parameter shards, optimizer state) are counted when registered with ``track``. A storage's size
is read at every sample, so FSDP's freeing of all-gathered parameters (storage resize to 0)
counts as a release. Not counted: scratch memory a kernel allocates and frees inside one
operation, allocator caching and fragmentation, and non-tensor memory (Python, libraries).
Resident set size is not used: on CPU it includes all of that and is too noisy to compare with.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass


def _plain_tensors(tensor: torch.Tensor):
    """The tensors that own storage: a DTensor (or other wrapper subclass) holds them inside."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):  # newer DTensors also list their mesh here
                yield from _plain_tensors(inner)
    else:
        yield tensor


def _tensors_in(value):
    # Not torch's pytree: it would open a DTensor into its mesh and placements.
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as tracker: ...``; then ``tracker.peak_bytes``. Setting
    ``tracker.phase`` to a label as the tracked code moves on (forward, backward, optimizer step)
    makes ``tracker.peak_phase`` say where the peak happened: which terms of an estimate were
    alive together."""

    def __init__(self):
        super().__init__()
        self._storages: dict[int, weakref.ref] = {}
        self.peak_bytes = 0
        self.phase = ""
        self.peak_phase = ""

    def track(self, *tensors_or_collections) -> None:
        for tensor in _tensors_in(tensors_or_collections):
            for plain in _plain_tensors(tensor):
                if plain.device.type == "meta":
                    continue
                storage = plain.untyped_storage()
                key = id(storage)
                if key not in self._storages:
                    # The storage object lives exactly as long as the memory behind it.
                    self._storages[key] = weakref.ref(storage, lambda _, key=key: self._storages.pop(key, None))
        self._sample()

    def current_bytes(self) -> int:
        return sum(storage.nbytes() for ref in list(self._storages.values()) if (storage := ref()) is not None)

    def _sample(self) -> None:
        current = self.current_bytes()
        if current > self.peak_bytes:
            self.peak_bytes, self.peak_phase = current, self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out
