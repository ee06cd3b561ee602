"""CGEE: gate logic without the model; verifier mechanics and gate equivalence with it."""

from __future__ import annotations

import math

import pytest
import sglang as sgl
import torch

from rksc_sgl.problems import extract_answer
from rksc_sgl.rksc.cgee import AuditLog, CGEEConfig, verifier_prompt, verify
from rksc_sgl.rksc.cgee_decisions import choose, cut_at_eos, generation_confidence, skip_decision
from rksc_sgl.rksc.verifier import ExitPolicy, binary_entropy_bits, should_exit, simulate_exit, wilson_interval

# ---- gate 1 and the pure pieces (no model) -------------------------------------------------------


def test_config_is_validated_and_frozen():
    with pytest.raises(ValueError):
        CGEEConfig(skip_min_vote_share=0.0)
    with pytest.raises(ValueError):
        CGEEConfig(exit_window=0)
    with pytest.raises(ValueError):
        CGEEConfig(exit_entropy_bits=1.5)
    with pytest.raises(ValueError):
        CGEEConfig(selection="best")
    with pytest.raises(ValueError):
        CGEEConfig(audit_fraction=2)
    cfg = CGEEConfig()
    with pytest.raises(Exception):
        cfg.skip_gate = False  # frozen
    full = cfg.full()
    assert not full.skip_gate and not full.exit_gate and not full.exit_policy().enabled


def test_skip_when_branches_agree_decisively():
    cfg = CGEEConfig(skip_min_vote_share=0.75, skip_min_confidence=0.5)
    answers = ["4", "4", "4", "5"]
    d = skip_decision(answers, [0.9, 0.95, 0.8, 0.99], cfg)
    assert d["skip"] and d["answer"] == "4" and d["branch"] == 1  # most confident agreeing branch
    assert d["vote_share"] == 0.75 and d["confidence"] == pytest.approx((0.9 + 0.95 + 0.8) / 3)


def test_no_skip_below_share_or_confidence_or_when_off():
    cfg = CGEEConfig(skip_min_vote_share=0.75, skip_min_confidence=0.5)
    assert not skip_decision(["4", "4", "5", "6"], [0.9] * 4, cfg)["skip"]  # share 0.5
    assert not skip_decision(["4", "4", "4", "5"], [0.3, 0.3, 0.4, 0.9], cfg)["skip"]  # low confidence
    assert not skip_decision(["4", "4", "4", "4"], [None] * 4, cfg)["skip"]  # confidence unknown
    assert not skip_decision([None] * 4, [0.9] * 4, cfg)["skip"]  # no answer at all
    assert not skip_decision(["4"] * 4, [0.9] * 4, CGEEConfig(skip_gate=False))["skip"]
    assert not skip_decision(["4", "4", "5", "5"], [0.9] * 4, CGEEConfig(skip_min_vote_share=0.5))["skip"]  # tie
    # None answers count against the share: 3 of 4, not 3 of 3.
    assert skip_decision(["4", "4", "4", None], [0.9] * 4, cfg)["vote_share"] == 0.75
    assert not skip_decision(["4", "4", "4", None], [0.9] * 4, CGEEConfig(skip_min_vote_share=1.0))["skip"]


def test_choose_weighted_vote_and_max_yes():
    answers = ["4", "5", "5", None]
    p = [0.9, 0.5, 0.5, 1.0]
    assert choose(answers, p, "weighted_vote") == (1, "5")  # 1.0 for "5" beats 0.9 for "4"
    assert choose(answers, p, "max_yes") == (0, "4")  # the None branch never wins an answer
    assert choose([None, None], [0.2, 0.7], "weighted_vote") == (1, None)
    assert choose(["3", "4"], [0.5, 0.5], "weighted_vote") == (0, "3")  # ties -> first seen


