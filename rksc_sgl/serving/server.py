"""SGLang's native HTTP API, and OpenAI-compatible endpoints, over the embedded engine:
``rksc-sgl serve``.

An unmodified ``sgl.RuntimeEndpoint("http://127.0.0.1:30000")`` program runs against
this server. It speaks the subset of SGLang's native API that the frontend uses:

- ``POST /generate``: text or input_ids, single or batch, ``sampling_params`` (one dict, or
  one per prompt of a batch), logprobs, and streaming as SGLang streams (``data: {json}\\n\\n``
  per chunk, growing ``text``, then ``data: [DONE]\\n\\n``). Streaming is for a single prompt only.
- ``GET /health``, ``GET /get_model_info``, ``GET /get_server_info`` and ``/server_info``,
  ``POST /flush_cache``.

and OpenAI's API for clients such as the ``openai`` package:

- ``POST /v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids or
  a list of such lists), ``max_tokens`` (default 16, as OpenAI), ``temperature``, ``top_p``,
  ``stop``, ``n``, ``seed``, ``echo``, ``logprobs`` (top-k count), ``stream``.
- ``POST /v1/chat/completions``: ``messages`` (system/developer, user and assistant turns; text
  content or text parts) rendered with the engine's chat template (the one ``sgl.system``/
  ``sgl.user``/``sgl.assistant`` programs get) plus the assistant prefix; ``max_completion_tokens``
  or ``max_tokens`` (default 128), ``logprobs`` + ``top_logprobs``, and the fields above.
- ``GET /v1/models`` and ``GET /v1/models/{id}``.

Both add SGLang's sampling extensions ``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``, and honour
``presence_penalty``, ``frequency_penalty`` and ``logit_bias``. ``seed`` seeds each choice's own
generator (choice j of a prompt uses ``seed + j``). ``stream_options.include_usage`` adds the
usage chunk. Fields accepted and ignored: ``user``, ``metadata``, ``service_tier``,
``parallel_tool_calls``; and, with their neutral value only: ``store`` (false), ``suffix``
(empty), ``best_of`` (1), ``tools``/``functions`` (empty), ``tool_choice``/``function_call``
("none"), ``response_format`` (``{"type": "text"}``), ``modalities`` (``["text"]``). A field
that is ``null`` counts as not given. Any other field is a 400 naming it, as on ``/generate``
(a message's ``name`` is accepted and ignored).
``model`` may be left out; if given it must be the served name (or the model folder), else 404.

Every endpoint builds SGLang ``/generate`` requests and sends them through the same checks and
the same ``Engine.generate_request`` (and scheduler) that in-process programs use; only the
I/O differs. An OpenAI request with ``n`` choices (or several prompts) is one engine batch, or
one engine stream per choice when streaming. Blocking engine calls run in starlette's
threadpool. A stream's first chunk is fetched before the response starts, so a request that
can never fit in the KV pool gets its 503 rather than a 200 with an error inside. A client
that disconnects mid-stream has its engine streams closed, which cancels the requests and
frees their KV.

Errors use SGLang's shape ``{"error": {"message": ..., "type": ..., "code": status}}`` (also
what OpenAI clients read): malformed JSON, unknown fields, bad sampling values, over-long
prompts (the engine's ``ValueError``), image content -> 400; ``max_new_tokens``/``max_tokens``
above the server's cap -> 400; an unknown ``model`` -> 404; a body over the size cap -> 413;
a missing/wrong API key -> 401; ``KVCacheExhausted`` -> 503; anything else -> 500 for that
request only. An error after a stream has started comes as one ``data: {"error": ...}`` event
before ``data: [DONE]``.

Chat templates: ``RuntimeEndpoint`` picks its chat template on the client from
``model_path`` (``get_chat_template_by_model_path``) unless it is given
``chat_template_name``. ``/get_model_info`` returns the engine's real ``model_path`` (as
SGLang does) and ``chat_template_name``: the SGLang template whose role prefixes and
suffixes equal the engine's own (derived from the tokenizer), with ``chat_template_exact``
telling whether its default system prompt is the same too. Pass that name to
``RuntimeEndpoint(url, chat_template_name=...)`` for chat programs.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .checks import (CHAT_FIELDS, COMPLETION_FIELDS, GENERATE_FIELDS, OPENAI_COMPLETION_DEFAULT_TOKENS,
                     OPENAI_IGNORED_FIELDS, OPENAI_MAX_N, OPENAI_MAX_STREAM_CHOICES, OPENAI_MAX_TOP_LOGPROBS,
                     _NEUTRAL_FIELDS, _OPENAI_SAMPLING, _bool_field, _chat_messages, _check_fields, _check_logit_bias,
                     _completion_prompts, _is_int, _wrap_seed)
from .errors import HTTPError, _error, _exception_response, _json
from .openai import _Choice, _Job
from .streaming import _ClosableStream, _stream_response

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NEW_TOKENS_CAP = 4096
DEFAULT_MAX_BATCH = 256
DEFAULT_NEW_TOKENS = 128  # the engine's default when a request does not say


def matching_chat_template(engine) -> Dict[str, Any]:
    """The SGLang chat template name whose role pieces equal the engine's template."""
    from sglang.lang.chat_template import chat_template_registry

    mine = engine.chat_template
    roles = mine.role_prefix_and_suffix
    candidates = [(name, t) for name, t in chat_template_registry.items()
                  if t.role_prefix_and_suffix == roles]
    exact = [name for name, t in candidates if t.default_system_prompt == mine.default_system_prompt]
    if exact:
        return {"chat_template_name": exact[0], "chat_template_exact": True}
    if candidates:
        return {"chat_template_name": candidates[0][0], "chat_template_exact": False}
    return {"chat_template_name": None, "chat_template_exact": False}


