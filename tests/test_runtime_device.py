"""The runtime's ASKS, RSBCM and attention statistics with the KV pool on another device.

SGLang's pools are built on the CPU and their tensors moved to the ``meta`` device, which
has no data: any read back to the host (``.item()``, ``.tolist()``, ``float(t)``, ``.cpu()``)
and any operation mixing a CPU tensor with a pool tensor raises. Each path runs there once
(no host sync, nothing mixed), and again on the CPU, where its numbers are checked against
a reference computed here, one request or one node at a time.
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

import rksc_sgl.rksc.rsbcm as rsbcm_module
from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.rksc.rsbcm import RSBCMStrategy
from rksc_sgl.rksc.tree_cache import RKSCRadixCache
from rksc_sgl.runtime import attention_stats
from rksc_sgl.runtime.asks import RuntimeASKSCache
from pools import device_pools

POOL, HEADS, KV_HEADS, DIM, LAYERS = 96, 4, 2, 8, 2
DEVICES = ["cpu", "meta"]


@dataclasses.dataclass
class Pools:
    kv: MHATokenToKVPool
    allocator: TokenToKVPoolAllocator
    rows: ReqToTokenPool
    device: str


def _pools(device: str, seed: int = 0) -> Pools:
    """SGLang's CPU pools, random KV, their tensors moved to ``device``."""
    kv, allocator, rows = device_pools(device, size=POOL, kv_heads=KV_HEADS, head_dim=DIM, layers=LAYERS, rows=4,
                                       context=64, seed=seed)
    return Pools(kv, allocator, rows, device)


def _params(pools: Pools, policy: str = "rsbcm", config=None) -> CacheInitParams:
    return CacheInitParams(disable=False, req_to_token_pool=pools.rows, token_to_kv_pool_allocator=pools.allocator,
                           page_size=1, eviction_policy=policy, eviction_policy_config=config)


def _key(tokens) -> RadixKey:
    return RadixKey(array("q", tokens))


def _insert(tree, tokens) -> None:
    alloc = tree.token_to_kv_pool_allocator
    slots = alloc.alloc(len(tokens))
    prefix = tree.insert(InsertParams(key=_key(tokens), value=slots.clone())).prefix_len
    alloc.free(slots[:prefix])


FORK = [list(range(1, 9)) + [20 + b] * 3 + [30 + b] for b in range(4)] + [[50, 51, 52, 53, 54]]


# ---- RSBCM: one vectorised read per eviction -----------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_rsbcm_eviction_reads_the_device_once(device, monkeypatch):
    pools = _pools(device)
    table = torch.rand(POOL + 1).to(device)
    tree = RKSCRadixCache(_params(pools), slot_attention=table)
    for tokens in FORK:
        _insert(tree, tokens)
    copies = []

    def counted(tensor):
        assert tensor.device.type == device
        copies.append(tensor.shape[0])
        return tensor.cpu() if device == "cpu" else torch.ones(tensor.shape)

    monkeypatch.setattr(rsbcm_module, "to_host", counted)
    evicted = 0
    for _ in range(3):
        before = tree.evictable_size()
        tree.evict(EvictParams(num_tokens=4))
        evicted += before - tree.evictable_size()
    # One copy per eviction, of every node the eviction could reach (the 5 leaves, then
    # what is left of them and the shared prefix above).
    assert len(copies) == 3 and copies[0] == 6
    assert evicted >= 12 and pools.allocator.available_size() == POOL - tree.evictable_size()


def test_rsbcm_mass_per_node_equals_a_sum_per_node():
    pools = _pools("cpu")
    table = torch.rand(POOL + 1)
    tree = RKSCRadixCache(_params(pools), slot_attention=table)
    for tokens in FORK:
        _insert(tree, tokens)
    strategy = tree.eviction_strategy
    strategy.begin_evict(tree.evictable_leaves)
    nodes = [n for n in _nodes(tree) if n.lock_ref == 0]
    for node in nodes:
        assert strategy.node_attention(node) == pytest.approx(float(table[node.value].sum()) / len(node.value),
                                                              rel=1e-6)
    leaves = list(tree.evictable_leaves)
    reference = float(table[torch.cat([n.value for n in leaves])].mean())
    assert strategy.attention_ref == pytest.approx(reference, rel=1e-6)


