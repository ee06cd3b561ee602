"""A feature's settings as a JSON object in an environment variable (``RKSC_ASKS``,
``RKSC_COMPRESSION``), which SGLang's scheduler processes inherit; torch-free."""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional, Sequence, Type


def json_settings(environ: Mapping[str, str], var: str, *, known: Sequence[str], what: str, example: str,
                  error: Type[ValueError]) -> Optional[Dict[str, Any]]:
    """The JSON object in ``environ[var]`` (None when unset or empty). ``error`` names a value
    that is not a JSON object, or a key not in ``known``; ``what`` names the settings in the
    message and ``example`` shows a valid value."""
    raw = environ.get(var, "").strip()
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise error(f"{var} must be a JSON object such as '{example}', got {raw!r} ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{var} must be a JSON object of {what} settings, got {raw!r}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{var}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return data
