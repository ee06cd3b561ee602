"""RKSCRadixCache (ASKS off) behaves exactly like SGLang's RadixCache; the runtime plugin works.

The property test drives a stock ``RadixCache`` and an ``RKSCRadixCache`` over their own,
identical SGLang CPU pools with the same random operations and compares everything the
caller can observe. Both trees read a shared counter clock (patched into SGLang's
``radix_cache`` module) so that LRU/FIFO timestamps are strictly increasing and the
eviction order is deterministic rather than a matter of clock resolution.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from array import array
from pathlib import Path
from unittest import mock

import pytest
from clock import CounterClock
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sglang.srt.mem_cache.radix_cache as radix_cache_module
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from rksc_sgl.runtime import plugin
from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.rksc.tree_cache import RKSCCacheStats, RKSCRadixCache

ROOT = Path(__file__).resolve().parents[1]
POOL = 40
POLICIES = ["lru", "lfu", "fifo", "mru", "filo", "slru", "priority"]


# ---- harness ----------------------------------------------------------------------------------


def _params(policy: str = "lru", disable: bool = False, pool: int = POOL) -> CacheInitParams:
    kv = MHATokenToKVPool(size=pool, page_size=1, dtype=torch.float32, head_num=1, head_dim=2,
                          layer_num=1, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size=pool, dtype=torch.float32, device="cpu", kvcache=kv,
                                       need_sort=False)
    rows = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    return CacheInitParams(disable=disable, req_to_token_pool=rows, token_to_kv_pool_allocator=allocator,
                           page_size=1, eviction_policy=policy)


def _key(tokens, extra_key=None) -> RadixKey:
    return RadixKey(array("q", tokens), extra_key)


def _path(tree, node) -> tuple:
    """Tokens from the root to ``node`` (identifies a node across the two trees)."""
    parts = []
    while node is not tree.root_node:
        parts.append((repr(node.key.extra_key), tuple(node.key.token_ids)))
        node = node.parent
    return tuple(reversed(parts))


def _shape(tree) -> list:
    """The whole tree, in a form that does not depend on node identity or timestamps."""
    out, stack = [], [(tree.root_node, ())]
    while stack:
        node, path = stack.pop()
        for child_key, child in node.children.items():
            child_path = path + ((repr(child.key.extra_key), tuple(child.key.token_ids)),)
            out.append((repr(child_key), child_path, child.value.tolist(), child.lock_ref,
                        child.hit_count, child.priority))
            stack.append((child, child_path))
    return sorted(out)


class _Side:
    def __init__(self, cls, policy: str):
        self.tree = cls(_params(policy))
        self.alloc = self.tree.token_to_kv_pool_allocator
        self.locks = []
        self.hit_tokens = 0


def _assert_same(stock: _Side, rksc: _Side) -> None:
    a, b = stock.tree, rksc.tree
    assert a.evictable_size() == b.evictable_size()
    assert a.protected_size() == b.protected_size()
    assert a.total_size() == b.total_size()
    assert torch.equal(stock.alloc.free_pages, rksc.alloc.free_pages)
    assert torch.equal(stock.alloc.release_pages, rksc.alloc.release_pages)
    assert _shape(a) == _shape(b)
    assert sorted(_path(a, n) for n in a.evictable_leaves) == sorted(_path(b, n) for n in b.evictable_leaves)
    # Nothing else holds slots in this harness: free + tree == pool.
    assert rksc.alloc.available_size() + b.total_size() == POOL
    stats = b.stats
    assert stats.inserted_tokens - stats.evicted_tokens == b.total_size()
    assert stats.exact_hit_tokens == rksc.hit_tokens
    assert stats.semantic_hit_tokens == 0


def _apply(side: _Side, op) -> tuple:
    """Run one operation on one side; return what the caller observes."""
    tree, alloc = side.tree, side.alloc
    kind = op[0]
    if kind == "insert":
        _, tokens, extra_key, priority = op
        n = len(tokens)
        evicted = 0
        if alloc.available_size() < n:
            evicted = tree.evict(EvictParams(num_tokens=n - alloc.available_size())).num_tokens_evicted
        slots = alloc.alloc(n)
        if slots is None:
            return ("no-room", evicted)
        result = tree.insert(InsertParams(key=_key(tokens, extra_key), value=slots.clone(), priority=priority))
        alloc.free(slots[: result.prefix_len])  # the tree already had these tokens
        return ("inserted", evicted, slots.tolist(), result.prefix_len, _path(tree, result.last_device_node))
    if kind in ("match", "lock"):
        _, tokens, extra_key = op
        result = tree.match_prefix(MatchPrefixParams(key=_key(tokens, extra_key)))
        node = result.last_device_node
        indices = tree.path_device_indices(node)
        assert len(indices) == result.device_prefix_len
        side.hit_tokens += result.device_prefix_len
        if kind == "lock":
            side.locks.append(tree.lock(node))
        return (kind, result.device_prefix_len, indices.tolist(), _path(tree, node))
    if kind == "unlock":
        if not side.locks:
            return ("nothing-locked",)
        lock = side.locks.pop(op[1] % len(side.locks))
        tree.unlock(lock)
        return ("unlocked", _path(tree, lock.node))
    if kind == "evict":
        return ("evicted", tree.evict(EvictParams(num_tokens=op[1])).num_tokens_evicted)
    if kind == "flush":
        if side.locks:
            return ("busy",)
        tree.reset()
        alloc.clear()
        if isinstance(tree, RKSCRadixCache):
            tree.reset_stats()
            side.hit_tokens = 0
        return ("flushed",)
    raise AssertionError(kind)


# Prompts share long prefixes (as the branches of a program do): a cut of one of a few
# base sequences plus a short random tail.
_BASES = ([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 2, 1, 0], [3, 3, 3, 3, 3, 3, 3, 3])
_tokens = st.builds(
    lambda base, cut, tail: (base[: cut % (len(base) + 1)] + tail) or [0],
    st.sampled_from(_BASES),
    st.integers(0, 11),
    st.lists(st.integers(0, 3), max_size=4),
)
_extra = st.sampled_from([None, None, "lora-a"])
_op = st.one_of(
    st.tuples(st.just("insert"), _tokens, _extra, st.integers(0, 2)),
    st.tuples(st.just("match"), _tokens, _extra),
    st.tuples(st.just("lock"), _tokens, _extra),
    st.tuples(st.just("unlock"), st.integers(0, 7)),
    st.tuples(st.just("evict"), st.integers(0, 12)),
    st.tuples(st.just("flush")),
)


# ---- equivalence with the stock class -------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(policy=st.sampled_from(POLICIES), ops=st.lists(_op, min_size=10, max_size=60))
def test_asks_off_behaves_exactly_like_radix_cache(policy, ops):
    clock = CounterClock()
    with mock.patch.object(radix_cache_module, "time", clock):
        stock = _Side(RadixCache, policy)
        rksc = _Side(RKSCRadixCache, policy)
        for op in ops:
            # Interleaved op by op on one clock: each tree sees strictly increasing times.
            assert _apply(stock, op) == _apply(rksc, op), op
            _assert_same(stock, rksc)
        while stock.locks:
            _apply(stock, ("unlock", 0))
            _apply(rksc, ("unlock", 0))
        _assert_same(stock, rksc)
        assert rksc.tree.protected_size() == 0
        # Everything evictable goes, in the same order, back to the same free list.
        assert _apply(stock, ("evict", POOL)) == _apply(rksc, ("evict", POOL))
        _assert_same(stock, rksc)
        assert rksc.tree.total_size() == 0 and rksc.alloc.available_size() == POOL


def test_disabled_cache_matches_stock_disabled():
    stock, rksc = RadixCache(_params(disable=True)), RKSCRadixCache(_params(disable=True))
    for tree in (stock, rksc):
        slots = tree.token_to_kv_pool_allocator.alloc(3)
        assert tree.insert(InsertParams(key=_key([1, 2, 3]), value=slots)).prefix_len == 0
        assert tree.match_prefix(MatchPrefixParams(key=_key([1, 2, 3]))).device_prefix_len == 0
        assert tree.evict(EvictParams(num_tokens=5)).num_tokens_evicted == 0
        assert tree.total_size() == 0 and not tree.supports_prefix_sharing()
    assert rksc.stats.inserted_tokens == 0 and rksc.stats.exact_hit_tokens == 0


def test_stats_count_lookups_inserts_and_evictions():
    tree = RKSCRadixCache(_params())
    alloc = tree.token_to_kv_pool_allocator
    tree.insert(InsertParams(key=_key([1, 2, 3, 4]), value=alloc.alloc(4)))
    dup = alloc.alloc(5)
    prefix = tree.insert(InsertParams(key=_key([1, 2, 3, 9, 9]), value=dup)).prefix_len
    alloc.free(dup[:prefix])
    assert prefix == 3
    assert tree.match_prefix(MatchPrefixParams(key=_key([1, 2, 3, 4, 7]))).device_prefix_len == 4
    assert tree.match_prefix(MatchPrefixParams(key=_key([5]))).device_prefix_len == 0
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted >= 1
    s = tree.stats
    assert (s.insert_calls, s.inserted_tokens) == (2, 6)
    assert (s.match_calls, s.match_query_tokens, s.exact_hit_tokens, s.semantic_hit_tokens) == (2, 6, 4, 0)
    assert s.evicted_tokens == 6 - tree.total_size()
    old = tree.reset_stats()
    assert old is s and tree.stats == RKSCCacheStats()
    assert set(old.as_dict()) >= {"exact_hit_tokens", "semantic_hit_tokens", "evicted_tokens"}


# ---- ASKS configuration ---------------------------------------------------------------------------
def test_asks_config_defaults_and_activity():
    cfg = ASKSConfig()
    assert not cfg.enabled and not cfg.active
    assert 0 < cfg.tau <= 1 and cfg.key_layer == 0 and cfg.recompute_fraction == 0.5
    assert ASKSConfig(enabled=True, tau=0.9).active
    assert not ASKSConfig(enabled=True, tau=1.01).active  # unreachable threshold: off
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau = 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"enabled": 1}, "enabled must be True or False"),
        ({"tau": float("nan")}, "tau must be a finite number"),
        ({"tau": float("inf")}, "tau must be a finite number"),
        ({"tau": "0.9"}, "tau must be a finite number"),
        ({"tau": True}, "tau must be a finite number"),
        ({"tau": -1.5}, "below -1"),
        ({"key_layer": -1}, "key_layer must be >= 0"),
        ({"key_layer": 1.0}, "key_layer must be an integer"),
        ({"key_layer": True}, "key_layer must be an integer"),
        ({"recompute_fraction": 1.5}, r"recompute_fraction must be a number in \[0, 1\]"),
        ({"recompute_fraction": -0.1}, r"recompute_fraction must be a number in \[0, 1\]"),
        ({"recompute_fraction": None}, r"recompute_fraction must be a number in \[0, 1\]"),
    ],
)
def test_asks_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ASKSConfig(**kwargs)


def test_asks_config_key_layer_checked_against_model():
    ASKSConfig(key_layer=30).check_key_layer(30)
    with pytest.raises(ValueError, match="key_layer=31 but the model has 30 layers"):
        ASKSConfig(key_layer=31).check_key_layer(30)


def test_active_asks_needs_a_key_function():
    with pytest.raises(ValueError, match="needs token_features"):
        RKSCRadixCache(_params(), asks=ASKSConfig(enabled=True, tau=0.9))
    with pytest.raises(TypeError, match="ASKSConfig"):
        RKSCRadixCache(_params(), asks={"enabled": False})
    tree = RKSCRadixCache(_params(), asks=ASKSConfig(enabled=True, tau=2.0))
    assert tree.asks.tau == 2.0 and not tree.asks.active


# ---- plugin, in this process ------------------------------------------------------------------------
def _ctx(params, **overrides):
    fields = dict(server_args=None, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                  enable_hierarchical_cache=False, disable_radix_cache=params.disable, tp_worker=None,
                  model_config=None, tp_size=1, tp_rank=0, tp_group=None)
    fields.update(overrides)
    return registry.TreeCacheBuildContext(**fields)


def test_register_is_idempotent_and_refuses_a_foreign_factory(monkeypatch):
    monkeypatch.setattr(registry, "_RADIX_CACHE_REGISTRY", {})
    plugin.register()
    plugin.register()
    assert registry.get_radix_cache_factory("rksc") is plugin.rksc_cache_factory
    monkeypatch.setattr(registry, "_RADIX_CACHE_REGISTRY", {"rksc": lambda ctx: None})
    with pytest.raises(ValueError, match="already registered"):
        plugin.register()


@pytest.mark.parametrize("flag", ["is_hybrid_swa", "is_hybrid_ssm", "enable_hierarchical_cache"])
def test_factory_refuses_what_radix_cache_cannot_hold(flag):
    with pytest.raises(ValueError, match="--radix-cache-backend=rksc"):
        plugin.rksc_cache_factory(_ctx(_params(), **{flag: True}))


def test_factory_builds_exact_rksc_cache():
    cache = plugin.rksc_cache_factory(_ctx(_params(policy="lfu")))
    assert type(cache) is RKSCRadixCache and not cache.asks.active
    assert type(cache.eviction_strategy).__name__ == "LFUStrategy"
    disabled = plugin.rksc_cache_factory(_ctx(_params(disable=True)))
    assert disabled.disable


# ---- plugin, as SGLang loads it in a fresh process ----------------------------------------------
_FRESH = textwrap.dedent(
    """
    import argparse, json, warnings
    from array import array
    warnings.simplefilter("ignore")
    import torch
    from sglang.srt.plugins import load_plugins
    load_plugins()  # what launch_server, sglang.Engine and every scheduler process call first

    from sglang.srt.mem_cache import registry
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.runtime_context import get_context
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixKey

    out = {"backends": registry.registered_radix_cache_backends()}
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    out["parsed"] = parser.parse_args(["--model-path", "x", "--radix-cache-backend", "rksc"]).radix_cache_backend

    kv = MHATokenToKVPool(size=16, page_size=1, dtype=torch.float32, head_num=1, head_dim=2, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(size=16, dtype=torch.float32, device="cpu", kvcache=kv, need_sort=False)
    rows = ReqToTokenPool(size=2, max_context_len=16, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=rows, token_to_kv_pool_allocator=alloc, page_size=1)
    with get_context().override_server_args(radix_cache_backend="rksc") as server_args:
        ctx = registry.TreeCacheBuildContext(
            server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
            enable_hierarchical_cache=False, disable_radix_cache=False, tp_worker=None, model_config=None,
            tp_size=1, tp_rank=0, tp_group=None)
        cache = registry.create_tree_cache(ctx)  # the scheduler's own route to the factory
    out["class"] = type(cache).__module__ + "." + type(cache).__name__

    key = lambda t: RadixKey(array("q", t))
    cache.insert(InsertParams(key=key([1, 2, 3, 4]), value=alloc.alloc(4)))
    cache.insert(InsertParams(key=key([7, 8]), value=alloc.alloc(2)))
    match = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3, 5])))
    out["match"] = match.device_prefix_len
    out["indices"] = cache.path_device_indices(match.last_device_node).tolist()
    lock = cache.lock(match.last_device_node)
    out["protected"] = cache.protected_size()
    out["evicted_locked"] = cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted
    cache.unlock(lock)
    out["evicted"] = cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted
    out["free"] = alloc.available_size()
    out["stats"] = cache.stats.as_dict()
    print("RESULT " + json.dumps(out))
    """
)


def test_plugin_loads_in_a_fresh_process_and_serves_the_tree():
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result; stdout={proc.stdout[-2000:]!r} stderr={proc.stderr[-2000:]!r}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert "rksc" in out["backends"], (
        "the sglang.srt.plugins entry point did not register 'rksc'; "
        "reinstall the package (pip install --no-deps -e .) so its entry points are current"
    )
    assert out["parsed"] == "rksc"
    assert out["class"] == "rksc_sgl.rksc.tree_cache.RKSCRadixCache"
    assert out["match"] == 3 and out["indices"] == [1, 2, 3]
    assert out["protected"] == 3
    assert out["evicted_locked"] == 3  # [4] and [7, 8]; the locked [1, 2, 3] stays
    assert out["evicted"] == 3
    assert out["free"] == 16
    assert out["stats"]["exact_hit_tokens"] == 3 and out["stats"]["semantic_hit_tokens"] == 0
    assert out["stats"]["inserted_tokens"] == 6 and out["stats"]["evicted_tokens"] == 6