def test_confidence_is_cut_at_eos():
    eos = 2
    lp = math.log
    triples = [(lp(0.8), 10, None), (lp(0.6), 11, None), (lp(0.9), eos, None), (lp(0.01), 12, None)]
    assert cut_at_eos([10, 11, eos, 12], {eos}) == 2
    assert cut_at_eos([10, 11], {eos}) == 2
    assert generation_confidence({"output_token_logprobs": triples}, {eos}) == pytest.approx(0.7)
    assert generation_confidence({"output_token_probs_mean": 0.42}) == 0.42
    assert generation_confidence(None) is None
    assert generation_confidence({"output_token_logprobs": [(lp(0.5), eos, None)]}, {eos}) is None


def test_exit_rule_and_replay():
    policy = ExitPolicy(entropy_bits=0.5, window=2, min_layer=3)
    low = float(binary_entropy_bits(torch.tensor(0.97)))
    assert low < 0.5
    assert not should_exit([(True, low), (True, low)], policy)  # before min_layer
    assert should_exit([(False, 0.9), (True, low), (True, low)], policy)
    assert not should_exit([(False, low), (False, low), (True, low)], policy)  # argmax changed
    trace = [(0.5, 1.0), (0.97, low), (0.97, low), (0.98, low), (0.2, 0.7)]
    assert simulate_exit(trace, policy) == (0.97, 3)
    assert simulate_exit(trace, ExitPolicy(enabled=False)) == (0.2, 5)


def test_audit_log_counts_after_warmup_with_ci():
    log = AuditLog(warmup=2)
    for _ in range(2):
        log.record(gated=True, audited=True, agrees=False, branch_agrees=False, skipped=True, exited=False)
    log.record(gated=False, audited=False, agrees=True, branch_agrees=True, skipped=False, exited=False)
    log.record(gated=True, audited=True, agrees=False, branch_agrees=False, skipped=True, exited=False)
    log.record(gated=True, audited=False, agrees=None, branch_agrees=None, skipped=True, exited=False)
    r = log.error_rate()
    assert r["calls"] == 5 and r["counted"] == 3 and r["compared"] == 2 and r["disagreements"] == 1
    assert r["error_rate"] == 0.5 and r["ci95"][0] < 0.5 < r["ci95"][1]
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and 0.03 < hi < 0.04


# ---- the verifier pass on the engine -----------------------------------------------------------

SHORT = ("<|im_start|>user\nWhat is 2+3? Answer: 5. Is this correct? Answer Yes or No.<|im_end|>\n"
         "<|im_start|>assistant\n")
LONG = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 4 - 1? "
        "End with 'Answer: <number>'.<|im_end|>\n<|im_start|>assistant\n4 - 1 = 3. Answer: 3<|im_end|>\n"
        "<|im_start|>user\nIs this solution correct? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")


THIRD = "<|im_start|>user\nIs the sky green? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n"


def _p_yes_from_logits(logits, verifier):
    yes = torch.logsumexp(logits[..., verifier.yes_ids].float(), -1)
    no = torch.logsumexp(logits[..., verifier.no_ids].float(), -1)
    return torch.sigmoid(yes - no)


def _verdict_ids(tokenizer):
    """The verdict words' token ids, by hand: "Yes"/"yes" against "No"/"no", each one token."""
    def ids(words):
        return [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in ("Yes", "yes", "No", "no"))
    return ids(("Yes", "yes")), ids(("No", "no"))


def _p_yes_by_hand(logits, tokenizer):
    """P(yes side | yes or no side) from next-token logits, the verifier's definition."""
    yes, no = _verdict_ids(tokenizer)
    return torch.sigmoid(torch.logsumexp(logits[..., yes].float(), -1) - torch.logsumexp(logits[..., no].float(), -1))


def _hf(engine, prompts, **kw):
    """The HF model itself on a LEFT-padded batch: the last real token is at index -1."""
    ids = [engine.encode(p) for p in prompts]
    width = max(map(len, ids))
    pad = engine.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        return engine.hf_model(input_ids=input_ids, attention_mask=mask, **kw)


