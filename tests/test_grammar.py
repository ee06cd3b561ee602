"""Constrained decoding with xgrammar (regex, JSON schema, EBNF, structural tags, the frontend's
dtype) and stop_regex."""

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

    from rksc_sgl.engine.grammar import apply_bitmask

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

    from rksc_sgl.engine.grammar import apply_dtype

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
    ({"structural_tag": "{}"}, r"invalid structural_tag '\{\}': needs \"format\""),
    ({"structural_tag": "[1]"}, "invalid structural_tag.*must be a JSON object"),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}},
     "invalid structural_tag.*Format type not recognized: nope"),
    ({"structural_tag": {"structures": [{"begin": "<a>", "end": "</a>"}], "triggers": ["<b"]}},
     "invalid structural_tag.*does not match any trigger"),
    ({"structural_tag": {"structures": [{"begin": "<a>", "end": "</a>", "schema": {"type": "integr"}}],
                         "triggers": ["<a"]}}, "invalid structural_tag.*integr"),
    ({"structural_tag": {"structures": [{"begin": "<a>"}], "triggers": ["<a"]}}, r"structures\[0\] has no 'end'"),
    ({"structural_tag": 5}, "'structural_tag' must be a string"),
    ({"structural_tag": '{"format": {"type": "const_string", "value": "x"}}', "json_schema": "{}"}, "Only one of"),
    ({"stop_regex": "[0-9"}, r"invalid stop_regex '\[0-9': unterminated character set"),
    ({"stop_regex": ["ok", "(x"]}, r"invalid stop_regex '\(x': missing \)"),
    ({"stop_regex": ["ok", 3]}, "'stop_regex' has the wrong type"),
    ({"stop_regex": "a" * 300}, "over the 256-byte limit"),
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


# ---- stop_regex ------------------------------------------------------------------------------
STORY = "Once upon a time"
STORY_TOKENS = 24


@pytest.fixture(scope="module")
def story(radix_engine):
    """The unconstrained greedy continuation of STORY: the reference for stop_regex."""
    out = radix_engine.generate_request(text=STORY, sampling_params={
        "max_new_tokens": STORY_TOKENS, "temperature": 0})
    return out["output_ids"]


def _stopped(tokenizer, ids, patterns, no_stop_trim=False):
    """What SGLang's rules give for a greedy run with ``stop_regex=patterns``, from the
    unconstrained run's tokens: it stops after the first token whose text completes a match
    of some pattern (the first such pattern of the list is the one named), keeps that whole
    token, and its detokenizer cuts the text only where the pattern occurs literally."""
    texts = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    k = next(k for k in range(1, len(ids) + 1) if any(re.search(p, texts[k]) for p in patterns))
    pattern = next(p for p in patterns if re.search(p, texts[k]))
    text = texts[k]
    cut = text.find(pattern)
    if cut >= 0:
        text = text[: cut + len(pattern)] if no_stop_trim else text[:cut]
    return ids[:k], text, {"type": "stop", "matched": pattern}


@pytest.mark.parametrize("stop_regex, no_stop_trim", [
    (r"s[a-z]y", False),  # the match ends inside a token: that whole token is kept
    ("y of N", False),  # a literal pattern spanning tokens: cut there, as a stop string
    ("y of N", True),
    ([r"bust\w+", r"N[a-z]va", r"\d+"], False),  # the pattern that matches first wins...
    ([r"o[v]", r"N.v"], False),  # ...and of two completed by the same token, the first listed
])
def test_stop_regex_stops_at_the_first_match(checked, story, stop_regex, no_stop_trim):
    patterns = [stop_regex] if isinstance(stop_regex, str) else stop_regex
    ids, text, reason = _stopped(checked.tokenizer, story, patterns, no_stop_trim)
    assert len(ids) < len(story)  # it does stop early
    out = checked.generate_request(text=STORY, sampling_params={
        "max_new_tokens": STORY_TOKENS, "temperature": 0, "stop_regex": stop_regex, "no_stop_trim": no_stop_trim})
    assert out["output_ids"] == ids
    assert out["text"] == text
    assert out["meta_info"]["finish_reason"] == reason


