"""ASKS (semantic KV sharing) on ``cache="rksc"``: alias ownership, exactness, outputs.

The first half drives ``KVCacheManager`` + ``RKSCRadixCache`` directly with a toy
feature table (no model): it checks that a semantic alias reads the donor's slots while
the donor is locked, that nothing approximate is ever stored under a recipient's
tokens, and (hypothesis) that slot ownership and lock counts stay right under random
workloads. Every slot's KV carries a fingerprint of the exact tokens it was computed
for, so "an exact lookup never returns approximate KV" is checked on the KV itself.
The second half runs the embedded engine.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rksc_sgl.kv.manager import KVCacheManager
from rksc_sgl.kv.records import KVLayout
from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.rksc.semantic_match import align_tokens
from rksc_sgl.rksc.tree_cache import RKSCRadixCache

VOCAB, DIM = 12, 8


def _table() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, DIM, generator=gen)
    table[11] = table[10] + 0.05 * torch.randn(DIM, generator=gen)  # 10 and 11 are "synonyms"
    return table


TABLE = _table()


def _features(ids):
    return TABLE[torch.tensor(list(ids), dtype=torch.long)]


ROTATION = 1000.0  # the toy "rotation": a key moved delta positions gains delta * ROTATION


def _toy_rotate(keys, delta):
    return keys + delta * ROTATION


def _manager(pool=48, tau=0.5, fraction=0.0, enabled=True, rows=6, shift=True) -> KVCacheManager:
    asks = ASKSConfig(enabled=enabled, tau=tau, recompute_fraction=fraction)
    kv = KVCacheManager(
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32),
        pool_tokens=pool, max_requests=rows, max_context_len=64, enable_prefix_cache=True,
        tree_cache_class=functools.partial(RKSCRadixCache, asks=asks, token_features=_features),
        rotate_keys=_toy_rotate if shift else None,
    )
    return kv


def _fp(tokens) -> float:
    """Fingerprint of the KV an exact computation of ``tokens[-1]`` after ``tokens[:-1]`` has."""
    return float(hash(tuple(tokens)) % 1_000_003)


def _write_kv(kv: KVCacheManager, slots, positions, tokens) -> None:
    buf = kv.kv_pool.get_key_buffer(0)
    for slot, pos in zip(slots.tolist(), positions):
        buf[slot, 0, 0] = _fp(tokens[: pos + 1])


def _check_tree_kv_exact(kv: KVCacheManager) -> None:
    """Every tree slot holds the KV of exactly the tokens on its path."""
    buf = kv.kv_pool.get_key_buffer(0)
    stack = [(kv.tree.root_node, [])]
    while stack:
        node, path = stack.pop()
        for child in node.children.values():
            tokens = path + list(child.key.token_ids)
            for i, slot in enumerate(child.value.tolist()):
                pos = len(path) + i
                assert float(buf[slot, 0, 0]) == _fp(tokens[: pos + 1]), "approximate KV stored as exact"
            stack.append((child, tokens))


def _admit(kv: KVCacheManager, ids, span_features=None):
    cap = len(ids) - 1
    prefix, node = kv.match(ids, cap)
    alias = kv.match_alias(ids, cap, prefix, node, span_features=span_features)
    req = kv.open(ids, prefix, node, alias)
    return req, alias


def _prefill(kv: KVCacheManager, req, ids) -> None:
    """What the scheduler does: extend, "compute" the KV of the computed positions, commit."""
    start = req.kv_len
    new = ids[start:]
    slots = kv.extend(req, new)
    positions = req.alias.positions if req.alias is not None else list(range(start, len(ids)))
    _write_kv(kv, slots, positions, ids)
    kv.commit(req, new)
    kv.checkpoint(req)


def _decode(kv: KVCacheManager, req, token: int) -> None:
    start = req.kv_len
    slots = kv.extend(req, [token])
    kv.commit(req, [token])
    _write_kv(kv, slots, [start], req.token_ids)


# ---- ownership and exactness, no model ---------------------------------------------------------------
def test_alias_reads_locked_donor_and_never_becomes_exact():
    kv = _manager(fraction=0.25)
    donor_ids = [1, 2, 3, 10, 4, 5, 6, 7]
    donor, alias = _admit(kv, donor_ids)
    assert alias is None
    _prefill(kv, donor, donor_ids)
    _decode(kv, donor, 8)
    kv.release(donor)
    kv.check_integrity(expect_idle=True)

    recipient_ids = [1, 2, 3, 11, 4, 5, 6, 7, 9]
    req, alias = _admit(kv, recipient_ids)
    assert alias is not None and alias.start == 3 and alias.length == 5
    assert alias.similarity >= 0.5
    assert alias.recompute == [0, 1]  # ceil(0.25 * 5): the differing token, then its neighbour
    donor_node = alias.node
    assert donor_node.lock_ref > 0
    # Everything unlocked is evictable, but the donor (and its path) is not.
    kv.tree.evict(_evict_all())
    assert not donor_node.evicted
    _prefill(kv, req, recipient_ids)
    assert req.alias.positions == [3, 4, 8]
    row = kv.row_slots(req)
    assert torch.equal(row[5:8], alias.slots[2:5])  # donor slots, read in place
    kv.check_integrity()
    _decode(kv, req, 9)
    kv.check_integrity()
    kv.release(req)
    kv.check_integrity(expect_idle=True)
    assert donor_node.lock_ref == 0
    # Exact lookups see only the exact part: nothing of the recipient's was inserted.
    prefix, _ = kv.match(recipient_ids + [9], 10)
    assert len(prefix) == 3
    _check_tree_kv_exact(kv)
    stats = kv.tree.stats
    assert (stats.semantic_matches, stats.semantic_hit_tokens, stats.recomputed_tokens) == (1, 3, 2)
    assert stats.key_tokens >= 5 and kv.key_tokens == stats.key_tokens
    # Once unlocked, the donor can be evicted.
    kv.tree.evict(_evict_all())
    assert kv.tree.total_size() == 0
    kv.check_integrity(expect_idle=True)


def test_align_tokens_pairs_only_identical_tokens():
    assert align_tokens([5, 6, 7, 8], [9, 6, 7, 8]) == [None, 1, 2, 3]
    assert align_tokens([5, 5, 6, 7], [9, 6, 7]) == [None, 2, 3]  # shifted one position earlier
    assert align_tokens([5, 5, 6, 7], [9, 6, 7], shift=False) == [None, None, None]
    assert align_tokens([5, 6], [6, 5, 6]) == [None, 0, 1]
    assert align_tokens([1, 2], [3, 4]) == [None, None]


def test_shifted_tokens_are_copied_rotated_and_owned():
    """A paraphrase one token shorter: what follows it is the donor's identical tokens one
    position earlier. Their KV is copied into the recipient's own slots, keys rotated by
    -1; the differing token is computed; the donor's slots are never written."""
    kv = _manager()
    donor_ids = [1, 2, 3, 10, 10, 4, 5, 6, 7]
    donor, _ = _admit(kv, donor_ids)
    _prefill(kv, donor, donor_ids)
    kv.release(donor)
    recipient_ids = [1, 2, 3, 11, 4, 5, 6, 7, 9]
    req, alias = _admit(kv, recipient_ids)
    assert alias is not None and alias.start == 3 and alias.length == 5
    assert alias.donor_offsets == [None, 2, 3, 4, 5]
    assert alias.recompute == [0] and alias.shifted() == [1, 2, 3, 4]
    assert (alias.reused_tokens, alias.shared_tokens) == (4, 0)
    donor_slots = alias.node.value.clone()
    buf = kv.kv_pool.get_key_buffer(0)
    donor_kv = buf[donor_slots, 0, 0].clone()
    _prefill(kv, req, recipient_ids)
    assert req.alias.positions == [3, 8]
    row = kv.row_slots(req)
    copies = row[4:8]
    assert not set(copies.tolist()) & set(donor_slots.tolist())  # owned copies, not the donor's
    assert torch.equal(buf[copies, 0, 0], donor_kv[2:6] - ROTATION)  # donor KV, moved one position earlier
    assert torch.equal(buf[donor_slots, 0, 0], donor_kv)
    kv.check_integrity()
    kv.release(req)
    kv.check_integrity(expect_idle=True)
    _check_tree_kv_exact(kv)
    # Without a way to rotate keys, shifted tokens are computed instead.
    kv = _manager(shift=False)
    donor, _ = _admit(kv, donor_ids)
    _prefill(kv, donor, donor_ids)
    kv.release(donor)
    req, alias = _admit(kv, recipient_ids)
    assert alias is None  # nothing identical at the same positions
    kv.release(req)
    kv.check_integrity(expect_idle=True)


