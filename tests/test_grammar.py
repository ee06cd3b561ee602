"""Constrained decoding with xgrammar: regex, JSON schema, EBNF, the frontend's dtype."""

from __future__ import annotations

import concurrent.futures
import json
import re

import pytest
import sglang as sgl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---- a small grammar of regexes, each with the length of its longest match ----------------
_CLASSES = [("[0-9]", 1), ("[a-z]", 1), ("[A-Z]", 1), ("[a-c]", 1), ("[0-9a-f]", 1)]
_LITERALS = list("abxyz0123")


@st.composite
def _atom(draw):
    if draw(st.booleans()):
        return draw(st.sampled_from(_CLASSES))
    return draw(st.sampled_from(_LITERALS)), 1


@st.composite
def _piece(draw):
    """An atom, optionally repeated: ``?`` or a bounded ``{m,n}``."""
    text, longest = draw(_atom())
    quant = draw(st.sampled_from(["", "", "?", "{m,n}"]))
    if quant == "?":
        return text + "?", longest
    if quant:
        lo = draw(st.integers(0, 3))
        hi = draw(st.integers(max(lo, 1), 4))
        return f"{text}{{{lo},{hi}}}", longest * hi
    return text, longest


@st.composite
def _sequence(draw):
    pieces = draw(st.lists(_piece(), min_size=1, max_size=3))
    return "".join(p for p, _ in pieces), sum(n for _, n in pieces)


@st.composite
def regexes(draw):
    """``(pattern, longest match length)``: sequences and alternation groups, at most 12 chars."""
    parts = []
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            alts = draw(st.lists(_sequence(), min_size=2, max_size=3))
            parts.append(("(" + "|".join(a for a, _ in alts) + ")", max(n for _, n in alts)))
        else:
            parts.append(draw(_sequence()))
    pattern, longest = "".join(p for p, _ in parts), sum(n for _, n in parts)
    if longest > 12:
        return draw(regexes())
    return pattern, longest


def _budget(longest: int) -> int:
    """Every token carries at least one (ASCII) character, plus one for EOS: the grammar
    always completes within this many tokens."""
    return longest + 2


PROMPTS = ["The code is", "Answer:", "Here is a short word:", "ID ="]
FAST = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---- regex: single requests ----------------------------------------------------------------
@FAST
@given(spec=regexes(), prompt=st.sampled_from(PROMPTS), temperature=st.sampled_from([0.0, 1.0]))
def test_regex_output_always_matches(radix_engine, spec, prompt, temperature):
    pattern, longest = spec
    out = radix_engine.generate_request(text=prompt, sampling_params={
        "regex": pattern, "max_new_tokens": _budget(longest), "temperature": temperature})
    assert re.fullmatch(pattern, out["text"]), (pattern, out["text"])
    eos = radix_engine.eos_ids
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert out["meta_info"]["finish_reason"]["matched"] in eos
    assert out["output_ids"][-1] in eos


# ---- regex: forked branches decoded together ------------------------------------------------
@sgl.function
def _branches(s, prompt, patterns, budgets):
    s += prompt
    forks = s.fork(len(patterns))
    for i, (f, pattern, budget) in enumerate(zip(forks, patterns, budgets)):
        f += f" Item {i}: "
        f += sgl.gen("out", regex=pattern, max_tokens=budget, temperature=0)
    return [(f["out"], f.get_meta_info("out")) for f in forks]


@FAST
@given(specs=st.lists(regexes(), min_size=4, max_size=4))
def test_forked_branches_each_match_their_regex(radix_engine, specs):
    patterns = [p for p, _ in specs]
    state = _branches.run(prompt="List of codes.", patterns=patterns, budgets=[_budget(n) for _, n in specs],
                          backend=radix_engine)
    results = state.ret_value
    for pattern, (text, meta) in zip(patterns, results):
        assert re.fullmatch(pattern, text), (pattern, text)
        assert meta["finish_reason"]["type"] == "stop"
    radix_engine.check_integrity()