@pytest.mark.parametrize("stop_regex", ["y of N", r"s[a-z]y"])
def test_stop_regex_streaming_never_passes_the_cut(checked, story, stop_regex):
    params = {"max_new_tokens": STORY_TOKENS, "temperature": 0, "stop_regex": stop_regex}
    whole = checked.generate_request(text=STORY, sampling_params=params)
    chunks = list(checked.generate_request(text=STORY, sampling_params=params, stream=True))
    final = chunks[-1]
    assert final["text"] == whole["text"] == _stopped(checked.tokenizer, story, [stop_regex])[1]
    assert final["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    assert len(chunks) > 2
    for chunk in chunks:
        assert final["text"].startswith(chunk["text"]), (chunk["text"], final["text"])


def test_stop_regex_from_frontend(checked, use_backend, story):
    use_backend(checked)

    @sgl.function
    def tale(s):
        s += STORY + sgl.gen("rest", max_tokens=STORY_TOKENS, temperature=0, stop_regex=r"N[a-z]va")

    state = tale.run()
    _, text, reason = _stopped(checked.tokenizer, story, [r"N[a-z]va"])
    assert state["rest"] == text
    assert state.get_meta_info("rest")["finish_reason"] == reason


# ---- structural_tag ----------------------------------------------------------------------------
TOOL_PROMPT = ('Tools: get_weather(city, days).\n'
               'User: Weather in Paris for 2 days?\n'
               'Assistant: <function=get_weather>{"city": "Paris", "days": 2}</function>\n'
               'User: Weather in Tokyo for 5 days?\nAssistant:')
# Not what the prompt's example shows: only the grammar makes the model write this.
WEATHER_ARGS = {
    "type": "object",
    "properties": {"location": {"type": "string", "minLength": 1, "maxLength": 16},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
LEGACY_TAG = {"structures": [{"begin": "<function=get_weather>", "schema": WEATHER_ARGS, "end": "</function>"}],
              "triggers": ["<function="]}
FORMAT_TAG = {"type": "structural_tag", "format": {
    "type": "triggered_tags", "triggers": ["<function="],
    "tags": [{"type": "tag", "begin": "<function=get_weather>",
              "content": {"type": "json_schema", "json_schema": WEATHER_ARGS}, "end": "</function>"}]}}


@pytest.mark.parametrize("tag", [LEGACY_TAG, json.dumps(LEGACY_TAG), FORMAT_TAG],
                         ids=["legacy-dict", "legacy-json", "format-dict"])
def test_structural_tag_call_follows_its_schema(checked, tag):
    params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": False}
    free = checked.generate_request(text=TOOL_PROMPT, sampling_params=params)
    out = checked.generate_request(text=TOOL_PROMPT, sampling_params={**params, "structural_tag": tag})
    # The model calls the tool by itself (the trigger fires); the grammar shapes the arguments.
    calls = re.findall(r"<function=get_weather>(.*?)</function>", out["text"], re.S)
    assert calls, out["text"]
    for call in calls:
        args = json.loads(call)
        assert set(args) == {"location", "unit"}, args
        assert isinstance(args["location"], str) and 1 <= len(args["location"]) <= 16
        assert args["unit"] in ("celsius", "fahrenheit")
    assert "location" not in free["text"]  # unconstrained, it copies the example's arguments
    # Text outside the tags is free: it is the unconstrained text up to the trigger.
    assert out["text"].split("<function=")[0] == free["text"].split("<function=")[0]


def test_structural_tag_is_compiled_once(checked):
    key = json.dumps(FORMAT_TAG)
    first = checked.grammars.compiled("structural_tag", key)
    n = len(checked.grammars)
    checked.generate_request(text=TOOL_PROMPT, sampling_params={"max_new_tokens": 2, "structural_tag": FORMAT_TAG})
    assert checked.grammars.compiled("structural_tag", key) is first and len(checked.grammars) == n
