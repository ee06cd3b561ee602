"""Decode-KV compression (rksc_sgl/compression.py): selection, mechanics, invariants."""

from __future__ import annotations

import pytest
import torch

import rksc_sgl
from rksc_sgl import scheduler as scheduler_module
from rksc_sgl.compression import CompressionConfig, Plan, plan, redundancy

PROMPT = "Question: Tom has 3 apples and buys 5 more, then gives 2 away. How many apples are left?\nAnswer:"
SMALL = {"budget": 0.25, "buffer": 4, "min_tokens": 4}


@pytest.fixture(scope="module")
def compressing():
    made = {}

    def get(**compression):
        key = tuple(sorted(compression.items()))
        if key not in made:
            made[key] = rksc_sgl.Engine(model="smollm2-135m", cache="radix", num_threads=1, device="cpu",
                                        kv_pool_tokens=2048, max_running_requests=8, compression=compression)
        return made[key]

    yield get
    for eng in made.values():
        eng.shutdown()


# ---- selection ---------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        CompressionConfig(method="zip")
    with pytest.raises(ValueError, match="budget"):
        CompressionConfig(budget=0)
    with pytest.raises(ValueError, match="min_tokens"):
        CompressionConfig(buffer=16, min_tokens=8)
    with pytest.raises(ValueError, match="unknown field"):
        rksc_sgl.EngineConfig(compression={"budget": 0.2, "ratio": 3})
    cfg = CompressionConfig(budget=0.16, buffer=16, min_tokens=32)
    assert cfg.target(100) == 32 and cfg.target(1000) == 160
    assert not cfg.needs_compression(48, 48) and cfg.needs_compression(49, 49)
    assert cfg.private_cap(1000) == 160 + 16 + 1 and cfg.private_cap(20) == 20


def test_rkv_score_trades_importance_against_redundancy():
    keys = torch.zeros(4, 1, 2)
    keys[0, 0] = torch.tensor([1.0, 0.0])
    keys[1, 0] = torch.tensor([1.0, 0.0])  # a duplicate of 0
    keys[2, 0] = torch.tensor([0.0, 1.0])
    keys[3, 0] = torch.tensor([-1.0, 0.0])
    importance = torch.tensor([1.0, 0.9, 0.1, 0.1])
    only_attention = CompressionConfig(lam=1.0)
    assert plan(only_attention, importance, keys, 2).keep == [0, 1]
    only_redundancy = CompressionConfig(lam=0.0)
    assert plan(only_redundancy, importance, keys, 2).keep == [2, 3]  # the least similar to the rest
    assert torch.allclose(redundancy(keys), torch.tensor([0.0, 0.0, 0.0, -2 / 3]))
    assert plan(only_attention, importance, keys, 9).keep == [0, 1, 2, 3]


def test_cask_protects_the_core_and_consolidates_the_rest():
    torch.manual_seed(0)
    importance = torch.rand(20)
    keys = torch.randn(20, 2, 8)
    cfg = CompressionConfig(method="cask", core=0.5)
    chosen = plan(cfg, importance, keys, 6)
    core = set(torch.topk(importance, 3).indices.tolist())
    assert len(chosen.keep) == 6 and core <= set(chosen.keep)
    dropped = sorted(set(range(20)) - set(chosen.keep))
    assert sorted(d for d, _ in chosen.merges) == dropped
    assert all(k in chosen.keep and k not in core for _, k in chosen.merges)


def test_recent_baseline_keeps_the_newest_candidates():
    assert CompressionConfig(method="recent", budget=0.16).method == "recent"
    importance = torch.tensor([9.0, 0.0, 5.0, 0.1, 0.2, 0.0])  # ignored, as are the keys
    keys = torch.randn(6, 2, 4)
    cfg = CompressionConfig(method="recent")
    assert plan(cfg, importance, keys, 2) == Plan([4, 5])  # candidates come oldest first
    assert plan(cfg, importance, keys, 0) == Plan([])
    assert plan(cfg, importance, keys, 6).keep == plan(cfg, importance, keys, 9).keep == [0, 1, 2, 3, 4, 5]


