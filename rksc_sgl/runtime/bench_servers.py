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
``waves-*``     SGLang's default cache; the client launches seeded branches in waves
                and stops them (``rksc_sgl.vote_waves``)
``stop-deepconf`` SGLang's default cache; the client reads each branch's top-k
                log-probabilities as SGLang streams them and stops low-confidence ones
``M+METHOD@B``  mode M with decode-KV compression (``RKSC_COMPRESSION``, method and
                budget B, the other settings ``CompressionConfig``'s defaults), in the
                ``rksc`` tree (:func:`compressed_flags`: ``radix+rkv@0.25`` is
                ``--radix-cache-backend rksc --radix-eviction-policy lru``)
==============  ==================================================================

A workload that seeds its branches (``vote``, ``serve``: ``Workload.votes``) runs every
mode's server with ``--seeded-sampling on`` (``rksc_sgl.runtime.seeded_sampling``), so branch
*i* of a program samples the same tokens in every mode, as on the engine.

``--scale-out workers:N`` runs each mode as N such servers (worker i bound to its own cores and
tagged ``--weight-version w<i>``, which SGLang returns in every answer's ``meta_info``) behind
SGLang's router (``rksc_sgl.runtime.router``, ``--router-policy``, ``cache_aware`` by default);
``--scale-out dp:N`` as one server with ``--dp-size N``. Either way the client counts each
answer's prompt and cached tokens where it ran (``RuntimeStats.places``: worker and DP rank).

ASKS modes take the run's ``asks_tau``/``asks_recompute`` (or their own ``asks@TAU``); key
layers above 0 (``asks@TAU:L<n>``) are refused: the runtime keys at layer 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["server_flags", "compressed_flags", "router_flags", "mode_server", "check_room", "servers_per_mode", "worker_plans", "worker_cores"]

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
    **{f"waves-{rule}": ([], False) for rule in ("lossless", "beta", "window")},
    "stop-deepconf": ([], False),  # its branches' top-k log-probabilities come streamed (RuntimeBackend)
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
    compression = mode.compression_config() if getattr(mode, "kv_method", None) else None
    if compression is not None:
        flags = compressed_flags(mode, flags)
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
    if compression is not None:  # plan_launch puts it in RKSC_COMPRESSION (and adds the attention hook)
        plan_kwargs["compression"] = compression
    return argv + shlex.split(settings.server_args), plan_kwargs


def compressed_flags(mode, flags: List[str]) -> List[str]:
    """The cache flags of ``mode`` (a compressed mode, ``radix+rkv@0.25``) on the runtime: its
    base mode's, on the ``rksc`` tree, which compression runs in (a base mode on SGLang's default
    cache gets ``--radix-cache-backend rksc`` with its eviction policy, LRU unless it names one);
    ``ValueError`` where the runtime cannot compress: a method it does not run (read from
    ``compression_settings.RUNTIME_METHODS`` now, so a method added there is taken), the radix
    cache off, or another tree."""
    from rksc_sgl.runtime import compression_settings
    from rksc_sgl.runtime.plugin import BACKEND_NAME

    methods = tuple(compression_settings.RUNTIME_METHODS)
    if mode.kv_method not in methods:
        raise ValueError(f"mode {mode.label!r}: SGLang's runtime does not run compression method "
                         f"{mode.kv_method!r}; it runs {', '.join(methods)} (or use --backend engine)")
    if "--disable-radix-cache" in flags:
        raise ValueError(f"mode {mode.label!r}: compression runs with the radix cache on, and mode "
                         f"{mode.base_label!r} turns it off")
    if "--radix-cache-backend" in flags:
        backend = flags[flags.index("--radix-cache-backend") + 1]
        if backend != BACKEND_NAME:
            raise ValueError(f"mode {mode.label!r}: compression runs in --radix-cache-backend {BACKEND_NAME}, "
                             f"and mode {mode.base_label!r} uses {backend}")
        return list(flags)
    policy = [] if "--radix-eviction-policy" in flags else ["--radix-eviction-policy", "lru"]
    return ["--radix-cache-backend", BACKEND_NAME, *policy, *flags]


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
                           "with --servers one-at-a-time, or with fewer modes (or --scale-out workers)")


def servers_per_mode(settings) -> int:
    """How many SGLang servers one mode runs: N with ``--scale-out workers:N``, else one (a
    ``dp:N`` server is one server with N schedulers)."""
    from rksc_sgl.bench.modes import parse_scale_out

    kind, count = parse_scale_out(settings.scale_out)
    return count if kind == "workers" else 1


def worker_cores(index: int, threads: int, cores: Optional[List[int]] = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` of worker ``index``: ``threads`` cores of its own, worker
    i from the (i * threads)-th of this process's cores on, wrapping around when the workers
    need more cores than there are."""
    if cores is None:
        import os

        cores = sorted(os.sched_getaffinity(0))
    return ",".join(str(cores[(index * threads + k) % len(cores)]) for k in range(threads))


def worker_plans(mode, settings, overrides: Dict[str, Any], seeded: bool = False,
                 ports: Optional[List[int]] = None, cores: Optional[List[int]] = None) -> List[Any]:
    """The launch plans of ``mode``'s servers: one (``single``, ``dp:N``: ``--dp-size N``, the
    cores split among its ranks by :func:`plan_launch`) or N (``workers:N``: worker i bound to
    :func:`worker_cores` and tagged ``--weight-version w<i>``, which SGLang puts in every
    answer's ``meta_info``, so the client can tell which worker the router chose)."""
    from rksc_sgl.bench.modes import parse_scale_out
    from rksc_sgl.runtime.launch_plan import CPU_THREADS_BIND, plan_launch
    from rksc_sgl.runtime.server_process import free_port

    kind, count = parse_scale_out(settings.scale_out)
    n = servers_per_mode(settings)
    ports = list(ports) if ports is not None else [free_port() for _ in range(n)]
    plans = []
    for i in range(n):
        argv, plan_kwargs = server_flags(mode, settings, overrides, ports[i], seeded)
        if kind == "dp":
            argv += ["--dp-size", str(count)]
        if kind == "workers" and "--weight-version" not in argv:
            argv += ["--weight-version", f"w{i}"]
        plan = plan_launch(argv, **plan_kwargs)
        if kind != "dp":  # the scheduler's CPU threads (a dp server's ranks get the plan's split)
            bind = worker_cores(i, settings.threads, cores)
            plan = dataclasses.replace(plan, env={**plan.env, CPU_THREADS_BIND: bind})
        plans.append(plan)
    return plans


@contextlib.contextmanager
def mode_server(mode, settings, overrides: Dict[str, Any], log, seeded: bool = False) -> Iterator[Any]:
    """``(backend, launch command, server)``: ``mode``'s started server(s), reached through a
    :class:`RuntimeBackend`, the shell command(s) they run, and the first
    :class:`RuntimeServer` (its size is each server's); everything ends on exit.

    With ``--scale-out workers:N`` the first worker starts alone, then (if memory holds N-1
    more: :func:`check_room`) the others side by side, then SGLang's router in front of them
    (``running_router``, the run's ``router_policy``); the backend goes through the router and
    reads every worker's state itself (``worker_urls``)."""
    from rksc_sgl.runtime.endpoint import RuntimeBackend
    from rksc_sgl.runtime.router import running_router
    from rksc_sgl.runtime.server_process import RuntimeServer

    plans = worker_plans(mode, settings, overrides, seeded)
    servers = [RuntimeServer(plan, log=log) for plan in plans]
    commands = [plan.shell_command() for plan in plans]
    try:
        servers[0].start()
        if len(servers) > 1:
            check_room(len(servers) - 1, servers[0].memory_bytes())
            for server in servers[1:]:
                server.launch()
            for server in servers[1:]:
                server.wait_ready()
        if len(servers) == 1:
            backend = RuntimeBackend(servers[0].url)
            yield backend, commands[0], servers[0]
            backend.check_integrity()
        else:
            urls = [server.url for server in servers]
            with running_router(urls, router_flags(settings), policy=settings.router_policy, log=log) as router:
                backend = RuntimeBackend(router.url, worker_urls=urls)
                yield backend, "\n".join([*commands, router.plan.shell_command()]), servers[0]
                backend.check_integrity()
    finally:
        for server in servers:
            server.stop()


def router_flags(settings) -> List[str]:
    """The run's further router flags (``--router-args``), checked with ``--router-policy`` by
    the router's own parser: ``ValueError`` names a bad one. Empty when the run has no router."""
    import shlex

    from rksc_sgl.bench.modes import parse_scale_out
    from rksc_sgl.runtime.launch_plan import LaunchError
    from rksc_sgl.runtime.router import plan_router

    if parse_scale_out(settings.scale_out)[0] != "workers":
        return []
    argv = shlex.split(settings.router_args)
    try:
        plan_router(["http://127.0.0.1:1"], argv, policy=settings.router_policy)
        return argv
    except SystemExit:  # argparse has printed what it did not take
        raise ValueError(f"the router does not take --router-args {settings.router_args!r} (see its message "
                         "above, or python -m sglang_router.launch_router --help)") from None
    except LaunchError as exc:
        raise ValueError(f"--router-args {settings.router_args!r}: {exc}") from None


def server_config(backend, launch_command: str) -> Dict[str, Optional[str]]:
    """What a run records about a mode's server."""
    state = backend.client.scheduler_state()
    keys = ("radix_cache_backend", "sampling_backend", "radix_eviction_policy", "disable_radix_cache", "max_total_tokens", "dtype",
            "device", "attention_backend", "forward_hooks")
    return {"launch_command": launch_command,
            **{k: str(state.get(k)) for k in keys}}
