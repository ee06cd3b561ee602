"""The KV accounting invariant, checked: every slot is in exactly one place.

====================  ===============================================================
owner                 slots
====================  ===============================================================
allocator             free (``free_pages`` + ``release_pages``)
tree cache            each node's ``value`` (locked while a request reads the path)
running request       the owned part of its ``ReqToTokenPool`` row (past ``protected_len``,
                      or an alias's recomputed, copied and tail positions)
scratch               ``KVCacheManager.borrowed``: one forward's slots, nothing keeps them
====================  ===============================================================

and free + tree + owned + scratch == pool size, each slot once. When idle, no request,
lock, row or scratch borrowing is left. An alias reads donor slots in place only where the
donor holds the same token at the same position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import torch

from rksc_sgl.kv.records import ReqKV

if TYPE_CHECKING:
    from rksc_sgl.kv.manager import KVCacheManager


def tree_slot_indices(tree) -> List[torch.Tensor]:
    """The slot tensors of every node of ``tree``."""
    values = []
    stack = list(tree.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.value is not None:
            values.append(node.value)
        stack.extend(node.children.values())
    return values


def check_integrity(kv: "KVCacheManager", expect_idle: bool = False) -> None:
    """Every slot is free, tree-held, request-owned or borrowed as scratch, exactly once;
    locks balance.

    Raises ``AssertionError`` with the counts when the accounting is off.
    """
    free = [kv.allocator.free_pages, kv.allocator.release_pages]
    tree = tree_slot_indices(kv.tree)
    owned = [kv.owned_slots(r) for r in kv.active.values()] + list(kv.borrowed)
    for r in kv.active.values():
        if r.alias is not None:
            _check_alias(kv, r)
    all_slots = torch.cat([t.to(torch.int64) for t in free + tree + owned] or [torch.empty(0, dtype=torch.int64)])
    n_free = sum(len(t) for t in free)
    n_tree = sum(len(t) for t in tree)
    n_owned = sum(len(t) for t in owned)
    summary = f"free={n_free} tree={n_tree} requests+scratch={n_owned} total={kv.pool_tokens}"
    assert n_free + n_tree + n_owned == kv.pool_tokens, f"slot count mismatch: {summary}"
    expected = torch.arange(1, kv.pool_tokens + 1, dtype=torch.int64)
    assert torch.equal(torch.sort(all_slots).values, expected), f"slot held twice or lost: {summary}"
    assert n_tree == kv.tree.total_size(), f"tree size {kv.tree.total_size()} != {n_tree}"
    locked = _locked_nodes(kv.tree)
    if expect_idle:
        assert not kv.active, f"{len(kv.active)} requests still hold KV"
        assert not kv.borrowed, f"{len(kv.borrowed)} scratch borrowings still open"
        assert not locked, f"{len(locked)} tree nodes still locked when idle"
        assert kv.tree.protected_size() == 0, f"protected_size={kv.tree.protected_size()} when idle"
        assert kv.req_to_token_pool.available_size() == kv.req_to_token_pool.size, "request row leaked"
    if not kv.tree.disable:
        assert kv.tree.evictable_size() + kv.tree.protected_size() == n_tree, (
            f"evictable {kv.tree.evictable_size()} + protected {kv.tree.protected_size()} != tree {n_tree}"
        )


def _check_alias(kv: "KVCacheManager", req: ReqKV) -> None:
    """An alias reads tree slots in place only where the donor token is at the same
    position (the donor's own slot there), donor locked; copies are owned."""
    alias = req.alias
    assert alias.lock is not None and alias.lock.node.lock_ref > 0, "alias donor not locked"
    assert req.protected_len == alias.start, "a request with an alias moved its tree prefix"
    donor_path = kv.tree.path_device_indices(alias.lock.node)
    row = kv.req_to_token_pool.req_to_token[req.row].to(torch.int64)
    shared = alias.shared_positions()
    assert not shared or len(donor_path) > shared[-1], "alias donor shorter than its span"
    assert torch.equal(row[shared], donor_path[shared]), "alias row slots are not the donor's"
    donor_tokens = _path_tokens(kv.tree, alias.lock.node)
    assert all(donor_tokens[p] == req.token_ids[p] for p in shared), "alias reuses a different token's KV"
    for pos, slot, delta in alias.copies:
        assert int(donor_path[pos - delta]) == slot, "alias copies from outside its donor"
        assert donor_tokens[pos - delta] == req.token_ids[pos], "alias copies a different token's KV"
    assert torch.equal(row[: alias.start], donor_path[: alias.start]), "alias prefix is not the donor's path"


def _path_tokens(tree, node) -> List[int]:
    """The token ids from the root to ``node`` (``path_device_indices``'s twin for keys)."""
    parts = []
    while node is not tree.root_node:
        parts.append(list(node.key.token_ids))
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def _locked_nodes(tree) -> list:
    locked, stack = [], list(tree.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.lock_ref:
            locked.append(node)
        stack.extend(node.children.values())
    return locked
