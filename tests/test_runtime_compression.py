"""Decode-KV compression inside SGLang's runtime with the radix cache on (issue #37).

Without a server: the settings (``RKSC_COMPRESSION``), every start-up refusal, the launcher's
flags, that nothing is registered while the variable is unset, and the hooks themselves on
SGLang's own pools with fake requests and batches, on the CPU (checked against the engine's
selection) and on the ``meta`` device (no read back, nothing mixed).

With one server (started once for the module, small settings so that 40-token generations
compress several times, method ``rkv``): a compressed request's greedy continuation equals the
embedded engine's given the runtime's own decisions (read from ``/server_info``), and equals
``transformers`` with the same cache entries deleted; after concurrent requests and aborts
every slot is free or in the tree exactly once, no lock is left, and the tree holds nothing
past a compressed request's prompt; four long requests that SGLang's full reservation would run
one at a time run at once.
"""

from __future__ import annotations

import json
import threading
import time
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.managers.schedule_batch import ReqKvInfo
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from rksc_sgl.rksc.compression import cask_select, plan, select_keep
from rksc_sgl.rksc.compression_config import CompressionConfig
from rksc_sgl.rksc.tree_cache import REQ_COMPRESSION_ATTR, is_compressed
from rksc_sgl.runtime import compression as runtime_compression, compression_hooks, plugin
from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.compression import POOL_ATTR, RuntimeCompression, compression_of
from rksc_sgl.runtime.compression_settings import (ENV_VAR, CompressionSettingsError, compression_config_from_env,
                                                   env_value)
from rksc_sgl.runtime.launch_plan import LaunchError, plan_launch, sglang_parser
from rksc_sgl.runtime.server_process import free_port, running_server
from rksc_sgl.runtime.support import unsupported

from aborting import stream_then_abort
from compression_replay import (candidate_origins, engine_continuation, replay_decisions,
                                transformers_with_entries_deleted)
from pools import device_pools
from processes import left_nothing

SETTINGS = {"method": "rkv", "budget": 0.25, "buffer": 4, "min_tokens": 8}
CONFIG = CompressionConfig(**SETTINGS)
PROMPT = "Question: Tom has 3 apples and buys 5 more, then gives 2 away. How many apples are left?\nAnswer:"
STEPS = 40
POOL_TOKENS = 2048
STARTUP_TIMEOUT_S = 600  # (a loaded 2-core machine has taken over 300 s)


# ---- settings and refusals (no server) -------------------------------------------------------------
def test_settings_parse_once_with_clear_errors():
    assert compression_config_from_env({}) is None
    assert compression_config_from_env({ENV_VAR: " "}) is None
    assert compression_config_from_env({ENV_VAR: env_value(CONFIG)}) == CONFIG
    for raw, message in (("rkv", "must be a JSON object such as"), ("[1]", "must be a JSON object of"),
                         ('{"ratio": 2}', "unknown setting\\(s\\) ratio; known: method, budget"),
                         ('{"budget": 0}', "RKSC_COMPRESSION: compression budget must be > 0"),
                         ('{"method": "zip"}', "compression method 'zip'")):
        with pytest.raises(CompressionSettingsError, match=message):
            compression_config_from_env({ENV_VAR: raw})


def _args(*argv):
    return sglang_parser().parse_args(["--model-path", "m", *argv])


HOOK = json.dumps([{"name": "rksc_attention", "target_modules": ["model.layers.*.self_attn.attn"],
                    "hook_factory": "rksc_sgl.runtime.attention_stats:attention_hook", "config": {"layer_stride": 4}}])
RKSC = ["--radix-cache-backend", "rksc"]
CPU = {"SGLANG_USE_CPU_ENGINE": "1"}
RECENT = {ENV_VAR: '{"method": "recent"}', **CPU}
RKV = {ENV_VAR: '{"method": "rkv"}', **CPU}


@pytest.mark.parametrize("argv, environ, message", [
    ([], RECENT, "needs --radix-cache-backend rksc (got the default cache)"),
    (["--disable-radix-cache"], RECENT, "with the radix cache on; drop --disable-radix-cache"),
    ([*RKSC, "--page-size", "16"], RECENT, "needs --page-size 1"),
    ([*RKSC, "--speculative-algorithm", "EAGLE"], RECENT, "does not support --speculative-algorithm EAGLE"),
    ([*RKSC, "--pp-size", "2"], RECENT, "needs --pp-size 1"),
    ([*RKSC, "--attn-dp-size", "2"], RECENT, "does not support DP attention"),
    ([*RKSC, "--enable-mixed-chunk"], RECENT, "does not support --enable-mixed-chunk"),
    ([*RKSC, "--disaggregation-mode", "decode"], RECENT, "does not support --disaggregation-mode decode"),
    ([*RKSC, "--enable-streaming-session"], RECENT, "does not support --enable-streaming-session"),
    ([*RKSC, "--enable-multimodal"], RECENT, "does not support --enable-multimodal"),
    ([*RKSC, "--forward-hooks", HOOK, "--disable-overlap-schedule"], {ENV_VAR: '{"method": "rkv"}'},
     "add --disable-decode-cuda-graph"),
    ([*RKSC, "--disable-decode-cuda-graph"], {ENV_VAR: '{"method": "recent"}'}, "needs --disable-overlap-schedule"),
    ([*RKSC, "--forward-hooks", HOOK, "--enable-torch-compile"], RKV, "drop --enable-torch-compile"),
    ([*RKSC], RKV, "--forward-hooks needs the rksc_attention hook"),
    ([*RKSC, "--forward-hooks", HOOK], {ENV_VAR: '{"attention_layer_stride": 2}', **CPU},
     "layer_stride 4 differs from the compression's attention_layer_stride 2"),
    ([*RKSC], {ENV_VAR: '{"method": "cask"}', **CPU}, "--forward-hooks needs the rksc_attention hook"),
    ([*RKSC], {ENV_VAR: "{bad"}, "RKSC_COMPRESSION must be a JSON object"),
])
def test_each_unsupported_configuration_is_refused_with_its_flag(argv, environ, message):
    problems = unsupported(_args(*argv), environ)
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("argv, environ", [
    (RKSC, RECENT), ([*RKSC, "--forward-hooks", HOOK], RKV), ([*RKSC, "--tp-size", "2"], RECENT),
    ([*RKSC, "--forward-hooks", HOOK, "--tp-size", "2"], RKV),
    ([*RKSC, "--forward-hooks", HOOK, "--tp-size", "2"], {ENV_VAR: '{"method": "cask"}', **CPU}),
    ([*RKSC, "--forward-hooks", HOOK], {ENV_VAR: '{"method": "cask"}', **CPU}),
    ([*RKSC, "--disable-overlap-schedule"], {ENV_VAR: '{"method": "recent"}'}),
    ([*RKSC, "--forward-hooks", HOOK, "--disable-overlap-schedule", "--disable-cuda-graph"],
     {ENV_VAR: '{"method": "attention"}'}),
])
def test_supported_configurations_pass(argv, environ):
    assert unsupported(_args(*argv), environ) == []


