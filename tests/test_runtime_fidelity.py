"""Teacher-forced replay on SGLang's runtime (``rksc_sgl.bench.runtime_fidelity``, issue #37's
fidelity check), against the runtime's own full-KV reference and the engine's replay.

Without a server: the processor on plain tensors. With one compressing server (``rkv``, small
settings so that 40 steps compress several times): the runtime's full-KV reference comes from
prefix extends (prefill KV is never compressed; one token each, the radix cache holds the rest),
the forced replay emits exactly the trace, its steps before the first compaction score as a
full-KV control (top-1 1.0, KL 0), and its per-step log-probs and scores equal the engine's
replay given the runtime's own decisions.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rksc_sgl.bench import runtime_fidelity
from rksc_sgl.bench.runtime_fidelity import KEY, TraceForcing, forced_replay, request_fields, score, step_logprobs
from rksc_sgl.rksc import compression as compression_module

from processes import assert_gone, server_pids

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
    log = open(tmp_path_factory.mktemp("fidelity") / "server.log", "w")
    pids = set()
    context = runtime_fidelity.fidelity_server(MODEL, SETTINGS, startup_timeout=STARTUP_TIMEOUT_S, log=log,
                                               extra=["--max-total-tokens", "2048"])
    try:
        with context as running:
            pids = server_pids(running)
            yield running
            pids |= server_pids(running)
    finally:
        log.close()
    assert_gone(pids)


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


def _candidate_origins(events, k, prompt):
    """Event ``k``'s candidates by original position: the kept ones of the event before, then
    the run from there to ``buffer`` before the newest token."""
    buffer = SETTINGS["buffer"]
    before = events[k - 1] if k else {"decoded": buffer, "kept": []}
    return before["kept"] + list(range(prompt + before["decoded"] - buffer, prompt + events[k]["decoded"] - buffer))


def test_compressed_replay_equals_the_engines_with_the_same_decisions(reference, replay, monkeypatch):
    import rksc_sgl

    ids, trace, ref = reference
    logprobs, decisions = replay
    events, used = decisions["events"], []

    def same_plan(config, importance, keys, keep_count):
        k = len(used)
        if k == len(events):
            return compression_module.Plan(list(range(importance.shape[0] - keep_count, importance.shape[0])))
        origins = _candidate_origins(events, k, len(ids))
        assert len(origins) == importance.shape[0] and keep_count == len(events[k]["kept"])
        used.append(k)
        kept = set(events[k]["kept"])
        return compression_module.Plan([i for i, o in enumerate(origins) if o in kept])

    monkeypatch.setattr(compression_module, "plan", same_plan)
    engine = rksc_sgl.Engine(model=MODEL, cache="radix", num_threads=1, device="cpu", kv_pool_tokens=1024,
                             max_running_requests=2, compression=SETTINGS)
    rows = torch.empty(STEPS, ref.shape[1])
    kept = []

    def observe(_, req, lp):
        rows[len(req.output_ids)] = lp[: ref.shape[1]].float()
        kept.append(req.kv.kv_len - len(ids))

    try:
        engine.replay(ids, [SETTINGS], observe, forced_ids=trace)
        engine.check_integrity()
    finally:
        engine.shutdown()
    assert len(used) == len(events)
    top = ref.topk(20, dim=-1).indices
    gap = (rows.gather(1, top) - logprobs.gather(1, top)).abs().max()
    assert float(gap) < 1e-3, float(gap)  # the same distributions, step by step (CPU kernels' rounding)
    mine, theirs = score(logprobs, ref, trace, decisions), score(rows, ref, trace)
    theirs["kv_kept"] = kept[-1] / (STEPS - 1)
    for metric in ("top1", "top5", "first_mismatch", "steps", "kv_kept"):
        assert mine[metric] == theirs[metric], (metric, mine, theirs)
    for metric in ("kl", "nll", "nll_full"):
        assert math.isclose(mine[metric], theirs[metric], abs_tol=1e-4), (metric, mine, theirs)
