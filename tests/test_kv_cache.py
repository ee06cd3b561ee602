"""KV accounting: every slot is free, tree-held or request-owned, exactly once."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rksc_sgl
from rksc_sgl.kv.manager import KVCacheExhausted, KVCacheManager
from rksc_sgl.kv.records import KVLayout

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)


def _manager(pool=64, prefix_cache=True):
    return KVCacheManager(LAYOUT, pool_tokens=pool, max_requests=8, max_context_len=128,
                          enable_prefix_cache=prefix_cache)


def _run_request(mgr, tokens, generated, checkpoint=True):
    prefix, node = mgr.match(tokens, len(tokens) - 1)
    req = mgr.open(tokens, prefix, node)
    new = tokens[req.kv_len:]
    mgr.extend(req, new)
    mgr.commit(req, new)
    if checkpoint:
        mgr.checkpoint(req)
    for t in generated:
        mgr.extend(req, [t])
        mgr.commit(req, [t])
    return req, len(prefix)


def test_prefix_reuse_and_release():
    mgr = _manager()
    req, hit = _run_request(mgr, [1, 2, 3, 4, 5], [6, 7])
    assert hit == 0
    mgr.check_integrity()
    mgr.release(req)
    mgr.check_integrity(expect_idle=True)
    assert mgr.tree.total_size() == 7
    req2, hit2 = _run_request(mgr, [1, 2, 3, 4, 9], [])
    assert hit2 == 4
    mgr.release(req2)
    mgr.check_integrity(expect_idle=True)


def test_none_mode_frees_everything():
    mgr = _manager(prefix_cache=False)
    req, _ = _run_request(mgr, [1, 2, 3], [4, 5])
    mgr.release(req)
    mgr.check_integrity(expect_idle=True)
    assert mgr.allocator.available_size() == 64


def test_scratch_slots_come_back_even_when_the_forward_fails():
    mgr = _manager(pool=16)
    req, _ = _run_request(mgr, [1, 2, 3, 4], [5])
    mgr.release(req)  # 5 tokens cached, unlocked: evictable
    with mgr.scratch(2) as first, mgr.scratch(3) as second:  # borrowings of other sizes, nested
        assert len(mgr.borrowed) == 2 and len(first) == 2 and len(second) == 3
        mgr.check_integrity()
    assert not mgr.borrowed
    with mgr.scratch(14) as slots:  # needs eviction: 11 free + 5 cached
        assert len(slots) == 14 and mgr.allocator.available_size() == 2
        mgr.check_integrity()  # borrowed slots are accounted for
        with pytest.raises(AssertionError, match="scratch borrowings still open"):
            mgr.check_integrity(expect_idle=True)
    assert mgr.allocator.available_size() + mgr.tree.total_size() == 16
    with pytest.raises(RuntimeError, match="forward failed"):
        with mgr.scratch(3):
            raise RuntimeError("forward failed")
    mgr.check_integrity(expect_idle=True)
    assert mgr.allocator.available_size() + mgr.tree.total_size() == 16
    with pytest.raises(KVCacheExhausted):
        with mgr.scratch(17):
            pass
    mgr.check_integrity(expect_idle=True)


def test_eviction_makes_room_lru_order():
    mgr = _manager(pool=16)
    for base in (10, 20):
        req, _ = _run_request(mgr, [base, base + 1, base + 2, base + 3, base + 4, base + 5], [])
        mgr.release(req)
    assert mgr.allocator.available_size() == 4
    mgr.match([10, 11, 12, 13, 14, 15], 6)  # touch the first: the second is now LRU
    slots = mgr.alloc(8)
    assert len(slots) == 8
    # The untouched sequence was evicted first.
    assert mgr.match([10, 11, 12, 13, 14, 15], 6)[0].numel() == 6
    assert mgr.match([20, 21, 22, 23, 24, 25], 6)[0].numel() == 0
    mgr.allocator.free(slots)
    mgr.check_integrity(expect_idle=True)


def test_locked_prefix_is_not_evicted_and_exhaustion_is_clear():
    mgr = _manager(pool=8)
    req, _ = _run_request(mgr, [1, 2, 3, 4, 5, 6], [])
    with pytest.raises(KVCacheExhausted, match="KV pool exhausted"):
        mgr.alloc(4)
    mgr.check_integrity()
    mgr.release(req)
    assert len(mgr.alloc(8)) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 4), min_size=2, max_size=10),
                          st.lists(st.integers(1, 4), max_size=5), st.booleans(), st.booleans()),
                min_size=1, max_size=12))
def test_random_workload_keeps_integrity(ops):
    """Random interleavings of open/extend/checkpoint/release/abort keep the invariant."""
    mgr = _manager(pool=48)
    live = []
    for tokens, generated, checkpoint, abort in ops:
        try:
            req, _ = _run_request(mgr, tokens, generated, checkpoint)
        except KVCacheExhausted:
            # Roll back a half-built request the way the scheduler does.
            for r in list(mgr.active.values()):
                if r not in live:
                    mgr.release_uncached(r, keep_len=r.protected_len)
            mgr.check_integrity()
            continue
        live.append((req, abort))
        mgr.check_integrity()
        if len(live) > 2:
            old, old_abort = live.pop(0)
            mgr.release_uncached(old, keep_len=old.protected_len) if old_abort else mgr.release(old)
            mgr.check_integrity()
    for req, _ in live:
        mgr.release(req)
    mgr.check_integrity(expect_idle=True)


# ---- the engine under memory pressure --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pool_engine():
    eng = rksc_sgl.Engine(model="smollm2-135m", cache="radix", num_threads=1, kv_pool_tokens=160,
                          max_running_requests=8)
    yield eng
    eng.shutdown()


def test_requests_wait_for_memory_and_all_finish(tiny_pool_engine):
    """Eight requests that cannot all fit at once queue, evict, and all complete."""
    eng = tiny_pool_engine
    prompts = [f"Request number {i}: tell me a short fact about the number {i * 7}." for i in range(8)]
    results = eng.generate_request(text=prompts, sampling_params={"max_new_tokens": 24, "temperature": 0})
    assert len(results) == 8
    for prompt, res in zip(prompts, results):
        solo = eng.generate_request(text=prompt, sampling_params={"max_new_tokens": 24, "temperature": 0})
        assert res["output_ids"] == solo["output_ids"]
    eng.check_integrity()


def test_request_that_can_never_fit_fails_clearly(tiny_pool_engine):
    with pytest.raises(KVCacheExhausted, match="raise kv_pool_tokens"):
        tiny_pool_engine.generate_request(text="hello " * 10, sampling_params={"max_new_tokens": 500})
    # The engine keeps serving.
    out = tiny_pool_engine.generate_request(text="hello", sampling_params={"max_new_tokens": 2})
    assert out["meta_info"]["completion_tokens"] == 2
    tiny_pool_engine.check_integrity()


def test_stream_abandoned_midway_frees_kv(tiny_pool_engine):
    stream = tiny_pool_engine.generate_request(
        text="Count slowly from one to fifty:", sampling_params={"max_new_tokens": 64, "ignore_eos": True}, stream=True)
    first = next(stream)
    assert "text" in first
    stream.close()  # the client goes away
    tiny_pool_engine.check_integrity()


def test_concurrent_threads_keep_integrity(tiny_pool_engine):
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(3):
                tiny_pool_engine.generate_request(
                    text=f"Thread {seed} says " + "word " * rng.randint(1, 20),
                    sampling_params={"max_new_tokens": rng.randint(1, 12), "temperature": 0.8})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    tiny_pool_engine.check_integrity()


def test_peak_kv_window(tiny_pool_engine):
    """``stats(reset_peak=True)`` opens a window: a later small request reports its own peak."""
    eng = tiny_pool_engine
    eng.generate_request(text="word " * 60, sampling_params={"max_new_tokens": 4})
    big = eng.stats().peak_kv_tokens
    before = eng.stats(reset_peak=True)
    eng.generate_request(text="hi", sampling_params={"max_new_tokens": 2})
    small = eng.stats().since(before).peak_kv_tokens
    assert big >= 60 and 0 < small < 10


def test_failing_forward_fails_the_batch_and_leaks_nothing(tiny_pool_engine, monkeypatch):
    """A model failure mid-step fails the requests in that step only; every slot comes back."""
    eng = tiny_pool_engine
    real_forward = eng.runner.forward
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the batch below
            raise RuntimeError("injected model failure")
        return real_forward(items)

    monkeypatch.setattr(eng.runner, "forward", flaky)
    with pytest.raises(RuntimeError, match="injected model failure"):
        eng.generate_request(text=[f"Prompt {i} is here." for i in range(4)],
                             sampling_params={"max_new_tokens": 6, "min_new_tokens": 6})
    monkeypatch.setattr(eng.runner, "forward", real_forward)
    eng.check_integrity()
    out = eng.generate_request(text="still serving", sampling_params={"max_new_tokens": 2})
    assert out["meta_info"]["completion_tokens"] == 2
    eng.check_integrity()


def test_failing_admission_fails_that_request_only(tiny_pool_engine, monkeypatch):
    """An exception while admitting a request (matching its prefix, say) fails that request;
    the requests queued with it run, nothing stays locked, and the engine keeps serving.
    (Before: the request stayed at the head of the queue, failing every step, and its
    client waited forever.)"""
    eng = tiny_pool_engine
    real_match = eng.kv.match

    def match(token_ids, cap, namespace=None):
        if eng.tokenizer.decode(token_ids).startswith("poison"):
            raise RuntimeError("injected admission failure")
        return real_match(token_ids, cap, namespace)

    monkeypatch.setattr(eng.kv, "match", match)
    texts = ["Fine one.", "poison pill", "Fine two."]
    pendings = [eng._prepare(eng.tokenizer.encode(t), {"max_new_tokens": 3, "min_new_tokens": 3}, False, -1, 0)
                for t in texts]
    for p in pendings:
        eng.scheduler.submit(p.req)
    outcomes = []
    for p in pendings:
        try:
            outcomes.append(len(p.wait().output_ids))
        except RuntimeError as exc:
            outcomes.append(str(exc))
    assert outcomes == [3, "injected admission failure", 3]
    monkeypatch.setattr(eng.kv, "match", real_match)
    eng.check_integrity()
    assert eng.generate_request(text="still serving", sampling_params={"max_new_tokens": 2})["meta_info"][
        "completion_tokens"] == 2