def _hf_lens_traces(engine, prompts):
    """Per prompt, P(yes) of the logit lens after every layer, from the HF model's own hidden
    states: the final norm then the LM head (the last layer's entry is the model's logits)."""
    out = _hf(engine, prompts, output_hidden_states=True)
    model, tok = engine.hf_model, engine.tokenizer
    layers = len(out.hidden_states) - 1
    with torch.no_grad():
        per_layer = [_p_yes_by_hand(model.lm_head(model.model.norm(out.hidden_states[k][:, -1])), tok)
                     for k in range(1, layers)] + [_p_yes_by_hand(out.logits[:, -1], tok)]
    return [[float(p[i]) for p in per_layer] for i in range(len(prompts))]


def _exit_layer_by_hand(trace, policy):
    """Layers a prompt runs under ``policy``, replayed from its lens P(yes) per layer as the
    rule reads: it leaves after layer l (l >= min_layer and l >= window, l before the last)
    once the verdict (P >= 0.5) was the same with binary entropy <= entropy_bits over the
    last ``window`` layers."""
    def entropy_bits(p):
        return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))

    for layer in range(max(policy.min_layer, policy.window), len(trace)):
        recent = trace[layer - policy.window:layer]
        if len({p >= 0.5 for p in recent}) == 1 and all(entropy_bits(p) <= policy.entropy_bits for p in recent):
            return layer
    return len(trace)


def _weighted_vote_by_hand(answers, p_yes):
    """``(branch, answer)`` of the weighted vote, by hand: the answer whose branches' P(yes)
    sum is largest, from its branch of highest P(yes); with no answer at all, the branch of
    highest P(yes). (Exact ties do not occur with these real-valued scores.)"""
    totals = {}
    for a, p in zip(answers, p_yes):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + p
    answer = max(totals, key=totals.get) if totals else None
    branch = max((i for i, a in enumerate(answers) if a == answer), key=lambda i: p_yes[i])
    return branch, answer


def _mean_prob_before_eos(triples, eos):
    """Mean probability of the generated tokens up to the first EOS token (not counted)."""
    ids = [t[1] for t in triples]
    n = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return sum(math.exp(t[0]) for t in triples[:n]) / n


def test_last_layer_lens_equals_real_logits_under_left_padding(radix_engine):
    prompts = [SHORT, LONG]
    full = radix_engine.verify_yes_no(prompts, trace=True)
    verifier = radix_engine._yes_no_verifier
    out = _hf(radix_engine, prompts)
    real = _p_yes_from_logits(out.logits[:, -1], verifier)  # index -1 is the last real token
    for r, p in zip(full, real):
        assert r.layers_run == r.num_layers == len(radix_engine.runner.layers)
        assert r.p_yes == pytest.approx(float(p), abs=2e-4)
        assert r.trace[-1][0] == pytest.approx(r.p_yes)
    # ``len - 1`` (what right padding would use) is a different, wrong token for the short prompt.
    n_short = len(radix_engine.encode(SHORT))
    wrong = _p_yes_from_logits(out.logits[0, n_short - 1], verifier)
    assert abs(float(wrong) - full[0].p_yes) > 1e-3
    # Batched == alone (ragged batch, no cross-talk between prompts).
    alone = radix_engine.verify_yes_no([SHORT])[0]
    assert alone.p_yes == pytest.approx(full[0].p_yes, abs=2e-4)


def test_intermediate_lens_applies_final_norm(radix_engine):
    full = radix_engine.verify_yes_no([LONG], trace=True)[0]
    verifier = radix_engine._yes_no_verifier
    out = _hf(radix_engine, [LONG], output_hidden_states=True)
    k = 12  # hidden_states[k] is the residual stream after k layers (before the final norm)
    h = out.hidden_states[k][:, -1]
    lens = _p_yes_from_logits(radix_engine.hf_model.lm_head(radix_engine.hf_model.model.norm(h)), verifier)
    no_norm = _p_yes_from_logits(radix_engine.hf_model.lm_head(h), verifier)
    assert full.trace[k - 1][0] == pytest.approx(float(lens[0]), abs=2e-4)
    assert abs(float(no_norm[0]) - float(lens[0])) > 1e-3  # skipping the norm would be wrong


