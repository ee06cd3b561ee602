"""Engine streams over HTTP: server-sent events, closed when the client goes away (which frees their KV)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from .errors import exception_response, json_bytes


def stream_response(streams: List["ClosableStream"], render, head=(), tail=None) -> StreamingResponse:
    return _EngineStreamResponse(streams, _sse(streams, render, head, tail), media_type="text/event-stream")


class _EngineStreamResponse(StreamingResponse):
    """Closes the engine streams however the response ends: finished, client gone (the send
    raises), or cancelled (starlette's disconnect listener)."""

    def __init__(self, streams: List["ClosableStream"], content, **kwargs):
        super().__init__(content, **kwargs)
        self._streams = streams

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            for stream in self._streams:
                stream.close_in_background()


_NOT_FETCHED = object()


class ClosableStream:
    """The engine's stream iterator, advanced in worker threads and closable from any thread.

    ``next`` and ``close`` hold one lock, so a close that arrives while a worker waits for
    the next token happens right after that token (closing a running generator is an error).
    """

    def __init__(self, iterator: Iterator[Dict[str, Any]]):
        self._it = iterator
        self._lock = threading.Lock()
        self._closed = False
        self._first = _NOT_FETCHED

    def _advance(self):
        if self._closed:
            return None
        try:
            return next(self._it)
        except StopIteration:
            self._closed = True
            return None

    def prime(self) -> None:
        """Fetch the first chunk now, so that an error such as ``KVCacheExhausted`` surfaces
        before the response starts; ``next`` returns it first."""
        with self._lock:
            if self._first is _NOT_FETCHED:
                self._first = self._advance()

    def next(self):
        with self._lock:
            if self._first is not _NOT_FETCHED:
                first, self._first = self._first, _NOT_FETCHED
                return first
            return self._advance()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._it.close()  # the engine cancels an unfinished request: its KV is freed

    def close_in_background(self) -> None:
        threading.Thread(target=self.close, name="rksc-sgl-stream-close", daemon=True).start()


def _data(obj: Any) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


async def _sse(streams: List[ClosableStream], render: Callable[[int, Dict[str, Any]], List[Any]],
               head: Iterable[Any] = (), tail: Optional[Callable[[], List[Any]]] = None):
    """SGLang's (and OpenAI's) stream format: ``data: {json}`` events, then ``data: [DONE]``.

    The streams are read round-robin, one chunk each in turn (the choices of one request
    decode in the same batches); ``render(i, chunk)`` turns stream ``i``'s chunk into events.
    """
    try:
        for event in head:
            yield _data(event)
        active = list(range(len(streams)))
        failed = False
        while active and not failed:
            for i in list(active):
                try:
                    out = await run_in_threadpool(streams[i].next)
                except Exception as e:  # noqa: BLE001 - reported in-stream, as SGLang does
                    yield b"data: " + exception_response(e).body + b"\n\n"
                    failed = True
                    break
                if out is None:
                    active.remove(i)
                    continue
                for event in render(i, out):
                    yield _data(event)
        if not failed and tail is not None:
            for event in tail():
                yield _data(event)
        yield b"data: [DONE]\n\n"
    finally:
        # Finished, or the client went away (the task is cancelled): close without awaiting,
        # since an await in a cancelled scope would be cancelled again. Closing an
        # unfinished engine stream cancels the request and frees its KV.
        for stream in streams:
            stream.close_in_background()
