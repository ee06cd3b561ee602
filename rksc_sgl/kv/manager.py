"""KV memory and its index: SGLang's pools plus SGLang's radix tree, on the CPU.

The pool owns the tensors (``MHATokenToKVPool``), one allocator hands out and takes back
every slot (``TokenToKVPoolAllocator``), each running request owns one row of
``ReqToTokenPool`` that lists its slots, and the tree cache holds slot indices only.
A request's row is ``[tree-owned prefix (locked) | slots the request owns]``; the split
point is ``protected_len``. Every slot is always in exactly one of four places: the
allocator's free list, a tree node, the owned part of a running request's row, or a
forward's scratch (``scratch``: borrowed for one pass whose KV nothing keeps).
``check_integrity`` asserts exactly that.

Semantic aliases (ASKS, ``cache="rksc-tree"``): a request may read a *donor* node's slots for
the span right after its exact prefix (``match_alias``). Its row is then
``[exact prefix | span | slots it owns]``, where a span position holds the donor's slot
(a token aligned with the identical donor token at the same position, read in place),
an owned copy of the donor's KV with keys rotated to the new position (aligned, but
shifted), or an owned slot the request computes (unaligned tokens and the selective
recompute). The donor slots stay the tree's (the donor node is locked while the request
runs) and a request that used an alias inserts nothing into the tree: everything it
computed after the exact prefix depends on approximate KV, so an exact lookup must never
return it.

This module mirrors, narrowly, what SGLang's scheduler does around the tree
(``match_prefix`` -> lock -> allocate -> ``checkpoint`` -> insert and free duplicates ->
unlock), with plain token lists instead of SGLang's ``Req`` objects.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, List, Optional

import torch

from rksc_sgl.gpu_stack import explain_missing_sgl_kernel

with warnings.catch_warnings(), explain_missing_sgl_kernel():
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
    from sglang.srt.mem_cache.radix_cache import RadixCache

from rksc_sgl.kv.integrity import check_integrity, tree_slot_indices
from rksc_sgl.kv.records import Alias, KVCacheExhausted, KVLayout, ReqKV, SemanticTree, radix_key


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
        device: str = "cpu",
        slot_attention: Optional[torch.Tensor] = None,
        slot_features: Optional[torch.Tensor] = None,
        rotate_keys: Optional[Callable] = None,
    ):
        # Only the KV tensors live on ``device``; rows, slot indices and the tree stay on
        # the host, where the scheduler reads them every step.
        self.layout = layout
        self.pool_tokens = pool_tokens
        self.kv_pool = MHATokenToKVPool(
            size=pool_tokens,
            page_size=1,
            dtype=layout.dtype,
            head_num=layout.num_kv_heads,
            head_dim=layout.head_dim,
            layer_num=layout.num_layers,
            device=device,
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
        self.borrowed: List[torch.Tensor] = []  # scratch slots of a forward in progress (``scratch``)
        self.key_tokens = 0  # tokens keyed by match_alias (the recipients' key cost)
        # (keys, delta) -> keys moved delta positions (RoPE). With it, ASKS may reuse an
        # aligned donor token at a shifted position (copied, rotated); without, it computes it.
        self.rotate_keys = rotate_keys
        # Per-slot tables (index = slot; slot 0 is padding), owned by whoever built the
        # engine and shared with the runner that fills them and the tree that reads them:
        # the attention mass each slot's key received (RSBCM eviction, decode-KV
        # compression; reset when a slot is allocated again), and each slot's hidden state
        # at the ASKS key layer. None: not collected.
        self.slot_attention = slot_attention
        self.slot_features = slot_features

    # ---- capacity -------------------------------------------------------------------
    def available_tokens(self) -> int:
        """Slots that are free now or could be freed by evicting unlocked tree nodes."""
        return self.allocator.available_size() + self.tree.evictable_size()

    def used_tokens(self) -> int:
        return self.pool_tokens - self.allocator.available_size()

    # ---- request lifecycle ----------------------------------------------------------
    def match(self, token_ids: List[int], max_len: int, namespace: Optional[str] = None):
        """Longest cached prefix of ``token_ids[:max_len]`` in ``namespace``: (slot indices, tree node)."""
        if max_len <= 0:
            return torch.empty((0,), dtype=torch.int64), self.tree.root_node
        result = self.tree.match_prefix(MatchPrefixParams(key=radix_key(token_ids[:max_len], namespace)))
        node = result.last_device_node
        return self.tree.path_device_indices(node), node

    def match_alias(self, token_ids: List[int], max_len: int, prefix_slots: torch.Tensor, node,
                    span_features: Optional[Callable] = None):
        """The semantic continuation of an exact match (ASKS), or None.

        ``prefix_slots`` and ``node`` are what ``match`` returned. Only an ``RKSCRadixCache``
        with ASKS active returns anything; pass the result to ``open``. With a
        ``span_features`` function (key layer above 0, ``rksc_sgl.rksc.span_keys``), the
        recipient's span is run through the first layers over its exact prefix to key it
        (``span_features(prefix_slots, span_ids)``); the prefix stays locked meanwhile.
        """
        prefix_len = len(prefix_slots)
        if prefix_len >= max_len or not (isinstance(self.tree, SemanticTree) and self.tree.semantic_active):
            return None
        span = token_ids[prefix_len:max_len]

        def locked_span_features(n: int) -> torch.Tensor:
            lock = self.tree.lock(node)
            try:
                return span_features(prefix_slots, span[:n])
            finally:
                self.tree.unlock(lock)

        before = self.tree.stats.key_tokens
        features = locked_span_features if span_features is not None else None
        match = self.tree.match_semantic(span, node, prefix_len, recipient_features=features,
                                         shift=self.rotate_keys is not None)
        self.key_tokens += self.tree.stats.key_tokens - before
        return match

    def open(self, token_ids: List[int], prefix_indices: torch.Tensor, node, alias=None,
             namespace: Optional[str] = None) -> ReqKV:
        """Lock the matched prefix and give the request a row that starts with it.

        ``alias`` (a ``SemanticMatch`` from ``match_alias``): also lock the donor node and
        put its slots in the row right after the prefix; the prefill then computes only
        the recomputed positions and the tokens after the span (see ``extend``).
        """
        rows = self.req_to_token_pool.alloc_rows(1)
        if not rows:
            raise KVCacheExhausted("no free request row (max_running_requests reached)")
        row = rows[0]
        req = ReqKV(row=row, token_ids=list(token_ids), namespace=namespace)
        n = len(prefix_indices)
        if n:
            self.req_to_token_pool.write((row, slice(0, n)), prefix_indices.to(torch.int32))
        req.kv_len = n
        req.protected_len = n
        req.lock = self.tree.lock(node)
        if alias is not None:
            assert alias.start == n and len(token_ids) > alias.start + alias.length, (alias.start, n)
            shifted = alias.shifted()
            req.alias = Alias(
                start=n,
                length=alias.length,
                recompute=[n + off for off in alias.recompute],
                similarity=alias.similarity,
                lock=self.tree.lock(alias.node),
                copies=[(n + i, int(alias.slots[i]), i - alias.donor_offsets[i]) for i in shifted],
            )
            shared = torch.tensor(req.alias.shared_positions(), dtype=torch.int64)
            self.req_to_token_pool.write((row, shared), alias.slots[shared - n].to(torch.int32))
        self.active[row] = req
        return req

    def cancel_open(self, req: ReqKV) -> None:
        """Undo ``open`` for a request that was not admitted after all (nothing computed)."""
        assert req.kv_len == req.protected_len, "cancel_open after KV was computed"
        assert req.alias is None or not req.alias.allocated, "cancel_open after KV was computed"
        self._unlock_alias(req)
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
        if self.slot_attention is not None:
            self.slot_attention[slots] = 0.0  # slots are reused: drop the previous owner's mass
        return slots

    @contextlib.contextmanager
    def scratch(self, num_tokens: int) -> Iterator[torch.Tensor]:
        """Slots borrowed for one forward whose KV nothing keeps (the verifier's pass, ASKS
        span keys): allocated like any (evicting if needed, ``KVCacheExhausted`` if even that
        is not enough) and back with the allocator on exit, whatever happens."""
        slots = self.alloc(num_tokens)
        self.borrowed.append(slots)
        try:
            yield slots
        finally:
            self.borrowed = [b for b in self.borrowed if b is not slots]  # by identity: tensors compare elementwise
            self.allocator.free(slots)

    def extend(self, req: ReqKV, new_token_ids: List[int]) -> torch.Tensor:
        """Reserve slots for ``new_token_ids`` at the end of the request's row.

        Returns the slots; the caller writes their KV and then calls ``commit``.
        For a request with a semantic alias, the first extend (its prefill, starting at
        the alias) allocates the recomputed positions, the shifted copies (filled here,
        from the locked donor) and the tokens after the span; it returns the slots of
        ``alias.positions``, the row positions the caller must compute.
        """
        alias = req.alias
        if alias is not None and not alias.allocated:
            assert req.kv_len == alias.start and len(new_token_ids) > alias.length, (req.kv_len, alias)
            positions = alias.recompute + list(range(alias.end, req.kv_len + len(new_token_ids)))
            slots = self.alloc(len(positions) + len(alias.copies))
            computed, copies = slots[: len(positions)], slots[len(positions) :]
            self.req_to_token_pool.write((req.row, torch.tensor(positions + alias.copied)), slots.to(torch.int32))
            for delta in sorted({d for _, _, d in alias.copies}):
                group = [k for k, (_, _, d) in enumerate(alias.copies) if d == delta]
                src = torch.tensor([alias.copies[k][1] for k in group], dtype=torch.int64)
                self.copy_kv(src, copies[group], delta, self.rotate_keys)
            alias.positions = positions
            alias.allocated = True
            return computed
        slots = self.alloc(len(new_token_ids))
        start = req.kv_len
        self.req_to_token_pool.write((req.row, slice(start, start + len(slots))), slots.to(torch.int32))
        req.pending = len(slots)
        return slots

    def commit(self, req: ReqKV, new_token_ids: List[int]) -> None:
        """Record that KV for ``new_token_ids`` is now in the row's slots."""
        del req.token_ids[req.kv_len :]
        req.token_ids.extend(new_token_ids)
        req.kv_len += len(new_token_ids)
        req.pending = 0

    def row_slots(self, req: ReqKV, length: Optional[int] = None) -> torch.Tensor:
        n = req.kv_len if length is None else length
        return self.req_to_token_pool.req_to_token[req.row, :n].to(torch.int64)

    def checkpoint(self, req: ReqKV) -> None:
        """Hand the request's computed KV to the tree so concurrent requests can share it.

        Mirrors ``RadixCache.checkpoint``: insert, free the slots the tree already had
        under the same tokens, point the row at the tree's slots, move the lock down.
        """
        if self.tree.disable or req.kv_len == req.protected_len or req.alias is not None:
            return
        self._insert(req, self.row_slots(req))
        key = radix_key(req.token_ids[: req.kv_len], req.namespace)
        node = self.tree.match_prefix(MatchPrefixParams(key=key)).last_device_node
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
        if req.alias is not None or req.dropped or req.merged:
            # Nothing past the exact prefix is exact (a donor's KV, or compressed KV):
            # cache none of it.
            self.allocator.free(self.owned_slots(req))
            self._unlock_alias(req)
        elif self.tree.disable:
            self.allocator.free(slots[req.protected_len :])
        else:
            self._insert(req, slots)
        self.tree.unlock(req.lock)
        req.lock = None
        self.req_to_token_pool.free_rows([req.row])
        del self.active[req.row]

    def release_uncached(self, req: ReqKV, keep_len: int) -> None:
        """Drop a request without caching anything past ``keep_len`` (used on errors)."""
        if req.pending:
            # A step failed between extend and commit: those slots hold no valid KV.
            self.allocator.free(self.row_slots(req, req.kv_len + req.pending)[req.kv_len :])
            req.pending = 0
        slots = self.row_slots(req)
        if keep_len < req.kv_len and req.alias is None:
            self.allocator.free(slots[max(keep_len, req.protected_len) :])
            req.kv_len = max(keep_len, req.protected_len)
        self.release(req)

    def _unlock_alias(self, req: ReqKV) -> None:
        if req.alias is not None and req.alias.lock is not None:
            self.tree.unlock(req.alias.lock)
            req.alias.lock = None

    def owned_slots(self, req: ReqKV) -> torch.Tensor:
        """The slots of the row that the request owns (not the tree's)."""
        alias = req.alias
        if alias is None:
            return self.row_slots(req)[req.protected_len :]
        if not alias.allocated:
            return torch.empty((0,), dtype=torch.int64)
        row = self.req_to_token_pool.req_to_token[req.row]
        positions = alias.recompute + alias.copied + list(range(alias.end, max(req.kv_len, alias.positions[-1] + 1)))
        return row[torch.tensor(positions, dtype=torch.int64)].to(torch.int64)

    def _insert(self, req: ReqKV, slots: torch.Tensor) -> int:
        """Insert the row into the tree and free our copies of tokens it already held."""
        result = self.tree.insert(
            InsertParams(key=radix_key(req.token_ids[: req.kv_len], req.namespace), value=slots.clone())
        )
        # [0, protected_len) are the tree's own slots (locked, identical); the tokens in
        # [protected_len, prefix_len) were computed again by this request: free our copies.
        self.allocator.free(slots[req.protected_len : result.prefix_len])
        return result.prefix_len

    def copy_kv(self, src: torch.Tensor, dst: torch.Tensor, delta: int, rotate_keys: Callable) -> None:
        if not len(src):
            return
        device = self.kv_pool.get_key_buffer(0).device
        src, dst = src.to(device), dst.to(device)
        for layer in range(self.layout.num_layers):
            k_buf = self.kv_pool.get_key_buffer(layer)
            v_buf = self.kv_pool.get_value_buffer(layer)
            keys = k_buf[src]
            k_buf[dst] = rotate_keys(keys, delta).to(k_buf.dtype) if delta else keys
            v_buf[dst] = v_buf[src]

    def flush(self) -> bool:
        """Empty the tree (only when no request holds KV), as SGLang's /flush_cache does."""
        if self.active:
            return False
        self.tree.reset()
        self.allocator.clear()
        self.req_to_token_pool.clear()
        if self.slot_attention is not None:
            self.slot_attention.zero_()
        return True

    # ---- invariants -----------------------------------------------------------------
    def tree_slot_indices(self) -> List[torch.Tensor]:
        """The slot tensors of every tree node."""
        return tree_slot_indices(self.tree)

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Every slot is free, tree-held, request-owned or borrowed as scratch, exactly once;
        locks balance (``rksc_sgl.kv.integrity``). Raises ``AssertionError`` with the counts."""
        check_integrity(self, expect_idle)