def _nodes(tree):
    stack, out = list(tree.root_node.children.values()), []
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


# ---- the attention hook: no host read per pass -------------------------------------------------------
def _batch(pools: Pools, lengths, mode: str):
    """Requests in rows 0..n-1 of ``lengths`` tokens each, their slots allocated; the
    forward batch of a decode pass (one query each) or an extend pass (``extend`` new
    tokens each, the last one counted)."""
    device = pools.device
    rows, slots = [], []
    for row, length in enumerate(lengths):
        s = pools.allocator.alloc(length)
        pools.rows.req_to_token[row, :length] = s.to(torch.int32)
        rows.append(row)
        slots.append(s)
    extend = [2] * len(lengths)
    queries = len(lengths) if mode == "decode" else sum(extend)
    q = torch.randn(queries, HEADS * DIM).to(device)
    forward_mode = SimpleNamespace(is_decode=lambda: mode == "decode", is_extend=lambda: mode == "extend")
    batch = SimpleNamespace(
        forward_mode=forward_mode, batch_size=len(lengths),
        seq_lens=torch.tensor(lengths).to(device), seq_lens_cpu=torch.tensor(lengths),
        req_pool_indices=torch.tensor(rows).to(device),
        extend_seq_lens=torch.tensor(extend).to(device) if mode == "extend" else None,
        out_cache_loc=torch.cat(slots)[-queries:])
    return q, batch, slots, extend


MODULE = SimpleNamespace(tp_q_head_num=HEADS, tp_k_head_num=KV_HEADS, qk_head_dim=DIM, scaling=DIM ** -0.5)


