"""RSBCM eviction: priority order on hand-built trees, exact LRU reduction, engine wiring.

Tree tests run on SGLang's CPU pools with a counter clock patched into ``radix_cache`` so
that timestamps are strictly increasing and orders are deterministic.
"""

from __future__ import annotations

import random
from array import array
from unittest import mock

import pytest
from clock import CounterClock
from pools import cache_params
import torch

import sglang.srt.mem_cache.radix_cache as radix_cache_module
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.evict_policy import LRUStrategy
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

import rksc_sgl
from rksc_sgl.runtime import plugin
from rksc_sgl.config import EngineConfig
from rksc_sgl.rksc.tree_cache import RKSCRadixCache
from rksc_sgl.rksc.rsbcm import RSBCMStrategy

POOL = 64
NO_SIGNALS = {"w_attention": 0.0, "w_depth": 0.0, "w_branches": 0.0}




def _params(policy="rsbcm", config=None, pool=POOL) -> CacheInitParams:
    return cache_params(policy, config, pool)


def _key(tokens) -> RadixKey:
    return RadixKey(array("q", tokens))


def _insert(tree, tokens) -> torch.Tensor:
    alloc = tree.token_to_kv_pool_allocator
    if alloc.available_size() < len(tokens):
        tree.evict(EvictParams(num_tokens=len(tokens) - alloc.available_size()))
    slots = alloc.alloc(len(tokens))
    prefix = tree.insert(InsertParams(key=_key(tokens), value=slots.clone())).prefix_len
    alloc.free(slots[:prefix])
    return slots[prefix:]


def _evict_order(tree) -> list:
    """Evict one token at a time until the tree is empty: the slots freed, in order."""
    alloc, order = tree.token_to_kv_pool_allocator, []
    while tree.evictable_size():
        before = set(alloc.free_pages.tolist()) | set(alloc.release_pages.tolist())
        tree.evict(EvictParams(num_tokens=1))
        after = set(alloc.free_pages.tolist()) | set(alloc.release_pages.tolist())
        order.append(sorted(after - before))
    return order


SHARED = [10, 11, 12, 13]  # a shallow prefix every branch went through
DEEP_A = [20, 21, 22, 23, 24, 25, 26, 27, 30, 31, 32, 33]
DEEP_B = [20, 21, 22, 23, 24, 25, 26, 27, 40, 41, 42, 43]


def _build(tree):
    """SHARED (a leaf, 3 branches, oldest) and two deep leaves under [20..27] (newer)."""
    slots = {}
    for _ in range(3):
        slots.setdefault("shared", _insert(tree, SHARED))
    slots["a"] = _insert(tree, DEEP_A)[-4:]
    slots["b"] = _insert(tree, DEEP_B)[-4:]
    return slots


# ---- priority order on a hand-built tree ---------------------------------------------------------
def test_low_attention_deep_leaf_goes_before_high_attention_shared_prefix():
    clock = CounterClock()
    with mock.patch.object(radix_cache_module, "time", clock):
        lru = RadixCache(_params("lru"))
        rsbcm = RKSCRadixCache(_params("rsbcm"))
        attention = torch.zeros(POOL + 1)
        rsbcm.eviction_strategy.attach(attention)
        slots_lru, slots = _build(lru), _build(rsbcm)
        attention[slots["shared"]] = 5.0  # much read
        attention[slots["a"]] = 0.01  # barely read
        attention[slots["b"]] = 1.0
        # LRU drops the oldest leaf, the shared prefix; RSBCM the cold deep leaf.
        lru.evict(EvictParams(num_tokens=4))
        assert set(slots_lru["shared"].tolist()) <= set(lru.token_to_kv_pool_allocator.free_pages.tolist())
        rsbcm.evict(EvictParams(num_tokens=4))
        free = set(rsbcm.token_to_kv_pool_allocator.free_pages.tolist())
        assert set(slots["a"].tolist()) <= free
        assert not set(slots["shared"].tolist()) & free and not set(slots["b"].tolist()) & free
        assert rsbcm.stats.evicted_tokens == 4
        # Full order: deep cold, deep warm, their parent, then the shared prefix last.
        order = _evict_order(rsbcm)
        step = {slot: i for i, freed in enumerate(order) for slot in freed}
        assert step[int(slots["b"][0])] < step[int(slots["shared"][0])] == len(order) - 1


