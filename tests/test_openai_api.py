"""``rksc-sgl serve``'s OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions,
/v1/models.

They run on the same engine path as the native /generate, so greedy outputs must equal the
engine's own ``generate_request`` on the same prompt (for chat: on the prompt the engine's chat
template renders). HTTP behaviour goes through starlette's TestClient; the official ``openai``
client and the disconnect test use a real uvicorn server on loopback.
"""

from __future__ import annotations

import json

import pytest
import requests
import torch
from starlette.testclient import TestClient
from test_server import running_server

from rksc_sgl.serving.checks import OPENAI_MAX_N
from rksc_sgl.serving.served import render_chat
from rksc_sgl.serving.server import create_app

CAP = 64
BODY_LIMIT = 256 * 1024
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def client(radix_engine):
    with TestClient(create_app(radix_engine, max_new_tokens_cap=CAP, max_request_bytes=BODY_LIMIT)) as c:
        yield c


def _greedy(n=8):
    return {"max_new_tokens": n, "temperature": 0}


def _post(client, path, body):
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _sse(resp):
    """The JSON events of an SSE response, checking it ends with [DONE]."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in resp.text.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


# ---- /v1/models -------------------------------------------------------------------------------
def test_models(client, radix_engine):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [radix_engine.get_model_name()]
    assert client.get(f"/v1/models/{radix_engine.get_model_name()}").json()["object"] == "model"
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and "gpt-4" in missing.json()["error"]["message"]


# ---- /v1/completions ----------------------------------------------------------------------------
def test_completion_greedy_matches_engine(client, checked):
    out = _post(client, "/v1/completions", {"model": checked.get_model_name(), "prompt": PROMPT,
                                            "max_tokens": 8, "temperature": 0})
    direct = checked.generate_request(text=PROMPT, sampling_params=_greedy(8))
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == checked.get_model_name()
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["text"] == direct["text"]
    assert choice["finish_reason"] == direct["meta_info"]["finish_reason"]["type"] == "length"
    assert choice["logprobs"] is None
    meta = direct["meta_info"]
    assert out["usage"] == {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
                            "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]}


def test_completion_prompt_forms(client, checked):
    texts = ["One, two,", "Red, green,"]
    direct = [o["text"] for o in checked.generate_request(text=texts, sampling_params=_greedy(4))]
    ids = [checked.encode(t) for t in texts]
    for prompt in (texts, ids):
        out = _post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert [c["text"] for c in out["choices"]] == direct
        assert [c["index"] for c in out["choices"]] == [0, 1]
    single = _post(client, "/v1/completions", {"prompt": ids[0], "max_tokens": 4, "temperature": 0})
    assert single["choices"][0]["text"] == direct[0]


def test_completion_stop_and_defaults(client, checked):
    full = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    text = full["choices"][0]["text"]
    stop = text.strip()[:2]
    out = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": [stop]})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[: text.index(stop)]
    # OpenAI's default max_tokens for completions is 16.
    default = _post(client, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "ignore_eos": True})
    assert default["usage"]["completion_tokens"] == 16


def test_completion_n_and_seed(client, checked):
    greedy = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2})
    assert [c["index"] for c in greedy["choices"]] == [0, 1]
    assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]
    assert greedy["usage"]["prompt_tokens"] == len(checked.encode(PROMPT))  # the prompt counts once
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 7}
    first, second = _post(client, "/v1/completions", body), _post(client, "/v1/completions", body)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]
    # Choice j samples with seed + j: the same as a one-choice request with that seed.
    alone = _post(client, "/v1/completions", {**body, "n": 1, "seed": 8})
    assert alone["choices"][0]["text"] == first["choices"][1]["text"]


def test_completion_logprobs(client, checked):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    out = _post(client, "/v1/completions", body)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
    direct = checked.generate_request(text=PROMPT, sampling_params=_greedy(5), return_logprob=True,
                                      top_logprobs_num=2, return_text_in_logprobs=True)["meta_info"]
    for got, (want, _, _) in zip(lp["token_logprobs"], direct["output_token_logprobs"]):
        assert abs(got - want) < 1e-4
    for token, token_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 2 <= len(top) <= 3 and top[token] == token_lp  # greedy: the sampled token is the best
        assert max(top.values()) == token_lp

    # echo: the prompt's tokens come first; the first has no logprob.
    echo = _post(client, "/v1/completions", {**body, "echo": True, "max_tokens": 0})
    choice = echo["choices"][0]
    assert choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == PROMPT and len(lp["tokens"]) == echo["usage"]["prompt_tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    with_new = _post(client, "/v1/completions", {**body, "echo": True})["choices"][0]
    assert with_new["text"] == PROMPT + out["choices"][0]["text"]
    assert with_new["logprobs"]["tokens"] == lp["tokens"] + out["choices"][0]["logprobs"]["tokens"]
    assert with_new["logprobs"]["text_offset"][len(lp["tokens"])] == len(PROMPT)
    streamed = _sse(client.post("/v1/completions", json={**body, "echo": True, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in streamed) == with_new["text"]
    assert [t for e in streamed for t in e["choices"][0]["logprobs"]["tokens"]] == with_new["logprobs"]["tokens"]


def test_stop_token_is_left_out_of_logprobs(client, checked):
    direct = checked.generate_request(text=PROMPT, sampling_params=_greedy(6))
    ids = direct["output_ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token that first comes k-th
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1, "stop_token_ids": [ids[k]]}
    out = _post(client, "/v1/completions", body)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == k + 1
    assert len(choice["logprobs"]["tokens"]) == k and "".join(choice["logprobs"]["tokens"]) == choice["text"]
    streamed = _sse(client.post("/v1/completions", json={**body, "stream": True}))
    tokens = [t for e in streamed for c in e["choices"] for t in c["logprobs"]["tokens"]]
    assert tokens == choice["logprobs"]["tokens"]


def test_completion_stream(client, checked):
    body = {"prompt": ["Count: 1, 2, 3,", "Red, green,"], "max_tokens": 8, "temperature": 0, "n": 2,
            "logprobs": 1}
    full = _post(client, "/v1/completions", body)
    events = _sse(client.post("/v1/completions", json={**body, "stream": True}))
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    texts, tokens, finish = {}, {}, {}
    for event in events:
        [choice] = event["choices"]
        i = choice["index"]
        assert i not in finish, "a chunk after the choice finished"
        texts[i] = texts.get(i, "") + choice["text"]
        tokens[i] = tokens.get(i, []) + choice["logprobs"]["tokens"]
        if choice["finish_reason"] is not None:
            finish[i] = choice["finish_reason"]
    assert sorted(texts) == [0, 1, 2, 3]
    for choice in full["choices"]:
        i = choice["index"]
        assert texts[i] == choice["text"] and finish[i] == choice["finish_reason"]
        assert tokens[i] == choice["logprobs"]["tokens"]


# ---- /v1/chat/completions -----------------------------------------------------------------------
def test_chat_template_rendering(radix_engine):
    """The prompt is the model's own template with the generation prompt, the same text
    ``sgl.system``/``sgl.user``/``sgl.assistant`` programs build."""
    tokenizer = radix_engine.tokenizer
    for messages in (CHAT, CHAT[1:], CHAT + [{"role": "assistant", "content": "Apple."},
                                             {"role": "user", "content": "Another?"}]):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(radix_engine.chat_template, messages) == want


def test_chat_greedy_matches_engine(client, checked):
    out = _post(client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 10, "temperature": 0})
    prompt = render_chat(checked.chat_template, CHAT)
    direct = checked.generate_request(text=prompt, sampling_params=_greedy(10))
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": direct["text"]}
    assert choice["finish_reason"] == direct["meta_info"]["finish_reason"]["type"]
    assert out["usage"]["prompt_tokens"] == direct["meta_info"]["prompt_tokens"]
    # Text parts are joined; max_completion_tokens is max_tokens' newer name.
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
    again = _post(client, "/v1/chat/completions", {"messages": parts, "max_completion_tokens": 10,
                                                   "temperature": 0})
    assert again["choices"][0]["message"]["content"] == direct["text"]


def test_chat_n_logprobs_and_stream(client, checked):
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2}
    full = _post(client, "/v1/chat/completions", body)
    assert [c["index"] for c in full["choices"]] == [0, 1]
    for choice in full["choices"]:
        content = choice["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == choice["message"]["content"]
        for item in content:
            assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
            assert item["bytes"] == list(item["token"].encode())
            assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["logprob"] == item["logprob"]

    events = _sse(client.post("/v1/chat/completions",
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    content, logprobs, seen = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for event in events[:-1]:
        assert event["usage"] is None
        [choice] = event["choices"]
        i = choice["index"]
        seen[i].append(choice)
        content[i] += choice["delta"].get("content", "")
        if choice["logprobs"]:
            logprobs[i] += choice["logprobs"]["content"]
    for choice in full["choices"]:
        chunks = seen[choice["index"]]
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}  # role first
        assert all(c["finish_reason"] is None for c in chunks[:-1])
        assert chunks[-1]["finish_reason"] == choice["finish_reason"]  # finish reason last
        assert content[choice["index"]] == choice["message"]["content"]
        assert [t["token"] for t in logprobs[choice["index"]]] == [t["token"] for t in choice["logprobs"]["content"]]


# ---- fields we accept, errors -------------------------------------------------------------------
def test_harmless_openai_fields_are_accepted(client, checked):
    body = {"messages": CHAT, "max_tokens": 2, "temperature": 0, "user": "u-1", "presence_penalty": 0,
            "frequency_penalty": 0, "stream_options": None, "store": False, "metadata": {"a": "b"},
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
            "seed": None, "top_p": 1.0}
    _post(client, "/v1/chat/completions", body)
    _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "user": "u-1", "best_of": 1,
                                      "suffix": None, "echo": False})


def test_logit_bias_and_top_k_change_what_is_sampled(client, checked):
    """``logit_bias`` and ``top_k`` reach the sampler: checked against the model's own
    next-token logits after the prompt (the HF model, not the engine)."""
    tok = checked.tokenizer
    ids = checked.encode(PROMPT)
    with torch.no_grad():
        logits = checked.hf_model(input_ids=torch.tensor([ids])).logits[0, -1]
    first, runner_up = torch.topk(logits, 2).indices.tolist()
    greedy = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert tok.decode([first]) == greedy["choices"][0]["text"][: len(tok.decode([first]))]
    # +100 on a token the model would not pick: greedy decoding emits it at every step.
    [banana] = tok.encode(" banana", add_special_tokens=False)
    assert banana not in (first, runner_up)
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})):
        out = _post(client, path, {**body, "max_tokens": 3, "temperature": 0, "logit_bias": {str(banana): 100}})
        choice = out["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert text == tok.decode([banana] * 3), path
    # -100 on the greedy token: the runner-up comes out instead.
    out = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                            "logit_bias": {str(first): -100}})
    assert out["choices"][0]["text"] == tok.decode([runner_up])
    # top_k=1 is greedy at any temperature; top_k=2 samples only the two most likely tokens.
    for seed in (1, 2, 3):
        hot = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.5, "top_k": 1,
                                                "seed": seed})
        assert hot["choices"][0]["text"] == greedy["choices"][0]["text"]
    drawn = set()
    for seed in range(6):
        two = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 2.0, "top_k": 2,
                                                "seed": seed})
        drawn.add(two["choices"][0]["text"])
    assert drawn <= {tok.decode([first]), tok.decode([runner_up])}, drawn


_LONG = "hi " * 9000  # over the 8192-token context, under the body cap
_MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", b"{not json", 400, "malformed JSON"),
    ("/v1/chat/completions", b"{not json", 400, "malformed JSON"),
    ("/v1/completions", b"[1]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("/v1/chat/completions", {"messages": _MSG, "frequency_penality": 0}, 400, "frequency_penality"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": _MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": CAP + 1}, 400, "cap"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "'n'"),
    ("/v1/completions", {"prompt": "hi", "n": OPENAI_MAX_N + 1}, 400, "'n'"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": [5] * 9000}, 400, "context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, 400, "context length"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 2, "stream": True}, 400, "at most"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"bogus": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "gpt-4"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, "image"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "extra"),
    ("/v1/chat/completions", {"messages": _MSG, "top_logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": _MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": _MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": _MSG, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": _MSG, "presence_penalty": 3}, 400, "presence_penalty"),
])
def test_bad_requests(client, checked, path, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = client.post(path, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"]


def test_guard_and_kv_exhaustion(radix_engine):
    with TestClient(create_app(radix_engine, api_key="s3cret", max_request_bytes=BODY_LIMIT)) as c:
        body = {"prompt": "hi", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.get("/v1/models").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=body, headers=auth).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x" * (BODY_LIMIT + 10)}, headers=auth).status_code == 413
        # 4000 prompt tokens + 200 new never fit the session engine's 4096 KV slots.
        huge = {"prompt": [17] * 4000, "max_tokens": 200}
        for stream in (False, True):
            resp = c.post("/v1/completions", json={**huge, "stream": stream}, headers=auth)
            assert resp.status_code == 503, resp.text
            assert "KV" in resp.json()["error"]["message"]
    radix_engine.check_integrity()


# ---- a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_url(radix_engine):
    with running_server(create_app(radix_engine, max_new_tokens_cap=2048)) as url:
        yield url


def test_disconnect_mid_stream_frees_kv(live_url, radix_engine):
    body = {"messages": CHAT, "stream": True, "n": 2, "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    with requests.post(f"{live_url}/v1/chat/completions", json=body, stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        first = next(ln for ln in resp.iter_lines() if ln)
        assert first.startswith(b"data: {")
    # 2 x 2000 tokens take minutes on a CPU; cancelled requests leave within seconds.
    assert radix_engine.scheduler.wait_idle(timeout=30), "the abandoned streams were not cancelled"
    radix_engine.check_integrity()


def test_official_openai_client(live_url, radix_engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert model == radix_engine.get_model_name()

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    direct = radix_engine.generate_request(text=PROMPT, sampling_params=_greedy(6))
    assert completion.choices[0].text == direct["text"]
    assert len(completion.choices[0].logprobs.tokens) == 6

    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, n=2)
    chat_direct = radix_engine.generate_request(text=render_chat(radix_engine.chat_template, CHAT),
                                                sampling_params=_greedy(8))
    expected = chat_direct["text"]
    assert [c.message.content for c in chat.choices] == [expected, expected]
    assert chat.usage.completion_tokens == 2 * chat_direct["meta_info"]["completion_tokens"]

    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected

    with pytest.raises(openai.BadRequestError, match="image"):
        client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    radix_engine.check_integrity()