@pytest.mark.parametrize("mode", ["decode", "extend"])
@pytest.mark.parametrize("budget", [attention_stats.CHUNK_KEYS, 16, 4])  # one chunk; one per request; keys in blocks
def test_hook_mass_equals_each_requests_softmax_and_reads_nothing_back(mode, budget, monkeypatch):
    monkeypatch.setattr(attention_stats, "CHUNK_KEYS", budget)
    monkeypatch.setattr(attention_stats.request_chunks, "__defaults__", (budget,))
    lengths = [5, 11, 3]
    results = {}
    for device in DEVICES:
        pools = _pools(device, seed=3)
        torch.manual_seed(4)
        q, batch, slots, extend = _batch(pools, lengths, mode)
        mass = torch.zeros(POOL + 1).to(device)
        keys = pools.kv.get_key_buffer(0)
        counted = attention_stats._add_query_mass(MODULE, q, batch, pools.rows.req_to_token, keys, mass, 0.5)
        assert counted == len(lengths) and mass.device.type == device
        results[device] = (mass, q, keys, slots, extend)
    mass, q, keys, slots, extend = results["cpu"]
    expected = torch.zeros(POOL + 1)
    last = torch.arange(len(lengths)) if mode == "decode" else torch.cumsum(torch.tensor(extend), 0) - 1
    for i, s in enumerate(slots):
        query = q.view(-1, HEADS, DIM)[last[i]]
        for head in range(HEADS):
            k = keys[s, head // (HEADS // KV_HEADS)]
            weights = torch.softmax(k @ query[head] * MODULE.scaling, dim=0)
            expected.index_add_(0, s, weights * 0.5 / HEADS)
    assert torch.allclose(mass, expected, atol=1e-6)
    assert mass.sum() == pytest.approx(0.5 * len(lengths), rel=1e-5)


def test_request_chunks_stay_within_the_budget():
    assert attention_stats.request_chunks([5, 11, 3], 16) == [(0, 1, 5), (1, 2, 11), (2, 3, 3)]
    assert attention_stats.request_chunks([5, 11, 3], 33) == [(0, 3, 11)]
    assert attention_stats.request_chunks([40, 2, 2], 16) == [(0, 1, 40), (1, 3, 2)]
    assert attention_stats.request_chunks([], 16) == []


@pytest.mark.parametrize("device", DEVICES)
def test_slots_handed_out_start_with_no_mass(device):
    pools = _pools(device)
    table = attention_stats.slot_attention_of(pools.kv)
    table.mass.fill_(1.0)
    slots = pools.allocator.alloc(7)
    assert attention_stats.reset_allocated(slots, pools.allocator) is slots
    if device == "cpu":
        assert table.mass[slots].sum() == 0 and table.mass.sum() == POOL + 1 - 7


# ---- the overhead switch: statistics only near a full pool -------------------------------------------------
def _run_hook(pools: Pools, q, batch) -> None:
    """The real ``rksc_attention`` hook (every layer sampled) over one pass, as SGLang calls it."""
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    hook = attention_stats.attention_hook({"layer_stride": 1})
    backend = SimpleNamespace(token_to_kv_pool=pools.kv, req_to_token_pool=pools.rows)
    with forward_context(ForwardContext(attn_backend=backend)):
        for layer in range(LAYERS):
            assert hook(SimpleNamespace(layer_id=layer, **vars(MODULE)), (q, None, None, batch), None) is None


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_are_off_far_from_full_and_on_near_full(device):
    pools = _pools(device)
    table = attention_stats.slot_attention_of(pools.kv)
    strategy = RSBCMStrategy(collect_above_usage=0.5)
    attention_stats.watch_usage(table, strategy.watch_free(POOL), pools.allocator.available_size())
    assert (table.watch_free, table.collecting) == (POOL // 2, False)
    q, batch, slots, _ = _batch(pools, [5, 11, 3], "decode")  # 19 of 96 slots allocated
    attention_stats.reset_allocated(torch.cat(slots), pools.allocator)
    _run_hook(pools, q, batch)
    assert (table.passes, table.skipped, table.collecting) == (0, 1, False)
    if device == "cpu":
        assert table.mass.sum() == 0
    more = pools.allocator.alloc(30)  # 49 of 96: more than half
    attention_stats.reset_allocated(more, pools.allocator)
    assert table.collecting and table.switched_on == 1
    _run_hook(pools, q, batch)
    assert (table.passes, table.queries, table.skipped) == (1, 3, 1)
    if device == "cpu":
        assert table.mass.sum() == pytest.approx(3.0, rel=1e-5)  # one unit per decode query
    pools.allocator.free(more)
    attention_stats.reset_allocated(pools.allocator.alloc(1), pools.allocator)  # 20 of 96 again
    assert not table.collecting and table.switched_on == 1


@pytest.mark.parametrize("usage, skipped", [(0.0, False), (0.5, True)])
def test_the_switch_is_on_before_every_eviction(usage, skipped, monkeypatch):
    """Requests of 12 tokens, one decode pass each, cached in the tree: the tree fills the
    pool and evicts. Every eviction comes after passes collected with the switch on."""
    pools = _pools("cpu")
    table = attention_stats.slot_attention_of(pools.kv)
    tree = RKSCRadixCache(_params(pools, config={"collect_above_usage": usage}), slot_attention=table.mass)
    attention_stats.watch_usage(table, tree.eviction_strategy.watch_free(POOL), pools.allocator.available_size())
    seen = []
    begin = tree.eviction_strategy.begin_evict
    monkeypatch.setattr(tree.eviction_strategy, "begin_evict",
                        lambda leaves: (seen.append((table.collecting, table.passes)), begin(leaves))[1])
    for i in range(20):
        tokens = [100 * i + t for t in range(12)]
        short = 12 - pools.allocator.available_size()
        if short > 0:
            tree.evict(EvictParams(num_tokens=short))
        slots = pools.allocator.alloc(12)
        attention_stats.reset_allocated(slots, pools.allocator)
        pools.rows.req_to_token[0, :12] = slots.to(torch.int32)
        batch = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True, is_extend=lambda: False),
                                batch_size=1, seq_lens=torch.tensor([12]), seq_lens_cpu=torch.tensor([12]),
                                req_pool_indices=torch.tensor([0]), out_cache_loc=slots[-1:])
        _run_hook(pools, torch.randn(1, HEADS * DIM), batch)
        prefix = tree.insert(InsertParams(key=_key(tokens), value=slots.clone())).prefix_len
        pools.allocator.free(slots[:prefix])
    assert len(seen) >= 10 and all(on and passes > 0 for on, passes in seen)
    assert (table.skipped > 0) == skipped and table.passes + table.skipped == 20