def test_recompute_above_layer_0_picks_the_most_deviating_tokens():
    """With stored key-layer states, the recompute share goes to the aligned tokens whose
    recipient state deviates most from the donor token's, not to the nearest after a change."""
    asks = ASKSConfig(enabled=True, tau=0.5, key_layer=2, recompute_fraction=0.25)
    slot_features = torch.zeros(49, DIM)
    kv = KVCacheManager(
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32),
        pool_tokens=48, max_requests=6, max_context_len=64, enable_prefix_cache=True,
        tree_cache_class=functools.partial(RKSCRadixCache, asks=asks, token_features=_features,
                                           slot_features=slot_features),
        rotate_keys=_toy_rotate,
    )
    donor_ids = [1, 2, 3, 10, 4, 5, 6, 7]
    donor, _ = _admit(kv, donor_ids)
    slots = kv.extend(donor, donor_ids)
    slot_features[slots] = TABLE[torch.tensor(donor_ids)]  # the states the donor's prefill stored
    kv.commit(donor, donor_ids)
    kv.release(donor)

    recipient_ids = [1, 2, 3, 11, 4, 5, 6, 7, 9]
    span_state = TABLE[torch.tensor(recipient_ids[3:8])].clone()
    span_state[3] = -span_state[3]  # token 6: its state moved most in the new context
    req, alias = _admit(kv, recipient_ids, span_features=lambda prefix_slots, ids: span_state[: len(ids)])
    assert alias is not None and alias.donor_offsets == [None, 1, 2, 3, 4]
    assert alias.recompute == [0, 3]  # the differing token, then the most deviating one (not 1)
    kv.release(req)
    kv.check_integrity(expect_idle=True)


