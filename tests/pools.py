"""SGLang's CPU memory pools for tree-cache tests: small, built the same way everywhere."""

from __future__ import annotations

import torch

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


def cache_params(policy: str = "rsbcm", config=None, pool: int = 64, disable: bool = False) -> CacheInitParams:
    """``CacheInitParams`` over a ``pool``-slot CPU KV pool (one layer, one head of size 2)."""
    kv = MHATokenToKVPool(size=pool, page_size=1, dtype=torch.float32, head_num=1, head_dim=2,
                          layer_num=1, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size=pool, dtype=torch.float32, device="cpu", kvcache=kv, need_sort=False)
    rows = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    return CacheInitParams(disable=disable, req_to_token_pool=rows, token_to_kv_pool_allocator=allocator,
                           page_size=1, eviction_policy=policy, eviction_policy_config=config)
