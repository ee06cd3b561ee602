"""``rksc-sgl bench --backend runtime``: each mode as a real SGLang server.

A mode's server is started with the flags below (through :func:`plan_launch`, so the CPU
defaults and the sgl_kernel stand-in apply), serves every problem of the run, and is ended
before the next mode's starts: the modes run one after another on the same problems.

==============  ==================================================================
mode            SGLang flags
==============  ==================================================================
``none``        ``--disable-radix-cache``
``radix``       no cache flag: SGLang's default cache as a user gets it
                (``UnifiedRadixCache``, LRU)
``radix-stock`` ``--radix-cache-backend radix-stock``: SGLang's own ``RadixCache``
                class with LRU (the embedded engine's ``radix``), registered by the plugin
``rksc``        ``--radix-cache-backend rksc --radix-eviction-policy rsbcm`` + the
                attention hook; CGEE in the verify step (gate 1: the frontend ``select``
                path has no layer exit)
``rsbcm``       as ``rksc``, without CGEE
``cgee``        SGLang's default cache, CGEE in the verify step
``lfu``/``slru``  SGLang's default cache with that eviction policy
==============  ==================================================================

ASKS is not in the runtime yet: there ``rksc`` matches exact tokens (RSBCM + CGEE), and the
``asks`` modes are refused with that reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["server_flags", "mode_server"]

RUNTIME_FLAGS: Dict[str, Tuple[List[str], bool]] = {
    # mode name -> (SGLang flags, rksc launcher defaults on)
    "none": (["--disable-radix-cache"], False),
    "radix": ([], False),
    "radix-stock": (["--radix-cache-backend", "radix-stock"], False),
    "rksc": (["--radix-cache-backend", "rksc", "--radix-eviction-policy", "rsbcm"], True),
    "rsbcm": (["--radix-cache-backend", "rksc", "--radix-eviction-policy", "rsbcm"], True),
    "cgee": ([], False),
    "lfu": (["--radix-eviction-policy", "lfu"], False),
    "slru": (["--radix-eviction-policy", "slru"], False),
}


def server_flags(mode, settings, overrides: Dict[str, Any], port: int) -> Tuple[List[str], Dict[str, Any]]:
    """``(SGLang argv, plan_launch keyword arguments)`` of ``mode``'s server; ``ValueError`` if
    the runtime cannot run it."""
    if mode.name == "asks" or (mode.asks and (mode.tau is not None or mode.key_layer is not None)):
        raise ValueError(f"mode {mode.label!r} needs ASKS, which is not in SGLang's runtime yet "
                         "(issue 18); run it with --backend engine")
    if mode.name not in RUNTIME_FLAGS:
        raise ValueError(f"mode {mode.label!r} has no runtime configuration; "
                         f"the runtime runs {', '.join(RUNTIME_FLAGS)}")
    flags, rksc = RUNTIME_FLAGS[mode.name]
    pool = overrides.get("kv_pool_tokens", settings.kv_pool_tokens)
    running = overrides.get("max_running_requests", settings.max_running_requests)
    argv = ["--model-path", settings.model, "--host", "127.0.0.1", "--port", str(port),
            "--max-total-tokens", str(pool), "--max-running-requests", str(running),
            "--random-seed", str(settings.seed), *flags]
    if settings.dtype != "auto":
        argv += ["--dtype", settings.dtype]
    if settings.device != "auto":
        argv += ["--device", settings.device]
    import shlex

    return argv + shlex.split(settings.server_args), {"rksc_cache": rksc}


@contextlib.contextmanager
def mode_server(mode, settings, overrides: Dict[str, Any], log) -> Iterator[Any]:
    """``(backend, launch command)``: a started server for ``mode``, reached through a
    :class:`RuntimeBackend`, and the shell command it runs; the server ends on exit."""
    from .endpoint import RuntimeBackend
    from .launcher import RuntimeServer, free_port, plan_launch

    argv, plan_kwargs = server_flags(mode, settings, overrides, free_port())
    plan = plan_launch(argv, **plan_kwargs)
    cores = "0" if settings.threads == 1 else f"0-{settings.threads - 1}"  # the scheduler's CPU threads
    plan = dataclasses.replace(plan, env={**plan.env, "SGLANG_CPU_OMP_THREADS_BIND": cores})
    server = RuntimeServer(plan, log=log)
    try:
        server.start()
        backend = RuntimeBackend(server.url)
        yield backend, plan.shell_command()
        backend.check_integrity()
    finally:
        server.stop()


def server_config(backend, launch_command: str) -> Dict[str, Optional[str]]:
    """What a run records about a mode's server."""
    state = backend.client.scheduler_state()
    keys = ("radix_cache_backend", "radix_eviction_policy", "disable_radix_cache", "max_total_tokens", "dtype",
            "device", "attention_backend", "forward_hooks")
    return {"launch_command": launch_command,
            **{k: str(state.get(k)) for k in keys}}