def _evict_all():
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    return EvictParams(num_tokens=10**6)


def test_cancel_open_releases_the_donor():
    kv = _manager()
    ids = [1, 10, 2, 3, 4]
    req, _ = _admit(kv, ids)
    _prefill(kv, req, ids)
    kv.release(req)
    req, alias = _admit(kv, [1, 11, 2, 3, 4, 5])
    assert alias is not None and alias.node.lock_ref == 1
    kv.cancel_open(req)
    assert alias.node.lock_ref == 0
    kv.check_integrity(expect_idle=True)


def test_no_alias_when_off_or_unreachable_or_dissimilar():
    for kv in (_manager(enabled=False), _manager(tau=1.5)):
        ids = [1, 10, 2, 3, 4]
        req, _ = _admit(kv, ids)
        _prefill(kv, req, ids)
        kv.release(req)
        assert _admit(kv, [1, 11, 2, 3, 4, 5])[1] is None
    kv = _manager(tau=0.99)
    ids = [1, 10, 2, 3, 4]
    req, _ = _admit(kv, ids)
    _prefill(kv, req, ids)
    kv.release(req)
    assert _admit(kv, [1, 7, 8, 9, 0, 5])[1] is None


def test_split_rekeys_both_halves():
    kv = _manager()
    tree = kv.tree
    ids = [1, 2, 3, 4, 5, 6]
    req, _ = _admit(kv, ids)
    _prefill(kv, req, ids)
    kv.release(req)
    kv.match([1, 2, 3, 9], 4)  # splits [1..6] at 3
    upper = tree.root_node.children[1]
    lower = next(iter(upper.children.values()))
    for node in (upper, lower):
        expected = torch.nn.functional.normalize(_features(node.key.token_ids).mean(0), dim=0)
        assert torch.allclose(node.asks_key, expected)


def test_active_asks_needs_a_key_function():
    with pytest.raises(ValueError, match="token_features"):
        RKSCRadixCache(_init_params(), asks=ASKSConfig(enabled=True, tau=0.9))


def _init_params():
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    return CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None, page_size=1)


_token = st.sampled_from([2, 3, 4, 10, 11])  # few tokens, a synonym pair: donors are common
_start = st.tuples(st.just("start"), st.lists(_token, min_size=2, max_size=9), st.integers(0, 3))
_op = st.one_of(
    _start,
    _start,
    st.tuples(st.just("step"), st.integers(0, 7)),
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("cancel"), st.integers(0, 7)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=4, max_size=40), fraction=st.sampled_from([0.0, 0.3, 1.0]),
       tau=st.sampled_from([0.3, 0.8, 0.95]), shift=st.booleans())