def test_attention_orders_equal_leaves_against_recency():
    clock = CounterClock()
    with mock.patch.object(radix_cache_module, "time", clock):
        tree = RKSCRadixCache(_params("rsbcm", {"w_recency": 1.0, "recency_scale_s": 1000.0}))
        attention = torch.zeros(POOL + 1)
        tree.eviction_strategy.attach(attention)
        old, new = _insert(tree, [1, 2, 3]), _insert(tree, [5, 6, 7])
        attention[old], attention[new] = 2.0, 0.1
        tree.evict(EvictParams(num_tokens=3))  # the newer, unread leaf goes
        free = set(tree.token_to_kv_pool_allocator.free_pages.tolist())
        assert set(new.tolist()) <= free and not set(old.tolist()) & free


def test_proxies_without_attention_statistics():
    """No slot_attention (the runtime): hit_count and depth rank the leaves."""
    clock = CounterClock()
    with mock.patch.object(radix_cache_module, "time", clock):
        tree = RKSCRadixCache(_params("rsbcm"))
        assert tree.eviction_strategy.slot_attention is None
        slots = _build(tree)
        strategy = tree.eviction_strategy
        leaves = {tuple(n.key.token_ids): n for n in tree.evictable_leaves}
        shared, deep = leaves[tuple(SHARED)], leaves[tuple(DEEP_A[8:])]
        assert strategy.node_branches(shared) == 3 and strategy.node_depth(deep) == 8
        assert strategy.node_attention(deep) == 0.0
        tree.evict(EvictParams(num_tokens=8))  # both deep leaves, though newer
        free = set(tree.token_to_kv_pool_allocator.free_pages.tolist())
        assert set(slots["a"].tolist()) | set(slots["b"].tolist()) <= free
        assert not set(slots["shared"].tolist()) & free


@pytest.mark.parametrize("config", [NO_SIGNALS, dict(NO_SIGNALS, w_recency=0.0), dict(NO_SIGNALS, w_recency=3.5)])
@pytest.mark.parametrize("seed", range(6))
def test_lru_reduction_evicts_in_exactly_lru_order(config, seed):
    rng = random.Random(seed)
    clock = CounterClock()
    with mock.patch.object(radix_cache_module, "time", clock):
        lru = RadixCache(_params("lru"))
        rsbcm = RKSCRadixCache(_params("rsbcm", dict(config)))
        attention = torch.rand(POOL + 1)  # present but weighted 0
        rsbcm.eviction_strategy.attach(attention)
        assert isinstance(lru.eviction_strategy, LRUStrategy)
        bases = [[1, 2, 3, 4, 5, 6], [1, 2, 7, 7], [9, 9, 9, 9, 9]]
        for _ in range(40):
            base = rng.choice(bases)
            tokens = base[: rng.randint(1, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 4))]
            if rng.random() < 0.7:
                assert _insert(lru, tokens).tolist() == _insert(rsbcm, tokens).tolist()
            else:
                a = lru.match_prefix(MatchPrefixParams(key=_key(tokens))).device_prefix_len
                assert a == rsbcm.match_prefix(MatchPrefixParams(key=_key(tokens))).device_prefix_len
            assert torch.equal(lru.token_to_kv_pool_allocator.free_pages, rsbcm.token_to_kv_pool_allocator.free_pages)
        assert _evict_order(lru) == _evict_order(rsbcm)


