"""Teacher-forced replay on SGLang's runtime (``rksc_sgl.bench.runtime_fidelity``, issue #37's
fidelity check), against the runtime's own full-KV reference and the engine's replay.

Without a server: the processor on plain tensors. With one compressing server (``rkv``, small
settings so that 40 steps compress several times): the runtime's full-KV reference comes from
prefix extends (prefill KV is never compressed; one token each, the radix cache holds the rest),
the forced replay emits exactly the trace, its steps before the first compaction score as a
full-KV control (top-1 1.0, KL 0), and its per-step log-probs and scores equal the engine's
replay given the runtime's own decisions. A trace the engine sampled replays on the runtime
with the engine's full-KV distributions before the first compaction and the engine's scores for
the same decisions. Without a server: ``--traces-from`` (the engine run's token ids in, both
backends' scores paired trace by trace out) and the paired report on constructed numbers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rksc_sgl.bench import runtime_fidelity
from rksc_sgl.bench.runtime_fidelity import (KEY, TraceForcing, compare_backends, forced_replay, reference_agreement,
                                             request_fields, score, step_logprobs, verdict)

from compression_replay import replay_decisions
from processes import left_nothing

SETTINGS = {"method": "rkv", "budget": 0.25, "buffer": 4, "min_tokens": 8}
PROMPT = "Question: Tom has 3 apples and buys 5 more, then gives 2 away. How many apples are left?\nAnswer:"
MODEL = "smollm2-135m"
STEPS = 40
STARTUP_TIMEOUT_S = 600


def test_the_processor_records_raw_log_probs_then_forces_the_trace():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, 1.0]])
    raw = torch.log_softmax(logits, dim=-1)
    reqs = [SimpleNamespace(output_ids=[7], customized_info=None), SimpleNamespace(output_ids=[], customized_info=None)]
    params = [{**request_fields(3, [0, 3])["sampling_params"]["custom_params"], "__req__": reqs[0]},
              {**request_fields(4)["sampling_params"]["custom_params"], "__req__": reqs[1]}]
    out = TraceForcing()(logits.clone(), params)
    assert int(out[0].argmax()) == 3 and out[0, 3] == 0 and bool(torch.isinf(out[0, :3]).all())
    assert torch.equal(out[1], logits[1])  # no trace: untouched
    first, second = reqs[0].customized_info[KEY], reqs[1].customized_info[KEY]
    assert len(first) == 2 and first[0] is None  # recorded at its step (1)
    assert torch.equal(step_logprobs({"meta_info": {KEY: first[1:]}}, 3)[0], raw[0, :3])
    assert torch.equal(step_logprobs({"meta_info": {KEY: second}}, 4)[0], raw[1])
    with pytest.raises(RuntimeError, match="no 'rksc_logprobs' for some step"):
        step_logprobs({"meta_info": {KEY: first}}, 3)


# ---- one compressing server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with open(tmp_path_factory.mktemp("fidelity") / "server.log", "w") as log, \
            left_nothing(runtime_fidelity.fidelity_server(MODEL, SETTINGS, startup_timeout=STARTUP_TIMEOUT_S, log=log,
                                                          extra=["--max-total-tokens", "2048"])) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    from rksc_sgl.runtime.client import RuntimeClient

    return RuntimeClient(server.url)


@pytest.fixture(scope="module")
def tokenizer_vocab():
    from transformers import AutoConfig, AutoTokenizer

    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    folder = resolve_model_dir(MODEL, default_cache_dir())
    return AutoTokenizer.from_pretrained(folder, local_files_only=True), AutoConfig.from_pretrained(folder).vocab_size


@pytest.fixture(scope="module")
def reference(client, tokenizer_vocab):
    """The runtime's full-KV greedy trace and its log-probs, one prefix extend per step."""
    tokenizer, vocab = tokenizer_vocab
    ids = tokenizer(PROMPT)["input_ids"]
    client.flush_cache()
    trace, rows = [], []
    for step in range(STEPS):
        out = client.generate(input_ids=ids + trace, rid=f"fid-ref-{step}",
                              **request_fields(vocab, None, {"max_new_tokens": 1, "temperature": 0}))
        rows.append(step_logprobs(out, vocab)[0])
        trace.append(out["output_ids"][0])
        assert trace[-1] == int(rows[-1].argmax())
    return ids, trace, torch.stack(rows)