def test_random_workload_with_asks_keeps_integrity(ops, fraction, tau, shift):
    from rksc_sgl.kv.manager import KVCacheExhausted

    kv = _manager(pool=40, tau=tau, fraction=fraction, shift=shift)
    running = []  # (req, remaining decode tokens)
    for op in ops:
        kind = op[0]
        if kind == "start":
            _, ids, n_new = op
            ids = [1] + ids  # a common first token makes shared prefixes and donors likely
            if len(running) >= 5:
                continue
            try:
                req, alias = _admit(kv, ids)
            except KVCacheExhausted:
                continue
            try:
                _prefill(kv, req, ids)
            except KVCacheExhausted:
                kv.release_uncached(req, keep_len=req.protected_len)
                continue
            running.append([req, n_new])
        elif running:
            i = op[1] % len(running)
            req, left = running[i]
            if kind == "step" and left > 0:
                try:
                    _decode(kv, req, (len(req.token_ids) * 7) % VOCAB)
                    running[i][1] -= 1
                except KVCacheExhausted:
                    pass
            elif kind == "cancel":
                kv.release_uncached(req, keep_len=req.protected_len)
                running.pop(i)
            else:
                kv.release(req)
                running.pop(i)
        kv.check_integrity()
        _check_tree_kv_exact(kv)
    for req, _ in running:
        kv.release(req)
    kv.check_integrity(expect_idle=True)
    _check_tree_kv_exact(kv)


# ---- the embedded engine ---------------------------------------------------------------------------
PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does Tom have now? Answer:",
    "Question: Tom has 3 apples and buys 5 more. How many apples does Tom have left? Answer:",
    "Question: Anna reads 12 pages a day for 4 days. How many pages does she read? Answer:",
]
GREEDY = {"max_new_tokens": 8, "temperature": 0}


def _run(engine, prompts):
    return [engine.generate_request(text=p, sampling_params=GREEDY)["output_ids"] for p in prompts]


@pytest.fixture(scope="module")
def engines():
    import rksc_sgl

    made = {}

    def get(name, **kwargs):
        if name not in made:
            made[name] = rksc_sgl.Engine(model="smollm2-135m", num_threads=1, kv_pool_tokens=2048,
                                         max_running_requests=8, **kwargs)
        return made[name]

    yield get
    for eng in made.values():
        eng.shutdown()


def test_rksc_without_asks_equals_radix(engines):
    radix = engines("radix", cache="radix")
    outputs = _run(radix, PROMPTS)
    for name, asks in (("rksc-off", None), ("rksc-tau2", {"enabled": True, "tau": 2.0})):
        eng = engines(name, cache="rksc", asks=asks)
        assert isinstance(eng.tree_cache, RKSCRadixCache)
        assert _run(eng, PROMPTS) == outputs
        stats = eng.stats()
        assert stats.semantic_tokens == 0 and stats.key_tokens == 0
        eng.check_integrity()
    radix.flush_cache()


def test_paraphrase_gets_semantic_hits_and_stays_explicit(engines):
    eng = engines("rksc-on", cache="rksc", asks={"enabled": True, "tau": 0.8, "recompute_fraction": 0.2})
    donor_text, recipient_text = (
        "Solve this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:",
        "Answer this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:",
    )
    before = eng.stats()
    eng.generate_request(text=donor_text, sampling_params=GREEDY)
    out = eng.generate_request(text=recipient_text, sampling_params=GREEDY)
    stats = eng.stats().since(before)
    assert stats.semantic_tokens > 0 and stats.recomputed_tokens > 0 and stats.key_tokens > 0
    assert out["meta_info"]["completion_tokens"] > 0
    eng.check_integrity()
    tree = eng.tree_cache
    assert tree.stats.semantic_hit_tokens >= stats.semantic_tokens
    # An exact lookup of the recipient's prompt sees only the part it shares with the donor.
    ids = eng.encode(recipient_text)
    exact = len(eng.scheduler.call(lambda: eng.kv.match(ids, len(ids))[0]))
    donor_ids = eng.encode(donor_text)
    shared = next(i for i, (a, b) in enumerate(zip(ids, donor_ids)) if a != b)
    assert exact == shared
    # The alias was released: nothing is locked and the donor can be evicted.
    assert eng.flush_cache()
    eng.check_integrity()