def test_forked_branches_share_decode_steps(checked, use_backend):
    """Four branches with different regexes decode in the same batched steps: far fewer
    forward passes than tokens, and each branch still follows its own grammar."""
    use_backend(checked)
    patterns = [r"[0-9]{8}", r"(yes|no) [a-z]{6}", r"[A-Z]{4}-[0-9]{4}", r"0x[0-9a-f]{8}"]
    before = checked.stats()
    state = _branches.run(prompt="Codes:", patterns=patterns, budgets=[20] * 4)
    stats = checked.stats().since(before)
    texts = [text for text, _ in state.ret_value]
    for pattern, text in zip(patterns, texts):
        assert re.fullmatch(pattern, text), (pattern, text)
    tokens = sum(meta["completion_tokens"] for _, meta in state.ret_value)
    assert tokens >= 4 * 6
    assert stats.forward_passes < 0.75 * tokens, (stats.forward_passes, tokens)


# ---- termination, interplay with other parameters ------------------------------------------
def test_grammar_end_finishes_like_eos_even_with_ignore_eos(checked):
    out = checked.generate_request(text="Pet:", sampling_params={
        "regex": r" ?(cat|dog)", "ignore_eos": True, "max_new_tokens": 10, "temperature": 0})
    assert re.fullmatch(r" ?(cat|dog)", out["text"])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": out["output_ids"][-1]}
    assert out["output_ids"][-1] in checked.eos_ids


def test_min_new_tokens_yields_to_a_finished_grammar(checked):
    """min_new_tokens masks EOS, but once the grammar allows only EOS the grammar wins."""
    out = checked.generate_request(text="Yes or no?", sampling_params={
        "regex": r" ?(yes|no)", "min_new_tokens": 6, "max_new_tokens": 10, "temperature": 0})
    assert re.fullmatch(r" ?(yes|no)", out["text"])
    assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_unconstrained_request_in_a_batch_with_constrained_ones(checked):
    """The mask touches only its own request: an unconstrained request decoded in the same
    steps as constrained ones gets the tokens it gets alone."""
    plain = {"max_new_tokens": 6, "min_new_tokens": 6, "temperature": 0}
    alone = checked.generate_request(text="Once upon a time", sampling_params=plain)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(checked.generate_request, text=f"Code {i}:", sampling_params={
                       "regex": r"[0-9]{5}", "max_new_tokens": 8, "temperature": 0}) for i in range(2)]
        futures.append(pool.submit(checked.generate_request, text="Once upon a time", sampling_params=plain))
        outs = [f.result() for f in futures]
    assert all(re.fullmatch(r"[0-9]{5}", o["text"]) for o in outs[:2])
    assert outs[2]["output_ids"] == alone["output_ids"]


def test_compiled_grammar_is_cached(checked):
    pattern = r"[a-z]{3}-cache-test"
    first = checked.grammars.compiled("regex", pattern)
    n = len(checked.grammars)
    out = checked.generate_request(text="x", sampling_params={"regex": pattern, "max_new_tokens": 16})
    assert re.fullmatch(pattern, out["text"])
    assert checked.grammars.compiled("regex", pattern) is first and len(checked.grammars) == n


