"""Which SGLang server configurations the RKSC features run with, checked at start-up.

:func:`unsupported` lists what a server's arguments ask for that an RKSC feature cannot do
correctly; the plugin refuses such a server in the launching process (an AFTER hook on
``ServerArgs.check_server_args``, which SGLang runs before any scheduler starts, so the
plain ``python -m sglang.launch_server`` command exits with the message too), and
``rksc-sgl launch-server`` checks the same before it starts anything. :func:`caveats`
lists what runs with a limit worth a start-up warning. ``docs/runtime-support.md`` is the
table of both.

``args``: SGLang's ``ServerArgs`` or the launcher's parsed namespace (read with
``getattr``); ``environ``: the environment the schedulers inherit (``RKSC_ASKS``,
``RKSC_SEEDED_SAMPLING``, ``RKSC_COMPRESSION``: ``rksc_sgl.runtime.compression_settings``).
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional

__all__ = ["UnsupportedConfiguration", "unsupported", "caveats", "check_server_args_hook", "CHECK_TARGET"]

CHECK_TARGET = "sglang.srt.server_args.ServerArgs.check_server_args"


class UnsupportedConfiguration(ValueError):
    """A server configuration an RKSC feature cannot run with."""


def server_arg(args, name: str, default=None):
    """``args.name`` (SGLang's ``ServerArgs`` or the launcher's namespace), ``default`` when absent or None."""
    value = getattr(args, name, default)
    return default if value is None else value


def dp_attention(args) -> bool:
    """Whether ``args`` turn on DP attention."""
    return bool(server_arg(args, "enable_dp_attention", False)) or int(server_arg(args, "attn_dp_size", 1) or 1) > 1


def _setting(read, environ, problems: List[str]):
    """``read(environ)``, or None with its message added to ``problems``."""
    try:
        return read(environ)
    except ValueError as exc:
        problems.append(str(exc))
        return None


def unsupported(args, environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """What of ``args`` the RKSC features cannot run with (empty: nothing); each line names
    the flag to change."""
    from rksc_sgl.runtime.asks_settings import ENV_VAR as ASKS_VAR
    from rksc_sgl.runtime.asks_settings import asks_config_from_env, asks_unsupported
    from rksc_sgl.runtime.compression_settings import compression_config_from_env, compression_unsupported
    from rksc_sgl.runtime.plugin import BACKEND_NAME, EVICTION_POLICY_NAME
    from rksc_sgl.runtime.seeded_sampling import ENV_VAR as SEEDED_VAR
    from rksc_sgl.runtime.seeded_sampling import seeded_sampling_from_env

    environ = os.environ if environ is None else environ
    problems: List[str] = []
    backend = server_arg(args, "radix_cache_backend")
    policy = str(server_arg(args, "radix_eviction_policy", "lru")).lower()
    disabled = bool(server_arg(args, "disable_radix_cache", False))
    pp_size, tp_size = int(server_arg(args, "pp_size", 1)), int(server_arg(args, "tp_size", 1))
    speculative = server_arg(args, "speculative_algorithm")
    if backend == BACKEND_NAME and server_arg(args, "enable_hierarchical_cache", False):
        problems.append(f"--radix-cache-backend {BACKEND_NAME} does not support --enable-hierarchical-cache "
                        "(it is a RadixCache: one device tier); omit --radix-cache-backend")
    if policy == EVICTION_POLICY_NAME and not disabled:
        if backend != BACKEND_NAME:
            problems.append(f"--radix-eviction-policy {EVICTION_POLICY_NAME} needs --radix-cache-backend {BACKEND_NAME} "
                            f"(got {backend or 'the default cache'})")
        if pp_size > 1:
            problems.append(f"--radix-eviction-policy {EVICTION_POLICY_NAME} needs --pp-size 1 (pipeline stages see "
                            f"different layers' attention), got {pp_size}; use --radix-eviction-policy lru")
        if speculative:
            problems.append(f"--radix-eviction-policy {EVICTION_POLICY_NAME} does not support --speculative-algorithm "
                            f"{speculative} (draft and verify passes would be counted as attention); "
                            "use --radix-eviction-policy lru")
        from rksc_sgl.rksc.rsbcm import RSBCMStrategy

        try:
            strategy = RSBCMStrategy(**(server_arg(args, "radix_eviction_policy_config", {}) or {}))
            if tp_size > 1:
                strategy.use_ranks(None)
        except (TypeError, ValueError) as exc:
            problems.append(f"--radix-eviction-policy-config: {exc}")
    asks = _setting(asks_config_from_env, environ, problems)
    if asks is not None and asks.active and not disabled:
        if backend != BACKEND_NAME:
            problems.append(f"{ASKS_VAR} (ASKS) needs --radix-cache-backend {BACKEND_NAME} "
                            f"(got {backend or 'the default cache'}); unset {ASKS_VAR}")
        chunk = server_arg(args, "chunked_prefill_size")
        problems += asks_unsupported(tp_size=tp_size, page_size=server_arg(args, "page_size"),
                                     chunked_prefill_size=chunk, speculative_algorithm=speculative)
        if pp_size > 1:
            problems.append(f"ASKS needs --pp-size 1, got {pp_size}")
        if dp_attention(args):
            problems.append("ASKS does not support DP attention (--enable-dp-attention / --attn-dp-size)")
        mode = server_arg(args, "disaggregation_mode", "null")
        if mode not in ("null", None):
            problems.append(f"ASKS does not support --disaggregation-mode {mode}")
    compression = _setting(compression_config_from_env, environ, problems)
    if compression is not None:
        problems += compression_unsupported(compression, args, environ)
    seeded = _setting(seeded_sampling_from_env, environ, problems)
    sampler = server_arg(args, "sampling_backend")
    if seeded and sampler not in (None, "pytorch"):
        problems.append(f"{SEEDED_VAR}=1 needs --sampling-backend pytorch (SGLang's {sampler} sampler takes no "
                        "per-request seeds and would stop the scheduler at the first seeded top-k/top-p batch)")
    return problems


def caveats(args, *, device: str, attention_hook: bool) -> List[str]:
    """What RSBCM's statistics will not see on this server (empty: everything)."""
    if device == "cpu" or not attention_hook:
        return []
    decode = not (server_arg(args, "disable_cuda_graph", False) or server_arg(args, "disable_decode_cuda_graph", False))
    prefill = not (server_arg(args, "disable_cuda_graph", False) or server_arg(args, "disable_prefill_cuda_graph", False))
    if not (decode or prefill):
        return []
    replayed = " and ".join(name for name, on in (("decode steps", decode), ("captured prefill batches", prefill)) if on)
    return [f"rsbcm: with CUDA graphs on, {replayed} replay without the rksc_attention hook, so RSBCM sees only the "
            "passes run eagerly (slots handed out are still reset). For full statistics launch with "
            "--disable-cuda-graph (or --disable-decode-cuda-graph / --disable-prefill-cuda-graph)"]


def check_server_args_hook(result, server_args, *args, **kwargs):
    """AFTER hook of ``ServerArgs.check_server_args``: refuse what :func:`unsupported` lists."""
    problems = unsupported(server_args)
    if problems:
        raise UnsupportedConfiguration("rksc: this server configuration is not supported: " + "; ".join(problems))
    return result
