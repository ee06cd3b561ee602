"""Which decode items of a batch share a slot prefix, and how each is attended.

Branches of a fork reference the same prefix slots in their rows, so comparing slot
indices finds them; a group's prefix is then read once per layer for all of its members
(cascade attention). Everything else is attended one item at a time.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List

import torch

if TYPE_CHECKING:  # the runner imports this module
    from rksc_sgl.model.runner import ForwardItem


@dataclasses.dataclass
class SharedPrefixGroup:
    """Decode items (one new token each) whose rows start with the same slots."""

    offsets: torch.Tensor  # positions of their queries in the batch
    members: List[tuple]  # (query offset, ForwardItem)
    shared_len: int  # how many leading slots of their rows they share
    prefix_index: object  # slice or (P,) slot tensor
    suffix_slots: torch.Tensor  # (m, S) padded with slot 0
    suffix_mask: torch.Tensor  # (m, S) True where a real key is


@dataclasses.dataclass
class AttentionPlan:
    singles: List[tuple]  # (query offset, ForwardItem, pool index) attended one by one
    groups: List[SharedPrefixGroup]


def plan_attention(items: List["ForwardItem"], min_shared: int, device=None) -> AttentionPlan:
    """Group decode items by a shared slot prefix of at least ``min_shared`` tokens.

    Branches of a fork reference the same prefix slots in their rows, so comparing slot
    indices finds them; a group's prefix is then read once per layer for all of them.
    Everything else (prefills, lone requests) is attended one item at a time with SDPA,
    which keeps single streams bit-identical to ``transformers``. Index tensors are put on
    ``device`` (the pool's); the items keep their host copies.
    """
    offsets, offset = [], 0
    for it in items:
        offsets.append(offset)
        offset += len(it.token_ids)
    by_first: dict = {}
    singles = []
    for off, it in zip(offsets, items):
        if len(it.token_ids) == 1 and min_shared and len(it.slots) > min_shared:
            by_first.setdefault(int(it.slots[0]), []).append((off, it))
        else:
            singles.append((off, it))
    groups = []
    for members in by_first.values():
        shared = _common_prefix_len([it.slots for _, it in members])
        if len(members) < 2 or shared < min_shared:
            singles.extend(members)
            continue
        groups.append(_group(members, shared, device))
    return AttentionPlan([(off, it, _to(pool_index(it.slots), device)) for off, it in singles], groups)


def _to(index, device):
    return index if device is None or isinstance(index, slice) else index.to(device)


def _common_prefix_len(rows: List[torch.Tensor]) -> int:
    n = min(len(r) for r in rows) - 1  # every branch keeps its own newest token
    first = rows[0][:n]
    same = torch.ones(n, dtype=torch.bool)
    for row in rows[1:]:
        same &= row[:n] == first
    return int(torch.cumprod(same.to(torch.int64), 0).sum()) if n > 0 else 0


def _group(members, shared: int, device=None) -> SharedPrefixGroup:
    suffixes = [it.slots[shared:] for _, it in members]
    width = max(len(x) for x in suffixes)
    suffix_slots = torch.zeros((len(members), width), dtype=torch.int64)
    suffix_mask = torch.zeros((len(members), width), dtype=torch.bool)
    for i, x in enumerate(suffixes):
        suffix_slots[i, : len(x)] = x
        suffix_mask[i, : len(x)] = True
    return SharedPrefixGroup(
        offsets=_to(torch.tensor([off for off, _ in members]), device),
        members=list(members),
        shared_len=shared,
        prefix_index=_to(pool_index(members[0][1].slots[:shared]), device),
        suffix_slots=_to(suffix_slots, device),
        suffix_mask=_to(suffix_mask[None, None], device),
    )


def pool_index(slots: torch.Tensor):
    """Index for ``buf[...]``: a slice (a view, no copy) when the slots are one
    contiguous run, as a prefix allocated in one piece is; else the slot tensor."""
    n = len(slots)
    if n and int(slots[-1]) - int(slots[0]) == n - 1 and bool((slots[1:] - slots[:-1] == 1).all()):
        return slice(int(slots[0]), int(slots[0]) + n)
    return slots
