"""The engine's sampling transforms (``rksc_sgl/engine/sampling.py``) against SGLang's own
sampling code, as installed (``sglang/srt/...``, SGLang 0.5.23 here).

``sample_token`` draws one token from one row of logits. What it draws from is read at
its two torch calls: the logits it hands to ``torch.softmax`` (after the penalties,
``logit_bias`` and the temperature) and the distribution it hands to ``torch.multinomial``
(after top-k, top-p and min-p); greedy requests take ``torch.argmax`` of the logits.

The references are SGLang's code itself, on the CPU:

* Filtering: ``layers/sampler.py`` ``top_k_top_p_min_p_sampling_from_probs_torch``, what
  SGLang's ``pytorch`` sampling backend runs, with ``return_filtered_probs=True`` (the
  weights it samples from and their token ids), on ``softmax(logits / temperature)`` as
  ``Sampler.forward`` computes it (``logits.div_(sampling_info.temperatures)``, line 275).
* Penalties and ``logit_bias``: ``sampling/sampling_batch_info.py``
  ``SamplingBatchInfo.from_schedule_batch`` builds the penalizer orchestrator (frequency,
  presence, repetition, min-new-tokens penalizers of ``sampling/penaltylib``) and the
  logit-bias tensor; the output tokens are fed one decode step at a time through
  ``cumulate_output_tokens``, as ``ScheduleBatch`` does after each step
  (``managers/schedule_batch.py`` line 3732), and ``copy_for_forward().apply_logits_bias``
  transforms the logits as the model runner does before sampling (``model_runner.py``
  line 2093; the scheduler always forwards that copy, ``scheduler.py`` line 4598).

Each reference value is also checked against the documented formula where there is one.
"""

from __future__ import annotations

import itertools
import threading
import types
from collections import Counter

import pytest
import torch
from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch
from sglang.srt.sampling import sampling_batch_info
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

from rksc_sgl.engine import sampling
from rksc_sgl.engine.sampling import parse_sampling_params

VOCAB = 64
TINY = 1e-6  # probabilities below this are float-rounding territory (see _assert_same_filter)


class _Seen:
    """``torch`` as ``rksc_sgl.engine.sampling`` sees it, remembering the inputs of the calls
    that decide the draw (made on the test's own thread: a session engine's scheduler thread
    samples through the same module); every other attribute is torch's own."""

    def __init__(self):
        self.softmax_in = self.multinomial_in = self.argmax_in = None
        self._thread = threading.current_thread()

    def __getattr__(self, name):
        return getattr(torch, name)

    def _keep(self, name, x):
        if threading.current_thread() is self._thread:
            setattr(self, name, x.detach().clone())

    def softmax(self, x, dim):
        self._keep("softmax_in", x)
        return torch.softmax(x, dim=dim)

    def multinomial(self, probs, num_samples, generator=None):
        self._keep("multinomial_in", probs)
        return torch.multinomial(probs, num_samples, generator=generator)

    def argmax(self, x, *args, **kwargs):
        self._keep("argmax_in", x)
        return torch.argmax(x, *args, **kwargs)


@pytest.fixture()
def seen(monkeypatch):
    spy = _Seen()
    monkeypatch.setattr(sampling, "torch", spy)
    return spy


@pytest.fixture()
def sglang_exec(monkeypatch):
    """``from_schedule_batch`` reads three switches of SGLang's published server config;
    outside a server there is none, so give it SGLang's defaults (no deterministic
    inference, no custom logit processor, no watermark)."""
    ns = types.SimpleNamespace
    switches = ns(deterministic=ns(enable_deterministic_inference=False),
                  features=ns(enable_custom_logit_processor=False, enable_watermark=False))
    monkeypatch.setattr(sampling_batch_info, "get_exec", lambda: switches)


def _params(**raw):
    """The engine's parse of a request's sampling parameters (SGLang's ``SamplingParams``)."""
    return parse_sampling_params(raw, None, VOCAB)


def _engine_draw(seen, logits, params, output_ids=()):
    seen.softmax_in = seen.multinomial_in = seen.argmax_in = None
    token = sampling.sample_token(logits.clone(), params, list(output_ids), torch.Generator().manual_seed(0))
    return token


