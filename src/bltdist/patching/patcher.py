"""The patcher the trainer calls on every micro-batch: the ``patching`` config section made runnable."""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from bltdist.config import PatchingConfig, SuperPatchConfig
from bltdist.data.loader import EntropySource
from bltdist.patching.entropy import EntropyModel, OnlineEntropies
from bltdist.patching.rules import entropy_super_patch_lengths, patch_lengths, patch_starts

# Bisection steps of a recalibration: the threshold interval shrinks 2**40-fold, far below float32 spacing.
RECALIBRATION_STEPS = 40
from bltdist.patching.store import PrecomputedEntropies


class Patcher:
    """Cuts a batch of tokens into patches by the configured rule; returns lengths (B, P).

    In entropy mode it also says where the loader gets entropies: from ``patching.entropies``
    (the output of ``python -m bltdist.patch precompute``) when set, else from the entropy model
    run online. Both give the same entropies, hence the same patches.
    """

    def __init__(self, cfg: PatchingConfig, device: torch.device | str = "cpu", recent_batches: int = 1,
                 super_patch: SuperPatchConfig | None = None):  # fmt: skip
        """``recent_batches``: micro-batches a recalibration looks at (those of one optimizer step).
        ``super_patch``: the model's model.blt.super_patch; in mode entropy the patcher groups patches too."""
        self.cfg = cfg
        self.super_patch = super_patch if super_patch is not None and super_patch.enabled else None
        self.grouped = [0, 0]  # real patches and super-patches grouped since grouped_counts() last ran
        self.entropy_model = None
        self.precomputed = None
        self.threshold = cfg.threshold  # the one in use; recalibrated when cfg.target_patch_size is set
        self.recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=recent_batches)
        if cfg.mode == "entropy":
            self.entropy_model = EntropyModel(cfg.entropy_model, device, key="patching.entropy_model")
            if cfg.entropies is not None:
                self.precomputed = PrecomputedEntropies(cfg.entropies, self.entropy_model, key="patching.entropies")

    @property
    def joint(self) -> bool:
        """Whether the entropy model trains alongside the BLT: the trainer, not the loader, computes entropies."""
        return self.entropy_model is not None and self.cfg.entropy_model_training == "joint"

    @property
    def holds_target(self) -> bool:
        return self.entropy_model is not None and self.cfg.target_patch_size is not None

    @property
    def needs_entropies(self) -> bool:
        return self.entropy_model is not None

    @property
    def lengths_from_batch_alone(self) -> bool:
        """Whether a batch's patch lengths depend on its tokens and loader-served entropies only (no
        jointly trained entropy model, no threshold recalibrated during training): then the loader
        cuts them with the batch, on its prefetch thread (``PackedByteLoader.patch_lengths``)."""
        return not self.joint and not self.holds_target

    def entropy_source(self, documents: list[bytes]) -> EntropySource | None:
        """Entropies of ``documents`` for a PackedByteLoader, or None when the mode needs none."""
        if self.entropy_model is None or self.joint:
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
            threshold=self.threshold,
            threshold_mode=self.cfg.threshold_mode,
            max_patch_length=self.cfg.max_patch_length,
        )

    def __call__(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        return patch_lengths(self.starts(tokens, entropies))

    def super_patch_lengths(self, tokens: torch.Tensor, lengths: torch.Tensor,
                            entropies: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
        """Patches per super-patch (B, Ps) of the patch ``lengths`` (B, P) that ``__call__`` gave, for the
        model's ``super_patch_lengths``; None unless model.blt.super_patch.mode is entropy (the model
        groups static super-patches itself)."""
        grouped = entropy_super_patch_lengths(self.super_patch, tokens, lengths, entropies)
        if grouped is None:
            return None
        self.grouped = [self.grouped[0] + int(grouped.sum()), self.grouped[1] + int((grouped > 0).sum())]
        return grouped

    def grouped_counts(self) -> list[int]:
        """Real patches and super-patches grouped since the last call (the FLOP formula's average
        super-patch size); [0, 0] when the patcher groups none."""
        counts, self.grouped = self.grouped, [0, 0]
        return counts

    def observe(self, tokens: torch.Tensor, entropies: torch.Tensor | None) -> None:
        """A training micro-batch, kept (the last ``recent_batches``) for the next recalibration."""
        if self.holds_target:
            self.recent.append((tokens.detach(), entropies.detach()))

    def recalibrate(self, group: dist.ProcessGroup | None = None) -> float:
        """Sets and returns the threshold whose average patch length over the recent micro-batches of
        every rank of ``group`` (default: the world) is closest to ``patching.target_patch_size``.

        Collective: every rank bisects with the same summed counts, so every rank gets the same
        threshold. Ranks that hold the same micro-batch (tensor, context and pipeline parallel ones)
        add it equally often, which leaves the average unchanged. The average patch length never
        falls as the threshold rises, so bisection between the lowest compared value (every
        comparable position starts a patch) and the highest (none does) finds it."""
        target = self.cfg.target_patch_size
        compared = torch.cat([self._compared(entropies).flatten() for _, entropies in self.recent])
        bounds = self._all_reduce(torch.stack([-compared.min(), compared.max()]).double(), group, dist.ReduceOp.MAX)
        low, high = float(-bounds[0]) - 1.0, float(bounds[1])
        low_average, high_average = self._average_patch_length(low, group), self._average_patch_length(high, group)
        if high_average <= target or low_average >= target:
            self.threshold = high if high_average <= target else low
            return self.threshold
        for _ in range(RECALIBRATION_STEPS):  # invariant: average(low) < target <= average(high)
            middle = (low + high) / 2
            middle_average = self._average_patch_length(middle, group)
            if middle_average < target:
                low, low_average = middle, middle_average
            else:
                high, high_average = middle, middle_average
        self.threshold = low if target - low_average < high_average - target else high
        return self.threshold

    def _compared(self, entropies: torch.Tensor) -> torch.Tensor:
        """The values the threshold is compared with: H(t), or its rise H(t) - H(t-1)."""
        return entropies if self.cfg.threshold_mode == "global" else entropies[:, 1:] - entropies[:, :-1]

    def _average_patch_length(self, threshold: float, group: dist.ProcessGroup | None) -> float:
        counts = torch.zeros(2, dtype=torch.float64)  # tokens, patches: whole numbers, exact in float64
        for tokens, entropies in self.recent:
            starts = patch_starts(
                tokens, "entropy", entropies=entropies, threshold=threshold,
                threshold_mode=self.cfg.threshold_mode, max_patch_length=self.cfg.max_patch_length,
            )  # fmt: skip
            counts += torch.tensor([starts.numel(), int(starts.sum())], dtype=torch.float64)
        tokens, patches = self._all_reduce(counts, group, dist.ReduceOp.SUM).tolist()
        return tokens / patches

    def _all_reduce(self, values: torch.Tensor, group: dist.ProcessGroup | None, op) -> torch.Tensor:
        if not dist.is_initialized():
            return values
        device = self.recent[0][0].device
        values = values.to(device)
        dist.all_reduce(values, op=op, group=group)
        return values.cpu()