@pytest.mark.parametrize("vocab", [49152, 49150, 49160])
def test_bitmask_unpacking_matches_xgrammar(vocab):
    """Our CPU unpacking gives exactly xgrammar's ``apply_token_bitmask_inplace`` result."""
    import torch
    import xgrammar as xgr

    from rksc_sgl.grammar import apply_bitmask

    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (49152 // 32,), dtype=torch.int32, generator=gen)
    bitmask[:5] = 0
    bitmask[5:9] = -1
    logits = torch.randn(vocab, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    ours = apply_bitmask(ours, bitmask)
    covered = min(vocab, 49152)
    xgr.apply_token_bitmask_inplace(theirs[None], bitmask[None], vocab_size=covered)
    assert torch.equal(ours[:covered], theirs[:covered])
    assert torch.isneginf(ours[covered:]).all()  # past the bitmask (padded LM head): never sampled


# ---- JSON schema and EBNF -------------------------------------------------------------------
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def _check_person(obj):
    """Validate against PERSON by hand (jsonschema is not installed)."""
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "pet"}, obj
    assert isinstance(obj["name"], str) and 1 <= len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert obj["pet"] in ("cat", "dog", "none")


@pytest.mark.parametrize("as_string", [True, False])
def test_json_schema_output_parses_and_validates(checked, as_string):
    schema = json.dumps(PERSON) if as_string else PERSON
    out = checked.generate_request(text="A person, as JSON:", sampling_params={
        "json_schema": schema, "max_new_tokens": 60, "temperature": 0})
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    _check_person(json.loads(out["text"]))


def test_json_schema_from_frontend_in_forked_branches(checked, use_backend):
    use_backend(checked)

    @sgl.function
    def people(s):
        s += "Three people, as JSON."
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"\nPerson {i + 1}: "
            f += sgl.gen("p", json_schema=json.dumps(PERSON), max_tokens=60, temperature=0.7)
        return [f["p"] for f in forks]

    for text in people.run().ret_value:
        _check_person(json.loads(text))


def test_ebnf(checked):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    out = checked.generate_request(text="Q: Is it raining?", sampling_params={
        "ebnf": grammar, "max_new_tokens": 12, "temperature": 0})
    assert re.fullmatch(r"The answer is (yes|no)\.", out["text"])


# ---- the frontend's dtype ----------------------------------------------------------------------
@sgl.function
def _typed(s):
    s += "Q: How many legs does a spider have?\nA: "
    s += sgl.gen_int("legs", max_tokens=6)
    s += "\nQ: How many wheels does a bicycle have?\nA: "
    s += sgl.gen("wheels", dtype=int, max_tokens=6)
    s += "\nQ: What is pi, roughly?\nA: "
    s += sgl.gen("pi", dtype=float, max_tokens=8)
    s += "\nQ: Is the sky blue?\nA: "
    s += sgl.gen("blue", dtype=bool, max_tokens=4)
    s += "\nQ: Name a colour.\nA: "
    s += sgl.gen_string("colour", max_tokens=10)


def test_dtype_from_frontend(checked, use_backend):
    use_backend(checked)
    state = _typed.run()
    int(state["legs"]), int(state["wheels"])
    float(state["pi"])
    assert state["blue"] in ("True", "False")
    assert re.fullmatch(r"\"[\w\d\s]*\"", state["colour"]), state["colour"]
    # int/float add the stop strings " " and "\n" exactly as SGLang's RuntimeEndpoint.
    assert state.get_meta_info("legs")["finish_reason"]["type"] == "stop"


def test_dtype_matches_sglang_runtime_endpoint():
    """Same regex and stop strings as ``RuntimeEndpoint._handle_dtype_to_regex``."""
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
    from sglang.lang.ir import SglSamplingParams

    from rksc_sgl.grammar import apply_dtype

    for dtype in (int, "int", float, "float", str, "str", bool, "bool"):
        ours, theirs = SglSamplingParams(dtype=dtype), SglSamplingParams(dtype=dtype)
        apply_dtype(ours)
        RuntimeEndpoint._handle_dtype_to_regex(None, theirs)
        assert (ours.regex, list(ours.stop)) == (theirs.regex, list(theirs.stop))
    with pytest.raises(ValueError, match="dtype"):
        apply_dtype(SglSamplingParams(dtype=list))


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"regex": "[0-9"}, r"invalid regex '\[0-9': .*Unclosed '\['"),
    ({"regex": "(ab"}, "invalid regex.*parenthesis"),
    ({"regex": "a{3,1}"}, "invalid regex.*3 > 1"),
    ({"json_schema": "{nope"}, "invalid json_schema.*not valid JSON"),
    ({"json_schema": {"type": "integr"}}, "invalid json_schema.*integr"),
    ({"json_schema": {"type": "integer", "multipleOf": 3}}, "multipleOf"),
    ({"ebnf": "root ::= "}, "invalid ebnf"),
    ({"regex": 5}, "'regex' must be a string"),
    ({"regex": "a", "json_schema": "{}"}, "Only one of"),
    ({"structural_tag": "{}"}, "not supported"),
])
def test_invalid_grammar_raises_and_engine_keeps_serving(checked, params, message):
    with pytest.raises(ValueError, match=message):
        checked.generate_request(text="hi", sampling_params={"max_new_tokens": 4, **params})
    out = checked.generate_request(text="hi", sampling_params={"max_new_tokens": 3, "regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", out["text"])


def test_invalid_regex_in_frontend_program(checked, use_backend):
    use_backend(checked)

    """The frontend checks a regex with Python's ``re`` first; xgrammar rejects more."""

    @sgl.function
    def bad(s):
        s += "Number: " + sgl.gen("n", regex=r"([0-9])\1", max_tokens=4)

    error = bad.run().error()
    assert isinstance(error, ValueError) and re.search("invalid regex.*Backreference is not supported", str(error))
    assert re.fullmatch("[0-9]{2}", _two_digits.run()["n"])


@sgl.function
def _two_digits(s):
    s += "Number: " + sgl.gen("n", regex="[0-9]{2}", max_tokens=4)
