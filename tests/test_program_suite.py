"""A suite of ordinary SGLang frontend programs, written the way SGLang's docs write them.

Few-shot QA, ``select``, multi-turn chat (``sgl.system/user/assistant`` and the ``with
s.user():`` scopes), streaming with logprobs, regex and dtype generation, parallel decoding
(``fork`` + default join), parallel encoding (``join(mode="concate_and_append")``),
``run_batch`` and a program that calls another ``@sgl.function``.

Each program runs first on the embedded engine, with concrete checks of what it produced,
then unchanged through ``sgl.RuntimeEndpoint`` against ``rksc_sgl.serving.server`` on loopback.
Both backends are the same engine (greedy, same model, same cache mode), so text,
variables and chat messages must be identical. The endpoint gets the engine's own chat
template (the one ``chat_template_for`` derives from the tokenizer), so chat programs build
the same prompts in both places, default system prompt included.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from typing import Any, Callable, Dict, List, Optional

import pytest
import requests
import sglang as sgl
from conftest import _leaked_sglang_executors
from sglang.lang.chat_template import chat_template_registry, get_chat_template
from sglang.lang.global_config import global_config
from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR
from test_server import running_server

from rksc_sgl.model.chat import chat_template_for
from rksc_sgl.serving.server import create_app

IPV4 = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
SELECT_CHOICES = ["True", "False", "Unknown"]
BATCH_QUESTIONS = ["What do cows drink?", "What is frozen water called?", "What do you call a baby cat?"]
BOXES = [("red", "Mia"), ("blue", "Omar"), ("green", "Lena")]


# ---- the programs -------------------------------------------------------------------------------
@sgl.function
def one_word_qa(s, question):
    s += "Answer each question with one word.\n\n"
    s += "Q: Which animal says moo?\nA: Cow\n"
    s += "Q: What colour is a clear sky?\nA: Blue\n"
    s += "Q: What do bees make?\nA: Honey\n"
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", max_tokens=8, stop="\n", temperature=0)


@sgl.function
def judge_claim(s, claim):
    s += "Label each claim as True, False or Unknown.\n"
    s += "Claim: Fish can swim.\nLabel: True\n"
    s += "Claim: Snow is usually hot.\nLabel: False\n"
    s += "Claim: " + claim + "\n"
    s += "Label:" + sgl.select("label", choices=SELECT_CHOICES)


@sgl.function
def travel_chat(s, city, follow_up):
    s += sgl.system("You are a travel guide who answers in one short sentence.")
    s += sgl.user(f"What should I see first in {city}?")
    s += sgl.assistant(sgl.gen("first_reply", max_tokens=12, temperature=0))
    with s.user():
        s += follow_up
    with s.assistant():
        s += sgl.gen("second_reply", max_tokens=12, temperature=0)


@sgl.function
def streamed_reply(s, question):
    # No system turn: the template's default system prompt goes first.
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("reply", max_tokens=10, temperature=0, return_logprob=True, top_logprobs_num=2))


@sgl.function
def constrained_facts(s):
    s += 'Q: What is the capital of France?\nA: "Paris"\n'
    s += "Q: What is the capital of Spain?\n"
    s += "A: " + sgl.gen_string("capital", max_tokens=8, temperature=0) + "\n"
    s += "Q: What is the IPv4 address of localhost?\n"
    s += "A: " + sgl.gen("ip", max_tokens=12, regex=IPV4, temperature=0) + "\n"
    s += "Q: How many legs does a spider have?\n"
    s += "A: " + sgl.gen_int("legs", max_tokens=4, temperature=0) + "\n"
    s += "Q: What is the value of pi to four decimals?\n"
    s += "A: " + sgl.gen("pi", dtype=float, max_tokens=6, temperature=0) + "\n"


@sgl.function
def packing_tips(s, trip):
    s += f"Give two short packing tips for {trip}.\n"
    s += "1. Pack sunscreen.\n"
    s += "2." + sgl.gen("tip_2", max_tokens=8, stop=[".", "\n"], temperature=0) + ".\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Tip {i + 1} in one sentence: Always"
        f += sgl.gen("detail", max_tokens=10, stop="\n", temperature=0)
    forks.join()
    s += "Details:\n"
    for i in range(2):
        s += f"Tip {i + 1}: Always" + forks[i]["detail"] + "\n"
    s += "In short," + sgl.gen("summary", max_tokens=8, stop="\n", temperature=0)
    return [forks[i]["detail"] for i in range(2)]


@sgl.function
def box_owner(s, colour, boxes):
    s += "Read the facts, then answer the question.\n"
    forks = s.fork(len(boxes))
    for i, (f, (box, name)) in enumerate(zip(forks, boxes)):
        f += f"Fact {i + 1}: The {box} box belongs to {name}. So the owner of the {box} box is"
        f += sgl.gen("owner", max_tokens=4, stop=[".", "\n"], temperature=0) + ".\n"
    owners = [f["owner"] for f in forks]
    forks.join(mode="concate_and_append")
    s += f"Question: Who owns the {colour} box?\n"
    s += f"Answer: The {colour} box belongs to" + sgl.gen("answer", max_tokens=4, stop=[".", "\n"], temperature=0)
    return owners


@sgl.function
def explain_step(s, step):
    s += f"Step: {step}\nWhy it helps: It" + sgl.gen("why", max_tokens=10, stop="\n", temperature=0)


@sgl.function
def study_plan(s, subject):
    s += f"A plan to learn {subject}.\nFirst step: Learn" + sgl.gen("first_step", max_tokens=8, stop="\n", temperature=0)
    sub = explain_step(step="Learn" + s["first_step"])  # another @sgl.function, run on the default backend
    s += "\nReason: It" + sub["why"] + "\n"
    s += "Second step:" + sgl.gen("second_step", max_tokens=8, stop="\n", temperature=0)
    return {"why": sub["why"], "text": sub.text(), "error": sub.error()}


# ---- running a program and keeping only plain data ----------------------------------------------
@dataclasses.dataclass
class Outcome:
    text: str
    variables: Dict[str, Any]
    messages: List[Dict[str, Any]]
    ret: Any = None
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)
    pieces: Optional[List[str]] = None  # streamed chunks of the streamed variable


def _outcome(state, meta_of=(), pieces=None) -> Outcome:
    """What ``state`` produced, as plain data; the state's executor is ended either way."""
    try:
        assert state.error() is None, state.error()
        return Outcome(
            text=state.text(),
            variables=copy.deepcopy(dict(state.stream_executor.variables)),
            messages=copy.deepcopy(state.messages()),
            ret=copy.deepcopy(getattr(state, "ret_value", None)),
            meta={name: copy.deepcopy(state.get_meta_info(name)) for name in meta_of},
            pieces=pieces,
        )
    finally:
        state.stream_executor.end()