@pytest.fixture(scope="module")
def replay(client, reference, tokenizer_vocab):
    ids, trace, _ = reference
    logprobs, decisions = forced_replay(client, ids, trace, tokenizer_vocab[1], rid="fid-replay")
    assert decisions is not None and decisions["start"] == len(ids) and len(decisions["events"]) >= 3
    return logprobs, decisions


def _kl(reference, logprobs):
    return (reference.exp() * (reference - logprobs)).sum(-1).clamp(min=0)


def test_forced_replay_before_its_first_compaction_is_a_full_kv_control(reference, replay):
    ids, trace, ref = reference
    logprobs, decisions = replay
    full = decisions["events"][0]["decoded"] + 1  # steps 0..decoded read every token (compaction comes after)
    assert 8 <= full < STEPS
    control = score(logprobs[:full], ref[:full], trace[:full])
    assert control["top1"] == 1.0 and control["top5"] == 1.0 and control["first_mismatch"] == full
    assert control["kl"] < 1e-5 and abs(control["nll"] - control["nll_full"]) < 1e-4
    compressed = score(logprobs, ref, trace, decisions)
    assert compressed["steps"] == STEPS and compressed["kv_kept"] < 1.0
    assert float(_kl(ref[full:], logprobs[full:]).max()) > 1e-4  # (compaction shows in the distributions)


def _engine_replay(monkeypatch, ids, trace, decisions, vocab):
    """The engine's teacher-forced replay of ``trace`` making the runtime's ``decisions``:
    each step's log-probs and the decode tokens the last step read."""
    import rksc_sgl

    events = decisions["events"]
    used = replay_decisions(monkeypatch, events, len(ids), SETTINGS["buffer"])
    engine = rksc_sgl.Engine(model=MODEL, cache="radix", num_threads=1, device="cpu", kv_pool_tokens=1024,
                             max_running_requests=2, compression=SETTINGS)
    rows = torch.empty(len(trace), vocab)
    kept = []

    def observe(_, req, lp):
        rows[len(req.output_ids)] = lp[:vocab].float()
        kept.append(req.kv.kv_len - len(ids))

    try:
        engine.replay(ids, [SETTINGS], observe, forced_ids=trace)
        engine.check_integrity()
    finally:
        engine.shutdown()
    assert len(used) == len(events)
    return rows, kept[-1]


def _assert_same_scores(mine, theirs):
    for metric in ("top1", "top5", "first_mismatch", "steps", "kv_kept"):
        assert mine[metric] == theirs[metric], (metric, mine, theirs)
    for metric in ("kl", "nll", "nll_full"):
        assert math.isclose(mine[metric], theirs[metric], abs_tol=1e-4), (metric, mine, theirs)


def test_compressed_replay_equals_the_engines_with_the_same_decisions(reference, replay, monkeypatch):
    ids, trace, ref = reference
    logprobs, decisions = replay
    rows, kept = _engine_replay(monkeypatch, ids, trace, decisions, ref.shape[1])
    top = ref.topk(20, dim=-1).indices
    gap = (rows.gather(1, top) - logprobs.gather(1, top)).abs().max()
    assert float(gap) < 1e-3, float(gap)  # the same distributions, step by step (CPU kernels' rounding)
    theirs = score(rows, ref, trace)
    theirs["kv_kept"] = kept / (STEPS - 1)
    _assert_same_scores(score(logprobs, ref, trace, decisions), theirs)


@pytest.fixture(scope="module")
def engine_trace(reference):
    """A trace the engine sampled with full KV (temperature 0.7) and its full-KV log-probs."""
    import rksc_sgl
    from rksc_sgl.bench.fidelity import full_kv_trace

    ids = reference[0]
    engine = rksc_sgl.Engine(model=MODEL, cache="radix", num_threads=1, device="cpu", kv_pool_tokens=1024,
                             max_running_requests=2)
    try:
        trace, ref = full_kv_trace(engine, ids, STEPS, 0.7, seed=7001)
    finally:
        engine.shutdown()
    return ids, trace, ref


