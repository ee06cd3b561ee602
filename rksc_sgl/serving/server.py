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
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from rksc_sgl.engine.request_input import GenerateRequest

from .checks import (DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS_CAP, DEFAULT_MAX_REQUEST_BYTES,
                     ServerLimits, openai_job)
from .errors import HTTPError, error_response, exception_response, json_response
from .openai import Choice
from .served import ServedModel
from .streaming import ClosableStream, stream_response

logger = logging.getLogger(__name__)


class Routes:
    """The endpoints over one engine. Every generation endpoint goes the same way: read the
    body, check it into :class:`GenerateRequest`s (``ServerLimits`` on top), run them with
    ``Engine.handle`` in the threadpool, answer JSON or a stream."""

    def __init__(self, engine, limits: ServerLimits):
        self.engine = engine
        self.limits = limits
        self.served = ServedModel.of(engine)

    def register(self, app: FastAPI) -> None:
        for path, handler, methods in (
                ("/health", self.health, ["GET"]),
                ("/get_model_info", self.get_model_info, ["GET"]),
                ("/get_server_info", self.server_info, ["GET"]),
                ("/server_info", self.server_info, ["GET"]),
                ("/flush_cache", self.flush_cache, ["POST", "GET"]),
                ("/concate_and_append_request", self.concate_and_append, ["POST"]),
                ("/v1/models", self.list_models, ["GET"]),
                ("/v1/models/{model:path}", self.retrieve_model, ["GET"]),
                ("/generate", self.generate, ["POST"]),
                ("/v1/completions", self.completions, ["POST"]),
                ("/v1/chat/completions", self.chat_completions, ["POST"])):
            app.add_api_route(path, handler, methods=methods)

    # ---- info endpoints --------------------------------------------------------------------
    async def health(self):
        return Response(status_code=200)

    async def get_model_info(self):
        served = self.served
        return json_response({
            "model_path": served.model_dir,
            "tokenizer_path": served.model_dir,
            "is_generation": True,
            "preferred_sampling_params": None,
            "served_model_name": served.name,
            "context_length": served.context_len,
            **served.template_info,
        })

    async def server_info(self):
        info = self.engine.get_server_info()
        info = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in info.items()}
        stats = await run_in_threadpool(self.engine.stats)
        info["stats"] = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else str(stats)
        info["max_new_tokens_cap"] = self.limits.max_new_tokens_cap
        info["max_request_bytes"] = self.limits.max_request_bytes
        from rksc_sgl import __version__
        info["version"] = __version__
        return json_response(info)

    async def flush_cache(self):
        ok = await run_in_threadpool(self.engine.flush_cache)
        if ok:
            return Response("Cache flushed.\n", status_code=200, media_type="text/plain")
        return Response("Cache not flushed: requests are running or waiting.\n", status_code=400,
                        media_type="text/plain")

    async def concate_and_append(self):
        return error_response(501, "concate_and_append is not supported by rksc-sgl serve; "
                                   "use fork/join with mode='gather_variable' (the default)")

    async def list_models(self):
        return json_response({"object": "list", "data": [self.served.card()]})

    async def retrieve_model(self, model: str):
        if not self.served.serves(model):
            return error_response(404, f"model {model!r} is not served here; this server serves "
                                       f"{self.served.name!r}")
        return json_response(self.served.card())

    # ---- the request path every generation endpoint shares ------------------------------------
    async def read_body(self, request: Request) -> Dict[str, Any]:
        chunks, size, limit = [], 0, self.limits.max_request_bytes
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    async def call_engine(self, request: GenerateRequest):
        return await run_in_threadpool(self.engine.handle, request)

    async def open_streams(self, requests: List[GenerateRequest]) -> List[ClosableStream]:
        """One engine stream per request, each with its first chunk fetched; on any error
        the streams opened so far are closed (their requests cancelled) and the error raised."""
        streams: List[ClosableStream] = []
        try:
            for request in requests:
                streams.append(ClosableStream(await self.call_engine(request.replace(stream=True))))
            for stream in streams:
                await run_in_threadpool(stream.prime)
        except BaseException:
            for stream in streams:
                stream.close_in_background()
            raise
        return streams

    # ---- /generate ---------------------------------------------------------------------------
    async def generate(self, request: Request):
        try:
            generate = self.limits.apply(GenerateRequest.from_body(await self.read_body(request)))
            if generate.stream:
                streams = await self.open_streams([generate])
                return stream_response(streams, lambda i, out: [out])
            return json_response(await self.call_engine(generate))
        except HTTPError as e:
            return error_response(e.status, e.message)
        except Exception as e:  # noqa: BLE001 - mapped to a status for this request only
            return exception_response(e)

    # ---- /v1/completions and /v1/chat/completions --------------------------------------------
    async def completions(self, request: Request):
        return await self.openai_endpoint(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.openai_endpoint(request, chat=True)

    async def openai_endpoint(self, request: Request, chat: bool):
        try:
            job = openai_job(await self.read_body(request), chat, self.served, self.limits)
            states = [Choice(job, i, self.engine.tokenizer) for i in range(len(job.prompts) * job.n)]
            if job.stream:
                streams = await self.open_streams(job.bodies)
                return stream_response(streams, job.render_chunk(states), head=job.head(states),
                                       tail=lambda: job.tail(states))
            outs = await self.call_engine(job.bodies[0])
            return json_response(job.response(states, outs))
        except HTTPError as e:
            return error_response(e.status, e.message)
        except Exception as e:  # noqa: BLE001
            return exception_response(e)


def create_app(engine, api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """A FastAPI app serving SGLang's native API and OpenAI's over ``engine`` (an :class:`~rksc_sgl.Engine`)."""
    limits = ServerLimits(max_new_tokens_cap=max_new_tokens_cap, max_batch=max_batch,
                          max_request_bytes=max_request_bytes)
    app = FastAPI(title="rksc-sgl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    expected_auth = f"Bearer {api_key}".encode() if api_key else None
    app.add_middleware(_Guard, expected_auth=expected_auth, max_request_bytes=max_request_bytes)
    Routes(engine, limits).register(app)
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
            return await error_response(*error)(scope, receive, send)
        return await self.app(scope, receive, send)


def serve(engine, host: str = "127.0.0.1", port: int = 30000, api_key: Optional[str] = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
          log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    app = create_app(engine, api_key=api_key, max_request_bytes=max_request_bytes,
                     max_new_tokens_cap=max_new_tokens_cap)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["create_app", "serve", "Routes"]