def _plan(*argv, **kwargs):
    kwargs.setdefault("cuda", False)
    return plan_launch(["--model-path", "smollm2-135m", *argv], sgl_kernel_installed=False, environ={}, **kwargs)


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_the_launcher_sets_the_variable_the_backend_and_the_hook():
    plan = _plan(compression=CONFIG)
    assert compression_config_from_env(plan.env) == CONFIG
    assert _value(plan.argv, "--radix-cache-backend") == "rksc"
    hooks = json.loads(_value(plan.argv, "--forward-hooks"))
    assert [h["config"] for h in hooks] == [{"layer_stride": CONFIG.attention_layer_stride}]
    recent = _plan("--radix-eviction-policy", "lru", compression=CompressionConfig(method="recent"))
    assert "--forward-hooks" not in recent.argv  # recent scores nothing
    gpu = plan_launch(["--model-path", "smollm2-135m"], cuda=True, sgl_kernel_installed=True, environ={},
                      compression=CONFIG)
    assert "--disable-overlap-schedule" in gpu.argv and "--disable-decode-cuda-graph" in gpu.argv
    from_env = plan_launch(["--model-path", "smollm2-135m"], cuda=False, sgl_kernel_installed=False,
                           environ={ENV_VAR: env_value(CONFIG)})
    assert ENV_VAR not in from_env.env and any("from the environment" in a for a in from_env.added)
    assert "--forward-hooks" in from_env.argv


@pytest.mark.parametrize("argv, kwargs, message", [
    ([], {"rksc_cache": False}, "it cannot run with SGLang's default cache"),
    (["--disable-radix-cache"], {}, "it cannot run with --disable-radix-cache"),
    (["--radix-eviction-policy-config", '{"attention_layer_stride": 2}'], {},
     "RSBCM's attention_layer_stride 2 .* and compression's 4 .* share one attention hook"),
    ([], {"attention_stats": False}, "scores tokens by attention; drop --attention-stats off"),
    (["--page-size", "16"], {}, "needs --page-size 1"),
])
def test_the_launcher_refuses_before_anything_starts(argv, kwargs, message):
    with pytest.raises(LaunchError, match=message):
        _plan(*argv, compression=CONFIG, **kwargs)


def test_launch_server_flags_make_the_config(capsys):
    from rksc_sgl.runtime.launcher import _compression_from_flags, launcher_parser

    def parsed(*argv):
        return _compression_from_flags(launcher_parser().parse_known_args(list(argv))[0])

    assert parsed() is None
    assert parsed("--kv-compression", "recent") == CompressionConfig(method="recent")
    assert parsed("--kv-compression", "rkv", "--kv-budget", "0.25", "--kv-compression-config",
                  '{"buffer": 4, "min_tokens": 8}') == CONFIG
    for argv, message in ((["--kv-budget", "0.2"], "need --kv-compression"),
                          (["--kv-compression", "rkv", "--kv-compression-config", "[1]"], "must be a JSON object"),
                          (["--kv-compression", "rkv", "--kv-compression-config", '{"budget": 1}'],
                           "give budget with --kv-budget"),
                          (["--kv-compression", "rkv", "--kv-budget", "2"], "budget must be a number in")):
        with pytest.raises(LaunchError, match=message):
            parsed(*argv)


def _compression_targets(hooks) -> set:
    return {target for target, entries in hooks.items()
            if any(h in {f for _, f, _ in compression_hooks.HOOKS} for _, h, _ in entries)}


@pytest.mark.parametrize("value", [None, env_value(CONFIG)])
def test_hooks_are_registered_only_with_the_variable_set(monkeypatch, value):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    plugin.register()
    targets = _compression_targets(HookRegistry._hooks)
    assert targets == (set() if value is None else {t for t, _, _ in compression_hooks.HOOKS})
    for target in targets:  # each target names a real SGLang method
        import pkgutil

        owner, name = target.rsplit(".", 1)
        assert callable(getattr(pkgutil.resolve_name(owner), name))