def test_layer_exit_runs_fewer_layers_and_counts_them(radix_engine, monkeypatch):
    runner = radix_engine.runner
    calls = []
    original = runner._layer

    def counting(layer_id, layer, hidden, *args):
        calls.append((layer_id, hidden.shape[1]))  # (block, new tokens of the prompts still in the batch)
        return original(layer_id, layer, hidden, *args)

    monkeypatch.setattr(runner, "_layer", counting)
    prompts = [SHORT, LONG, THIRD]
    assert radix_engine.flush_cache()  # nothing cached: each prompt brings all of its tokens
    lengths = [len(radix_engine.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    num_layers = len(runner.layers)
    full = radix_engine.verify_yes_no(prompts, trace=True)
    assert calls == [(layer, sum(lengths)) for layer in range(num_layers)]
    # The engine's lens, layer by layer, is the HF model's own.
    lens = _hf_lens_traces(radix_engine, prompts)
    for f, ref in zip(full, lens):
        assert [p for p, _ in f.trace] == pytest.approx(ref, abs=2e-4)
    calls.clear()
    first = radix_engine.verify_yes_no(prompts, policy=ExitPolicy(entropy_bits=1.0, window=1, min_layer=1))
    assert calls == [(0, sum(lengths))] and [r.layers_run for r in first] == [1, 1, 1]
    assert [r.p_yes for r in first] == pytest.approx([t[0] for t in lens], abs=2e-4)
    # A real policy: every prompt exits where a replay of its HF lens by hand says it would,
    # with the lens value of that layer, and leaves the batch there: each block runs the new
    # tokens of exactly the prompts that have not left yet.
    for policy in (ExitPolicy(entropy_bits=0.5, window=2, min_layer=1),
                   ExitPolicy(entropy_bits=0.7, window=3, min_layer=1),
                   ExitPolicy(entropy_bits=0.2, window=3, min_layer=10)):
        calls.clear()
        got = radix_engine.verify_yes_no(prompts, policy=policy)
        exits = [_exit_layer_by_hand(t, policy) for t in lens]
        assert len(set(exits)) == 3 and max(exits) < num_layers  # they leave one at a time, all early
        for g, e, t in zip(got, exits, lens):
            assert g.layers_run == e and g.p_yes == pytest.approx(t[e - 1], abs=2e-4)
        assert calls == [(layer, sum(n for n, e in zip(lengths, exits) if e > layer)) for layer in range(max(exits))]
    radix_engine.check_integrity()  # temporary verifier slots were all freed, locks balanced


@sgl.function
def _branches(s, question, num, cfg):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(f"{question} End with 'Answer: <number>'.")
    forks = s.fork(num)
    forks += sgl.assistant(sgl.gen("solution", max_tokens=16, temperature=0.9, return_logprob=True))
    result = verify(forks, answer="solution", config=cfg)
    prompts = [verifier_prompt(f, cfg, None) for f in forks.states]
    metas = [f.get_meta_info("solution") for f in forks.states]
    texts = [f["solution"] for f in forks.states]
    return result, prompts, metas, texts


def test_both_gates_off_equals_plain_full_pass(radix_engine, use_backend):
    use_backend(radix_engine)
    cfg = CGEEConfig(skip_gate=False, exit_gate=False, skip_min_vote_share=0.25)
    state = _branches.run(question="What is 3 + 4?", num=4, cfg=cfg)
    result, prompts, metas, texts = state.ret_value
    # The verify turn continues each branch's own conversation, in the chat template's markup.
    assert prompts == ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                       "What is 3 + 4? End with 'Answer: <number>'.<|im_end|>\n<|im_start|>assistant\n"
                       f"{text}<|im_end|>\n<|im_start|>user\n{cfg.verify_prompt}<|im_end|>\n"
                       "<|im_start|>assistant\n" for text in texts]
    plain = radix_engine.verify_yes_no(prompts)
    assert result.scores == [r.p_yes for r in plain]
    assert not result.gates["skipped"] and result.gates["layers_run"] == [30] * 4
    # The scores are the model's P(yes) after each prompt (HF, by hand) ...
    expected = _p_yes_by_hand(_hf(radix_engine, prompts).logits[:, -1], radix_engine.tokenizer).tolist()
    assert result.scores == pytest.approx(expected, abs=2e-4)
    # ... and the weighted vote over the branches' answers, by hand.
    assert result.answers == [extract_answer(t) for t in texts]
    assert (result.branch, result.answer) == _weighted_vote_by_hand(result.answers, expected)
    # Confidence: mean prob of the generated tokens before EOS; no EOS text in the branch.
    eos = set(radix_engine.eos_ids)
    for conf, meta, text in zip(result.confidences, metas, texts):
        assert conf == pytest.approx(_mean_prob_before_eos(meta["output_token_logprobs"], eos))
        assert "<|im_end|>" not in text
    radix_engine.check_integrity()


def test_gates_on_skip_and_audit(radix_engine, use_backend):
    use_backend(radix_engine)
    log = AuditLog()
    # Greedy branches agree; the skip gate fires and the audit runs the full pass as well.
    cfg = CGEEConfig(skip_min_vote_share=0.5, audit_fraction=1.0)

    @sgl.function
    def greedy(s, cfg, log):
        s += sgl.user("What is 2 + 2? End with 'Answer: <number>'.")
        forks = s.fork(3)
        forks += sgl.assistant(sgl.gen("solution", max_tokens=16, temperature=0.0))
        return verify(forks, answer="solution", config=cfg, audit_log=log)

    r = greedy.run(cfg=cfg, log=log).ret_value
    assert r.gates["skipped"] and r.scores == [None] * 3 and r.gates["layers_run"] is None
    assert r.gates["audited"] and len(r.gates["audit_scores"]) == 3
    stats = log.error_rate()
    assert stats["counted"] == 1 and stats["audited"] == 1 and stats["skipped"] == 1
    radix_engine.check_integrity()


class _RuntimeLike:
    """The engine seen as another SGLang backend: everything but the layer-exit verifier,
    as with ``sgl.RuntimeEndpoint``, so ``verify`` takes its ``select`` fallback."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        if name == "verify_yes_no":
            raise AttributeError(name)
        return getattr(self._engine, name)


def test_select_fallback_scores_yes_against_no(radix_engine, use_backend):
    """On other backends the full verifier is ``select`` over ("Yes", "No") on a copy of
    each branch: P(yes) = softmax of the two choices' log-probabilities after the verify
    turn, checked against the model's own next-token logits."""
    runtime_like = _RuntimeLike(radix_engine)
    assert not hasattr(runtime_like, "verify_yes_no")
    use_backend(runtime_like)
    cfg = CGEEConfig(skip_gate=False, skip_min_vote_share=0.25)
    state = _branches.run(question="What is 5 + 2?", num=3, cfg=cfg)
    result, prompts, _, texts = state.ret_value
    assert result.gates["layers_run"] is None and not result.gates["skipped"]
    tok = radix_engine.tokenizer
    yes, no = tok.encode("Yes", add_special_tokens=False), tok.encode("No", add_special_tokens=False)
    assert len(yes) == len(no) == 1
    logits = _hf(radix_engine, prompts).logits[:, -1]
    expected = torch.sigmoid(logits[:, yes[0]] - logits[:, no[0]]).tolist()
    assert result.scores == pytest.approx(expected, abs=1e-4)
    assert result.answers == [extract_answer(t) for t in texts]
    assert (result.branch, result.answer) == _weighted_vote_by_hand(result.answers, expected)
    radix_engine.check_integrity()
