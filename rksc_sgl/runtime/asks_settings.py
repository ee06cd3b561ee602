"""The runtime's ASKS settings: ``RKSC_ASKS`` (the environment SGLang's scheduler processes
inherit) read and written, and the server configurations ASKS cannot run with. Checked by
the launcher before anything starts and by the cache factory in each scheduler; torch-free,
so the launcher checks without loading a model stack."""

from __future__ import annotations

import json
import os
from typing import List, Mapping, Optional

from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.runtime.env_settings import json_settings

ENV_VAR = "RKSC_ASKS"
"""Environment variable with the runtime's ASKS settings (a JSON object of ``ASKSConfig``
fields, e.g. ``{"tau": 0.95, "recompute_fraction": 0.5}``); SGLang's scheduler processes
inherit it. Unset or empty: ASKS off."""

SETTINGS = ("enabled", "tau", "recompute_fraction", "shifted", "key_layer")


class ASKSSettingsError(ValueError):
    """The ``RKSC_ASKS`` settings are malformed or not supported in the runtime."""


def asks_config_from_env(environ: Mapping[str, str] = os.environ) -> ASKSConfig:
    """The runtime's ASKS configuration from ``RKSC_ASKS`` (off when unset or empty)."""
    data = json_settings(environ, ENV_VAR, known=SETTINGS, what="ASKS", error=ASKSSettingsError,
                         example='{"tau": 0.95, "recompute_fraction": 0.5}')
    if data is None:
        return ASKSConfig()
    data.setdefault("enabled", True)
    try:
        config = ASKSConfig(**data)
    except ValueError as exc:
        raise ASKSSettingsError(f"{ENV_VAR}: {exc}") from None
    if config.key_layer != 0:
        raise ASKSSettingsError(
            f"{ENV_VAR}: key_layer={config.key_layer} is not supported in SGLang's runtime (key layer 0 only): "
            "a deeper key needs the recipient's span run through the first layers before its prefix "
            "match, a pass SGLang's scheduler has no place for; use the embedded engine for key_layer > 0")
    return config


def asks_unsupported(*, tp_size: int, page_size: Optional[int], chunked_prefill_size: Optional[int],
                     speculative_algorithm: Optional[str]) -> List[str]:
    """What of a server's configuration ASKS cannot run with (empty: nothing). Checked by the
    launcher before anything starts and by the scheduler's cache factory (the plain SGLang
    command); ``chunked_prefill_size=None``: not set (the launcher then adds one)."""
    problems = []
    if page_size not in (None, 1):
        problems.append(f"ASKS needs --page-size 1 (donor and computed tokens interleave), got {page_size}")
    if chunked_prefill_size is not None and chunked_prefill_size <= 0:
        problems.append("ASKS needs chunked prefill (a recipient's rounds are its chunks); "
                        f"drop --chunked-prefill-size {chunked_prefill_size}")
    if tp_size != 1:
        problems.append(f"ASKS needs --tp-size 1 (its keys read the token embeddings), got {tp_size}")
    if speculative_algorithm:
        problems.append(f"ASKS does not support --speculative-algorithm {speculative_algorithm}")
    return problems


def env_value(config: ASKSConfig) -> str:
    """The ``RKSC_ASKS`` value that gives ``config``."""
    return json.dumps({name: getattr(config, name) for name in SETTINGS if name != "key_layer"})