def test_a_bad_variable_stops_the_plugin(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setenv(ENV_VAR, '{"budget": 7}')
    with pytest.raises(ValueError, match="rksc plugin: RKSC_COMPRESSION: compression budget must be a number"):
        plugin.register()


# ---- the hooks on SGLang's pools, with fake requests and batches (no server) ----------------------------
POOL, KV_HEADS, DIM, LAYERS, ROWS, CONTEXT = 256, 2, 8, 4, 6, 128


def _pools(device: str, seed: int = 0):
    """SGLang's CPU pools with random keys, their tensors moved to ``device``."""
    return device_pools(device, size=POOL, kv_heads=KV_HEADS, head_dim=DIM, layers=LAYERS, rows=ROWS,
                        context=CONTEXT, seed=seed)


class FakeReq(SimpleNamespace):
    def finished(self):
        return self.done


def _request(allocator, rows, row: int, prompt: int, length: int, rid: str, **extra) -> FakeReq:
    slots = allocator.alloc(length)
    rows.req_to_token[row, :length] = slots.to(torch.int32)
    kv = ReqKvInfo(req_pool_idx=row, cache_protected_len=prompt, kv_committed_len=length, kv_allocated_len=length)
    return FakeReq(kv=kv, origin_input_ids=[1] * prompt, done=False, is_retracted=False, beam_group=None, rid=rid,
                   sampling_params=SimpleNamespace(max_new_tokens=200, ignore_eos=False), **extra)


def _batch(reqs, device):
    lengths = [r.kv.kv_committed_len for r in reqs]
    return SimpleNamespace(reqs=reqs, seq_lens=torch.tensor(lengths).to(device), seq_lens_cpu=torch.tensor(lengths),
                           orig_seq_lens=torch.tensor(lengths).to(device), seq_lens_sum=sum(lengths),
                           batch_is_full=True)


def _setup(device, config):
    kv, allocator, rows = _pools(device)
    from rksc_sgl.runtime.attention_stats import slot_attention_of

    table = slot_attention_of(kv)
    if device == "cpu":
        table.mass.copy_(torch.rand(table.mass.shape[0]))
    state = RuntimeCompression(config, rows, allocator, table.mass)
    setattr(rows, POOL_ATTR, state)
    return kv, allocator, rows, state


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("method", ["rkv", "cask", "recent", "attention"])
def test_a_compaction_rewrites_the_row_frees_the_slots_and_rebinds_the_batch(device, method):
    config = CompressionConfig(method=method, budget=0.25, buffer=4, min_tokens=8)
    kv, allocator, rows, state = _setup(device, config)
    prompt = 10
    over = _request(allocator, rows, 1, prompt, prompt + 13, "over")  # 13 decode tokens > 8 + 4
    under = _request(allocator, rows, 2, prompt, prompt + 12, "under")  # at the limit: untouched
    done = _request(allocator, rows, 3, prompt, prompt + 30, "done")
    done.done = True
    row_before = rows.req_to_token[1].clone()
    slots = row_before[prompt:prompt + 9].to(torch.int64)
    mass, keys = state.mass[slots].clone(), kv.get_key_buffer(LAYERS // 2)[slots].clone()  # (cask merges into them)
    free_before = allocator.available_size()
    batch = _batch([over, under, done], device)
    old_lens, old_cpu = batch.seq_lens, batch.seq_lens_cpu
    compact = compression_hooks.compact_before_schedule
    scheduler = SimpleNamespace(req_to_token_pool=rows, tree_cache=SimpleNamespace(), chunked_req=None)
    assert compact(scheduler, running_batch=batch, last_batch=None) is None
    keep = config.target(13) - config.buffer  # 4 of the 9 candidates
    assert over.kv.kv_committed_len == over.kv.kv_allocated_len == prompt + 13 - 5
    assert under.kv.kv_committed_len == prompt + 12 and done.kv.kv_committed_len == prompt + 30
    assert allocator.available_size() == free_before + 5
    assert is_compressed(over) and not is_compressed(under) and not is_compressed(done)
    assert batch.seq_lens is not old_lens and batch.seq_lens_cpu is not old_cpu  # new tensors
    assert batch.seq_lens_cpu.tolist() == [prompt + 8, prompt + 12, prompt + 30] and old_cpu[0] == prompt + 13
    assert batch.seq_lens_sum == 3 * prompt + 50 and batch.batch_is_full is False
    assert batch.seq_lens.device.type == batch.orig_seq_lens.device.type == device
    assert state.offset.device.type == device and state.shifted_rows == 1
    # positions: the compressed row continues at its true position, the others as SGLang says
    forward = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True), spec_info=None,
                              req_pool_indices=torch.tensor([1, 2]).to(device),
                              positions=torch.tensor([prompt + 7, prompt + 11]).to(device))
    runner = SimpleNamespace(req_to_token_pool=rows)
    shifted = compression_hooks.shift_decode_positions(forward, None, None, runner)
    assert shifted.positions.device.type == device
    if device == "meta":
        return
    assert shifted.positions.tolist() == [prompt + 12, prompt + 11]
    # the row: kept candidates (by the engine's own selection), then the buffer, moved down
    age = (prompt + 13 - torch.arange(prompt, prompt + 9)).float()
    expected = plan(config, mass / age, keys, keep).keep
    assert rows.req_to_token[1, prompt:prompt + 8].tolist() == \
        slots[expected].tolist() + row_before[prompt + 9:prompt + 13].tolist()
    assert rows.req_to_token[1, :prompt].tolist() == row_before[:prompt].tolist()
    assert state.offset[1] == 5 and getattr(over, REQ_COMPRESSION_ATTR).kept.tolist() == \
        [prompt + i for i in expected]
    freed = set(slots.tolist()) - set(slots[expected].tolist())
    assert freed <= set(allocator.free_pages.tolist())
    # release: the offset and the state go with the row; the decisions stay for /server_info
    compression_hooks.release_row(rows, over)
    assert state.offset[1] == 0 and not is_compressed(over) and state.shifted_rows == 0
    events = state.as_dict()["decisions"]["over"]["events"]
    assert [(e["decoded"], e["kept"]) for e in events] == [(13, [prompt + i for i in expected])]
    merges = plan(config, mass / age, keys, keep).merges
    assert [e.get("merged") for e in events] == [[[prompt + d, prompt + k] for d, k in merges] if method == "cask"
                                                 else None]