def test_a_prefill_only_request_is_computed_exactly_and_cached(engines):
    # A fork's commit (max_new_tokens 0) exists to be cached: ASKS leaves it exact, so the
    # branches after it reuse the whole prompt exactly.
    eng = engines("rksc-on", cache="rksc", asks={"enabled": True, "tau": 0.8, "recompute_fraction": 0.2})
    assert eng.flush_cache()
    donor_text, recipient_text = (
        "Solve this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:",
        "Answer this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:",
    )
    eng.generate_request(text=donor_text, sampling_params=GREEDY)
    before = eng.stats()
    eng.generate_request(text=recipient_text, sampling_params={"max_new_tokens": 0})
    assert eng.stats().since(before).semantic_tokens == 0
    ids = eng.encode(recipient_text)
    assert len(eng.scheduler.call(lambda: eng.kv.match(ids, len(ids))[0])) == len(ids)
    assert eng.flush_cache()
    eng.check_integrity()


def test_shifted_copies_equal_a_plain_prefill_at_layer_0(engines):
    """'Solve' is two tokens, 'Answer' one: the rest of the recipient's prompt is the
    donor's, one position earlier. Layer-0 keys and values depend only on the token and
    its position, so the rotated copies must equal a plain prefill's there."""
    eng = engines("rksc-shift", cache="rksc", asks={"enabled": True, "tau": 0.8})
    radix = engines("radix", cache="radix")
    donor_text = "Solve this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:"
    recipient_text = "Answer this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:"
    eng.generate_request(text=donor_text, sampling_params=GREEDY)
    radix.generate_request(text=recipient_text, sampling_params=GREEDY)
    ids = eng.encode(recipient_text)

    def copied_layer_0():
        kv = eng.kv
        prefix, node = kv.match(ids, len(ids) - 1)
        alias = kv.match_alias(ids, len(ids) - 1, prefix, node)
        assert alias is not None and alias.shifted()
        req = kv.open(ids, prefix, node, alias)
        try:
            kv.extend(req, ids[len(prefix):])
            positions = torch.tensor(req.alias.copied)
            slots = kv.row_slots(req, len(ids))[positions]
            return positions, kv.kv_pool.get_key_buffer(0)[slots].clone(), kv.kv_pool.get_value_buffer(0)[slots].clone()
        finally:
            kv.release_uncached(req, keep_len=req.protected_len)

    positions, k_copy, v_copy = eng.scheduler.call(copied_layer_0)

    def plain_layer_0():
        slots, _ = radix.kv.match(ids, len(ids))
        slots = slots[positions]
        return radix.kv.kv_pool.get_key_buffer(0)[slots].clone(), radix.kv.kv_pool.get_value_buffer(0)[slots].clone()

    k_ref, v_ref = radix.scheduler.call(plain_layer_0)
    torch.testing.assert_close(k_copy.float(), k_ref.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_copy.float(), v_ref.float(), atol=1e-5, rtol=1e-5)
    eng.check_integrity()


@pytest.mark.parametrize("dtype, shifted, expect_shifted", [
    ("bfloat16", None, False),  # default: computed, not rotated, in 16-bit pools
    ("bfloat16", True, True),
    ("float32", False, False),
])
def test_shifted_reuse_follows_the_pool_dtype_unless_set(engines, dtype, shifted, expect_shifted):
    """Every aligned token of this pair sits one position later in the donor; whether ASKS
    offers them as rotated copies depends on ``shifted`` (default: float32 pools only)."""
    asks = {"enabled": True, "tau": 0.8} | ({} if shifted is None else {"shifted": shifted})
    eng = engines(f"rksc-{dtype}-shifted-{shifted}", cache="rksc", device="cpu", dtype=dtype, asks=asks)
    eng.generate_request(text="Solve this problem. Tom has 3 apples and buys 5 more. How many apples does Tom "
                              "have? Answer:", sampling_params=GREEDY)
    ids = eng.encode("Answer this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? "
                     "Answer:")

    def offered_shifted():
        prefix, node = eng.kv.match(ids, len(ids) - 1)
        match = eng.kv.match_alias(ids, len(ids) - 1, prefix, node)
        return match is not None and bool(match.shifted())

    assert (eng.kv.rotate_keys is not None) == expect_shifted
    assert eng.scheduler.call(offered_shifted) == expect_shifted
    eng.check_integrity()


