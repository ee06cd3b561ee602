"""SGLang's native HTTP API over the embedded engine: ``rksc-sgl serve``.

An unmodified ``sgl.RuntimeEndpoint("http://127.0.0.1:30000")`` program runs against
this server. It speaks the subset of SGLang's native API that the frontend uses:

- ``POST /generate``: text or input_ids, single or batch, ``sampling_params``, logprobs,
  and streaming as SGLang streams (``data: {json}\\n\\n`` per chunk, growing ``text``,
  then ``data: [DONE]\\n\\n``). Streaming is for a single prompt only.
- ``GET /health``, ``GET /get_model_info``, ``GET /get_server_info`` and ``/server_info``,
  ``POST /flush_cache``.

The requests go to ``Engine.generate_request``, the same entry point (and the same
scheduler) that in-process programs use; only the I/O differs. Blocking engine calls run
in starlette's threadpool. A client that disconnects mid-stream has its engine stream
closed, which cancels the request and frees its KV.

Errors use SGLang's shape ``{"error": {"message": ...}}``: malformed JSON, unknown
fields, bad sampling values, over-long prompts (the engine's ``ValueError``) -> 400;
``max_new_tokens`` above the server's cap -> 400; a body over the size cap -> 413;
a missing/wrong API key -> 401; ``KVCacheExhausted`` -> 503; anything else -> 500 for
that request only.

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
import threading
from typing import Any, Dict, Iterator, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .kv_cache import KVCacheExhausted

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NEW_TOKENS_CAP = 4096
DEFAULT_MAX_BATCH = 256
DEFAULT_NEW_TOKENS = 128  # the engine's default when a request does not say

GENERATE_FIELDS = frozenset({
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "stream",
})
# Fields SGLang clients may send with a neutral value; accepted only when they are neutral.
_NEUTRAL_FIELDS = {"image_data": (None, [], ""), "rid": (None,), "lora_path": (None,),
                   "return_hidden_states": (None, False), "log_metrics": (None, True)}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _json_bytes(obj: Any) -> bytes:
    # orjson (as SGLang's ORJSONResponse): tuples -> lists, NaN/inf -> null.
    return orjson.dumps(obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_json_bytes(obj), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": {"message": message, "code": status}}, status)


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


def create_app(engine, api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """A FastAPI app serving SGLang's native API over ``engine`` (an :class:`~rksc_sgl.Engine`)."""
    app = FastAPI(title="rksc-sgl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    template_info = matching_chat_template(engine)
    expected_auth = f"Bearer {api_key}".encode() if api_key else None

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
            "served_model_name": engine.get_model_name(),
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
        from . import __version__
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

    # ---- /generate ---------------------------------------------------------------------------
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

    def check_request(body: Dict[str, Any]) -> Dict[str, Any]:
        unknown = []
        for key in list(body):
            if key in GENERATE_FIELDS:
                continue
            if key in _NEUTRAL_FIELDS and body[key] in _NEUTRAL_FIELDS[key]:
                del body[key]
                continue
            unknown.append(key)
        if unknown:
            raise HTTPError(400, f"unknown or unsupported request fields: {sorted(unknown)}")
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
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise HTTPError(400, "'sampling_params' must be a JSON object")
        params = dict(params)
        max_new = params.get("max_new_tokens")
        if max_new is None:
            params["max_new_tokens"] = min(DEFAULT_NEW_TOKENS, max_new_tokens_cap)
        elif _is_int(max_new) and max_new > max_new_tokens_cap:
            raise HTTPError(400, f"max_new_tokens={max_new} is over this server's cap of {max_new_tokens_cap}")
        body["sampling_params"] = params
        return body

    @app.post("/generate")
    async def generate(request: Request):
        try:
            body = check_request(await read_body(request))
        except HTTPError as e:
            return _error(e.status, e.message)
        if body.get("stream"):
            try:
                stream = await run_in_threadpool(lambda: engine.generate_request(**body))
            except Exception as e:  # noqa: BLE001 - mapped to a status for this request only
                return _exception_response(e)
            closable = _ClosableStream(stream)
            return _EngineStreamResponse(closable, _sse(closable), media_type="text/event-stream")
        try:
            out = await run_in_threadpool(lambda: engine.generate_request(**body))
        except Exception as e:  # noqa: BLE001
            return _exception_response(e)
        return _json(out)

    return app


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


class _EngineStreamResponse(StreamingResponse):
    """Closes the engine stream however the response ends: finished, client gone (the send
    raises), or cancelled (starlette's disconnect listener)."""

    def __init__(self, closable: "_ClosableStream", content, **kwargs):
        super().__init__(content, **kwargs)
        self._closable = closable

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self._closable.close_in_background()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exception_response(e: BaseException) -> Response:
    if isinstance(e, KVCacheExhausted):
        return _error(503, str(e))
    if isinstance(e, (ValueError, NotImplementedError)):
        return _error(400, str(e))
    logger.exception("request failed")
    return _error(500, f"internal error: {type(e).__name__}: {e}")


class _ClosableStream:
    """The engine's stream iterator, advanced in worker threads and closable from any thread.

    ``next`` and ``close`` hold one lock, so a close that arrives while a worker waits for
    the next token happens right after that token (closing a running generator is an error).
    """

    def __init__(self, iterator: Iterator[Dict[str, Any]]):
        self._it = iterator
        self._lock = threading.Lock()
        self._closed = False

    def next(self):
        with self._lock:
            if self._closed:
                return None
            try:
                return next(self._it)
            except StopIteration:
                self._closed = True
                return None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._it.close()  # the engine cancels an unfinished request: its KV is freed

    def close_in_background(self) -> None:
        threading.Thread(target=self.close, name="rksc-sgl-stream-close", daemon=True).start()


async def _sse(stream: _ClosableStream):
    """SGLang's stream format: one ``data: {json}`` event per chunk, then ``data: [DONE]``."""
    try:
        while True:
            try:
                out = await run_in_threadpool(stream.next)
            except Exception as e:  # noqa: BLE001 - reported in-stream, as SGLang does
                resp = _exception_response(e)
                yield b"data: " + resp.body + b"\n\n"
                break
            if out is None:
                break
            yield b"data: " + _json_bytes(out) + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        # Finished, or the client went away (the task is cancelled): close without awaiting,
        # since an await in a cancelled scope would be cancelled again. Closing an
        # unfinished engine stream cancels the request and frees its KV.
        stream.close_in_background()


def serve(engine, host: str = "127.0.0.1", port: int = 30000, api_key: Optional[str] = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
          log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    app = create_app(engine, api_key=api_key, max_request_bytes=max_request_bytes,
                     max_new_tokens_cap=max_new_tokens_cap)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["create_app", "serve", "matching_chat_template"]
