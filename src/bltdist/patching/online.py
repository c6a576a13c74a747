"""Patch boundaries decided byte by byte, for generation: ``patch_starts``' rule on a growing sequence.

``patch_starts`` cuts a whole sequence at once; generation must know whether byte t+1 starts a
patch as soon as byte t (and its entropy H(t)) exists. ``OnlineBoundaries`` keeps the few numbers
the rule looks back at (the last BOS, the last rule start, the previous byte's class and entropy)
and gives, per byte, the value ``patch_starts`` has at the next position. The next byte is taken
not to be a BOS: generation never produces one (BLT_NOTES section 7).
"""

from __future__ import annotations

import numpy as np

from bltdist.patching.rules import PATCH_MODES, THRESHOLD_MODES
from bltdist.patching.tokens import BOS_ID, BYTE_OFFSET


def is_space_like(token: int) -> bool:
    """The space rule's byte class: anything but an ASCII letter or digit or a UTF-8 continuation byte."""
    byte = token - BYTE_OFFSET
    word_byte = chr(byte).isascii() and chr(byte).isalnum() if 0 <= byte < 0x80 else 0x80 <= byte < 0xC0
    return not word_byte


class OnlineBoundaries:
    """Feed the tokens of a sequence in order; ``observe`` says whether the next position starts a patch."""

    def __init__(
        self,
        mode: str,
        *,
        patch_size: int = 4,
        threshold: float | None = None,
        threshold_mode: str = "global",
        max_patch_length: int | None = None,
    ):
        if mode not in PATCH_MODES:
            raise ValueError(f"unknown patching mode {mode!r}; expected one of {', '.join(PATCH_MODES)}")
        if mode == "entropy" and (threshold is None or threshold_mode not in THRESHOLD_MODES):
            raise ValueError(f"entropy patching needs a threshold and a threshold_mode in {THRESHOLD_MODES}")
        self.mode, self.patch_size, self.max_patch_length = mode, patch_size, max_patch_length
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.position = -1  # position of the last observed token
        self.last_bos = 0
        self.last_rule_start = 0  # latest start before max_patch_length cuts long patches
        self.previous_space_like = False
        self.previous_entropy: float | None = None

    def observe(self, token: int, entropy: float | None = None) -> bool:
        """Take the token at the next position t (and H(t) in entropy mode); True when t+1 starts a patch."""
        t = self.position = self.position + 1
        bos_like = t == 0 or token == BOS_ID
        if bos_like:
            self.last_bos = t
        starts = self._rule_starts(t, token, entropy) or bos_like  # the byte after a BOS starts a patch
        if starts:
            self.last_rule_start = t + 1
        if self.max_patch_length is not None:
            starts = (t + 1 - self.last_rule_start) % self.max_patch_length == 0
        self.previous_entropy = entropy
        return starts

    def _rule_starts(self, t: int, token: int, entropy: float | None) -> bool:
        if self.mode == "static":
            return (t - self.last_bos) % self.patch_size == 0  # offset of t+1 after the BOS, minus one
        if self.mode == "space":
            space_like = is_space_like(token)
            ends_patch = (space_like and (t == 0 or not self.previous_space_like)) or token < BYTE_OFFSET
            self.previous_space_like = space_like
            return ends_patch
        if entropy is None:
            raise ValueError("entropy patching needs the entropy of every byte")
        # In float32, as patch_starts compares its float32 entropies (the threshold rounded to float32 too).
        entropy, threshold = np.float32(entropy), np.float32(self.threshold)
        if self.threshold_mode == "global":
            return t >= 1 and bool(entropy > threshold)
        offset = t + 1 - self.last_bos  # monotonic: b+2 always starts, later positions on a rise
        return offset == 2 or (offset >= 3 and bool(entropy - np.float32(self.previous_entropy) > threshold))
