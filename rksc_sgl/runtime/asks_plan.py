"""One ASKS recipient's plan in SGLang's runtime: which row positions read a donor's KV (in
place, or as a copy with its keys rotated) and which are computed, in how many prefill
rounds. Pure bookkeeping over slot numbers: :class:`~rksc_sgl.runtime.asks.RuntimeASKSCache`
makes the plans, SGLang's chunked prefill runs their rounds."""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from rksc_sgl.rksc.semantic_match import SemanticMatch

ROTATABLE_ROPE = ("RotaryEmbedding", "Llama3RotaryEmbedding")


@dataclasses.dataclass
class ASKSPlan:
    """One recipient's use of a donor: which row positions reuse what, and its rounds.

    Slots themselves stay on the pool's device: the plan holds *span offsets*, indices into
    ``match.slots`` (the donor slots, gathered on the device when the match was made).
    ``in_place``: row position -> span offset whose donor slot it reads (an identical token
    at the same offset). ``copies``: row position -> (span offset, delta), an identical token
    ``delta`` positions earlier in the donor, copied with its keys rotated. Every other
    position from ``exact_len`` on is computed. ``copy_rows``: the copies made so far
    (position -> row of ``copy_slots``, the device tensor of their slots). ``lock``: the
    donor node's tree lock while the recipient runs.
    """

    match: SemanticMatch
    exact_len: int
    in_place: Dict[int, int]
    copies: Dict[int, Tuple[int, int]]
    copy_rows: Dict[int, int] = dataclasses.field(default_factory=dict)
    copy_slots: Optional[torch.Tensor] = None
    lock: Any = None
    kv: Any = None  # the admitted request's ReqKvInfo (kept alive while registered)

    @classmethod
    def build(cls, match: SemanticMatch, exact_len: int, shift: bool) -> "ASKSPlan":
        computed = set(match.recompute)
        in_place, copies = {}, {}
        for offset, donor_offset in enumerate(match.donor_offsets):
            if donor_offset is None or offset in computed:
                continue
            if donor_offset == offset:
                in_place[exact_len + offset] = offset
            elif shift:
                copies[exact_len + offset] = (offset, offset - donor_offset)
        return cls(match=match, exact_len=exact_len, in_place=in_place, copies=copies)

    @functools.cached_property
    def reused(self) -> List[int]:
        """Row positions served from the donor, ascending (``in_place``/``copies`` never change)."""
        return sorted([*self.in_place, *self.copies])

    def reused_slots(self, start: int, end: int) -> torch.Tensor:
        """Slots of the reused row positions ``start .. end - 1`` (all copies made), as one
        gather on the device from the donor's slots and the copies' slots."""
        donor = self.match.slots
        sources = donor if self.copy_slots is None else torch.cat([donor, self.copy_slots.to(donor.dtype)])
        rows = [self.in_place[p] if p in self.in_place else len(donor) + self.copy_rows[p] for p in range(start, end)]
        return sources[torch.tensor(rows, dtype=torch.int64, device=sources.device)].to(torch.int64)

    @property
    def reused_tokens(self) -> int:
        return len(self.in_place) + len(self.copies)

    def next_computed(self, position: int) -> int:
        """The first computed row position at or after ``position``."""
        while position in self.in_place or position in self.copies:
            position += 1
        return position

    def run_end(self, start: int) -> Optional[int]:
        """Where the computed run from ``start`` ends (the next reused position), or
        ``None`` when it runs to the end of the prompt (the last round)."""
        k = bisect.bisect_right(self.reused, start)
        return self.reused[k] if k < len(self.reused) else None

    @property
    def rounds(self) -> int:
        """Prefill passes the recipient takes: one per computed run."""
        count, position = 0, self.next_computed(self.exact_len)
        while True:
            count += 1
            end = self.run_end(position)
            if end is None:
                return count
            position = self.next_computed(end)


def key_rotation(rotary_emb) -> Optional[Callable[[torch.Tensor, int], torch.Tensor]]:
    """``rotate(keys, delta)``: keys (n, heads, head_dim) moved ``delta`` positions later,
    for SGLang's position-independent rotary embeddings; ``None`` for others (shifted donor
    tokens are then computed). Rotations compose, R(p + d) = R(d) R(p)."""
    if type(rotary_emb).__name__ not in ROTATABLE_ROPE:
        return None
    inv_freq = rotary_emb._compute_inv_freq(rotary_emb.base).float().cpu()  # (rotary_dim / 2,)
    rotary_dim, neox = int(rotary_emb.rotary_dim), bool(rotary_emb.is_neox_style)

    def rotate(keys: torch.Tensor, delta: int) -> torch.Tensor:
        angle = inv_freq.to(keys.device) * float(delta)
        cos, sin = angle.cos(), angle.sin()
        k = keys.float()
        rot, rest = k[..., :rotary_dim], k[..., rotary_dim:]
        if neox:
            x1, x2 = rot.chunk(2, dim=-1)
            rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return torch.cat([rot, rest], dim=-1)

    return rotate


def subtract_positions(ranges: List[Tuple[int, int]], positions: List[int]) -> List[Tuple[int, int]]:
    """Ascending half-open ``ranges`` without the sorted ``positions``."""
    out = []
    for start, end in ranges:
        cursor = start
        for position in positions[bisect.bisect_left(positions, start):bisect.bisect_left(positions, end)]:
            if position > cursor:
                out.append((cursor, position))
            cursor = position + 1
        if cursor < end:
            out.append((cursor, end))
    return out
