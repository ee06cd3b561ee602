"""The runtime's decode-KV compression settings: ``RKSC_COMPRESSION`` (the environment SGLang's
scheduler processes inherit) read and written, and the server configurations compression
cannot run with. Checked by the launcher before anything starts, by SGLang's argument check
in the launching process (``rksc_sgl.runtime.support``) and read once by the plugin in each
process; nothing heavy at import time (every SGLang process imports it when the variable is set).

What the runtime does with the settings: ``rksc_sgl.runtime.compression``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Mapping, Optional

from rksc_sgl.rksc.compression_config import METHODS, CompressionConfig
from rksc_sgl.runtime.env_settings import json_settings
from rksc_sgl.runtime.support import dp_attention, server_arg

__all__ = ["ENV_VAR", "CompressionSettingsError", "compression_config_from_env", "env_value",
           "compression_unsupported", "RUNTIME_METHODS"]

ENV_VAR = "RKSC_COMPRESSION"
"""Environment variable with the runtime's compression settings: a JSON object of
``CompressionConfig`` fields, e.g. ``{"method": "rkv", "budget": 0.25}``. Unset or empty: off."""

FIELDS = tuple(f.name for f in dataclasses.fields(CompressionConfig))

RUNTIME_METHODS = METHODS
"""The methods SGLang's runtime runs: all of ``CompressionConfig``'s."""


class CompressionSettingsError(ValueError):
    """The ``RKSC_COMPRESSION`` settings are malformed."""


def compression_config_from_env(environ: Mapping[str, str] = os.environ) -> Optional[CompressionConfig]:
    """The runtime's compression configuration from ``RKSC_COMPRESSION`` (None: off)."""
    data = json_settings(environ, ENV_VAR, known=FIELDS, what="compression", error=CompressionSettingsError,
                         example='{"method": "rkv", "budget": 0.25}')
    if data is None:
        return None
    try:
        return CompressionConfig(**data)
    except (TypeError, ValueError) as exc:
        raise CompressionSettingsError(f"{ENV_VAR}: {exc}") from None


def env_value(config: CompressionConfig) -> str:
    """The ``RKSC_COMPRESSION`` value that gives ``config``."""
    return json.dumps(dataclasses.asdict(config), separators=(",", ":"))


def compression_unsupported(config: CompressionConfig, args, environ: Mapping[str, str],
                            device: Optional[str] = None) -> List[str]:
    """What of the server's arguments ``args`` compression with ``config`` cannot run with
    (empty: nothing); each line names the flag to change. ``environ``: the environment the
    schedulers inherit (``SGLANG_USE_CPU_ENGINE`` tells a CPU server from a GPU one before
    SGLang resolves ``--device``); ``device``: the KV pool's, where it is known."""
    from rksc_sgl.runtime.attention_stats import rksc_hook_strides
    from rksc_sgl.runtime.plugin import BACKEND_NAME

    what = f"{ENV_VAR} (--kv-compression {config.method})"
    problems: List[str] = []
    device = device or server_arg(args, "device") or ("cpu" if environ.get("SGLANG_USE_CPU_ENGINE", "") == "1" else "cuda")
    on_gpu = str(device).split(":")[0] != "cpu"
    if config.method not in RUNTIME_METHODS:
        problems.append(f"{what}: SGLang's runtime does not run {config.method!r}; choose one of "
                        f"{', '.join(RUNTIME_METHODS)} or use the embedded engine")
    if server_arg(args, "disable_radix_cache", False):
        problems.append(f"{what} runs in --radix-cache-backend {BACKEND_NAME} with the radix cache on; "
                        "drop --disable-radix-cache")
    elif server_arg(args, "radix_cache_backend") != BACKEND_NAME:
        problems.append(f"{what} needs --radix-cache-backend {BACKEND_NAME} (got "
                        f"{server_arg(args, 'radix_cache_backend') or 'the default cache'})")
    page = int(server_arg(args, "page_size", 1) or 1)
    if page != 1:
        problems.append(f"{what} needs --page-size 1 (a compacted row's slots are no longer page-contiguous), "
                        f"got {page}")
    speculative = server_arg(args, "speculative_algorithm")
    if speculative:
        problems.append(f"{what} does not support --speculative-algorithm {speculative} (draft and verify passes "
                        "have their own positions and lengths)")
    pp_size = int(server_arg(args, "pp_size", 1))
    if pp_size > 1:
        problems.append(f"{what} needs --pp-size 1 (pipeline stages see different layers), got {pp_size}")
    if dp_attention(args):
        problems.append(f"{what} does not support DP attention (--enable-dp-attention / --attn-dp-size): "
                        "its decode runs as extend passes, whose positions compression does not shift")
    if server_arg(args, "enable_mixed_chunk", False):
        problems.append(f"{what} does not support --enable-mixed-chunk (decode rows run as extend passes, whose "
                        "positions compression does not shift)")
    mode = server_arg(args, "disaggregation_mode", "null")
    if mode not in ("null", None):
        problems.append(f"{what} does not support --disaggregation-mode {mode}")
    if server_arg(args, "enable_streaming_session", False):
        problems.append(f"{what} does not support --enable-streaming-session (a session keeps the row for "
                        "its next turn)")
    if server_arg(args, "enable_hisparse", False):
        problems.append(f"{what} does not support --enable-hisparse")
    if int(server_arg(args, "dcp_size", 1) or 1) > 1:
        problems.append(f"{what} does not support --dcp-size > 1")
    if server_arg(args, "enable_multimodal", False):
        problems.append(f"{what} does not support --enable-multimodal (mrope positions are not shifted)")
    if on_gpu and not server_arg(args, "disable_overlap_schedule", False):
        problems.append(f"{what} on a GPU needs --disable-overlap-schedule (the scheduler would rewrite a row "
                        "while the previous forward may still read it)")
    if config.needs_attention:
        graphs = not (server_arg(args, "disable_cuda_graph", False) or server_arg(args, "disable_decode_cuda_graph", False))
        if on_gpu and graphs:
            problems.append(f"{what} scores tokens by attention, which decode steps replayed from CUDA graphs do "
                            "not report: add --disable-decode-cuda-graph (or use method 'recent')")
        if server_arg(args, "enable_torch_compile", False):
            problems.append(f"{what} scores tokens by attention, which compiled graphs do not report: "
                            "drop --enable-torch-compile (or use method 'recent')")
        strides = rksc_hook_strides(server_arg(args, "forward_hooks"))
        if not strides:
            problems.append(f"{what} scores tokens by attention: --forward-hooks needs the rksc_attention hook "
                            f"(rksc-sgl launch-server adds it; see docs/kv-compression.md)")
        elif any(s != config.attention_layer_stride for s in strides):
            problems.append(f"{what}: the rksc_attention hook's layer_stride {strides[0]} differs from the "
                            f"compression's attention_layer_stride {config.attention_layer_stride}; make them equal "
                            "(--forward-hooks or --kv-compression-config)")
    return problems