def render_chat(template, messages: List[Dict[str, str]]) -> str:
    """The prompt an SGLang chat program builds for ``messages`` with ``template``, ending with
    the assistant prefix (add_generation_prompt): the default system prompt goes first when
    the conversation does not start with a system turn, as the interpreter does."""
    messages = list(messages)
    if messages and messages[0]["role"] != "system" and template.default_system_prompt:
        messages.insert(0, {"role": "system", "content": template.default_system_prompt})
    prompt = template.get_prompt(messages)
    return prompt + template.get_prefix_and_suffix("assistant", messages)[0]


def create_app(engine, api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """A FastAPI app serving SGLang's native API and OpenAI's over ``engine`` (an :class:`~rksc_sgl.Engine`)."""
    app = FastAPI(title="rksc-sgl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    template_info = matching_chat_template(engine)
    expected_auth = f"Bearer {api_key}".encode() if api_key else None
    served_model = engine.get_model_name()
    served_names = {served_model, str(engine.model_dir)}
    started = int(time.time())

    app.add_middleware(_Guard, expected_auth=expected_auth, max_request_bytes=max_request_bytes)

    # ---- info endpoints --------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info():
        return _json({
            "model_path": str(engine.model_dir),
            "tokenizer_path": str(engine.model_dir),
            "is_generation": True,
            "preferred_sampling_params": None,
            "served_model_name": served_model,
            "context_length": engine.context_len,
            **template_info,
        })

    async def server_info():
        info = engine.get_server_info()
        info = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in info.items()}
        stats = await run_in_threadpool(engine.stats)
        info["stats"] = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else str(stats)
        info["max_new_tokens_cap"] = max_new_tokens_cap
        info["max_request_bytes"] = max_request_bytes
        from rksc_sgl import __version__
        info["version"] = __version__
        return _json(info)

    app.add_api_route("/get_server_info", server_info, methods=["GET"])
    app.add_api_route("/server_info", server_info, methods=["GET"])

    @app.api_route("/flush_cache", methods=["POST", "GET"])
    async def flush_cache():
        ok = await run_in_threadpool(engine.flush_cache)
        if ok:
            return Response("Cache flushed.\n", status_code=200, media_type="text/plain")
        return Response("Cache not flushed: requests are running or waiting.\n", status_code=400,
                        media_type="text/plain")

    @app.post("/concate_and_append_request")
    async def concate_and_append():
        return _error(501, "concate_and_append is not supported by rksc-sgl serve; "
                           "use fork/join with mode='gather_variable' (the default)")

    def model_card() -> Dict[str, Any]:
        return {"id": served_model, "object": "model", "created": started, "owned_by": "rksc-sgl",
                "root": str(engine.model_dir), "max_model_len": engine.context_len}

    @app.get("/v1/models")
    async def list_models():
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        if model not in served_names:
            return _error(404, f"model {model!r} is not served here; this server serves {served_model!r}")
        return _json(model_card())

    # ---- the request path every generation endpoint shares ------------------------------------
    async def read_body(request: Request) -> Dict[str, Any]:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise HTTPError(413, f"request body is over the limit of {max_request_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    def check_params(params: Any) -> Dict[str, Any]:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise HTTPError(400, "'sampling_params' must be a JSON object or a list of them")
        params = dict(params)
        max_new = params.get("max_new_tokens")
        if max_new is None:
            params["max_new_tokens"] = min(DEFAULT_NEW_TOKENS, max_new_tokens_cap)
        elif _is_int(max_new) and max_new > max_new_tokens_cap:
            raise HTTPError(400, f"max_new_tokens={max_new} is over this server's cap of {max_new_tokens_cap}")
        return params

    def check_request(body: Dict[str, Any]) -> Dict[str, Any]:
        """Validate a native ``/generate`` body; the OpenAI endpoints build one and send it here too."""
        _check_fields(body, GENERATE_FIELDS, _NEUTRAL_FIELDS)
        for key in ("return_logprob", "return_text_in_logprobs", "stream"):
            if key in body and body[key] is not None and not isinstance(body[key], bool):
                raise HTTPError(400, f"{key!r} must be a boolean")
            if body.get(key) is None:
                body.pop(key, None)
        for key in ("logprob_start_len", "top_logprobs_num"):
            value = body.get(key)
            if value is None:
                body.pop(key, None)
            elif not isinstance(value, int) or isinstance(value, bool):
                raise HTTPError(400, f"{key!r} must be an integer")
        text, ids = body.get("text"), body.get("input_ids")
        if text is not None and not (isinstance(text, str) or (
                isinstance(text, list) and text and all(isinstance(t, str) for t in text))):
            raise HTTPError(400, "'text' must be a string or a non-empty list of strings")
        if ids is not None and not (isinstance(ids, list) and ids and (
                all(_is_int(t) for t in ids)
                or all(isinstance(row, list) and all(_is_int(t) for t in row) for row in ids))):
            raise HTTPError(400, "'input_ids' must be a non-empty list of ints or of lists of ints")
        batch = text if isinstance(text, list) else (ids if ids and isinstance(ids[0], list) else None)
        if batch is not None and len(batch) > max_batch:
            raise HTTPError(400, f"batch of {len(batch)} prompts is over the limit of {max_batch}")
        params = body.get("sampling_params")
        if isinstance(params, list):
            if batch is None or len(params) != len(batch):
                raise HTTPError(400, "a list of 'sampling_params' needs one entry per prompt of a batch")
            body["sampling_params"] = [check_params(p) for p in params]
        else:
            body["sampling_params"] = check_params(params)
        samples = [p.get("n", 1) for p in (body["sampling_params"] if isinstance(params, list)
                                           else [body["sampling_params"]])]
        total = (len(batch) if batch is not None else 1) * max((n for n in samples if _is_int(n)), default=1)
        if total > max_batch:
            raise HTTPError(400, f"{total} sequences (prompts x n) is over the limit of {max_batch}")
        return body

    async def call_engine(body: Dict[str, Any]):
        return await run_in_threadpool(lambda: engine.generate_request(**body))

    async def open_streams(bodies: List[Dict[str, Any]]) -> List["_ClosableStream"]:
        """One engine stream per body, each with its first chunk fetched; on any error the
        streams opened so far are closed (their requests cancelled) and the error raised."""
        streams: List[_ClosableStream] = []
        try:
            for body in bodies:
                streams.append(_ClosableStream(await call_engine({**body, "stream": True})))
            for stream in streams:
                await run_in_threadpool(stream.prime)
        except BaseException:
            for stream in streams:
                stream.close_in_background()
            raise
        return streams

    # ---- /generate ---------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        try:
            body = check_request(await read_body(request))
            if body.get("stream"):
                streams = await open_streams([body])
                return _stream_response(streams, lambda i, out: [out])
            return _json(await call_engine(body))
        except HTTPError as e:
            return _error(e.status, e.message)
        except Exception as e:  # noqa: BLE001 - mapped to a status for this request only
            return _exception_response(e)

    # ---- /v1/completions and /v1/chat/completions --------------------------------------------
    def openai_job(body: Dict[str, Any], chat: bool) -> "_Job":
        _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, OPENAI_IGNORED_FIELDS)
        for key in [k for k, v in body.items() if v is None]:
            del body[key]  # null: not given
        model = body.get("model", served_model)
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string")
        if model not in served_names:
            raise HTTPError(404, f"model {model!r} is not served here; this server serves {served_model!r} "
                                 "(see GET /v1/models)")
        n = body.get("n", 1)
        if not _is_int(n) or not 1 <= n <= OPENAI_MAX_N:
            raise HTTPError(400, f"'n' must be an integer in [1, {OPENAI_MAX_N}]")
        stream = _bool_field(body, "stream")
        options = body.get("stream_options", {})
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise HTTPError(400, "'stream_options' must be an object with only 'include_usage'")
        include_usage = _bool_field(options, "include_usage", "stream_options.include_usage")

        if chat:
            max_tokens, key = body.get("max_completion_tokens"), "max_completion_tokens"
            if max_tokens is None:
                max_tokens, key = body.get("max_tokens"), "max_tokens"
            default_tokens, least = min(DEFAULT_NEW_TOKENS, max_new_tokens_cap), 1
        else:
            max_tokens, key = body.get("max_tokens"), "max_tokens"
            default_tokens, least = min(OPENAI_COMPLETION_DEFAULT_TOKENS, max_new_tokens_cap), 0
        if max_tokens is None:
            max_tokens = default_tokens
        elif not _is_int(max_tokens) or max_tokens < least:
            raise HTTPError(400, f"{key!r} must be an integer >= {least}, got {max_tokens!r}")
        elif max_tokens > max_new_tokens_cap:
            raise HTTPError(400, f"{key}={max_tokens} is over this server's cap of {max_new_tokens_cap}")
        params = {"max_new_tokens": max_tokens}
        params.update({name: body[key] for key, name in _OPENAI_SAMPLING.items() if key in body})
        _check_logit_bias(params.get("logit_bias"))
        seed = body.get("seed")
        if seed is not None and not (_is_int(seed) and -2**63 <= seed < 2**63):
            raise HTTPError(400, "'seed' must be a 64-bit integer")
        per_choice = [params if seed is None else {**params, "sampling_seed": _wrap_seed(seed + j)}
                      for j in range(n)]

        if chat:
            prompts = [("text", render_chat(engine.chat_template, _chat_messages(body.get("messages"))))]
            echo = False
            top = None
            if _bool_field(body, "logprobs"):
                top = body.get("top_logprobs", 0)
                if not _is_int(top) or not 0 <= top <= OPENAI_MAX_TOP_LOGPROBS:
                    raise HTTPError(400, f"'top_logprobs' must be an integer in [0, {OPENAI_MAX_TOP_LOGPROBS}]")
            elif "top_logprobs" in body:
                raise HTTPError(400, "'top_logprobs' needs 'logprobs': true")
        else:
            prompts = _completion_prompts(body.get("prompt"))
            echo = _bool_field(body, "echo")
            top = body.get("logprobs")
            if top is not None and (not _is_int(top) or not 0 <= top <= OPENAI_MAX_TOP_LOGPROBS):
                raise HTTPError(400, f"'logprobs' must be an integer in [0, {OPENAI_MAX_TOP_LOGPROBS}]")
        if stream and len(prompts) * n > OPENAI_MAX_STREAM_CHOICES:
            raise HTTPError(400, f"a streamed request may have at most {OPENAI_MAX_STREAM_CHOICES} choices "
                                 f"(prompts x n); this one has {len(prompts) * n}")

        def native(kind: str, prompt_values: list, sampling_params: list) -> Dict[str, Any]:
            body = {kind: prompt_values, "sampling_params": sampling_params}
            if top is not None:
                body.update(return_logprob=True, top_logprobs_num=top, return_text_in_logprobs=True,
                            logprob_start_len=0 if echo else -1)
            return check_request(body)

        kind = prompts[0][0]
        if stream:  # one engine stream per choice
            bodies = [native(kind, value, params) for _, value in prompts for params in per_choice]
        else:  # one engine batch for every choice of every prompt
            bodies = [native(kind, [value for _, value in prompts for _ in range(n)], per_choice * len(prompts))]
        return _Job(chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                    model=model, n=n, stream=stream, include_usage=include_usage, logprobs=top, echo=echo,
                    prompts=prompts, bodies=bodies)

    async def openai_endpoint(request: Request, chat: bool):
        try:
            job = openai_job(await read_body(request), chat)
            states = [_Choice(job, i, engine.tokenizer) for i in range(len(job.prompts) * job.n)]
            if job.stream:
                streams = await open_streams(job.bodies)
                return _stream_response(streams, job.render_chunk(states), head=job.head(states),
                                        tail=lambda: job.tail(states))
            outs = await call_engine(job.bodies[0])
            return _json(job.response(states, outs))
        except HTTPError as e:
            return _error(e.status, e.message)
        except Exception as e:  # noqa: BLE001
            return _exception_response(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai_endpoint(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await openai_endpoint(request, chat=True)

    return app


# ---- HTTP plumbing ---------------------------------------------------------------------------
class _Guard:
    """Pure ASGI middleware (streams pass through untouched): API key and body-size checks."""

    def __init__(self, app, expected_auth: Optional[bytes], max_request_bytes: int):
        self.app = app
        self.expected_auth = expected_auth
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        error = None
        if self.expected_auth is not None and not scope["path"].startswith("/health"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected_auth):
                error = (401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        length = headers.get(b"content-length")
        if error is None and length is not None:
            try:
                if int(length) > self.max_request_bytes:
                    error = (413, f"request body of {int(length)} bytes is over the limit of "
                                  f"{self.max_request_bytes}")
            except ValueError:
                error = (400, "malformed Content-Length header")
        if error is not None:
            return await _error(*error)(scope, receive, send)
        return await self.app(scope, receive, send)


def serve(engine, host: str = "127.0.0.1", port: int = 30000, api_key: Optional[str] = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
          log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    app = create_app(engine, api_key=api_key, max_request_bytes=max_request_bytes,
                     max_new_tokens_cap=max_new_tokens_cap)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["create_app", "serve", "matching_chat_template", "render_chat"]