def test_rsbcm_settings_are_validated():
    with pytest.raises(ValueError, match="w_depth"):
        RSBCMStrategy(w_depth=-1)
    with pytest.raises(ValueError, match="attention_layer_stride"):
        RSBCMStrategy(attention_layer_stride=0)
    for bad in (-0.1, 1.5, "half", float("nan")):
        with pytest.raises(ValueError, match="collect_above_usage"):
            RSBCMStrategy(collect_above_usage=bad)
    assert RSBCMStrategy(collect_above_usage=0).watch_free(100) is None
    assert RSBCMStrategy().watch_free(100) == 50 and RSBCMStrategy(collect_above_usage=1).watch_free(100) == 1
    with pytest.raises(TypeError):
        RKSCRadixCache(_params("rsbcm", {"no_such_setting": 1}))
    with pytest.raises(ValueError, match="Unknown eviction policy"):
        RadixCache(_params("rsbcm"))  # only the RKSC cache builds it
    with pytest.raises(ValueError, match="needs cache='rksc-tree'"):
        EngineConfig(cache="radix", eviction_policy="rsbcm")
    with pytest.raises(ValueError, match="eviction_policy_config"):
        EngineConfig(cache="rksc", eviction_policy="rsbcm", eviction_policy_config={"bogus": 1})
    assert EngineConfig(cache="rksc", eviction_policy="RSBCM").eviction_policy == "rsbcm"


def test_plugin_adds_the_policy_choice_and_the_factory_builds_it(monkeypatch):
    from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES

    monkeypatch.setattr(registry, "_RADIX_CACHE_REGISTRY", {})
    plugin.register()
    plugin.register()
    assert RADIX_EVICTION_POLICY_CHOICES.count("rsbcm") == 1
    params = _params("rsbcm", {"w_depth": 2.0})
    ctx = registry.TreeCacheBuildContext(
        server_args=None, params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False, tp_worker=None, model_config=None, tp_size=1, tp_rank=0, tp_group=None)
    cache = plugin.rksc_cache_factory(ctx)
    assert isinstance(cache.eviction_strategy, RSBCMStrategy) and cache.eviction_strategy.w_depth == 2.0
    assert cache.eviction_policy == "rsbcm"


# ---- the engine -------------------------------------------------------------------------------------
GREEDY = {"max_new_tokens": 16, "min_new_tokens": 16, "temperature": 0}
PROMPTS = [f"Request number {i}: tell me a short fact about the number {i * 7}." for i in range(8)]


@pytest.fixture(scope="module")
def rsbcm_engine():
    eng = rksc_sgl.Engine(model="smollm2-135m", cache="rksc", eviction_policy="rsbcm", num_threads=1,
                          kv_pool_tokens=160, max_running_requests=8,
                          eviction_policy_config={"attention_layer_stride": 3, "collect_above_usage": 0})
    yield eng
    eng.shutdown()


def test_collection_is_off_for_other_policies(radix_engine):
    assert radix_engine.kv.slot_attention is None and radix_engine.runner.slot_attention is None


def test_engine_under_pressure_keeps_integrity_and_collects_attention(rsbcm_engine, radix_engine):
    eng = rsbcm_engine
    assert isinstance(eng.tree_cache.eviction_strategy, RSBCMStrategy)
    assert eng.runner.slot_attention is eng.kv.slot_attention is eng.tree_cache.eviction_strategy.slot_attention
    assert eng.runner.attention_layer_stride == 3
    eng.flush_cache()
    evicted = eng.tree_cache.stats.evicted_tokens
    results = eng.generate_request(text=PROMPTS, sampling_params=GREEDY)  # 233 distinct tokens > 160 slots
    eng.check_integrity()
    assert eng.tree_cache.stats.evicted_tokens > evicted, "the pool was meant to be under pressure"
    reference = radix_engine.generate_request(text=PROMPTS, sampling_params=GREEDY)
    assert [r["output_ids"] for r in results] == [r["output_ids"] for r in reference]
    mass = eng.scheduler.call(lambda: eng.kv.slot_attention.clone())
    tree_slots = torch.cat(eng.scheduler.call(eng.kv.tree_slot_indices)).to(torch.int64)
    held = mass[tree_slots]
    assert float(held.sum()) > 0 and float(held.std()) > 0  # real, not constant
    assert float(mass[0]) == 0.0  # the padding slot collects nothing


