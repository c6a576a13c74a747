"""Patching: how byte sequences are cut into patches for the global model.

Layers, bottom up (each module imports only those before it, and only the last three import
the model):

- ``tokens``: the byte vocabulary and how a document is tokenised;
- ``rules``: patch boundaries from tokens (static, space, entropy thresholds), as tensor ops;
- ``entropy``: a trained entropy model directory, and entropies computed online per document chunk;
- ``store``: entropies precomputed to disk (``python -m bltdist.patch precompute``);
- ``patcher``: what the trainer calls per micro-batch (``patching`` config section);
- ``cli``: ``python -m bltdist.patch {calibrate,precompute,stats}``.

This package's top level exposes the two leaf modules only, so that the model can import the
token ids without importing the entropy model, which imports the model.
"""

from bltdist.patching.rules import pad_patch_lengths, patch_lengths, patch_starts
from bltdist.patching.tokens import BOS_ID, BYTE_OFFSET, EOS_ID, document_ids, document_tokens

__all__ = [
    "BOS_ID",
    "BYTE_OFFSET",
    "EOS_ID",
    "document_ids",
    "document_tokens",
    "pad_patch_lengths",
    "patch_lengths",
    "patch_starts",
]
