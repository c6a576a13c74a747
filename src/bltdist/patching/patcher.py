"""The patcher the trainer calls on every micro-batch: the ``patching`` config section made runnable."""

from __future__ import annotations

import torch

from bltdist.config import PatchingConfig
from bltdist.data.loader import EntropySource
from bltdist.patching.entropy import EntropyModel, OnlineEntropies
from bltdist.patching.rules import patch_lengths, patch_starts
from bltdist.patching.store import PrecomputedEntropies


class Patcher:
    """Cuts a batch of tokens into patches by the configured rule; returns lengths (B, P).

    In entropy mode it also says where the loader gets entropies: from ``patching.entropies``
    (the output of ``python -m bltdist.patch precompute``) when set, else from the entropy model
    run online. Both give the same entropies, hence the same patches.
    """

    def __init__(self, cfg: PatchingConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.entropy_model = None
        self.precomputed = None
        if cfg.mode == "entropy":
            self.entropy_model = EntropyModel(cfg.entropy_model, device, key="patching.entropy_model")
            if cfg.entropies is not None:
                self.precomputed = PrecomputedEntropies(cfg.entropies, self.entropy_model, key="patching.entropies")

    @property
    def needs_entropies(self) -> bool:
        return self.entropy_model is not None

    def entropy_source(self, documents: list[bytes]) -> EntropySource | None:
        """Entropies of ``documents`` for a PackedByteLoader, or None when the mode needs none."""
        if self.entropy_model is None:
            return None
        if self.precomputed is not None:
            return self.precomputed.source(documents)
        return OnlineEntropies(self.entropy_model, documents)

    def starts(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_entropies and entropies is None:
            raise ValueError("entropy patching needs the entropies the loader serves with the tokens")
        return patch_starts(
            tokens,
            self.cfg.mode,
            patch_size=self.cfg.patch_size,
            entropies=entropies,
            threshold=self.cfg.threshold,
            threshold_mode=self.cfg.threshold_mode,
            max_patch_length=self.cfg.max_patch_length,
        )

    def __call__(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        return patch_lengths(self.starts(tokens, entropies))