def test_mass_per_decode_token_is_one_and_greedy_equals_radix(rsbcm_engine, radix_engine):
    eng = rsbcm_engine
    eng.flush_cache()
    evicted = eng.tree_cache.stats.evicted_tokens
    prompt = "The capital of France is"
    out = eng.generate_request(text=prompt, sampling_params=GREEDY)
    assert eng.tree_cache.stats.evicted_tokens == evicted  # nothing evicted
    assert out["output_ids"] == radix_engine.generate_request(text=prompt, sampling_params=GREEDY)["output_ids"]
    total = float(eng.scheduler.call(lambda: eng.kv.slot_attention.sum()))
    # Every decode step (all new tokens but the first, which the prefill produced) adds 1.
    assert total == pytest.approx(GREEDY["max_new_tokens"] - 1, rel=1e-4)
    eng.check_integrity()


def test_statistics_wait_for_a_pool_near_full(rsbcm_engine, radix_engine):
    """collect_above_usage 0.5: a short request in an empty 160-slot pool adds no mass (and
    generates what radix does); requests that fill the pool do, before it evicts."""
    eng = rsbcm_engine
    strategy = eng.tree_cache.eviction_strategy
    eng.scheduler.call(lambda: setattr(strategy, "collect_above_usage", 0.5))
    try:
        eng.flush_cache()
        prompt = "The capital of France is"
        out = eng.generate_request(text=prompt, sampling_params=GREEDY)
        assert out["output_ids"] == radix_engine.generate_request(text=prompt, sampling_params=GREEDY)["output_ids"]
        assert float(eng.scheduler.call(lambda: eng.kv.slot_attention.sum())) == 0.0
        evicted = eng.tree_cache.stats.evicted_tokens
        results = eng.generate_request(text=PROMPTS, sampling_params=GREEDY)
        assert eng.tree_cache.stats.evicted_tokens > evicted
        reference = radix_engine.generate_request(text=PROMPTS, sampling_params=GREEDY)
        assert [r["output_ids"] for r in results] == [r["output_ids"] for r in reference]
        assert float(eng.scheduler.call(lambda: eng.kv.slot_attention.sum())) > 0.0
        eng.check_integrity()
    finally:
        eng.scheduler.call(lambda: setattr(strategy, "collect_above_usage", 0.0))


def test_shared_prefix_decode_collects_what_per_branch_attention_does(rsbcm_engine):
    """Branches decoding together over their shared prefix record the same mass per slot."""
    eng, runner = rsbcm_engine, rsbcm_engine.runner
    prompt = "A shared context that every branch reads. " * 8
    texts = [prompt + hint for hint in ("First, ", "Let me think. ", "The answer: ")]
    params = {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0}
    masses, outputs = [], []
    try:
        for min_shared in (16, 0):
            eng.scheduler.call(lambda: setattr(runner, "shared_prefix_min_tokens", min_shared))
            eng.flush_cache()
            eng.generate_request(text=prompt, sampling_params={"max_new_tokens": 0})
            outputs.append([r["output_ids"] for r in eng.generate_request(text=texts, sampling_params=params)])
            # Mass per token of each branch's cached sequence (slot numbers depend on the
            # order the scheduler admitted the branches in; the tokens do not).
            sequences = [eng.encode(t) + out for t, out in zip(texts, outputs[-1])]
            masses.append(eng.scheduler.call(
                lambda: [eng.kv.slot_attention[eng.kv.match(ids, len(ids))[0]].clone() for ids in sequences]))
    finally:
        eng.scheduler.call(lambda: setattr(runner, "shared_prefix_min_tokens", 64))
    assert outputs[0] == outputs[1]
    assert all(len(m) >= len(eng.encode(prompt)) for m in masses[0])
    assert float(torch.cat(masses[0]).sum()) > 0
    for grouped, single in zip(*masses):
        torch.testing.assert_close(grouped, single, rtol=1e-4, atol=1e-6)
    eng.check_integrity()
