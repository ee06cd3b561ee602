"""Decode-KV compression on tensor-parallel ranks (``RuntimeCompression(rank_mean=...)``).

Two gloo ranks in two processes each hold half of the KV heads (their own slice of the same
keys and values) and their own heads' attention mass, and compress one decoding request
through the same steps. With ``mean_over_ranks`` every rank logs the same compactions (kept
and merged original positions), and they equal one process's that holds every head and the
ranks' mean mass; without it the ranks keep different tokens (the control).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from gloo_ranks import on_ranks
from pools import device_pools

HEADS, RANKS, DIM, LAYERS, POOL, PROMPT, STEPS = 4, 2, 8, 4, 256, 10, 60
CASES = [("rkv", "cumulative"), ("cask", "cumulative"), ("attention", "window"), ("rkv", "window")]


def _compactions(method: str, importance: str, heads: slice, increments, rank_mean=None) -> list:
    """The decision log of one request decoding ``STEPS`` tokens on a pool holding ``heads``
    of the shared keys and values; ``increments(step)`` is the attention mass the pool's
    table receives before each step's compaction."""
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    from rksc_sgl.rksc.compression_config import CompressionConfig
    from rksc_sgl.runtime.attention_stats import slot_attention_of
    from rksc_sgl.runtime.compression import RuntimeCompression

    shared = torch.Generator().manual_seed(5)
    kv, allocator, rows = device_pools("cpu", size=POOL, kv_heads=heads.stop - heads.start, head_dim=DIM,
                                       layers=LAYERS, rows=2, context=PROMPT + STEPS + 1)
    for buffers in (kv.k_buffer, kv.v_buffer):
        for layer in range(LAYERS):
            buffers[layer].copy_(torch.randn(POOL + 1, HEADS, DIM, generator=shared)[:, heads])
    mass = slot_attention_of(kv).mass
    mass.zero_()
    config = CompressionConfig(method=method, importance=importance, budget=0.25, buffer=4, min_tokens=8)
    log = io.StringIO()
    state = RuntimeCompression(config, rows, allocator, mass, rank_mean=rank_mean, decision_log=log)
    slots = allocator.alloc(PROMPT + 1)
    rows.req_to_token[0, :PROMPT + 1] = slots.to(torch.int32)
    req = SimpleNamespace(kv=ReqKvInfo(req_pool_idx=0, cache_protected_len=PROMPT, kv_committed_len=PROMPT + 1,
                                       kv_allocated_len=PROMPT + 1), origin_input_ids=[1] * PROMPT, rid="r")
    for step in range(STEPS):
        mass += increments(step)
        state.compress(req)
        slot = allocator.alloc(1)
        rows.req_to_token[0, req.kv.kv_committed_len] = slot.to(torch.int32)
        req.kv.kv_committed_len += 1
        req.kv.kv_allocated_len += 1
    return log.getvalue().splitlines()


def _increments(rank: int):
    """Rank ``rank``'s heads' attention mass per step: its own, unlike the other rank's."""
    return lambda step: torch.rand(POOL + 1, generator=torch.Generator().manual_seed(1000 * rank + step))


def _mean_mass(step: int) -> torch.Tensor:
    """The ranks' mean attention mass per step: what one process with every head receives."""
    return sum(_increments(rank)(step) for rank in range(RANKS)) / RANKS


def _both_ways(rank: int, world: int) -> dict:
    """This rank's compactions per case, with and without the ranks' mean; rank 0 adds one
    process's with every head (computed here, in a fresh process like the ranks, so no hook
    another test installed in the test process changes it)."""
    import torch.distributed as dist

    from rksc_sgl.runtime.rank_consistency import mean_over_ranks

    share = HEADS // world
    heads = slice(rank * share, (rank + 1) * share)
    mean = mean_over_ranks(dist.group.WORLD, world)
    out = {(case, combined): _compactions(*case, heads, _increments(rank), mean if combined else None)
           for case in CASES for combined in (True, False)}
    if rank == 0:
        out.update({(case, "whole"): _compactions(*case, slice(0, HEADS), _mean_mass) for case in CASES})
    return out


@pytest.fixture(scope="module")
def ranks():
    return on_ranks(_both_ways, RANKS)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_every_rank_compresses_as_one_process_with_every_head(ranks, case):
    whole = ranks[0][(case, "whole")]
    assert len(whole) >= 8
    if case[0] == "cask":
        assert any(line.count("[") > 2 for line in whole)  # merges were made and logged
    assert ranks[0][(case, True)] == ranks[1][(case, True)] == whole


def test_without_the_ranks_mean_they_keep_different_tokens(ranks):
    """The control: each rank scoring with its own heads."""
    for case in CASES:
        assert ranks[0][(case, False)] != ranks[1][(case, False)], case
