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


def device_pools(device: str, *, size: int, kv_heads: int, head_dim: int, layers: int, rows: int, context: int,
                 seed: int = 0):
    """``(kv, allocator, rows)``: SGLang's CPU pools with random keys and values, every tensor
    moved to ``device`` (``meta`` in tests that must catch a CPU tensor mixed in)."""
    torch.manual_seed(seed)
    kv = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=kv_heads, head_dim=head_dim,
                          layer_num=layers, device="cpu", enable_memory_saver=False)
    for buffers in (kv.k_buffer, kv.v_buffer):
        for layer, buffer in enumerate(buffers):
            buffers[layer] = torch.randn_like(buffer).to(device)
    kv.device = device
    allocator = TokenToKVPoolAllocator(size=size, dtype=torch.float32, device="cpu", kvcache=kv, need_sort=False)
    for name, value in list(vars(allocator).items()):
        if isinstance(value, torch.Tensor):
            setattr(allocator, name, value.to(device))
    allocator.device = device
    table = ReqToTokenPool(size=rows, max_context_len=context, device="cpu", enable_memory_saver=False)
    table.req_to_token = table.req_to_token.to(device)
    table.device = device
    return kv, allocator, table
