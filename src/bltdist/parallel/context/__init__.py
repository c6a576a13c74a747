"""Context parallelism: one micro-batch's sequence split across the ranks of the cp group.

Every cp rank gets the same micro-batch and patches it whole, so the patches are exactly those of
one process; ``ContextParallelLayout.build`` then gives each rank its share, in the shape that
``BLT.forward(..., layout=)`` reads:

- ``layout``: the split. The patches, right-padded to 2 x cp chunks of equal patch count; rank r
  keeps chunks r and 2cp-1-r (causal attention makes late chunks dearer, so each rank gets one
  early and one late) and the bytes of their patches, each chunk right-padded to the longest one.
- ``ring``: global attention over patches. K and V travel around the ring, partial outputs merge
  by log-sum-exp; only the visible half of each off-diagonal block is computed. (An all-gather, as
  in Llama 3, would hold every layer's whole-sequence K/V, the memory cp exists to remove.)
- ``halo``: the local layers' sliding window, whose first keys live on other ranks.
- ``comms``: the two communication steps, as autograd functions.

The loss of a rank is the cross-entropy of its own bytes (``layout.local_targets``); summed over
the cp ranks it is the single-process loss, and the gradients add up likewise, so a trainer whose
FSDP averages over dp_shard x cp multiplies the loss by cp before backward (as torchtitan does).

The plain LMs (arch entropy, bytelm, tokenlm) split the same way, every byte or token a patch of its
own (``ContextParallelSequence``): their attention is the ring, or the halo under a sliding window.

Not done yet: fused kernels for the ring blocks and the halo attention; overlap of the halo
exchange with compute.
"""

from bltdist.parallel.context.layout import ContextParallelLayout, ContextParallelSequence, chunk_width, own_targets

__all__ = ["ContextParallelLayout", "ContextParallelSequence", "chunk_width", "own_targets"]
