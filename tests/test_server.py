"""``rksc-sgl serve``: SGLang's native HTTP API over the embedded engine.

HTTP behaviour (errors, auth, streaming format, flush_cache) goes through starlette's
TestClient; the end-to-end tests start uvicorn on a free loopback port and run unmodified
``@sgl.function`` programs through ``sgl.RuntimeEndpoint``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
import requests
import sglang as sgl
import uvicorn
from starlette.testclient import TestClient

from rksc_sgl.serving.server import create_app

CAP = 64
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def client(radix_engine):
    with TestClient(create_app(radix_engine, max_new_tokens_cap=CAP, max_request_bytes=BODY_LIMIT)) as c:
        yield c


def _greedy(n=8, **extra):
    return {"max_new_tokens": n, "temperature": 0, **extra}


def _events(resp):
    lines = [ln for ln in resp.text.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    return lines


# ---- /generate ------------------------------------------------------------------------------
def test_generate_matches_in_process(client, checked):
    body = {"text": "The capital of France is", "sampling_params": _greedy()}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    direct = checked.generate_request(**body)
    assert out["text"] == direct["text"] and out["output_ids"] == direct["output_ids"]
    assert out["meta_info"]["finish_reason"] == direct["meta_info"]["finish_reason"]
    assert out["meta_info"]["prompt_tokens"] == direct["meta_info"]["prompt_tokens"]


def test_generate_batch_and_input_ids(client, checked):
    texts = ["One, two,", "Red, green,"]
    resp = client.post("/generate", json={"text": texts, "sampling_params": _greedy(4)})
    assert resp.status_code == 200, resp.text
    outs = resp.json()
    assert isinstance(outs, list) and len(outs) == 2
    ids = [checked.encode(t) for t in texts]
    by_ids = client.post("/generate", json={"input_ids": ids, "sampling_params": _greedy(4)}).json()
    assert [o["text"] for o in by_ids] == [o["text"] for o in outs]
    single = client.post("/generate", json={"input_ids": ids[0], "sampling_params": _greedy(4)}).json()
    assert single["text"] == outs[0]["text"]


def test_generate_logprobs(client, checked):
    body = {"text": "Hello there", "sampling_params": _greedy(3), "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    meta = client.post("/generate", json=body).json()["meta_info"]
    direct = checked.generate_request(**body)["meta_info"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert len(meta[key]) == len(direct[key])
        for (lp, tid, txt), (dlp, dtid, dtxt) in zip(meta[key], direct[key]):
            assert tid == dtid and txt == dtxt
            assert (lp is None and dlp is None) or abs(lp - dlp) < 1e-4
    assert len(meta["output_top_logprobs"]) == 3 and len(meta["output_top_logprobs"][0]) == 2


def test_streaming_format(client, checked):
    body = {"text": "Count: 1, 2, 3,", "sampling_params": _greedy(8)}
    full = client.post("/generate", json=body).json()
    resp = client.post("/generate", json={**body, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = _events(resp)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert len(chunks) >= 2
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # the text grows, as SGLang's
    assert texts[-1] == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("body, needle", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"text": "hi", "bogus": 1}).encode(), "bogus"),
    (json.dumps({"text": "hi", "sampling_params": {"temperature": -1}}).encode(), "temperature"),
    (json.dumps({"text": "hi", "sampling_params": {"nope": 1}}).encode(), "nope"),
    (json.dumps({"text": "hi", "sampling_params": {"max_new_tokens": CAP + 1}}).encode(), "cap"),
    (json.dumps({"text": "hi", "sampling_params": {"stop": 5}}).encode(), "stop"),
    (json.dumps({"text": 5}).encode(), "text"),
    (json.dumps({"input_ids": [1, -3]}).encode(), "input_ids"),
    (json.dumps({"text": "hi", "input_ids": [1]}).encode(), "exactly one"),
    (json.dumps({"text": ["a", "b"], "stream": True}).encode(), "single prompt"),
    (json.dumps({"text": "hi", "stream": "yes"}).encode(), "boolean"),
    (json.dumps({"input_ids": [5] * 9000}).encode(), "context length"),
    (json.dumps({"text": "hi", "sampling_params": {"n": 10**6}}).encode(), "prompts x n"),
    (json.dumps({"text": "hi", "extra_key": 3}).encode(), "extra_key"),
])
def test_bad_requests_are_400(client, checked, body, needle):
    resp = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]


def test_generate_n_samples(client, checked):
    """As SGLang: n > 1 on one prompt returns a list of n outputs."""
    resp = client.post("/generate", json={"text": "One, two,", "sampling_params": {**_greedy(3), "n": 2}})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert isinstance(out, list) and len(out) == 2 and out[0]["text"] == out[1]["text"]


def test_generate_sampling_params_per_prompt(client, checked):
    """As SGLang: a batch may give one sampling_params dict per prompt."""
    texts = ["One, two,", "One, two,"]
    resp = client.post("/generate", json={"text": texts, "sampling_params": [_greedy(2), _greedy(5)]})
    assert resp.status_code == 200, resp.text
    assert [o["meta_info"]["completion_tokens"] for o in resp.json()] == [2, 5]
    bad = client.post("/generate", json={"text": texts, "sampling_params": [_greedy(2)]})
    assert bad.status_code == 400 and "one entry per prompt" in bad.json()["error"]["message"]


def test_sampling_seed_is_reproducible(client, checked):
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 8, "temperature": 1.0,
                                                             "sampling_seed": 1234}}
    first, second = (client.post("/generate", json=body).json() for _ in range(2))
    assert first["output_ids"] == second["output_ids"]
    # The same seed twice in one batch: each request has its own generator.
    both = client.post("/generate", json={**body, "text": [body["text"]] * 2}).json()
    assert [o["output_ids"] for o in both] == [first["output_ids"]] * 2


def test_body_size_cap(client, checked):
    resp = client.post("/generate", json={"text": "x" * (BODY_LIMIT + 10)})
    assert resp.status_code == 413


def test_kv_exhausted_is_503(radix_engine):
    # The session engine has 4096 KV slots: 4000 prompt tokens + 200 new can never fit.
    with TestClient(create_app(radix_engine, max_request_bytes=BODY_LIMIT)) as c:
        resp = c.post("/generate", json={"input_ids": [17] * 4000,
                                         "sampling_params": {"max_new_tokens": 200}})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["message"]
        # Streamed too: the first chunk is fetched before the response starts.
        streamed = c.post("/generate", json={"input_ids": [17] * 4000, "stream": True,
                                             "sampling_params": {"max_new_tokens": 200}})
        assert streamed.status_code == 503, streamed.text
    radix_engine.check_integrity()


class _Flaky:
    """The engine, except that one prompt raises an unexpected error."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def handle(self, request):
        if request.text == "boom":
            raise RuntimeError("kaboom")
        return self._engine.handle(request)