EMBED = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
DONOR = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
RECIPIENT = [1, 2, 3, 4, 60, 61, 6, 7, 8, 9, 10, 11, 12, 13, 99]  # two new tokens shift the rest by 1


def _request(tokens):
    kv = SimpleNamespace(holds_kv=False, req_pool_idx=0, cache_protected_len=4)
    return SimpleNamespace(
        rid="r", output_ids=[], kv=kv, sampling_params=SimpleNamespace(max_new_tokens=4), extra_key=None,
        cache_salt=None, multimodal_inputs=None, return_logprob=False, origin_input_ids=tokens, last_node=None,
        prefix_len=0, extend_end=len(tokens), skip_radix_cache_insert=False)


def _asks_tree(pools: Pools, barrier=None) -> RuntimeASKSCache:
    asks = ASKSConfig(enabled=True, tau=0.5, recompute_fraction=0.0, shifted=True)
    return RuntimeASKSCache(_params(pools, "lru"), asks=asks, token_features=lambda ids: EMBED[list(ids)],
                            rotate_keys=lambda k, delta: k * (1.0 + delta), wait_for_forward=barrier)


@pytest.mark.parametrize("device", DEVICES)
def test_asks_recipient_runs_on_the_pools_device(device):
    pools = _pools(device, seed=5)
    order = []
    tree = _asks_tree(pools, barrier=lambda: order.append("barrier"))
    rotate = tree.rotate_keys
    tree.rotate_keys = lambda k, delta: (order.append("copy"), rotate(k, delta))[1]
    _insert(tree, DONOR)
    donor_slots = tree.match_prefix(MatchPrefixParams(key=_key(DONOR))).last_device_node.value
    free_before = pools.allocator.available_size()
    req = _request(RECIPIENT)
    match = tree.match_prefix(MatchPrefixParams(key=_key(RECIPIENT), req=req))
    assert match.device_prefix_len == 4  # exact [1..4], then the computed [60, 61]
    plan = tree.pending_plan(req)
    assert plan is not None and sorted(plan.copies) == list(range(6, 14)) and plan.rounds == 2
    req.last_node, req.prefix_len = match.last_device_node, 4
    tree.admit(req)
    prefix = tree.prefix_device_indices(req)
    assert prefix.device.type == device
    if device == "cpu":
        assert torch.equal(prefix, donor_slots[:4].to(torch.int64))
    req.prefix_len = 6  # the first round computed row positions 4 and 5
    assert tree.advance(req) is None  # the last round: the donor's 8 tokens, then 99
    assert req.prefix_len == 14 and order[0] == "barrier" and "copy" in order
    written = pools.rows.req_to_token[0, 6:14]
    assert written.device.type == device
    assert pools.allocator.available_size() == free_before - 8
    if device == "cpu":
        copies = written.to(torch.int64)
        donor = donor_slots.to(torch.int64)
        assert not set(copies.tolist()) & set(donor.tolist())
        for layer in range(LAYERS):
            k, v = pools.kv.get_key_buffer(layer), pools.kv.get_value_buffer(layer)
            # Recipient position 6 + i holds donor offset 5 + i (donor token 6 + i), one position later.
            assert torch.equal(k[copies], k[donor[5:13]] * 2.0) and torch.equal(v[copies], v[donor[5:13]])
    tree.on_release(req, checkpointed=False)
    assert pools.allocator.available_size() == free_before and not tree.plans
    assert all(node.lock_ref == 0 for node in _nodes(tree))

