"""Decode-KV compression (rksc_sgl/rksc/compression.py): selection, mechanics, invariants."""

from __future__ import annotations

import pytest
import torch

import rksc_sgl
from rksc_sgl.rksc import compression as compression_module
from rksc_sgl.rksc.compression import CompressionConfig, Plan, plan, redundancy

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
    monkeypatch.setattr(compression_module, "plan", _keep_evens)
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


# ---- continuation fidelity: teacher-forced replay (rksc_sgl/bench/fidelity.py) -----------------------
def test_the_attention_baseline_keeps_the_most_attended_candidates():
    importance = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0])
    keys = torch.zeros(5, 1, 2)  # all identical: the redundancy term would not separate them
    assert plan(CompressionConfig(method="attention"), importance, keys, 2) == Plan([1, 3])
    with pytest.raises(ValueError, match="compression importance 'soon'"):
        CompressionConfig(importance="soon")
    with pytest.raises(ValueError, match="compression redundancy_layers 'some'"):
        CompressionConfig(redundancy_layers="some")


def test_the_full_kv_trace_is_the_engines_own_sampled_generation(compressing, radix_engine):
    from rksc_sgl.bench.fidelity import full_kv_trace

    eng = compressing(**SMALL)
    ids = eng.encode(PROMPT)
    trace, reference = full_kv_trace(eng, ids, 20, temperature=1.0, seed=3)
    plain = radix_engine.generate_request(input_ids=ids, return_logprob=True, sampling_params={
        "max_new_tokens": 20, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 3})
    assert trace == plain["output_ids"]  # full KV, not the engine's compression
    logprobs = [lp for lp, _, _ in plain["meta_info"]["output_token_logprobs"]]
    assert max(abs(float(reference[t, tok]) - lp) for t, (tok, lp) in enumerate(zip(trace, logprobs))) < 1e-4
    eng.check_integrity()


def test_replays_are_teacher_forced_and_the_full_control_is_exact(compressing):
    from rksc_sgl.bench.fidelity import full_kv_trace, trace_fidelity

    eng = compressing(**SMALL)
    ids = eng.encode(PROMPT)
    steps = 40
    trace, reference = full_kv_trace(eng, ids, steps, temperature=1.0, seed=5)
    modes = {"recent": {**SMALL, "method": "recent"}, "rkv+window+all": {
        **SMALL, "method": "rkv", "importance": "window", "redundancy_layers": "all"}}
    seen = {}

    def observe(i, req, logprobs):
        seen.setdefault(i, []).append(len(req.output_ids))

    reqs = eng.replay(ids, [None, modes["recent"]], observe, forced_ids=trace)
    assert [r.output_ids for r in reqs] == [trace, trace]  # each emits the trace, whatever it would pick
    assert seen[0] == seen[1] == list(range(steps))
    result = trace_fidelity(eng, ids, trace, reference, modes)
    full = result["full"]
    assert full["top1"] == full["top5"] == 1.0 and full["kl"] < 1e-6 and full["first_mismatch"] == steps
    assert abs(full["nll"] - full["nll_full"]) < 1e-4 and full["kv_kept"] == 1.0
    for name in modes:
        cfg = CompressionConfig(**modes[name])
        assert result[name]["kv_kept"] <= (cfg.target(steps) + cfg.buffer + 1) / (steps - 1)
        assert result[name]["kl"] > 0 and result[name]["steps"] == steps
    eng.check_integrity()
    with pytest.raises(ValueError, match="a replay needs 1 to"):
        eng.replay(ids, [None], observe, forced_ids=[])


def test_window_importance_counts_only_the_queries_since_the_last_compression(compressing, monkeypatch):
    eng = compressing(**SMALL, importance="window")
    calls = []
    real = compression_module.plan

    def recording(config, importance, keys, keep_count):
        calls.append(float(importance.sum()))
        assert bool((importance >= -1e-6).all())
        return real(config, importance, keys, keep_count)

    monkeypatch.setattr(compression_module, "plan", recording)
    params = {"max_new_tokens": 60, "temperature": 0, "ignore_eos": True}
    eng.generate_request(text=PROMPT, sampling_params=params)
    assert len(calls) > 3
    # Every decode query spreads a mass of 1 over all its keys (the prompt's too); between two
    # compressions 1 + buffer queries run at most, so the candidates can have received no more.
    assert all(total <= 1 + SMALL["buffer"] + 1e-3 for total in calls[1:])
    eng.check_integrity()


def test_fidelity_summary_pairs_traces_and_finds_the_smallest_budget():
    from rksc_sgl.bench.fidelity import METRICS, summarize, sweep_modes

    modes = sweep_modes(["rkv", "recent"], [0.1, 0.5], {"buffer": 4, "min_tokens": 4})
    assert list(modes) == ["rkv@0.1", "rkv@0.5", "recent@0.1", "recent@0.5"]
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        sweep_modes(["rkv+fast"], [0.1], {})

    def row(top1):
        return {**{m: 0.5 for m in METRICS}, "top1": top1, "nll_full": 1.0}

    per_trace = [{"rkv@0.1": row(0.90), "rkv@0.5": row(0.97), "recent@0.1": row(0.80), "recent@0.5": row(0.99)},
                 {"rkv@0.1": row(0.92), "rkv@0.5": row(0.96), "recent@0.1": row(0.84), "recent@0.5": row(0.97)}]
    summary = summarize(per_trace, ["rkv", "recent"], [0.1, 0.5], samples=200)
    assert summary["smallest_budget_top1"] == {"rkv": 0.5, "recent": 0.5}
    diff = summary["paired"]["rkv@0.1 - recent@0.1"]["top1"]
    assert abs(diff["mean"] - 0.09) < 1e-9 and 0.08 - 1e-9 <= diff["ci95"][0] <= diff["ci95"][1] <= 0.10 + 1e-9
    assert summary["modes"]["rkv@0.5"]["top1"]["mean"] == pytest.approx(0.965)


def test_the_fidelity_benchmark_writes_its_table(tmp_path):
    import runpy
    import sys

    script = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compression.py")
    argv = [script, "--fidelity", "--traces", "2", "--trace-tokens", "24", "--prompt-tokens", "120",
            "--methods", "rkv,recent", "--fidelity-budgets", "0.25", "--buffer", "4", "--min-tokens", "4",
            "--bootstrap", "50", "--out-dir", str(tmp_path)]
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bench_compression_fidelity.json", "bench_compression_fidelity.md",
                     "bench_compression_fidelity.png"]
    import json

    result = json.loads((tmp_path / "bench_compression_fidelity.json").read_text())
    assert set(result["summary"]["modes"]) == {"full", "rkv@0.25", "recent@0.25"}
    assert result["summary"]["modes"]["full"]["top1"]["mean"] == 1.0
    assert "rkv@0.25 - recent@0.25" in result["summary"]["paired"]
