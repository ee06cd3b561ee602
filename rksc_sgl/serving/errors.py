"""HTTP errors in SGLang's shape (``{"error": {...}}``) and JSON responses."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi.responses import Response

from rksc_sgl.kv.manager import KVCacheExhausted


logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 501: "not_implemented_error", 503: "service_unavailable_error"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_bytes(obj: Any) -> bytes:
    # orjson (as SGLang's ORJSONResponse): tuples -> lists, NaN/inf -> null.
    return orjson.dumps(obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(json_bytes(obj), status_code=status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json_response({"error": {"message": message, "type": kind, "code": status}}, status)


def exception_response(e: BaseException) -> Response:
    if isinstance(e, KVCacheExhausted):
        return error_response(503, str(e))
    if isinstance(e, (ValueError, NotImplementedError)):
        return error_response(400, str(e))
    logger.exception("request failed")
    return error_response(500, f"internal error: {type(e).__name__}: {e}")