# ---- mechanics against a reference -------------------------------------------------------------
def _keep_evens(config, importance, keys, keep_count):
    n = importance.shape[0]
    order = list(range(0, n, 2)) + list(range(1, n, 2))
    return Plan(sorted(order[:keep_count]))


def _reference(model, prompt_ids, steps, config):
    """Greedy decoding with transformers, dropping the same cache entries the engine drops."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
    logits = out.logits[0, -1]
    prompt, dropped, tokens, logprobs = len(prompt_ids), 0, [], []
    for _ in range(steps):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
        length = cache.get_seq_length()
        with torch.inference_mode():
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[length + dropped]]), cache_position=torch.tensor([length]))
        logits = out.logits[0, -1]
        kept = cache.get_seq_length() - prompt
        if config.needs_compression(kept, kept + dropped):
            end = cache.get_seq_length() - config.buffer
            candidates = end - prompt
            keep = _keep_evens(config, torch.zeros(candidates), None, config.target(kept + dropped) - config.buffer).keep
            index = torch.tensor(list(range(prompt)) + [prompt + k for k in keep] +
                                 list(range(end, cache.get_seq_length())))
            for layer in cache.layers:
                layer.keys = layer.keys[:, :, index]
                layer.values = layer.values[:, :, index]
            dropped += candidates - len(keep)
    return tokens, logprobs, dropped


def test_compressed_decoding_equals_transformers_with_the_same_entries_dropped(compressing, monkeypatch):
    eng = compressing(**SMALL)
    monkeypatch.setattr(scheduler_module, "compression_plan", _keep_evens)
    steps = 24
    before = eng.stats()
    out = eng.generate_request(text=PROMPT, sampling_params={"max_new_tokens": steps, "temperature": 0,
                                                              "ignore_eos": True}, return_logprob=True)
    dropped = eng.stats().since(before).dropped_tokens
    tokens, logprobs, ref_dropped = _reference(eng.hf_model, eng.encode(PROMPT), steps, eng.config.compression)
    assert dropped == ref_dropped > 0
    assert out["output_ids"] == tokens
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, logprobs)) < 1e-3
    eng.check_integrity()


def test_compression_keeps_the_budget_and_caches_only_the_prompt(compressing):
    eng = compressing(**SMALL)
    steps = 40
    params = {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True}
    before = eng.stats(reset_peak=True)
    out = eng.generate_request(text=PROMPT, sampling_params=params)
    stats = eng.stats().since(before)
    prompt = len(eng.encode(PROMPT))
    cfg = eng.config.compression
    assert out["meta_info"]["completion_tokens"] == steps
    assert stats.dropped_tokens > 0
    assert stats.peak_kv_tokens <= prompt + cfg.target(steps) + cfg.buffer + 1
    eng.check_integrity()
    # Only the prompt entered the tree: no lookup can match compressed KV.
    ids = eng.encode(PROMPT) + out["output_ids"]
    cached = eng.scheduler.call(lambda: len(eng.kv.match(ids, len(ids))[0]))
    assert cached == prompt


def test_cask_and_batched_forks_keep_integrity(compressing):
    eng = compressing(method="cask", **SMALL)
    params = {"max_new_tokens": 30, "temperature": 0.8, "ignore_eos": True}
    outs = eng.generate_request(text=[PROMPT] * 4, sampling_params=params)
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [30] * 4
    eng.check_integrity()
    assert eng.flush_cache()


def test_full_budget_changes_nothing(compressing, radix_engine):
    eng = compressing(budget=1.0, buffer=4, min_tokens=4)
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    assert eng.generate_request(text=PROMPT, sampling_params=params)["output_ids"] == \
        radix_engine.generate_request(text=PROMPT, sampling_params=params)["output_ids"]
    assert eng.stats().dropped_tokens == 0