def test_repeated_compactions_track_original_positions_like_the_engine():
    """``recent`` on one request, step by step: the kept positions are always the newest
    candidates, in true positions, and the held decode KV never exceeds target + buffer + 1."""
    config = CompressionConfig(method="recent", budget=0.25, buffer=4, min_tokens=8)
    kv, allocator, rows, state = _setup("cpu", config)
    prompt = 6
    req = _request(allocator, rows, 1, prompt, prompt + 1, "r")
    for decoded in range(2, 60):
        new = allocator.alloc(1)
        rows.req_to_token[1, req.kv.kv_committed_len] = int(new)
        req.kv.kv_committed_len += 1
        req.kv.kv_allocated_len += 1
        batch = _batch([req], "cpu")
        state.compact_running(batch)
        held = req.kv.kv_committed_len - prompt
        assert held <= config.target(decoded) + config.buffer
        st = getattr(req, REQ_COMPRESSION_ATTR, None)
        if st is not None:
            assert held + st.dropped == decoded
            kept = st.kept.tolist()
            assert kept == sorted(kept) and len(kept) == st.kept_count
            assert state.offset[1] == st.dropped
            assert kept[-1] == prompt + decoded - config.buffer - 1 if st.events[-1][0] == decoded else True
    # recent keeps the newest candidates: the last kept one is the newest candidate of its compaction
    assert len(st.events) > 3 and all(k.tolist()[-1] == prompt + d - config.buffer - 1 for d, k in st.events)
    assert allocator.available_size() == POOL - (prompt + held)


@pytest.mark.parametrize("importance", ["cumulative", "window"])
def test_the_second_compactions_importance_is_the_engines(importance, monkeypatch):
    """Cumulative: mass per query since each candidate was written, at its original position;
    window: the mass received since the previous compaction (0 before it for newer tokens)."""
    config = CompressionConfig(method="attention", budget=0.25, buffer=4, min_tokens=8, importance=importance)
    kv, allocator, rows, state = _setup("cpu", config)
    seen = []
    real = runtime_compression.select_keep
    monkeypatch.setattr(runtime_compression, "select_keep",
                        lambda c, imp, keys, count, **kw: seen.append(imp.clone()) or real(c, imp, keys, count, **kw))
    prompt = 5
    req = _request(allocator, rows, 1, prompt, prompt + 13, "r")
    state.compact_running(_batch([req], "cpu"))  # 13 decoded: 9 candidates, 4 kept
    first = getattr(req, REQ_COMPRESSION_ATTR)
    kept = first.kept.tolist()
    mass_then = state.mass.clone()
    while req.kv.kv_committed_len - prompt <= config.target(first.dropped + req.kv.kv_committed_len - prompt) + 4:
        rows.req_to_token[1, req.kv.kv_committed_len] = int(allocator.alloc(1))
        req.kv.kv_committed_len += 1
        req.kv.kv_allocated_len += 1
    state.mass.copy_(torch.rand(state.mass.shape[0]))
    held, dropped = req.kv.kv_committed_len - prompt, first.dropped
    slots = rows.req_to_token[1, prompt:req.kv.kv_committed_len - 4].to(torch.int64)
    state.compact_running(_batch([req], "cpu"))
    assert len(seen) == 2
    n = slots.shape[0]
    if importance == "cumulative":
        origins = torch.tensor(kept + list(range(prompt + 4 + dropped, prompt + held + dropped - 4)))
        assert origins.shape[0] == n
        expected = state.mass[slots] / (prompt + held + dropped - origins).float()
    else:  # the kept ones and the buffer had their mass taken at the first compaction
        before = torch.zeros(n)
        before[:8] = mass_then[slots[:8]]
        expected = state.mass[slots] - before
    assert torch.allclose(seen[1], expected)


def test_skipped_requests_and_the_admission_reservation():
    config = CompressionConfig(method="recent", budget=0.25, buffer=4, min_tokens=8)
    kv, allocator, rows, state = _setup("cpu", config)
    chunked = _request(allocator, rows, 1, 5, 30, "chunked")
    retracted = _request(allocator, rows, 2, 5, 30, "retracted", )
    retracted.is_retracted = True
    recipient = _request(allocator, rows, 3, 5, 30, "asks")
    beam = _request(allocator, rows, 4, 5, 30, "beam")
    beam.beam_group = object()
    batch = _batch([chunked, retracted, recipient, beam], "cpu")
    assert state.compact_running(batch, chunked, {id(recipient.kv): object()}) == 0
    assert not any(is_compressed(r) for r in batch.reqs) and batch.batch_is_full
    # admission: a running request reserves its compressed cap less what it holds
    running = _request(allocator, rows, 5, 5, 5 + 20, "running")  # 20 decode tokens held
    adder = SimpleNamespace(tree_cache=SimpleNamespace(req_to_token_pool=rows), new_token_ratio=0.5)
    reserve = compression_hooks.reserve_compressed
    cap = config.private_cap(200)
    assert reserve(lambda a, r: 90.0, adder, running) == (cap - 20) * 0.5
    assert reserve(lambda a, r: 3.0, adder, running) == 3.0  # never more than SGLang's own
    running.sampling_params.ignore_eos = True
    assert reserve(lambda a, r: 180.0, adder, running) == cap - 20
    no_state = SimpleNamespace(tree_cache=SimpleNamespace(req_to_token_pool=object()), new_token_ratio=0.5)
    assert reserve(lambda a, r: 90.0, no_state, running) == 90.0  # compression off: SGLang's