# ---- SGLang's side -----------------------------------------------------------------------------------
def _sglang_filtered(logits, params):
    """The distribution SGLang's torch sampler draws from, renormalised, over the vocabulary."""
    probs = torch.softmax(logits.float()[None] / params.temperature, dim=-1)
    _, weights, ids, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs, torch.tensor([params.top_k], dtype=torch.int32), torch.tensor([params.top_p]),
        torch.tensor([params.min_p]), params.min_p > 0, None, torch.zeros(1, dtype=torch.int64),
        return_filtered_probs=True)
    full = torch.zeros(logits.numel()).scatter_(0, ids[0].long(), weights[0])
    return full / full.sum()


class _Req:
    """What ``from_schedule_batch`` and the penalizers read of a request."""

    def __init__(self, params):
        self.sampling_params = params
        self.custom_logit_processor = None
        self.return_sampling_mask = False
        self.sampling_logprobs_mode = None
        self.eos_token_ids = set()
        self.tokenizer = types.SimpleNamespace(additional_stop_token_ids=None, eos_token_id=None)


class _Batch:  # the orchestrator holds a weak reference to its batch
    def __init__(self, reqs):
        self.reqs = reqs
        self.device = "cpu"


def _sglang_logits(logits, params, output_ids=()):
    """The logits SGLang samples from after ``len(output_ids)`` decode steps, before the
    temperature: its penalizers and logit bias, applied by SGLang itself."""
    batch = _Batch([_Req(params)])
    info = SamplingBatchInfo.from_schedule_batch(batch, VOCAB)
    for token in output_ids:  # one decode step at a time, as ScheduleBatch feeds them
        info.penalizer_orchestrator.cumulate_output_tokens(torch.tensor([token], dtype=torch.int64))
    out = logits.float().clone()[None]
    # apply_scaling_penalties is torch.compile'd; eager is the same arithmetic, without a
    # C++ toolchain and seconds of compiling on a CPU.
    with torch._dynamo.config.patch(disable=True):
        info.copy_for_forward().apply_logits_bias(out)
    return out[0]


# ---- the comparison -----------------------------------------------------------------------------------
def _kept_per_value(logits, probs):
    """How many tokens of each logit value keep a probability above TINY. Tokens with equal
    logits are interchangeable: which of them a cut keeps is the sort's choice (neither
    SGLang's ``probs.sort`` nor the engine's is stable), how many it keeps is not."""
    return Counter(float(v) for v in logits[probs > TINY])


def _assert_same_filter(logits, engine_probs, reference, where):
    """The same support (up to which of several tied tokens) and the same renormalised
    probabilities. Support is compared above TINY: with top_p == 1.0, SGLang's float32
    cumulative sum can pass 1.0 by rounding and drop tail tokens of ~1e-8 (sampler.py
    line 827, ``(probs_sum - probs_sort) > top_ps``)."""
    assert engine_probs is not None, f"{where}: the engine did not sample"
    assert _kept_per_value(logits, engine_probs) == _kept_per_value(logits, reference), where
    assert torch.allclose(torch.sort(engine_probs).values, torch.sort(reference).values, atol=TINY, rtol=1e-5), where
    if len(set(logits.tolist())) == logits.numel():  # no ties: the very same tokens
        assert torch.equal(engine_probs > TINY, reference > TINY), where
        assert torch.allclose(engine_probs, reference, atol=TINY, rtol=1e-5), where


def _logit_rows():
    """Random logits, logits with many ties (integers), and logits with masked (-inf) tokens."""
    for seed in range(6):
        base = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
        yield f"random{seed}", base
        yield f"ties{seed}", torch.round(base)
        yield f"masked{seed}", torch.where(base < -1, torch.tensor(float("-inf")), base)


def _untied_at(logits, k):
    """Whether the k-th and (k+1)-th largest logits differ (top-k's cut splits no tie)."""
    ordered = torch.sort(logits, descending=True).values
    return not 0 < k < logits.numel() or bool(ordered[k - 1] != ordered[k])


GRID = list(itertools.product([-1, 2, 5, 20, VOCAB - 1, VOCAB, 100],  # top_k (-1: all)
                              [1.0, 0.95, 0.5, 0.05],  # top_p
                              [0.0, 0.05, 0.5, 1.0],  # min_p
                              [0.3, 1.0, 2.5]))  # temperature