def test_an_exception_fails_only_its_request(radix_engine):
    with TestClient(create_app(_Flaky(radix_engine))) as c:
        bad = c.post("/generate", json={"text": "boom"})
        good = c.post("/generate", json={"text": "fine", "sampling_params": _greedy(2)})
    assert bad.status_code == 500 and "kaboom" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["meta_info"]["completion_tokens"] >= 1
    radix_engine.check_integrity()


def test_api_key(radix_engine):
    with TestClient(create_app(radix_engine, api_key="s3cret")) as c:
        body = {"text": "hi", "sampling_params": _greedy(1)}
        assert c.post("/generate", json=body).status_code == 401
        assert c.post("/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/get_model_info").status_code == 401
        ok = c.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200


# ---- info / flush ----------------------------------------------------------------------------
def test_model_info_and_chat_template(client, radix_engine):
    from sglang.lang.chat_template import get_chat_template

    info = client.get("/get_model_info").json()
    assert info["model_path"] == str(radix_engine.model_dir)
    template = get_chat_template(info["chat_template_name"])
    assert template.role_prefix_and_suffix == radix_engine.chat_template.role_prefix_and_suffix
    # SmolLM2's own template adds a default system prompt no SGLang template has.
    assert info["chat_template_exact"] is False
    for path in ("/get_server_info", "/server_info"):
        server = client.get(path)
        assert server.status_code == 200 and server.json()["model_path"] == info["model_path"]
    assert client.get("/health").status_code == 200


def test_flush_cache(client, checked):
    client.post("/generate", json={"text": "A prefix to cache in the tree", "sampling_params": _greedy(2)})
    assert checked.tree_cache.total_size() > 0
    resp = client.post("/flush_cache")
    assert resp.status_code == 200
    assert checked.tree_cache.total_size() == 0


