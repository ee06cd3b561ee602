"""``rksc-sgl bench --backend runtime``: each mode as a real SGLang server.

A mode's server is started with the flags below (through :func:`plan_launch`, so the CPU
defaults and the sgl_kernel stand-in apply) and serves every problem of the run. By default
all modes' servers run at once and take turns problem by problem (``rksc_sgl.bench.runner``;
``--servers one-at-a-time`` runs them one after another), so each is started with
``--sleep-on-idle``: an idle SGLang scheduler otherwise polls its sockets on a busy core,
which would slow whichever server is working (the CPU launch plan adds the flag anyway;
here it holds on a GPU machine too).

==============  ==================================================================
mode            SGLang flags
==============  ==================================================================
``none``        ``--disable-radix-cache``
``radix``       no cache flag: SGLang's default cache as a user gets it
                (``UnifiedRadixCache``, LRU)
``radix-stock`` ``--radix-cache-backend radix-stock``: SGLang's own ``RadixCache``
                class with LRU (the embedded engine's ``radix``), registered by the plugin
``rksc``        ``--radix-cache-backend rksc --radix-eviction-policy rsbcm`` + the
                attention hook + ASKS (``RKSC_ASKS``, ``--chunked-prefill-size 4096``);
                CGEE in the verify step (gate 1: the frontend ``select`` path has no
                layer exit)
``asks``        ``--radix-cache-backend rksc --radix-eviction-policy lru`` + ASKS
``rsbcm``       as ``rksc``, without ASKS and CGEE
``cgee``        SGLang's default cache, CGEE in the verify step
``lfu``/``slru``  SGLang's default cache with that eviction policy
``stop-*``      SGLang's default cache; the client stops branches (``/abort_request``)
==============  ==================================================================

A workload that seeds its branches (``vote``, ``serve``: ``Workload.votes``) runs every
mode's server with ``--seeded-sampling on`` (``rksc_sgl.runtime.seeded_sampling``), so branch
*i* of a program samples the same tokens in every mode, as on the engine.

ASKS modes take the run's ``asks_tau``/``asks_recompute`` (or their own ``asks@TAU``); key
layers above 0 (``asks@TAU:L<n>``) are refused: the runtime keys at layer 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["server_flags", "mode_server", "check_room"]

MEMORY_MARGIN = 1.15
"""Head-room over the measured size of a server before more are started beside it."""

RUNTIME_FLAGS: Dict[str, Tuple[List[str], bool]] = {
    # mode name -> (SGLang flags, rksc launcher defaults on)
    "none": (["--disable-radix-cache"], False),
    "radix": ([], False),
    "radix-stock": (["--radix-cache-backend", "radix-stock"], False),
    "rksc": (["--radix-cache-backend", "rksc", "--radix-eviction-policy", "rsbcm"], True),
    "asks": (["--radix-cache-backend", "rksc", "--radix-eviction-policy", "lru"], True),
    "rsbcm": (["--radix-cache-backend", "rksc", "--radix-eviction-policy", "rsbcm"], True),
    "cgee": ([], False),
    "lfu": (["--radix-eviction-policy", "lfu"], False),
    "slru": (["--radix-eviction-policy", "slru"], False),
    # branch stop is the client's (rksc_sgl.vote through SGLang's abort API): the default cache
    **{f"stop-{rule}": ([], False) for rule in ("lossless", "beta", "window")},
}


def server_flags(mode, settings, overrides: Dict[str, Any], port: int,
                 seeded: bool = False) -> Tuple[List[str], Dict[str, Any]]:
    """``(SGLang argv, plan_launch keyword arguments)`` of ``mode``'s server (``seeded``: honour
    per-request sampling seeds); ``ValueError`` if the runtime cannot run it."""
    if mode.asks and (mode.key_layer if mode.key_layer is not None else settings.asks_key_layer):
        raise ValueError(f"mode {mode.label!r} keys ASKS above layer 0, which SGLang's runtime cannot "
                         "(layer 0 only); run it with --backend engine")
    if mode.name not in RUNTIME_FLAGS:
        raise ValueError(f"mode {mode.label!r} has no runtime configuration; "
                         f"the runtime runs {', '.join(RUNTIME_FLAGS)}")
    flags, rksc = RUNTIME_FLAGS[mode.name]
    pool = overrides.get("kv_pool_tokens", settings.kv_pool_tokens)
    running = overrides.get("max_running_requests", settings.max_running_requests)
    argv = ["--model-path", settings.model, "--host", "127.0.0.1", "--port", str(port),
            "--max-total-tokens", str(pool), "--max-running-requests", str(running),
            "--random-seed", str(settings.seed), "--sleep-on-idle", *flags]
    if settings.dtype != "auto":
        argv += ["--dtype", settings.dtype]
    if settings.device != "auto":
        argv += ["--device", settings.device]
    import shlex

    plan_kwargs: Dict[str, Any] = {"rksc_cache": rksc, "seeded_sampling": seeded}
    if mode.asks:
        from rksc_sgl.rksc.asks_config import ASKSConfig

        plan_kwargs["asks"] = ASKSConfig(enabled=True, tau=mode.effective_tau(settings),
                                         recompute_fraction=settings.asks_recompute)
    return argv + shlex.split(settings.server_args), plan_kwargs


def check_room(more: int, server_bytes: int, available_bytes: Optional[int] = None) -> None:
    """Refuse to start ``more`` servers the size of one already running (``server_bytes``)
    when the machine's available memory cannot hold them, before they are started and
    the kernel's out-of-memory killer picks a process."""
    if more <= 0:
        return
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    need = more * server_bytes * MEMORY_MARGIN
    if need > available_bytes:
        gib = 1 << 30
        raise RuntimeError(f"not enough memory to run the modes' servers together: {more} more would take about "
                           f"{need / gib:.1f} GiB ({server_bytes / gib:.1f} GiB each), and "
                           f"{available_bytes / gib:.1f} GiB is available; run them one after another "
                           "with --servers one-at-a-time, or with fewer modes")


@contextlib.contextmanager
def mode_server(mode, settings, overrides: Dict[str, Any], log, seeded: bool = False) -> Iterator[Any]:
    """``(backend, launch command, server)``: a started server for ``mode``, reached through a
    :class:`RuntimeBackend`, the shell command it runs, and its :class:`RuntimeServer`; the
    server ends on exit."""
    from rksc_sgl.runtime.endpoint import RuntimeBackend
    from rksc_sgl.runtime.launch_plan import plan_launch
    from rksc_sgl.runtime.server_process import RuntimeServer, free_port

    argv, plan_kwargs = server_flags(mode, settings, overrides, free_port(), seeded)
    plan = plan_launch(argv, **plan_kwargs)
    cores = "0" if settings.threads == 1 else f"0-{settings.threads - 1}"  # the scheduler's CPU threads
    plan = dataclasses.replace(plan, env={**plan.env, "SGLANG_CPU_OMP_THREADS_BIND": cores})
    server = RuntimeServer(plan, log=log)
    try:
        server.start()
        backend = RuntimeBackend(server.url)
        yield backend, plan.shell_command(), server
        backend.check_integrity()
    finally:
        server.stop()


def server_config(backend, launch_command: str) -> Dict[str, Optional[str]]:
    """What a run records about a mode's server."""
    state = backend.client.scheduler_state()
    keys = ("radix_cache_backend", "sampling_backend", "radix_eviction_policy", "disable_radix_cache", "max_total_tokens", "dtype",
            "device", "attention_backend", "forward_hooks")
    return {"launch_command": launch_command,
            **{k: str(state.get(k)) for k in keys}}