def test_top_k_top_p_min_p_keep_what_sglang_keeps(seen):
    compared = 0
    for name, logits in _logit_rows():
        for top_k, top_p, min_p, temperature in GRID:
            if not _untied_at(logits, top_k):
                continue  # test_top_k_keeps_exactly_k_tokens_when_the_kth_is_tied
            params = _params(top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
            _engine_draw(seen, logits, params)
            where = f"{name} top_k={top_k} top_p={top_p} min_p={min_p} T={temperature}"
            engine_probs = seen.multinomial_in / seen.multinomial_in.sum()
            _assert_same_filter(logits, engine_probs, _sglang_filtered(logits, params), where)
            compared += 1
    assert compared > 0.8 * len(GRID) * 18


def test_each_filter_keeps_the_documented_tokens(seen):
    """Hand-checked cases on logits log(p): what each rule keeps, independently of both codes."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (VOCAB - 4))
    logits = torch.log(probs)  # -inf for the zero-probability tokens

    def kept(**raw):
        _engine_draw(seen, logits, _params(**raw))
        p = seen.multinomial_in / seen.multinomial_in.sum()
        return [round(float(x), 4) for x in p[:4]], int((p > 0).sum())

    assert kept(top_k=2) == ([0.5714, 0.4286, 0.0, 0.0], 2)  # the 2 largest, renormalised
    assert kept(top_p=0.5) == ([0.5714, 0.4286, 0.0, 0.0], 2)  # 0.4 < 0.5, so 0.3 is still needed
    assert kept(top_p=0.3) == ([1.0, 0.0, 0.0, 0.0], 1)  # the mass before 0.3 is 0.4 > 0.3
    assert kept(min_p=0.6) == ([0.5714, 0.4286, 0.0, 0.0], 2)  # at least 0.6 * 0.4
    assert kept(top_k=3, top_p=0.95) == ([0.4444, 0.3333, 0.2222, 0.0], 3)  # top-p has nothing left to cut
    assert kept(top_k=3, top_p=0.6) == ([0.5714, 0.4286, 0.0, 0.0], 2)  # the mass before 0.2 is 0.7 > 0.6
    assert kept(top_p=0.95, min_p=0.4) == ([0.4444, 0.3333, 0.2222, 0.0], 3)  # 0.1 < 0.4 * 0.4
    assert kept(top_k=100) == ([0.4, 0.3, 0.2, 0.1], 4)  # k past the vocabulary: nothing cut
    for top_k, top_p, min_p in [(2, 1.0, 0.0), (-1, 0.5, 0.0), (-1, 0.3, 0.0), (-1, 1.0, 0.6), (3, 0.6, 0.0)]:
        params = _params(top_k=top_k, top_p=top_p, min_p=min_p)
        _engine_draw(seen, logits, params)
        _assert_same_filter(logits, seen.multinomial_in / seen.multinomial_in.sum(),
                            _sglang_filtered(logits, params), f"top_k={top_k} top_p={top_p} min_p={min_p}")


def test_top_k_keeps_exactly_k_tokens_when_the_kth_is_tied(seen):
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0] + [0.0] * (VOCAB - 5))
    params = _params(top_k=2)
    _engine_draw(seen, logits, params)
    reference = _sglang_filtered(logits, params)
    assert int((reference > 0).sum()) == 2
    assert int((seen.multinomial_in > 0).sum()) == 2


def test_greedy_is_the_argmax_of_the_transformed_logits(seen, sglang_exec):
    """top_k == 1 and temperature 0 (SGLang sets top_k = 1) are SGLang's greedy path:
    ``torch.argmax`` of the logits after penalties and bias (sampler.py line 216)."""
    history = [5, 5, 9, 30]
    for seed in range(8):
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(100 + seed)) * 2
        for raw in ({"temperature": 0.0}, {"top_k": 1, "temperature": 0.7},
                    {"temperature": 0.0, "frequency_penalty": 1.5, "logit_bias": {"3": 4.0}},
                    {"temperature": 0.0, "repetition_penalty": 2.0}):
            params = _params(**raw)
            token = _engine_draw(seen, logits, params, history)
            assert seen.multinomial_in is None
            assert token == int(torch.argmax(_sglang_logits(logits, params, history))), (seed, raw)


# ---- penalties and logit_bias ------------------------------------------------------------------------
HISTORY = [7, 3, 7, 12, 7, 3, 40]  # 7 three times, 3 twice, 12 and 40 once
COUNTS = Counter(HISTORY)


def _penalised_logits(seen, logits, **raw):
    """The logits the engine samples from (temperature 1, nothing filtered)."""
    params = _params(temperature=1.0, **raw)
    _engine_draw(seen, logits, params, HISTORY)
    return seen.softmax_in, params


def _row(seed):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
    logits[7], logits[3] = 1.25, -0.75  # a positive and a negative penalised logit, for sure
    return logits


@pytest.mark.parametrize("raw", [{"frequency_penalty": 0.6}, {"frequency_penalty": -0.4},
                                 {"presence_penalty": 0.9}, {"presence_penalty": -1.1},
                                 {"frequency_penalty": 0.6, "presence_penalty": 0.9},
                                 {"repetition_penalty": 1.7}, {"repetition_penalty": 0.6},
                                 {"repetition_penalty": 1.5, "frequency_penalty": 0.5, "presence_penalty": 0.25}])
def test_penalties_change_the_logits_by_the_documented_amounts(seen, sglang_exec, raw):
    for seed in range(4):
        logits = _row(seed)
        got, params = _penalised_logits(seen, logits, **raw)
        assert torch.allclose(got, _sglang_logits(logits, params, HISTORY), atol=1e-6), (seed, raw)
        # The documented amounts (OpenAI's frequency/presence penalties, CTRL's repetition
        # penalty), over the output tokens only: every other logit is untouched.
        # SGLang's order: the additive penalties first, then the scaling one.
        expected = logits.clone()
        rep = raw.get("repetition_penalty", 1.0)
        for token, count in COUNTS.items():
            x = float(logits[token]) - raw.get("frequency_penalty", 0.0) * count - raw.get("presence_penalty", 0.0)
            expected[token] = x / rep if x > 0 else x * rep
        assert torch.allclose(got, expected, atol=1e-6), (seed, raw)
        untouched = [t for t in range(VOCAB) if t not in COUNTS]
        assert torch.equal(got[untouched], logits[untouched])


def test_no_output_yet_no_penalty(seen, sglang_exec):
    logits = _row(0)
    params = _params(temperature=1.0, frequency_penalty=1.0, presence_penalty=1.0, repetition_penalty=1.5)
    _engine_draw(seen, logits, params, [])
    assert torch.equal(seen.softmax_in, logits)
    assert torch.equal(_sglang_logits(logits, params, []), logits)


def test_repetition_with_frequency_and_presence_penalties_is_sglangs_order(seen, sglang_exec):
    logits = _row(1)
    got, params = _penalised_logits(seen, logits, repetition_penalty=1.5, frequency_penalty=0.5,
                                    presence_penalty=0.25)
    assert torch.allclose(got, _sglang_logits(logits, params, HISTORY), atol=1e-6)


def test_logit_bias_shifts_exactly_the_named_tokens(seen, sglang_exec):
    bias = {"3": 5.0, "17": -2.5, "63": 100.0, "0": -100.0}
    for seed in range(4):
        logits = _row(seed)
        got, params = _penalised_logits(seen, logits, logit_bias=bias)
        shift = got - logits
        moved = {t: float(shift[t]) for t in range(VOCAB) if shift[t] != 0}  # every other logit is bit-identical
        assert moved == pytest.approx({int(k): v for k, v in bias.items()}, abs=1e-5)
        assert torch.allclose(got, _sglang_logits(logits, params, HISTORY), atol=1e-6)
        # After the penalties, as SGLang (its post-grammar transform, sampling_batch_info.py line 441).
        got, params = _penalised_logits(seen, logits, logit_bias=bias, frequency_penalty=0.5, repetition_penalty=1.3)
        assert torch.allclose(got, _sglang_logits(logits, params, HISTORY), atol=1e-6)
        assert float(got[3]) == pytest.approx((float(logits[3]) - 0.5 * COUNTS[3]) * 1.3 + 5.0)  # logits[3] < 0


def test_temperature_divides_the_transformed_logits(seen, sglang_exec):
    logits = _row(2)
    for temperature in (0.25, 1.0, 3.0):
        params = _params(temperature=temperature, frequency_penalty=0.3, logit_bias={"5": 1.5})
        _engine_draw(seen, logits, params, HISTORY)
        assert torch.allclose(seen.softmax_in, _sglang_logits(logits, params, HISTORY) / temperature, atol=1e-6)


def test_logit_bias_naming_one_token_twice_is_sglangs_last_value(seen, sglang_exec):
    """``"5"`` and ``"05"`` name the same token: SGLang keeps the later value
    (``{int(key): value ...}``, sampling_batch_info.py line 183), it does not add both."""
    logits = _row(3)
    got, params = _penalised_logits(seen, logits, logit_bias={"5": 2.0, "05": 3.0, "7": -1.0})
    assert torch.allclose(got, _sglang_logits(logits, params, HISTORY), atol=1e-6)
    shift = got - logits
    assert {t: float(shift[t]) for t in range(VOCAB) if shift[t] != 0} == pytest.approx({5: 3.0, 7: -1.0})


# ---- a batch whose rows each have their own parameters -----------------------------------------------
BATCH = [  # (request, its output so far): every step's output feeds every row, as in a decode batch
    ({"temperature": 0.7, "top_k": 5}, [1, 2, 3, 4, 5, 6]),
    ({"temperature": 1.3, "top_p": 0.6, "frequency_penalty": 0.8}, [9, 9, 9, 2, 2, 60]),
    ({"min_p": 0.15, "presence_penalty": -0.5, "logit_bias": {"9": 3.0, "40": -2.0}}, [40, 1, 40, 1, 40, 9]),
    ({"temperature": 0.5, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.4}, [0, 0, 11, 12, 13, 11]),
    ({}, [3, 3, 3, 3, 3, 3]),  # stock parameters beside the others
    ({"temperature": 0.0, "frequency_penalty": 0.3, "logit_bias": {"17": 0.5}}, [17, 17, 4, 4, 4, 8]),  # greedy
]


def _sglang_batch(logits, params, histories):
    """One SGLang decode step for the whole batch: ``SamplingBatchInfo`` over all the requests,
    its penalizers fed step by step, its bias applied, its temperatures divided, its torch
    sampler's filter run with the batch's own per-row tensors (``Sampler._sample_from_probs``).
    Returns the logits it takes the softmax of and the distributions it samples from."""
    batch = _Batch([_Req(p) for p in params])
    info = SamplingBatchInfo.from_schedule_batch(batch, VOCAB)
    for step in zip(*histories):
        info.penalizer_orchestrator.cumulate_output_tokens(torch.tensor(step, dtype=torch.int64))
    out = logits.float().clone()
    with torch._dynamo.config.patch(disable=True):
        info.copy_for_forward().apply_logits_bias(out)
    out.div_(info.temperatures)
    probs = torch.softmax(out, dim=-1)
    _, weights, ids, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), info.top_ks, info.top_ps, info.min_ps, info.need_min_p_sampling, None,
        torch.zeros(len(params), dtype=torch.int64), return_filtered_probs=True, max_top_k=info.max_top_k)
    filtered = torch.zeros_like(probs).scatter_(1, ids.long(), weights.float())
    return out, filtered / filtered.sum(dim=-1, keepdim=True)


def test_batch_rows_with_their_own_parameters(seen, sglang_exec):
    """Each row of a mixed SGLang batch (sampled and greedy, filters, penalties, bias, stock)
    equals the engine's draw for that request alone."""
    params = [_params(**raw) for raw, _ in BATCH]
    histories = [history for _, history in BATCH]
    for seed in range(4):
        logits = torch.randn(len(BATCH), VOCAB, generator=torch.Generator().manual_seed(200 + seed)) * 2.5
        scaled, filtered = _sglang_batch(logits, params, histories)
        for row, (p, history) in enumerate(zip(params, histories)):
            where = f"seed {seed} row {row} {BATCH[row][0]}"
            token = _engine_draw(seen, logits[row], p, history)
            if p.top_k == 1:  # greedy: SGLang's filter leaves the argmax alone
                assert seen.multinomial_in is None, where
                assert torch.allclose(seen.argmax_in, scaled[row], atol=1e-6), where  # temperature 1.0
                assert torch.nonzero(filtered[row]).flatten().tolist() == [token], where
                continue
            assert torch.allclose(seen.softmax_in, scaled[row], atol=1e-5), where
            _assert_same_filter(logits[row], seen.multinomial_in / seen.multinomial_in.sum(), filtered[row], where)