def test_retraction_and_stock_processes_are_left_alone():
    config = CompressionConfig(method="recent", budget=0.25, buffer=4, min_tokens=8)
    kv, allocator, rows, state = _setup("cpu", config)
    req = _request(allocator, rows, 1, 4, 4 + 20, "r")
    state.compact_running(_batch([req], "cpu"))
    assert is_compressed(req)
    compression_hooks.reset_after_retract(None, req)
    assert not is_compressed(req)
    plain = ReqToTokenPool(size=2, max_context_len=8, device="cpu", enable_memory_saver=False)
    assert compression_of(plain) is None
    scheduler = SimpleNamespace(req_to_token_pool=plain, tree_cache=None, chunked_req=None)
    assert compression_hooks.compact_before_schedule(scheduler, running_batch=object(), last_batch=None) is None
    forward = SimpleNamespace(positions=torch.tensor([3]))
    assert compression_hooks.shift_decode_positions(forward, None, None, SimpleNamespace(req_to_token_pool=plain)) \
        is forward and forward.positions.tolist() == [3]


# ---- admission with SGLang's own PrefillAdder (no server) ----------------------------------------------
ADMIT_POOL, ADMIT_PROMPT, ADMIT_NEW = 250, 10, 100
ADMIT_CONFIG = CompressionConfig(method="recent", budget=0.25, buffer=4, min_tokens=8)


@pytest.fixture()
def sglang_config():
    """``PrefillAdder`` reads SGLang's published server config; outside a server, its defaults."""
    from sglang.srt.runtime_context import get_context

    with get_context().override_server_args():
        yield


def _admitted(config, requests, hooked: bool):
    """Run SGLang's admission loop (``Scheduler.get_new_batch_prefill``'s: match the prefix, then
    ``add_one_req`` until it says stop) over ``requests`` on an empty ``ADMIT_POOL``-slot pool,
    compression attached when ``config`` is set, the new-request hook around
    ``_select_prefill_admission`` when ``hooked``; returns (admitted rids, tokens left)."""
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

    from pools import cache_params
    from rksc_sgl.rksc.asks_config import ASKSConfig
    from rksc_sgl.rksc.tree_cache import RKSCRadixCache

    params = cache_params(policy="lru", pool=ADMIT_POOL)
    tree = RKSCRadixCache(params, asks=ASKSConfig(enabled=False))
    if config is not None:
        setattr(params.req_to_token_pool, POOL_ATTR,
                RuntimeCompression(config, params.req_to_token_pool, params.token_to_kv_pool_allocator, None))
    original = PrefillAdder._select_prefill_admission
    patched = (lambda self, *a, **k: compression_hooks.admit_compressed(original, self, *a, **k)) if hooked else original
    PrefillAdder._select_prefill_admission = patched
    try:
        adder = PrefillAdder(1, tree, params.token_to_kv_pool_allocator, None, 0.7, 10_000, None)
        for req in requests:
            req.init_next_round_input(tree)
            if adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) != AddReqResult.CONTINUE:
                break
    finally:
        PrefillAdder._select_prefill_admission = original
    return [r.rid for r in adder.can_run_list], adder.rem_total_tokens


def _waiting(n: int, max_new: int = ADMIT_NEW, output: int = 0):
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    reqs = [Req(f"w{i}", "", array("q", [100 + i] * ADMIT_PROMPT), SamplingParams(max_new_tokens=max_new))
            for i in range(n)]
    for req in reqs:
        req.output_ids.extend([7] * output)
    return reqs


def test_new_requests_are_admitted_with_their_compressed_cap(sglang_config):
    # stock: each request charges prompt 10 + one page + max_new_tokens 100 = 111 tokens and is
    # admitted while that is < the tokens left: 250 -> 139 -> 28, the third (111 >= 28) waits
    assert _admitted(None, _waiting(8), hooked=False) == (["w0", "w1"], 28)
    # compressed: cap = min(100, max(ceil(0.25 * 100), 8) + buffer 4 + 1) = 30, so each charges
    # 10 + 1 + 30 = 41: 250 -> 209 -> 168 -> 127 -> 86 -> 45 -> 4, the seventh (41 >= 4) waits
    assert ADMIT_CONFIG.private_cap(ADMIT_NEW) == 30
    assert _admitted(ADMIT_CONFIG, _waiting(8), hooked=True) == (["w0", "w1", "w2", "w3", "w4", "w5"], 4)
    # compression off (the hook is there, nothing attached): SGLang's admission, token for token
    assert _admitted(None, _waiting(8), hooked=True) == (["w0", "w1"], 28)
    # a short request reserves SGLang's own (max_new_tokens 20 < its cap: min(20, 8 + 4 + 1) = 13, but
    # 13 of 20 decode slots is what it can hold); never more than SGLang would
    assert ADMIT_CONFIG.private_cap(20) == 13
    assert _admitted(ADMIT_CONFIG, _waiting(1, max_new=20), hooked=True)[1] == ADMIT_POOL - (10 + 1 + 13)
    assert _admitted(ADMIT_CONFIG, _waiting(1, max_new=8), hooked=True)[1] == \
        _admitted(None, _waiting(1, max_new=8), hooked=False)[1] == ADMIT_POOL - (10 + 1 + 8)


def test_requests_that_will_not_be_compressed_reserve_in_full(sglang_config):
    from rksc_sgl.runtime.asks import PENDING_ATTR

    # an ASKS recipient (plan pending) or a beam charges 111, the others 41: 250 -> 139 -> 98 -> 57 -> 16
    for mark in ((PENDING_ATTR, object()), ("beam_group", object())):
        reqs = _waiting(8)
        setattr(reqs[0], *mark)
        assert _admitted(ADMIT_CONFIG, reqs, hooked=True) == (["w0", "w1", "w2", "w3"], 16), mark[0]
    # a request resuming after a retraction with 90 tokens out: its prompt and output (100) are the
    # extend; SGLang checks 100 + 1 + (100 - 90) = 111 < 250 (left as it is: 10 < the cap) and
    # charges max_new_tokens 100, the hook the cap 30: 250 - 131 = 119 (stock: 250 - 201 = 49)
    assert _admitted(None, _waiting(1, output=90), hooked=False) == (["w0"], 49)
    assert _admitted(ADMIT_CONFIG, _waiting(1, output=90), hooked=True) == (["w0"], 119)