def test_an_engine_trace_replayed_on_the_runtime_scores_as_on_the_engine(client, engine_trace, monkeypatch):
    ids, trace, ref = engine_trace
    vocab = ref.shape[1]
    logprobs, decisions = forced_replay(client, ids, trace, vocab, rid="fid-engine-trace")
    assert decisions is not None and len(decisions["events"]) >= 3
    full = decisions["events"][0]["decoded"] + 1
    top = ref.topk(20, dim=-1).indices
    # before the first compaction the runtime's distributions are the engine's full-KV reference
    assert float((ref.gather(1, top)[:full] - logprobs.gather(1, top)[:full]).abs().max()) < 1e-3
    control = score(logprobs[:full], ref[:full], trace[:full])
    assert control["top1"] == 1.0 and control["kl"] < 1e-5
    rows, kept = _engine_replay(monkeypatch, ids, trace, decisions, vocab)
    engine_scores = score(rows, ref, trace)
    engine_scores["kv_kept"] = kept / (STEPS - 1)
    runtime_scores = score(logprobs, ref, trace, decisions)
    assert runtime_scores["kv_kept"] < 1.0
    _assert_same_scores(runtime_scores, engine_scores)
    paired = compare_backends([{"rkv": engine_scores}] * 2, [{"rkv": runtime_scores}] * 2, samples=50)
    for metric in ("top1", "top5", "first_mismatch", "kv_kept"):
        row = paired["modes"]["rkv"]["metrics"][metric]
        assert row["difference"]["mean"] == 0 and row["verdict"] == "same", (metric, row)


# ---- the paired report, without a server -------------------------------------------------------------
def _scores(top1, kl=0.1, first=10, kept=0.5):
    return {"top1": top1, "top5": 1.0, "kl": kl, "nll": 1.0 + kl, "nll_full": 1.0, "first_mismatch": first,
            "kv_kept": kept, "steps": 16}


def test_verdict_reads_the_interval_against_zero_and_the_tolerance():
    assert verdict([-0.01, 0.015], 0.02) == "same"
    assert verdict([-0.03, 0.01], 0.02) == "undecided"
    assert verdict([0.005, 0.015], 0.02) == "shifted"
    assert verdict([0.01, 0.05], 0.02) == "differs"
    assert verdict([0.0, 0.0], 0.0) == "same"


def test_compare_backends_pairs_the_same_traces_on_constructed_numbers():
    engine = [{"full": _scores(1.0, 0.0, 16, 1.0), "rkv@0.25": _scores(t)} for t in (0.8, 0.9, 0.7, 0.85)]
    runtime = [{"full": _scores(1.0, 0.0, 16, 1.0), "rkv@0.25": _scores(t + 0.01, first=12)}
               for t in (0.8, 0.9, 0.7, 0.85)]
    out = compare_backends(engine, runtime, samples=200)
    assert out["traces"] == 4 and list(out["modes"]) == ["full", "rkv@0.25"]
    full = out["modes"]["full"]
    assert full["same"] and all(r["difference"]["ci95"] == [0.0, 0.0] for r in full["metrics"].values())
    top1 = out["modes"]["rkv@0.25"]["metrics"]["top1"]
    assert top1["engine"] == pytest.approx(0.8125) and top1["runtime"] == pytest.approx(0.8225)
    assert top1["difference"]["mean"] == pytest.approx(0.01)
    assert top1["difference"]["ci95"] == pytest.approx([0.01, 0.01]) and top1["verdict"] == "shifted"
    first = out["modes"]["rkv@0.25"]["metrics"]["first_mismatch"]
    assert first["difference"]["mean"] == 2 and first["verdict"] == "shifted"  # 2 steps, within 8
    assert out["modes"]["rkv@0.25"]["metrics"]["kl"]["verdict"] == "same"
    assert not out["modes"]["rkv@0.25"]["same"]
    # a difference that varies in sign over traces: the interval holds 0
    wobble = [{"rkv@0.25": _scores(e["rkv@0.25"]["top1"] + d)} for e, d in zip(engine, (0.04, -0.04, 0.04, -0.04))]
    row = compare_backends([{"rkv@0.25": e["rkv@0.25"]} for e in engine], wobble, samples=200)
    row = row["modes"]["rkv@0.25"]["metrics"]["top1"]
    assert row["difference"]["mean"] == pytest.approx(0.0, abs=1e-12) and row["verdict"] == "undecided"
    with pytest.raises(ValueError, match="same, non-empty"):
        compare_backends(engine, runtime[:3])
    with pytest.raises(ValueError, match="no 'rkv@0.25' scores"):
        compare_backends([{"full": e["full"]} for e in engine], runtime)