def run_few_shot():
    return _outcome(one_word_qa.run(question="What falls from clouds when it rains?"), meta_of=["answer"])


def run_select():
    return _outcome(judge_claim.run(claim="Birds have feathers."), meta_of=["label"])


def run_chat():
    return _outcome(travel_chat.run(city="Rome", follow_up="Which food should I try there?"))


def run_stream():
    state = streamed_reply.run(question="Name a fruit that is yellow.", stream=True)
    try:
        pieces = list(state.text_iter("reply"))
        whole = "".join(state.text_iter())  # ends when the program has finished
        assert whole == state.text()
    except BaseException:
        state.stream_executor.end()
        raise
    return _outcome(state, meta_of=["reply"], pieces=pieces)


def run_constrained():
    return _outcome(constrained_facts.run(), meta_of=["ip", "legs", "pi", "capital"])


def run_parallel_decoding():
    return _outcome(packing_tips.run(trip="a beach holiday"))


def run_parallel_encoding():
    return _outcome(box_owner.run(colour="blue", boxes=BOXES))


def run_nested():
    return _outcome(study_plan.run(subject="chess"))


def run_batch():
    states = one_word_qa.run_batch([{"question": q} for q in BATCH_QUESTIONS], progress_bar=False)
    try:
        return [_outcome(state) for state in states]
    finally:
        for state in states:  # also when one of them failed
            state.stream_executor.end()


RUNNERS: Dict[str, Callable[[], Any]] = {
    "few_shot": run_few_shot,
    "select": run_select,
    "chat": run_chat,
    "stream": run_stream,
    "constrained": run_constrained,
    "parallel_decoding": run_parallel_decoding,
    "parallel_encoding": run_parallel_encoding,
    "nested": run_nested,
    "run_batch": run_batch,
}

