"""What the RKSC features run with on SGLang's runtime: start-up refusals, caveats, the tree
SGLang disables by itself, and identical RSBCM decisions on tensor-parallel ranks.

The rank test runs two real ``torch.distributed`` (gloo) ranks in two processes, each with
its own tree, its own attention table (as each rank's hook sees only its own heads) and its
own clock, and compares what they evict.
"""

from __future__ import annotations

import os
import random
import time
from array import array

import pytest
import torch

from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from rksc_sgl.rksc.rsbcm import RSBCMStrategy
from rksc_sgl.runtime import plugin
from rksc_sgl.runtime.launch_plan import LaunchError, plan_launch, sglang_parser
from rksc_sgl.runtime.support import UnsupportedConfiguration, caveats, check_server_args_hook, unsupported

from pools import cache_params
from gloo_ranks import on_ranks
from processes import alive


def _args(*argv):
    return sglang_parser().parse_args(["--model-path", "m", *argv])


ASKS = {"RKSC_ASKS": '{"tau": 0.9}'}
SEEDED = {"RKSC_SEEDED_SAMPLING": "1"}
RKSC = ["--radix-cache-backend", "rksc"]
RSBCM = [*RKSC, "--radix-eviction-policy", "rsbcm"]


@pytest.mark.parametrize("argv, environ, message", [
    (["--radix-eviction-policy", "rsbcm"], {}, "rsbcm needs --radix-cache-backend rksc"),
    ([*RSBCM, "--pp-size", "2"], {}, "rsbcm needs --pp-size 1"),
    ([*RSBCM, "--speculative-algorithm", "EAGLE"], {}, "does not support --speculative-algorithm EAGLE"),
    ([*RSBCM, "--tp-size", "2", "--radix-eviction-policy-config", '{"recency_clock": "wall"}'], {},
     "recency_clock 'wall' differs between tensor-parallel ranks"),
    ([*RKSC, "--enable-hierarchical-cache"], {}, "does not support --enable-hierarchical-cache"),
    ([*RKSC, "--tp-size", "2"], ASKS, "ASKS needs --tp-size 1"),
    ([*RKSC, "--pp-size", "2"], ASKS, "ASKS needs --pp-size 1"),
    ([*RKSC, "--attn-dp-size", "2"], ASKS, "ASKS does not support DP attention"),
    ([*RKSC, "--page-size", "16"], ASKS, "ASKS needs --page-size 1"),
    ([*RKSC, "--disaggregation-mode", "decode"], ASKS, "ASKS does not support --disaggregation-mode decode"),
    ([], ASKS, "ASKS) needs --radix-cache-backend rksc"),
    (["--sampling-backend", "flashinfer"], SEEDED, "RKSC_SEEDED_SAMPLING=1 needs --sampling-backend pytorch"),
])
def test_each_unsupported_configuration_is_named_with_its_flag(argv, environ, message):
    problems = unsupported(_args(*argv), environ)
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(UnsupportedConfiguration, match="rksc: this server configuration is not supported"):
        old = dict(os.environ)
        os.environ.update(environ)
        try:
            check_server_args_hook(None, _args(*argv))
        finally:
            os.environ.clear()
            os.environ.update(old)


@pytest.mark.parametrize("argv, environ", [
    (RSBCM, {}), ([*RSBCM, "--tp-size", "2"], {}), ([*RSBCM, "--dp-size", "2"], {}), (RKSC, ASKS),
    (["--sampling-backend", "pytorch"], SEEDED), ([*RSBCM, "--disable-radix-cache", "--pp-size", "2"], {}),
])
def test_supported_configurations_pass(argv, environ):
    assert unsupported(_args(*argv), environ) == []


def test_the_launcher_refuses_before_anything_starts():
    with pytest.raises(LaunchError, match="rsbcm needs --pp-size 1"):
        plan_launch(["--model-path", "smollm2-135m", "--pp-size", "2"], cuda=True, sgl_kernel_installed=True)


def test_graph_caveat_names_the_flags_that_give_full_statistics():
    (line,) = caveats(_args(*RSBCM), device="cuda", attention_hook=True)
    assert "decode steps and captured prefill batches" in line and "--disable-cuda-graph" in line
    (line,) = caveats(_args(*RSBCM, "--disable-decode-cuda-graph"), device="cuda", attention_hook=True)
    assert "captured prefill batches replay" in line
    assert caveats(_args(*RSBCM, "--disable-cuda-graph"), device="cuda", attention_hook=True) == []
    assert caveats(_args(*RSBCM), device="cpu", attention_hook=True) == []


def test_plugin_registers_the_check_on_sglangs_argument_check():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from rksc_sgl.runtime.support import CHECK_TARGET

    plugin.register()
    assert any(hook is check_server_args_hook for _, hook, _ in HookRegistry._hooks[CHECK_TARGET])


# ---- a tree SGLang disables (PD decode, deterministic inference on torch_native, embeddings) -------
def _params(policy="rsbcm", disable=False, config=None, pool=64):
    return cache_params(policy, config, pool, disable)