def test_reference_agreement_counts_steps_with_the_same_top1():
    assert reference_agreement([[1, 2, 3, 4], None], [[1, 2, 0, 4], [5]]) == [0.75, None]
    with pytest.raises(ValueError, match="different numbers of steps"):
        reference_agreement([[1, 2]], [[1, 2, 3]])


def test_traces_from_replays_the_engines_token_ids_and_pairs_the_scores(tmp_path, monkeypatch):
    """The engine side records each trace's token ids; ``--backend runtime --traces-from`` hands
    exactly those to the runtime sweep (faked here: no server) and pairs its scores with the engine's."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compression.py")

    def run(*argv):
        old = sys.argv
        sys.argv = [script, *argv]
        try:
            with pytest.raises(SystemExit) as done:
                runpy.run_path(script, run_name="__main__")
        finally:
            sys.argv = old
        return done.value.code

    common = ["--fidelity", "--methods", "rkv", "--fidelity-budgets", "0.25,0.5", "--buffer", "4",
              "--min-tokens", "4", "--bootstrap", "50"]
    engine_dir, runtime_dir = tmp_path / "engine", tmp_path / "runtime"
    assert run(*common, "--traces", "2", "--trace-tokens", "16", "--prompt-tokens", "120", "--seed", "7000",
               "--out-dir", str(engine_dir)) == 0
    engine_json = engine_dir / "bench_compression_fidelity.json"
    engine_run = json.loads(engine_json.read_text())
    loaded = runtime_fidelity.engine_traces(engine_json)
    assert loaded["seeds"] == [7000, 7001] and all(len(t) == 16 for t in loaded["traces"])
    assert all(len(t["reference_top1"]) == 16 for t in engine_run["traces"])
    seen = {}

    def fake_sweep(model, prompts, seeds, modes, tokens, temperature, vocab, *, traces=None, progress=None, **_):
        seen.update(prompts=prompts, traces=traces, seeds=seeds, modes=modes, tokens=tokens)
        per_trace = [{name: dict(s) for name, s in t.items()} for t in engine_run["per_trace"]]
        for t in per_trace:
            t["rkv@0.25"]["top1"] -= 0.25
        top1 = [list(t["reference_top1"]) for t in engine_run["traces"]]
        top1[1][0] = -1  # one step of 16 where the references disagree
        return per_trace, traces, top1

    monkeypatch.setattr(runtime_fidelity, "sweep", fake_sweep)
    assert run(*common, "--backend", "runtime", "--traces-from", str(engine_json), "--out-dir", str(runtime_dir)) == 0
    assert seen["prompts"] == loaded["prompts"] and seen["traces"] == loaded["traces"] and seen["tokens"] == 16
    assert seen["seeds"] == [7000, 7001] and list(seen["modes"]) == ["rkv@0.25", "rkv@0.5"]
    names = sorted(p.name for p in runtime_dir.iterdir())
    assert names == ["bench_compression_fidelity_same_traces.json", "bench_compression_fidelity_same_traces.md",
                     "bench_compression_fidelity_same_traces.png", "runtime_fidelity_servers.log"]
    result = json.loads((runtime_dir / "bench_compression_fidelity_same_traces.json").read_text())
    comparison = result["comparison"]
    assert comparison["reference_top1_agreement"] == [1.0, 15 / 16]
    top1 = comparison["modes"]["rkv@0.25"]["metrics"]["top1"]
    assert top1["difference"]["mean"] == pytest.approx(-0.25) and top1["verdict"] == "differs"
    assert comparison["modes"]["rkv@0.5"]["same"] and comparison["modes"]["full"]["same"]
    assert [t["trace_ids"] for t in result["traces"]] == loaded["traces"]
    markdown = (runtime_dir / "bench_compression_fidelity_same_traces.md").read_text()
    assert "same scores on the same traces: full yes, rkv@0.25 no, rkv@0.5 yes" in markdown
    # a mode the engine did not run, or other settings, is refused before any server starts
    assert run(*common[:-4], "--buffer", "8", "--min-tokens", "4", "--bootstrap", "50", "--backend", "runtime",
               "--traces-from", str(engine_json), "--out-dir", str(runtime_dir)) == 2