_EMBEDDED: Dict[str, Any] = {}  # case -> what the embedded engine gave (plain data only)


def _embedded(name, engine, use_backend):
    if name not in _EMBEDDED:
        use_backend(engine)
        _EMBEDDED[name] = RUNNERS[name]()
    return _EMBEDDED[name]


@pytest.fixture(autouse=True)
def _no_executor_left_running():
    """Every program this module runs ends its StreamExecutors (forks and nested programs too)."""
    before = {id(e) for e in _leaked_sglang_executors()}
    yield
    deadline = time.time() + 10
    while True:  # an ended executor's worker thread exits asynchronously
        new = [e for e in _leaked_sglang_executors() if id(e) not in before]
        if not new or time.time() > deadline:
            break
        time.sleep(0.05)
    assert not new, f"{len(new)} SGLang StreamExecutor(s) left running"


def _render(engine, messages, generation_prompt):
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


# ---- on the embedded engine ---------------------------------------------------------------------
def test_few_shot_qa(checked, use_backend):
    out = _embedded("few_shot", checked, use_backend)
    answer = out.variables["answer"]
    assert answer.strip() and "\n" not in answer
    assert out.text.endswith("Q: What falls from clouds when it rains?\nA:" + answer)
    assert out.meta["answer"]["finish_reason"]["type"] in ("stop", "length")
    assert out.meta["answer"]["completion_tokens"] <= 8
    assert out.messages == []
    checked.check_integrity()


def test_select(checked, use_backend):
    out = _embedded("select", checked, use_backend)
    assert out.variables["label"] in SELECT_CHOICES
    assert out.text.endswith("Claim: Birds have feathers.\nLabel:" + out.variables["label"])
    scores = out.meta["label"]["normalized_prompt_logprobs"]
    assert len(scores) == len(SELECT_CHOICES)
    assert SELECT_CHOICES[max(range(len(scores)), key=scores.__getitem__)] == out.variables["label"]
    checked.check_integrity()


def test_multi_turn_chat_uses_the_model_template(checked, use_backend):
    out = _embedded("chat", checked, use_backend)
    first, second = out.variables["first_reply"], out.variables["second_reply"]
    assert [m["role"] for m in out.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in out.messages] == [
        "You are a travel guide who answers in one short sentence.",
        "What should I see first in Rome?",
        first.lstrip(),
        "Which food should I try there?",
        second.lstrip(),
    ]
    # The prompt of the last assistant turn is the tokenizer's own rendering of the history.
    history = _render(checked, out.messages[:-1], True)
    assert out.text.startswith(history)
    assert out.text.endswith(second + checked.chat_template.role_prefix_and_suffix["assistant"][1])
    checked.check_integrity()