def test_engine_config_asks_validation():
    from rksc_sgl.config import CACHE_MODES, EngineConfig

    assert "rksc-tree" in CACHE_MODES
    cfg = EngineConfig(cache="rksc", asks={"enabled": True, "tau": 0.9})
    assert cfg.asks == ASKSConfig(enabled=True, tau=0.9) and cfg.asks.active
    assert EngineConfig(cache="rksc").asks == ASKSConfig()
    assert not EngineConfig().asks.enabled
    with pytest.raises(ValueError, match="needs cache='rksc-tree'"):
        EngineConfig(cache="radix", asks=ASKSConfig(enabled=True))
    with pytest.raises(ValueError, match="unknown field"):
        EngineConfig(cache="rksc", asks={"enabled": True, "threshold": 0.9})
    with pytest.raises(ValueError, match="shifted must be True, False or None"):
        ASKSConfig(enabled=True, shifted="yes")
    assert ASKSConfig().reuses_shifted("float32") and not ASKSConfig().reuses_shifted("bfloat16")
    assert ASKSConfig(shifted=True).reuses_shifted("float16") and not ASKSConfig(shifted=False).reuses_shifted("float32")
    with pytest.raises(ValueError, match="tau"):
        EngineConfig(cache="rksc", asks={"enabled": True, "tau": float("nan")})
    with pytest.raises(ValueError, match="asks must be"):
        EngineConfig(cache="rksc", asks=0.9)


def test_batched_paraphrases_with_asks_keep_integrity(engines):
    eng = engines("rksc-on", cache="rksc", asks={"enabled": True, "tau": 0.8, "recompute_fraction": 0.2})
    words = ["Solve", "Answer", "Explain", "Check", "Compute", "Do"]
    prompts = [f"{w} this problem. Anna reads 12 pages a day for 4 days. How many pages? Answer:" for w in words]
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    before = eng.stats()
    eng.generate_request(text=prompts[0], sampling_params=params)  # the donor
    for _ in range(2):  # recipients decode together, reading the donor's slots
        outs = eng.generate_request(text=prompts[1:], sampling_params=params)
        assert [o["meta_info"]["completion_tokens"] for o in outs] == [4] * (len(prompts) - 1)
        eng.check_integrity()
    stats = eng.stats().since(before)
    assert stats.semantic_tokens > 0 and stats.decode_tokens > 0
    assert eng.flush_cache()
    eng.check_integrity()


def test_key_layer_above_zero_keys_from_hidden_states(engines):
    """key_layer=L: node keys are the mean hidden state at layer L that the prefill stored per
    slot, the recipient's span is run through the first L blocks over its prefix; both equal
    the model's own hidden_states[L]."""
    layer = 4
    eng = engines("rksc-l4", cache="rksc", asks={"enabled": True, "tau": 0.8, "key_layer": layer})
    donor_text, recipient_text = (
        "Solve this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:",
        "Answer this problem. Tom has 3 apples and buys 5 more. How many apples does Tom have? Answer:",
    )

    def hidden(ids):
        with torch.inference_mode():
            out = eng.hf_model(torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[layer][0].float()

    eng.generate_request(text=donor_text, sampling_params=GREEDY)
    (node,) = eng.tree_cache.root_node.children.values()
    expected = torch.nn.functional.normalize(hidden(list(node.key.token_ids)).mean(0), dim=0)
    torch.testing.assert_close(node.asks_key, expected, atol=2e-4, rtol=1e-3)
    recipient = eng.encode(recipient_text)
    empty = torch.empty((0,), dtype=torch.int64)
    span = eng.scheduler.call(lambda: eng.scheduler.span_features(empty, recipient))
    torch.testing.assert_close(span, hidden(recipient), atol=2e-3, rtol=1e-3)
    eng.check_integrity()  # the scratch slots went back

    before = eng.stats()
    out = eng.generate_request(text=recipient_text, sampling_params=GREEDY)
    stats = eng.stats().since(before)
    assert stats.semantic_tokens > 0 and stats.key_tokens >= stats.semantic_tokens
    assert out["meta_info"]["completion_tokens"] > 0
    eng.check_integrity()
    assert eng.flush_cache()