def test_select_keep_is_the_engines_plan():
    torch.manual_seed(1)
    importance, keys = torch.rand(30), torch.randn(30, 2, 8)
    for method in ("rkv", "recent", "attention"):
        config = CompressionConfig(method=method)
        assert select_keep(config, importance, keys, 7).tolist() == plan(config, importance, keys, 7).keep
    with pytest.raises(ValueError, match="merges tokens; use plan"):
        select_keep(CompressionConfig(method="cask"), importance, keys, 7)


def _cask_by_hand(config, importance, keys, keep_count):
    """``cask``'s rule written out on lists, the reference: the ``core`` share of the kept
    count with the highest importance, then the best R-KV scores among the rest (scratch),
    each other candidate merged into its most similar scratch one; ``(keep, merges)``."""
    from rksc_sgl.rksc.compression import _scores, key_similarity

    n = importance.shape[0]
    keep_count = max(0, min(keep_count, n))
    if keep_count >= n:
        return list(range(n)), []
    score, imp = _scores(config, importance, key_similarity(keys))
    core_count = min(keep_count, int(round(config.core * keep_count)))
    core = set(int(i) for i in torch.topk(imp, core_count).indices) if core_count else set()
    rest = [i for i in range(n) if i not in core]
    scratch_count = keep_count - len(core)
    scratch = sorted(rest[int(i)] for i in torch.topk(score[rest], scratch_count).indices) if scratch_count else []
    merges = []
    dropped = [i for i in rest if i not in set(scratch)]
    if scratch and dropped:
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        sim = torch.einsum("ihd,jhd->ij", unit[dropped], unit[scratch]) / keys.shape[1]
        merges = [(d, scratch[int(j)]) for d, j in zip(dropped, sim.argmax(dim=1))]
    return sorted(core | set(scratch)), merges


