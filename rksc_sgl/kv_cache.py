"""KV memory and its index: SGLang's pools plus SGLang's radix tree, on the CPU.

The pool owns the tensors (``MHATokenToKVPool``), one allocator hands out and takes back
every slot (``TokenToKVPoolAllocator``), each running request owns one row of
``ReqToTokenPool`` that lists its slots, and the tree cache holds slot indices only.
A request's row is ``[tree-owned prefix (locked) | slots the request owns]``; the split
point is ``protected_len``. Every slot is always in exactly one of three places: the
allocator's free list, a tree node, or the owned part of a running request's row.
``check_integrity`` asserts exactly that.

This module mirrors, narrowly, what SGLang's scheduler does around the tree
(``match_prefix`` -> lock -> allocate -> ``checkpoint`` -> insert and free duplicates ->
unlock), with plain token lists instead of SGLang's ``Req`` objects.
"""

from __future__ import annotations

import dataclasses
import warnings
from array import array
from typing import Any, List, Optional

import torch

with warnings.catch_warnings():
    # sglang's quantization modules warn at import that they need CUDA; irrelevant here.
    warnings.simplefilter("ignore")
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import (
        EvictParams,
        InsertParams,
        MatchPrefixParams,
    )
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey


class KVCacheExhausted(RuntimeError):
    """The KV pool cannot hold what a request needs, even after evicting everything."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shape of the per-layer KV the model writes (from the model config)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclasses.dataclass
class ReqKV:
    """The KV state of one request: its row and how much of it the tree owns."""

    row: int
    token_ids: List[int]
    kv_len: int = 0
    protected_len: int = 0
    lock: Any = None


def _radix_key(token_ids) -> RadixKey:
    return RadixKey(array("q", token_ids))


class KVCacheManager:
    """Pools + tree cache + the request-side bookkeeping between them."""

    def __init__(
        self,
        layout: KVLayout,
        pool_tokens: int,
        max_requests: int,
        max_context_len: int,
        enable_prefix_cache: bool,
        eviction_policy: str = "lru",
        eviction_policy_config: Optional[dict] = None,
        tree_cache_class: type = RadixCache,
    ):
        self.layout = layout
        self.pool_tokens = pool_tokens
        self.kv_pool = MHATokenToKVPool(
            size=pool_tokens,
            page_size=1,
            dtype=layout.dtype,
            head_num=layout.num_kv_heads,
            head_dim=layout.head_dim,
            layer_num=layout.num_layers,
            device="cpu",
            enable_memory_saver=False,
        )
        self.allocator = TokenToKVPoolAllocator(
            size=pool_tokens, dtype=layout.dtype, device="cpu", kvcache=self.kv_pool, need_sort=False
        )
        self.req_to_token_pool = ReqToTokenPool(
            size=max_requests, max_context_len=max_context_len, device="cpu", enable_memory_saver=False
        )
        self.tree = tree_cache_class(
            CacheInitParams(
                disable=not enable_prefix_cache,
                req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool_allocator=self.allocator,
                page_size=1,
                eviction_policy=eviction_policy,
                eviction_policy_config=dict(eviction_policy_config) if eviction_policy_config else None,
            )
        )
        self.active: dict[int, ReqKV] = {}

    # ---- capacity -------------------------------------------------------------------
    def available_tokens(self) -> int:
        """Slots that are free now or could be freed by evicting unlocked tree nodes."""
        return self.allocator.available_size() + self.tree.evictable_size()

    def used_tokens(self) -> int:
        return self.pool_tokens - self.allocator.available_size()

    # ---- request lifecycle ----------------------------------------------------------
    def match(self, token_ids: List[int], max_len: int):
        """Longest cached prefix of ``token_ids[:max_len]``: (slot indices, tree node)."""
        if max_len <= 0:
            return torch.empty((0,), dtype=torch.int64), self.tree.root_node
        result = self.tree.match_prefix(MatchPrefixParams(key=_radix_key(token_ids[:max_len])))
        node = result.last_device_node
        return self.tree.path_device_indices(node), node

    def open(self, token_ids: List[int], prefix_indices: torch.Tensor, node) -> ReqKV:
        """Lock the matched prefix and give the request a row that starts with it."""
        rows = self.req_to_token_pool.alloc_rows(1)
        if not rows:
            raise KVCacheExhausted("no free request row (max_running_requests reached)")
        row = rows[0]
        req = ReqKV(row=row, token_ids=list(token_ids))
        n = len(prefix_indices)
        if n:
            self.req_to_token_pool.write((row, slice(0, n)), prefix_indices.to(torch.int32))
        req.kv_len = n
        req.protected_len = n
        req.lock = self.tree.lock(node)
        self.active[row] = req
        return req

    def cancel_open(self, req: ReqKV) -> None:
        """Undo ``open`` for a request that was not admitted after all (nothing computed)."""
        assert req.kv_len == req.protected_len, "cancel_open after KV was computed"
        self.tree.unlock(req.lock)
        req.lock = None
        self.req_to_token_pool.free_rows([req.row])
        del self.active[req.row]

    def alloc(self, num_tokens: int) -> torch.Tensor:
        """Allocate slots, evicting unlocked tree leaves by the tree's policy if needed."""
        if num_tokens == 0:
            return torch.empty((0,), dtype=torch.int64)
        shortfall = num_tokens - self.allocator.available_size()
        if shortfall > 0:
            self.tree.evict(EvictParams(num_tokens=shortfall))
        slots = self.allocator.alloc(num_tokens)
        if slots is None:
            raise KVCacheExhausted(
                f"KV pool exhausted: need {num_tokens} slots, "
                f"{self.allocator.available_size()} free after eviction "
                f"(pool {self.pool_tokens} tokens)"
            )
        return slots

    def extend(self, req: ReqKV, new_token_ids: List[int]) -> torch.Tensor:
        """Reserve slots for ``new_token_ids`` at the end of the request's row.

        Returns the slots; the caller writes their KV and then calls ``commit``.
        """
        slots = self.alloc(len(new_token_ids))
        start = req.kv_len
        self.req_to_token_pool.write((req.row, slice(start, start + len(slots))), slots.to(torch.int32))
        return slots

    def commit(self, req: ReqKV, new_token_ids: List[int]) -> None:
        """Record that KV for ``new_token_ids`` is now in the row's slots."""
        del req.token_ids[req.kv_len :]
        req.token_ids.extend(new_token_ids)
        req.kv_len += len(new_token_ids)

    def row_slots(self, req: ReqKV, length: Optional[int] = None) -> torch.Tensor:
        n = req.kv_len if length is None else length
        return self.req_to_token_pool.req_to_token[req.row, :n].to(torch.int64)

    def checkpoint(self, req: ReqKV) -> None:
        """Hand the request's computed KV to the tree so concurrent requests can share it.

        Mirrors ``RadixCache.checkpoint``: insert, free the slots the tree already had
        under the same tokens, point the row at the tree's slots, move the lock down.
        """
        if self.tree.disable or req.kv_len == req.protected_len:
            return
        self._insert(req, self.row_slots(req))
        node = self.tree.match_prefix(MatchPrefixParams(key=_radix_key(req.token_ids[: req.kv_len]))).last_device_node
        tree_slots = self.tree.path_device_indices(node)
        assert len(tree_slots) == req.kv_len, (len(tree_slots), req.kv_len)
        self.req_to_token_pool.write(
            (req.row, slice(req.protected_len, req.kv_len)), tree_slots[req.protected_len :].to(torch.int32)
        )
        req.protected_len = req.kv_len
        self.tree.unlock(req.lock)
        req.lock = self.tree.lock(node)

    def release(self, req: ReqKV) -> None:
        """Request finished (or failed): cache what it computed, free the rest, unlock."""
        slots = self.row_slots(req)
        if self.tree.disable:
            self.allocator.free(slots[req.protected_len :])
        else:
            self._insert(req, slots)
        self.tree.unlock(req.lock)
        req.lock = None
        self.req_to_token_pool.free_rows([req.row])
        del self.active[req.row]

    def release_uncached(self, req: ReqKV, keep_len: int) -> None:
        """Drop a request without caching anything past ``keep_len`` (used on errors)."""
        slots = self.row_slots(req)
        if keep_len < req.kv_len:
            self.allocator.free(slots[max(keep_len, req.protected_len) :])
            req.kv_len = max(keep_len, req.protected_len)
        self.release(req)

    def _insert(self, req: ReqKV, slots: torch.Tensor) -> int:
        """Insert the row into the tree and free our copies of tokens it already held."""
        result = self.tree.insert(
            InsertParams(key=_radix_key(req.token_ids[: req.kv_len]), value=slots.clone())
        )
        # [0, protected_len) are the tree's own slots (locked, identical); the tokens in
        # [protected_len, prefix_len) were computed again by this request: free our copies.
        self.allocator.free(slots[req.protected_len : result.prefix_len])
        return result.prefix_len

    def flush(self) -> bool:
        """Empty the tree (only when no request holds KV), as SGLang's /flush_cache does."""
        if self.active:
            return False
        self.tree.reset()
        self.allocator.clear()
        self.req_to_token_pool.clear()
        return True

    # ---- invariants -----------------------------------------------------------------
    def tree_slot_indices(self) -> List[torch.Tensor]:
        values = []
        stack = list(self.tree.root_node.children.values())
        while stack:
            node = stack.pop()
            if node.value is not None:
                values.append(node.value)
            stack.extend(node.children.values())
        return values

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Every slot is free, tree-held or request-owned, exactly once; locks balance.

        Raises ``AssertionError`` with the counts when the accounting is off.
        """
        free = [self.allocator.free_pages, self.allocator.release_pages]
        tree = self.tree_slot_indices()
        owned = [self.row_slots(r)[r.protected_len :] for r in self.active.values()]
        all_slots = torch.cat([t.to(torch.int64) for t in free + tree + owned] or [torch.empty(0, dtype=torch.int64)])
        n_free = sum(len(t) for t in free)
        n_tree = sum(len(t) for t in tree)
        n_owned = sum(len(t) for t in owned)
        summary = f"free={n_free} tree={n_tree} requests={n_owned} total={self.pool_tokens}"
        assert n_free + n_tree + n_owned == self.pool_tokens, f"slot count mismatch: {summary}"
        expected = torch.arange(1, self.pool_tokens + 1, dtype=torch.int64)
        assert torch.equal(torch.sort(all_slots).values, expected), f"slot held twice or lost: {summary}"
        assert n_tree == self.tree.total_size(), f"tree size {self.tree.total_size()} != {n_tree}"
        locked = self._locked_nodes()
        if expect_idle:
            assert not self.active, f"{len(self.active)} requests still hold KV"
            assert not locked, f"{len(locked)} tree nodes still locked when idle"
            assert self.tree.protected_size() == 0, f"protected_size={self.tree.protected_size()} when idle"
            assert self.req_to_token_pool.available_size() == self.req_to_token_pool.size, "request row leaked"
        if not self.tree.disable:
            assert self.tree.evictable_size() + self.tree.protected_size() == n_tree, (
                f"evictable {self.tree.evictable_size()} + protected {self.tree.protected_size()} != tree {n_tree}"
            )

    def _locked_nodes(self) -> list:
        locked, stack = [], list(self.tree.root_node.children.values())
        while stack:
            node = stack.pop()
            if node.lock_ref:
                locked.append(node)
            stack.extend(node.children.values())
        return locked