def test_streaming_with_logprobs(checked, use_backend):
    out = _embedded("stream", checked, use_backend)
    reply = out.variables["reply"]
    assert "".join(out.pieces) == reply and reply
    assert len(out.pieces) >= 2, out.pieces  # really streamed, not one final chunk
    # No system turn in the program: the model's default system prompt is inserted, as the
    # tokenizer's template does it.
    assert [m["role"] for m in out.messages] == ["system", "user", "assistant"]
    assert out.messages[1]["content"] == "Name a fruit that is yellow."
    assert out.messages[2]["content"] == reply.lstrip()
    prompt = _render(checked, [out.messages[1]], True)
    assert prompt == _render(checked, out.messages[:2], True)
    assert out.text.startswith(prompt + reply)

    meta = out.meta["reply"]
    for key in ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs",
                "prompt_tokens", "completion_tokens", "finish_reason"):
        assert key in meta, key
    n = meta["completion_tokens"]
    assert 1 <= n <= 10
    assert meta["prompt_tokens"] == len(checked.encode(prompt))
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert meta["input_token_logprobs"] == []  # SGLang's default logprob_start_len: outputs only
    assert len(meta["output_token_logprobs"]) == n and len(meta["output_top_logprobs"]) == n
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    for (lp, tid, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert lp <= 0 and top[0][1] == tid and top[0][0] == pytest.approx(lp, abs=1e-5)  # greedy
        assert top[0][0] >= top[1][0]
    ids = [tid for _, tid, _ in meta["output_token_logprobs"]]
    if meta["finish_reason"]["type"] == "stop":
        ids = ids[:-1]  # the EOS token is not in the text
    assert checked.tokenizer.decode(ids, skip_special_tokens=True) == reply
    checked.check_integrity()


def test_regex_and_dtype_generation(checked, use_backend):
    out = _embedded("constrained", checked, use_backend)
    v = out.variables
    assert re.fullmatch(IPV4, v["ip"]), v["ip"]
    # gen_int / dtype=float: SGLang's regexes, with " " and "\n" as stop strings (trimmed).
    assert re.fullmatch(REGEX_INT, v["legs"]) and re.fullmatch(r"[-+]?[0-9]+", v["legs"]), v["legs"]
    int(v["legs"])
    assert re.fullmatch(REGEX_FLOAT, v["pi"]), v["pi"]
    float(v["pi"])
    assert re.fullmatch(REGEX_STR, v["capital"]) and v["capital"] != '""', v["capital"]
    for name in ("ip", "legs", "pi", "capital"):
        assert out.meta[name]["completion_tokens"] <= 12
    assert f"A: {v['capital']}\n" in out.text and f"A: {v['ip']}\n" in out.text
    assert out.text.endswith(f"A: {v['pi']}\n")
    checked.check_integrity()


def test_parallel_decoding_default_join(checked, use_backend):
    out = _embedded("parallel_decoding", checked, use_backend)
    details = out.variables["detail"]
    assert isinstance(details, list) and len(details) == 2  # gather_variable: one per branch
    assert details == out.ret
    assert all(d.strip() and "\n" not in d for d in details), details
    body = out.text
    first = body.index("Details:\nTip 1: Always" + details[0] + "\n")
    assert body.index("Tip 2: Always" + details[1] + "\n", first) > first
    assert body.endswith("In short," + out.variables["summary"])
    assert f"1. Pack sunscreen.\n2.{out.variables['tip_2']}.\n" in body
    checked.check_integrity()


def _joined_part(out: Outcome) -> str:
    return out.text[: out.text.index("Question: ")]


def test_parallel_encoding_concate_and_append(checked, use_backend):
    out = _embedded("parallel_encoding", checked, use_backend)
    owners = out.ret
    assert len(owners) == len(BOXES) and all(o.strip() for o in owners), owners
    branches = "".join(f"Fact {i + 1}: The {box} box belongs to {name}. So the owner of the {box} box is{owners[i]}.\n"
                       for i, (box, name) in enumerate(BOXES))
    # The joined text is the prefix followed by every branch's text, in branch order.
    assert _joined_part(out) == "Read the facts, then answer the question.\n" + branches
    assert out.text.endswith("Question: Who owns the blue box?\nAnswer: The blue box belongs to" + out.variables["answer"])
    assert "owner" not in out.variables  # concate_and_append joins text, not variables
    checked.check_integrity()


def test_nested_function_call(checked, use_backend):
    out = _embedded("nested", checked, use_backend)
    step, sub = out.variables["first_step"], out.ret
    assert sub["error"] is None
    assert step.strip() and sub["why"].strip()
    assert sub["text"] == f"Step: Learn{step}\nWhy it helps: It{sub['why']}"
    assert f"First step: Learn{step}\nReason: It{sub['why']}\nSecond step:" in out.text
    checked.check_integrity()


def test_run_batch(checked, use_backend):
    batched = _embedded("run_batch", checked, use_backend)
    use_backend(checked)
    one_by_one = [_outcome(one_word_qa.run(question=q)) for q in BATCH_QUESTIONS]
    assert [o.text for o in batched] == [o.text for o in one_by_one]
    for out, q in zip(batched, BATCH_QUESTIONS):
        assert out.text.endswith(f"Q: {q}\nA:" + out.variables["answer"])
    checked.check_integrity()


# ---- the same programs through RuntimeEndpoint over rksc_sgl.serving.server ------------------------------
@pytest.fixture(scope="module")
def endpoint(radix_engine):
    """A RuntimeEndpoint on a loopback server over the engine, with the engine's chat template."""
    with running_server(create_app(radix_engine)) as url:
        info = requests.get(f"{url}/get_model_info", timeout=10).json()
        # The name the server reports has the engine's role markers (not its default system prompt).
        reported = get_chat_template(info["chat_template_name"])
        assert reported.role_prefix_and_suffix == radix_engine.chat_template.role_prefix_and_suffix
        template = chat_template_for(radix_engine.tokenizer, radix_engine.config.model)
        assert template == radix_engine.chat_template
        name = f"rksc-test-{id(template)}"
        chat_template_registry[name] = template  # only while the endpoint looks it up
        try:
            backend = sgl.RuntimeEndpoint(url, chat_template_name=name)
        finally:
            del chat_template_registry[name]
        assert backend.get_chat_template() == radix_engine.chat_template
        # patches/0002: the endpoint joins concate_and_append by text, not through the server.
        assert backend.support_concate_and_append is False
        yield backend


COMPARED_META = ("prompt_tokens", "completion_tokens", "finish_reason", "input_token_logprobs",
                 "output_token_logprobs", "output_top_logprobs", "normalized_prompt_logprobs")


def _plain(x):
    """JSON's view of a value (the engine's tuples are the server's lists)."""
    return json.loads(json.dumps(x))


def _assert_close(remote, local, where):
    if isinstance(local, float):
        assert remote == pytest.approx(local, abs=1e-4), where
    elif isinstance(local, list):
        assert isinstance(remote, list) and len(remote) == len(local), where
        for i, (r, l) in enumerate(zip(remote, local)):
            _assert_close(r, l, f"{where}[{i}]")
    elif isinstance(local, dict):
        assert isinstance(remote, dict) and remote.keys() == local.keys(), where
        for k in local:
            _assert_close(remote[k], local[k], f"{where}.{k}")
    else:
        assert remote == local, where


def _assert_same_meta(remote: dict, local: dict):
    """Token ids, texts and counts equal; log-probabilities equal to 1e-4."""
    for key in COMPARED_META:
        if key in local:
            _assert_close(_plain(remote[key]), _plain(local[key]), key)


def _assert_same(remote: Outcome, local: Outcome):
    assert remote.text == local.text
    assert remote.variables == local.variables
    assert remote.messages == local.messages
    assert remote.ret == local.ret
    assert remote.pieces is None or "".join(remote.pieces) == "".join(local.pieces)
    for name in local.meta:
        _assert_same_meta(remote.meta[name], local.meta[name])


@pytest.mark.parametrize("name", [n for n in RUNNERS if n != "parallel_encoding"])
def test_runtime_endpoint_gives_the_same(name, endpoint, checked, use_backend):
    local = _embedded(name, checked, use_backend)
    use_backend(endpoint)  # the nested program runs its callee on the default backend
    remote = RUNNERS[name]()
    if isinstance(local, list):
        assert len(remote) == len(local)
        for r, l in zip(remote, local):
            _assert_same(r, l)
    else:
        _assert_same(remote, local)
    assert checked.scheduler.wait_idle(timeout=10)
    checked.check_integrity()


def test_runtime_endpoint_parallel_encoding(endpoint, checked, use_backend, monkeypatch):
    local = _embedded("parallel_encoding", checked, use_backend)
    use_backend(endpoint)
    remote = run_parallel_encoding()
    # The branches and the text up to the join must be identical.
    assert remote.ret == local.ret
    assert _joined_part(remote) == _joined_part(local)
    assert remote.messages == local.messages
    # After the join, RuntimeEndpoint always joins by text (patches/0002), while the embedded
    # engine concatenates the branches' KV (SGLang's parallel encoding: each branch's KV was
    # computed without the other branches before it), which legitimately changes what the model
    # generates after the join. So the post-join generation is compared with the same program on
    # the engine with parallel encoding off: then SGLang's interpreter joins by text there too.
    assert global_config.enable_parallel_encoding and checked.support_concate_and_append  # local joined KV
    monkeypatch.setattr(global_config, "enable_parallel_encoding", False)
    use_backend(checked)
    by_text = run_parallel_encoding()
    assert by_text.ret == local.ret and _joined_part(by_text) == _joined_part(local)
    assert remote.text == by_text.text
    assert remote.variables == by_text.variables
    assert checked.scheduler.wait_idle(timeout=10)
    checked.check_integrity()
