"""Decode-KV compression applied to a request's row (``rksc_sgl.rksc.compression`` chooses
what to keep): the kept slots move down the row, the dropped ones go back to the
allocator, and merged pairs are averaged first (CASK), weighted by the tokens each slot
stands for. A compressed row is never inserted into the tree (``KVCacheManager.release``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import torch

from rksc_sgl.kv.records import ReqKV

if TYPE_CHECKING:
    from rksc_sgl.kv.manager import KVCacheManager


def compress(kv: "KVCacheManager", req: ReqKV, start: int, end: int, keep: List[int], merges=()) -> int:
    """Keep only ``keep`` (indices into row positions ``start .. end - 1``) of those
    positions, consolidating each ``(dropped, kept)`` pair of ``merges`` first (keys and
    values averaged, weighted by the tokens each slot stands for). Positions from
    ``end`` on move down; the dropped slots are freed. Returns the number dropped."""
    assert req.protected_len <= start <= end <= req.kv_len and not req.pending
    row = kv.req_to_token_pool.req_to_token[req.row]
    slots = row[start:end].to(torch.int64)
    if merges:
        _consolidate(kv, req, slots, merges)
    keep_index = torch.tensor(sorted(keep), dtype=torch.int64)
    dropped_mask = torch.ones(len(slots), dtype=torch.bool)
    dropped_mask[keep_index] = False
    gone = slots[dropped_mask]
    if not len(gone):
        return 0
    for slot in gone.tolist():
        req.merged.pop(slot, None)
    moved = torch.cat([slots[keep_index], row[end : req.kv_len].to(torch.int64)])
    row[start : start + len(moved)] = moved.to(row.dtype)
    drop_positions = set((start + torch.nonzero(dropped_mask).flatten()).tolist())
    req.token_ids[: req.kv_len] = [t for p, t in enumerate(req.token_ids[: req.kv_len]) if p not in drop_positions]
    req.kv_len -= len(gone)
    req.dropped += len(gone)
    kv.allocator.free(gone)
    return len(gone)


def _consolidate(kv: "KVCacheManager", req: ReqKV, slots: torch.Tensor, merges) -> None:
    for dropped, kept in merges:
        src, dst = int(slots[dropped]), int(slots[kept])
        w_src, w_dst = req.merged.get(src, 1.0), req.merged.get(dst, 1.0)
        total = w_src + w_dst
        for layer in range(kv.layout.num_layers):
            for buf in (kv.kv_pool.get_key_buffer(layer), kv.kv_pool.get_value_buffer(layer)):
                mixed = (buf[dst].float() * w_dst + buf[src].float() * w_src) / total
                buf[dst] = mixed.to(buf.dtype)
        req.merged[dst] = total
        if kv.slot_attention is not None:
            kv.slot_attention[dst] += kv.slot_attention[src]