# ---- a real server: RuntimeEndpoint programs --------------------------------------------------
@contextlib.contextmanager
def running_server(app):
    """``app`` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_url(radix_engine):
    with running_server(create_app(radix_engine, max_new_tokens_cap=2048)) as url:
        yield url


@sgl.function
def fork_program(s, question):
    s += sgl.system("You are a terse assistant.")
    s += sgl.user(question)
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += sgl.assistant(f"Idea {i + 1}: " + sgl.gen("idea", max_tokens=10, temperature=0))
    forks.join()
    s += sgl.user("Is the sky blue?")
    s += sgl.assistant(sgl.select("verdict", choices=["Yes", "No"]))


def _endpoint(url):
    info = requests.get(f"{url}/get_model_info", timeout=10).json()
    return sgl.RuntimeEndpoint(url, chat_template_name=info["chat_template_name"])


def test_runtime_endpoint_fork_program_matches_in_process(live_url, radix_engine):
    endpoint = _endpoint(live_url)
    remote = fork_program.run(question="Name a fruit.", backend=endpoint)
    local = fork_program.run(question="Name a fruit.", backend=radix_engine)
    assert remote.error() is None and local.error() is None
    assert remote.text() == local.text()
    assert remote["verdict"] == local["verdict"]
    radix_engine.check_integrity()


def test_runtime_endpoint_streaming(live_url, radix_engine):
    @sgl.function
    def short(s):
        s += "Once upon a time" + sgl.gen("story", max_tokens=12, temperature=0)

    endpoint = _endpoint(live_url)
    state = short.run(backend=endpoint, stream=True)
    pieces = "".join(state.text_iter("story"))
    local = short.run(backend=radix_engine)
    assert pieces == local["story"] and state["story"] == local["story"]
    radix_engine.check_integrity()


def test_disconnect_mid_stream_frees_kv(live_url, radix_engine):
    body = {"text": "Write a very long story.", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}}
    with requests.post(f"{live_url}/generate", json=body, stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(ln for ln in lines if ln)
        assert first.startswith(b"data: {")
    # 2000 tokens take minutes on a CPU; a cancelled request leaves within seconds.
    assert radix_engine.scheduler.wait_idle(timeout=30), "the abandoned stream was not cancelled"
    radix_engine.check_integrity()


def test_concurrent_runtime_endpoint_programs(live_url, radix_engine):
    @sgl.function
    def small(s, i):
        s += f"Question {i}: what comes after {i}?"
        forks = s.fork(2)
        for f in forks:
            f += sgl.gen("a", max_tokens=4, temperature=0)
        forks.join()

    endpoint = _endpoint(live_url)
    results, errors = {}, []

    def worker(i):
        try:
            state = small.run(i=i, backend=endpoint)
            assert state.error() is None
            results[i] = (state.text(), state["a"])  # the join gathers the branches' "a" into a list
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 180 - (time.time() - started)))
    assert not any(t.is_alive() for t in threads), "load test did not finish in time"
    assert not errors, errors
    assert sorted(results) == list(range(8))
    # Greedy: each program, run alone in process afterwards, gives the same branches. Sixteen
    # requests shared the engine's batches; none got another's tokens.
    for i in range(8):
        alone = small.run(i=i, backend=radix_engine)
        assert alone.error() is None
        assert results[i] == (alone.text(), alone["a"]), i
        assert alone.text() == f"Question {i}: what comes after {i}?" and len(alone["a"]) == 2
    assert len({tuple(a) for _, a in results.values()}) > 1  # the programs asked different things
    radix_engine.check_integrity()


def test_serve_command(tmp_path):
    """``rksc-sgl serve`` starts a loopback server that RuntimeEndpoint can talk to."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).with_name("rksc-sgl")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rksc_sgl.cli"]
    proc = subprocess.Popen([*command, "serve", "--model", "smollm2-135m", "--cache", "radix", "--port", str(port),
                             "--kv-pool-tokens", "1024", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "rksc-sgl serve did not come up"
            time.sleep(0.5)
        assert requests.get(f"{url}/get_model_info", timeout=10).status_code == 401
        endpoint = sgl.RuntimeEndpoint(url, api_key="k", chat_template_name="chatml")
        assert endpoint.get_model_name().endswith("smollm2-135m")

        @sgl.function
        def hello(s):
            s += "Hello," + sgl.gen("x", max_tokens=3, temperature=0)

        assert hello.run(backend=endpoint).error() is None
        endpoint.flush_cache()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