def test_cask_select_is_the_engines_plan():
    """The runtime's device-side ``cask`` decisions and the engine's ``plan`` equal the rule
    written out on lists: kept indices and (dropped, kept) merge pairs, with ties in importance
    and in keys, every core share."""
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 40, (1,), generator=g))
        count = int(torch.randint(0, n + 1, (1,), generator=g))
        config = CompressionConfig(method="cask", core=(0.0, 0.5, 1.0, float(torch.rand(1, generator=g)))[seed % 4],
                                   lam=float(torch.rand(1, generator=g)))
        importance = torch.randint(0, 3, (n,), generator=g).float() if seed % 3 == 0 else torch.rand(n, generator=g)
        keys = torch.randn(n, 2, 4, generator=g)
        if seed % 5 == 0:
            keys[: n // 2] = keys[0]
        expected_keep, expected_merges = _cask_by_hand(config, importance, keys, count)
        keep, scratch, dropped, into = cask_select(config, importance, keys, count)
        assert keep.tolist() == expected_keep and list(zip(dropped.tolist(), into.tolist())) == expected_merges
        assert set(scratch.tolist()) == {k for _, k in expected_merges} | set(scratch.tolist()) <= set(keep.tolist())
        engine = plan(config, importance, keys, count)
        assert (engine.keep, engine.merges) == (expected_keep, expected_merges)


def _engine_side(seed: int = 0):
    """The engine's compaction over its own copy of the same SGLang pools (same keys, values and
    slot order): a stand-in ``KVCacheManager`` for ``compress_decode_kv``."""
    kv, allocator, rows = _pools("cpu", seed)
    manager = SimpleNamespace(req_to_token_pool=rows, kv_pool=kv, allocator=allocator,
                              layout=SimpleNamespace(num_layers=LAYERS), slot_attention=None,
                              row_slots=lambda r, length=None: rows.req_to_token[
                                  r.row, :(r.kv_len if length is None else length)].to(torch.int64))
    return manager


def _buffers(kv):
    return [b for layer in range(LAYERS) for b in (kv.get_key_buffer(layer), kv.get_value_buffer(layer))]


@pytest.mark.parametrize("settings", [
    {"importance": "cumulative"}, {"importance": "window"}, {"budget": 0.5, "core": 0.25},
    {"budget": 0.1, "min_tokens": 4, "core": 0.0}])
def test_cask_decode_matches_the_engine_step_by_step(settings):
    """One request decodes 80 tokens on both backends (same new K/V and attention each step):
    every compaction drops, keeps and merges the same slots, the rows, the free lists, the
    weights (runtime table vs the engine's ``ReqKV.merged``) and the attention mass are equal,
    and K/V equal the engine's up to float rounding (the engine averages pair by pair)."""
    from rksc_sgl.kv.records import ReqKV
    from rksc_sgl.rksc.compression import compress_decode_kv

    config = CompressionConfig(**{"method": "cask", "budget": 0.25, "buffer": 4, "min_tokens": 8, **settings})
    kv, allocator, rows, state = _setup("cpu", config)
    engine = _engine_side()
    engine.slot_attention = state.mass.clone()
    prompt = 6
    req = _request(allocator, rows, 1, prompt, prompt + 1, "r")
    ereq = ReqKV(row=1, token_ids=list(range(prompt + 1)), kv_len=prompt + 1, protected_len=prompt)
    engine.req_to_token_pool.req_to_token[1, :prompt + 1] = engine.allocator.alloc(prompt + 1).to(torch.int32)
    g = torch.Generator().manual_seed(3)
    compactions = 0
    for step in range(80):
        new = allocator.alloc(1)
        assert torch.equal(new, engine.allocator.alloc(1))
        for mine, theirs in zip(_buffers(kv), _buffers(engine.kv_pool)):
            mine[new] = theirs[new] = torch.randn(mine.shape[1:], generator=g)
        rows.req_to_token[1, req.kv.kv_committed_len] = int(new)
        engine.req_to_token_pool.req_to_token[1, ereq.kv_len] = int(new)
        req.kv.kv_committed_len += 1
        req.kv.kv_allocated_len += 1
        ereq.kv_len += 1
        ereq.token_ids.append(step)
        bump = torch.rand(state.mass.shape[0], generator=g) * 0.1
        state.mass += bump
        engine.slot_attention += bump
        dropped = state.compact_running(_batch([req], "cpu"))
        assert dropped == compress_decode_kv(engine, ereq, prompt, config)
        assert torch.equal(rows.req_to_token[1], engine.req_to_token_pool.req_to_token[1])
        assert torch.equal(allocator.free_pages, engine.allocator.free_pages)
        assert torch.equal(state.mass, engine.slot_attention)
        if dropped:
            compactions += 1
            assert getattr(req, REQ_COMPRESSION_ATTR).kept.tolist() == ereq.kept_origins
            merged = torch.nonzero(state.weight != 1).flatten()
            assert dict(zip(merged.tolist(), state.weight[merged].tolist())) == ereq.merged
            for mine, theirs in zip(_buffers(kv), _buffers(engine.kv_pool)):
                assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert compactions >= 8 and state.weight.max() > 2  # kept slots merged into more than once


def test_cask_merge_is_the_engines_consolidation():
    """The KV write alone, on the same pools and pairs: bitwise the engine's when each kept slot
    takes one token; with several, the same weighted mean up to float rounding."""
    from rksc_sgl.kv.compaction import _consolidate
    from rksc_sgl.kv.records import ReqKV

    config = CompressionConfig(method="cask")
    for pairs in ([(0, 5), (1, 6), (2, 7)], [(0, 5), (1, 5), (2, 6), (3, 5), (4, 6)]):
        kv, allocator, rows, state = _setup("cpu", config)
        engine = _engine_side()
        engine.slot_attention = state.mass.clone()
        slots = torch.arange(20, 28)
        prior = {int(slots[5]): 3.0, int(slots[0]): 2.0}  # slots that already stand for several tokens
        for slot, w in prior.items():
            state.weight[slot] = w
        ereq = ReqKV(row=0, token_ids=[], merged=dict(prior))
        _consolidate(engine, ereq, slots, pairs)
        scratch = torch.tensor(sorted({k for _, k in pairs}))
        state._merge(slots[scratch], slots[[d for d, _ in pairs]],
                     torch.searchsorted(scratch, torch.tensor([k for _, k in pairs])))
        merged = torch.nonzero(state.weight != 1).flatten()
        assert dict(zip(merged.tolist(), state.weight[merged].tolist())) == {**prior, **ereq.merged}
        assert torch.equal(state.mass, engine.slot_attention)
        single = len({k for _, k in pairs}) == len(pairs)
        for mine, theirs in zip(_buffers(kv), _buffers(engine.kv_pool)):
            assert torch.equal(mine, theirs) if single else torch.allclose(mine, theirs, rtol=1e-6, atol=1e-6)
            if not single:
                assert torch.equal(mine[:int(slots[5])], theirs[:int(slots[5])])  # nothing else written


def test_the_merge_weight_is_reset_when_slots_are_freed_and_handed_out_again():
    config = CompressionConfig(method="cask", budget=0.25, buffer=4, min_tokens=8)
    kv, allocator, rows, state = _setup("cpu", config)
    assert state.weight.device == kv.get_key_buffer(0).device and state.weight.dtype == torch.float32
    prompt = 4
    req = _request(allocator, rows, 1, prompt, prompt + 30, "r")
    before = rows.req_to_token[1, :prompt + 30].to(torch.int64).clone()
    state.compact_running(_batch([req], "cpu"))
    held = rows.req_to_token[1, :req.kv.kv_committed_len].to(torch.int64)
    gone = sorted(set(before.tolist()) - set(held.tolist()))
    assert state.weight[held].sum() == 30 + prompt  # the kept slots stand for every token
    assert (state.weight[held] > 1).any() and bool((state.weight[gone] == 1).all())  # freed: back to 1
    compression_hooks.release_row(rows, req)  # finished: the row's slots go back to the allocator
    assert bool((state.weight == 1).all()) and not is_compressed(req)
    allocator.free(held)
    again = allocator.alloc(allocator.available_size())
    assert set(held.tolist()) <= set(again.tolist()) and bool((state.weight[again] == 1).all())


# ---- one compressing server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    argv = ["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
            "--max-total-tokens", str(POOL_TOKENS)]
    with open(tmp_path_factory.mktemp("compression") / "server.log", "w") as log, \
            left_nothing(running_server(argv, startup_timeout=STARTUP_TIMEOUT_S, log=log, compression=CONFIG)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return RuntimeClient(server.url)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    folder = resolve_model_dir("smollm2-135m", default_cache_dir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def compressed_run(client, hf):
    """One greedy 40-token generation on the server and the decisions it made."""
    ids = hf[1](PROMPT)["input_ids"]
    client.flush_cache()
    out = client.generate(input_ids=ids, rid="kvc-greedy",
                          sampling_params={"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True})
    state = client.rksc_state()["compression"]
    decisions = state["decisions"]["kvc-greedy"]
    assert decisions["prompt_len"] == decisions["start"] == len(ids)
    assert len(decisions["events"]) >= 3  # compressed several times
    return ids, out["output_ids"], decisions["events"]


def test_runtime_continuation_equals_the_engines_with_the_same_decisions(compressed_run, monkeypatch):
    ids, output, events = compressed_run
    used = replay_decisions(monkeypatch, events, len(ids), CONFIG.buffer)
    assert engine_continuation(ids, SETTINGS, STEPS) == output
    assert len(used) >= len(events) - 1


def test_compressed_decode_equals_transformers_with_the_same_entries_deleted(compressed_run, hf):
    ids, output, events = compressed_run
    tokens, replayed = transformers_with_entries_deleted(hf[0], ids, events, STEPS, CONFIG)
    assert replayed >= len(events) - 1
    assert tokens == output


def test_after_concurrent_requests_and_aborts_every_slot_is_accounted_for(client, compressed_run, hf):
    tokenizer = hf[1]
    ids, output, _ = compressed_run
    before = client.rksc_state()["compression"]
    results, errors = {}, []

    def generate(name, prompt_ids, tokens):
        try:
            results[name] = client.generate(input_ids=prompt_ids, rid=name, sampling_params={
                "max_new_tokens": tokens, "temperature": 0.8, "ignore_eos": True})
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    prompts = {f"kvc-{i}": tokenizer(f"Story {i}: once upon a time, a robot named {i}")["input_ids"] for i in range(4)}
    workers = [threading.Thread(target=generate, args=(name, p, 16 + 4 * i))
               for i, (name, p) in enumerate(prompts.items())]
    aborted = tokenizer("A very long list of prime numbers:")["input_ids"]

    def aborted_after_compressing():  # past min_tokens + buffer: compacted at least once before the abort
        try:
            results["kvc-abort"] = stream_then_abort(client, aborted, "kvc-abort", before_abort=24,
                                                     sampling_params={"temperature": 0.8})
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    workers.append(threading.Thread(target=aborted_after_compressing))
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=180)
    assert not any(w.is_alive() for w in workers) and not errors, errors
    assert results["kvc-abort"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert all(results[name]["meta_info"]["completion_tokens"] == 16 + 4 * i for i, name in enumerate(prompts))
    report = client.idle_integrity()
    assert report["ok"], report
    after = client.rksc_state()["compression"]
    assert after["compactions"] > before["compactions"] and after["running_compressed"] == 0
    assert after["compressed_requests"] >= before["compressed_requests"] + 5  # the aborted one too
    # the tree holds no compressed KV: prompt + output matches the prompt only
    for name, prompt_ids in [("kvc-greedy", ids), *prompts.items()]:
        produced = output if name == "kvc-greedy" else results[name]["output_ids"]
        again = client.generate(input_ids=prompt_ids + produced, sampling_params={"max_new_tokens": 1,
                                                                                  "temperature": 0})
        assert again["meta_info"]["cached_tokens"] == len(prompt_ids), name
    report = client.idle_integrity()
    assert report["ok"], report
    assert client.healthy()


def _running(url: str) -> int:
    import requests

    loads = requests.get(url + "/v1/loads", params={"include": "core"}, timeout=10).json()["loads"]
    return sum(int(load.get("num_running_reqs", 0)) for load in loads)


def test_long_requests_run_at_once_with_their_compressed_reservation(server, client, compressed_run, hf):
    """Four requests of ``max_new_tokens`` 1900 on the 2048-token pool: SGLang alone charges each
    prompt + 1 + 1900, so one runs and the others wait (2048 - 1 running < 2 x 1900); compressed,
    each charges prompt + 1 + cap 480 (min(1900, max(ceil(0.25 x 1900), 8) + 4 + 1)), so all four
    run at once. Aborted once seen, then every slot is accounted for."""
    tokenizer = hf[1]
    cap = CONFIG.private_cap(1900)
    assert cap == 480
    prompts = {f"kvc-long-{i}": tokenizer(f"Count slowly from {i}:")["input_ids"] for i in range(4)}
    assert sum(len(p) + 1 + cap for p in prompts.values()) < POOL_TOKENS < 2 * (1900 + 1)
    errors = []

    def generate(name, prompt_ids):
        try:
            client.generate(input_ids=prompt_ids, rid=name, sampling_params={
                "max_new_tokens": 1900, "temperature": 0, "ignore_eos": True})
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    workers = [threading.Thread(target=generate, args=item) for item in prompts.items()]
    for w in workers:
        w.start()
    peak, deadline = 0, time.monotonic() + 120
    try:
        while peak < len(prompts) and time.monotonic() < deadline:
            peak = max(peak, _running(server.url))
            time.sleep(0.1)
    finally:
        for name in prompts:
            client.abort(rid=name)
        for w in workers:
            w.join(timeout=120)
    assert not any(w.is_alive() for w in workers) and not errors, errors
    assert peak == len(prompts)
    report = client.idle_integrity()
    assert report["ok"], report


@pytest.mark.parametrize("method, pool, model, message", [
    ("cask", {"kv_cache_layout": "hnd"}, {}, "method 'cask' averages K and V slot by slot: it needs SGLang's plain "
                                             r"token-major KV pool \(layout nhd, not a quantized KV cache\)"),
    ("cask", {"is_quantized_kv_cache": True}, {}, "needs SGLang's plain token-major KV pool"),
    ("rkv", {}, {"is_multimodal": True}, "does not support multimodal models"),
    ("recent", {}, {"model_is_mrope": True}, "does not support mrope models"),
    ("recent", {}, {"is_encoder_decoder": True}, "does not support encoder-decoder models"),
])
def test_a_scheduler_refuses_the_pools_and_models_compression_cannot_shift(method, pool, model, message):
    """What only the scheduler sees (its KV pool and model) is refused when it builds its tree,
    before anything is attached."""
    kv = types.SimpleNamespace(device="cpu", **pool)
    allocator = types.SimpleNamespace(get_kvcache=lambda: kv)
    ctx = types.SimpleNamespace(params=types.SimpleNamespace(token_to_kv_pool_allocator=allocator),
                                server_args=_args(*RKSC, "--forward-hooks", HOOK, "--disable-overlap-schedule",
                                                  "--disable-decode-cuda-graph"),
                                model_config=types.SimpleNamespace(**model))
    with pytest.raises(ValueError, match=f"^rksc: .*{message}"):
        runtime_compression.attach(ctx, None, CompressionConfig(method=method))
    assert not hasattr(kv, "rksc_compression") and not hasattr(allocator, "rksc_compression")