def _context(params, *, disable=False, tp_size=1):
    return registry.TreeCacheBuildContext(
        server_args=_args(*RSBCM), params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
        enable_hierarchical_cache=False, disable_radix_cache=disable, tp_worker=None, model_config=None,
        tp_size=tp_size, tp_rank=0, tp_group=None)


def test_rsbcm_on_a_disabled_tree_builds_and_never_evicts():
    cache = plugin.rksc_cache_factory(_context(_params(disable=True), disable=True))
    assert cache.disable and not isinstance(cache.eviction_strategy, RSBCMStrategy)
    assert cache.evict(EvictParams(num_tokens=8)).num_tokens_evicted == 0
    assert cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1, 2, 3])))).device_prefix_len == 0


# ---- tensor-parallel ranks -----------------------------------------------------------------------------
OPS = 60


def _both_ways(rank: int, world: int) -> dict:
    return {consistent: _rank_evictions(rank, world, consistent) for consistent in (True, False)}


def _rank_evictions(rank: int, world: int, consistent: bool) -> list:
    """One rank's tree through the same operations as every rank's; what each eviction took."""
    import torch.distributed as dist

    import sglang.srt.mem_cache.radix_cache as radix_cache_module

    from rksc_sgl.rksc.tree_cache import RKSCRadixCache
    from rksc_sgl.runtime.rank_consistency import rank_reducer

    torch.manual_seed(100 + rank)  # each rank's own heads: different mass tables
    config = {"recency_scale_s": 0.001, "recency_scale_ops": 4.0}
    tree = RKSCRadixCache(_params(config=config, pool=48), slot_attention=torch.rand(49))
    if consistent:
        tree.eviction_strategy.use_ranks(rank_reducer(dist.group.WORLD, world))
    offset, real = 1000.0 * rank, time.monotonic  # each process's own clock
    radix_cache_module.time.monotonic = lambda: real() + offset  # (this child process only)
    rng = random.Random(7)  # the same operations on every rank
    evicted, alloc = [], tree.token_to_kv_pool_allocator
    for _ in range(OPS):
        tokens = rng.choice([[1, 2, 3, 4], [1, 2, 9], [5, 6, 7, 8, 9], [5, 6]]) + [
            rng.randint(10, 14) for _ in range(rng.randint(1, 5))]
        if alloc.available_size() < len(tokens):
            before = {tuple(n.key.token_ids) for n in tree.evictable_leaves}
            tree.evict(EvictParams(num_tokens=len(tokens) - alloc.available_size()))
            evicted.append(sorted(before - {tuple(n.key.token_ids) for n in tree.evictable_leaves}))
        time.sleep(rng.random() * 0.002 * (1 + rank))  # ranks run at their own pace
        if rng.random() < 0.6:
            slots = alloc.alloc(len(tokens))
            prefix = tree.insert(InsertParams(key=RadixKey(array("q", tokens)), value=slots.clone())).prefix_len
            alloc.free(slots[:prefix])
        else:
            tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    return evicted


@pytest.fixture(scope="module")
def rank_evictions():
    """Two gloo ranks in two processes; per rank, the evictions with and without combining."""
    return on_ranks(_both_ways, 2)


def test_tensor_parallel_ranks_evict_identically_with_their_own_heads_and_clocks(rank_evictions):
    assert len(rank_evictions[0][True]) >= 10 and rank_evictions[0][True] == rank_evictions[1][True]


def test_without_combining_them_ranks_diverge(rank_evictions):
    """The control: the same ranks, each ranking by its own heads' mass and its own clock."""
    assert rank_evictions[0][False] != rank_evictions[1][False]


def test_a_server_whose_tree_sglang_disabled_starts_with_rsbcm_and_serves(tmp_path):
    """The plain command with ``--disable-radix-cache`` reaches the factory with a disabled
    tree, as PD decode servers and deterministic inference on most backends do (on this CPU,
    SGLang refuses deterministic inference with torch_native outright)."""
    import dataclasses

    from rksc_sgl.runtime.client import RuntimeClient
    from rksc_sgl.runtime.server_process import RuntimeServer, free_port

    plan = plan_launch(["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
                        "--disable-radix-cache", "--max-total-tokens", "2048"], rksc_cache=False)
    plan = dataclasses.replace(plan, argv=[*plan.argv, *RSBCM])
    with open(tmp_path / "server.log", "w") as log:
        server = RuntimeServer(plan, startup_timeout=300, log=log)
        try:
            server.start()
            client = RuntimeClient(server.url)
            answer = client.generate("The capital of France is", sampling_params={"temperature": 0, "max_new_tokens": 4})
            assert answer["meta_info"]["completion_tokens"] == 4
            (state,) = client.server_info()["internal_states"]
            assert state["radix_eviction_policy"] == "rsbcm" and state["rksc"]["cache"]["inserted_tokens"] == 0
        finally:
            pids = {server.process.pid} if server.process else set()
            server.stop()
    assert not alive(pids)
