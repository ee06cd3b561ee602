"""What an ASKS lookup finds: which donor token serves each recipient token
(``align_tokens``), and the alias it hands the caller (``SemanticMatch``). Plain data and
``difflib``; the search over the tree is ``RKSCRadixCache.match_semantic``."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, List, Optional

import torch


def align_tokens(donor_ids: List[int], recipient_ids: List[int], shift: bool = True) -> List[Optional[int]]:
    """For each recipient token, the offset of the identical donor token it is aligned
    with, or None: ``difflib.SequenceMatcher``'s matching blocks (longest first, in order,
    no junk heuristic). ``shift=False`` keeps only pairs at the same offset."""
    if not shift:
        return [i if i < len(donor_ids) and donor_ids[i] == token else None for i, token in enumerate(recipient_ids)]
    matcher = difflib.SequenceMatcher(None, donor_ids, recipient_ids, autojunk=False)
    offsets: List[Optional[int]] = [None] * len(recipient_ids)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            offsets[block.b + k] = block.a + k
    return offsets


@dataclasses.dataclass
class SemanticMatch:
    """A semantic alias for the recipient's positions ``start .. start + length - 1``.

    ``donor_offsets[i]``: the offset in the donor node of the identical token whose KV
    serves span offset ``i`` (None: not aligned, computed). ``recompute``: the span
    offsets the recipient computes itself (every unaligned one, plus the selective
    recompute). ``slots[i]``: the donor's KV slot for offset ``i`` (-1 where unaligned;
    tree-owned: valid while ``node`` is locked). A reused offset whose donor token sits at
    another offset is *shifted*: its KV must be copied with rotated keys."""

    node: Any  # the donor TreeNode
    start: int
    length: int
    similarity: float
    slots: torch.Tensor
    recompute: List[int]
    donor_offsets: List[Optional[int]]

    @property
    def reused_tokens(self) -> int:
        """Span tokens whose KV comes from the donor (read in place or copied)."""
        return self.length - len(self.recompute)

    def shifted(self) -> List[int]:
        """Reused span offsets whose donor token sits at another offset (copied, rotated)."""
        skip = set(self.recompute)
        return [i for i, j in enumerate(self.donor_offsets) if j is not None and j != i and i not in skip]

    @property
    def shared_tokens(self) -> int:
        """Reused span tokens read in place from the donor's slots (no new slot)."""
        return self.reused_tokens - len(self.shifted())
