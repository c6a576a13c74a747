"""The byte loss: one function for every path (plain, context-parallel, pipeline)."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets of bytes that carry no loss (context-parallel padding)


def byte_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-byte cross-entropy in nats of logits (B, T, vocab) against targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
