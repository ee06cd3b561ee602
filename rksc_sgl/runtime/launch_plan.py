"""What ``rksc-sgl launch-server`` runs: SGLang's command line, checked, plus RKSC's and the CPU's defaults.

The command line is SGLang's (``python -m sglang.launch_server ...``): every argument is
parsed by SGLang's own parser, in this process, before anything starts, so a typo or a bad
value fails at once with SGLang's message. :func:`plan_launch` then adds what the user did
not say:

=======================================  =============================================
added unless the user's flags say so      why
=======================================  =============================================
``--radix-cache-backend rksc``            the RKSC tree (``rksc_sgl.runtime.plugin``)
``--radix-eviction-policy rsbcm``         RSBCM eviction (only with the ``rksc`` backend)
``--forward-hooks [rksc_attention]``      RSBCM's attention statistics (only with ``rsbcm``)
``RKSC_SEEDED_SAMPLING=1`` (asked for)    per-request ``sampling_seed`` honoured
                                          (``rksc_sgl.runtime.seeded_sampling``); on a
                                          GPU also ``--sampling-backend pytorch``
``RKSC_COMPRESSION`` (asked for)          decode-KV compression of running requests
                                          (``rksc_sgl.runtime.compression``), the
                                          attention hook for the methods that score by
                                          attention; on a GPU also
                                          ``--disable-overlap-schedule`` and (those methods)
                                          ``--disable-decode-cuda-graph``
CPU only: ``--dtype float32``             ``auto`` turns a float32 checkpoint into float16
CPU only: ``--max-total-tokens 16384``    else the KV pool takes 72% of RAM
CPU only: ``--sleep-on-idle``             else the idle scheduler spins a core
CPU only: ``SGLANG_USE_CPU_ENGINE=1``     SGLang's CPU code paths
CPU, more ranks than NUMA nodes:          SGLang refuses to start otherwise; one core list
``SGLANG_CPU_OMP_THREADS_BIND=0|1``       per rank, this process's cores split among them
no ``sgl_kernel``: ``PYTHONPATH+=cpu_site``  an import-only stand-in in every SGLang process
=======================================  =============================================

``--disable-radix-cache`` (or any ``--radix-cache-backend``) keeps SGLang's choice; an
explicit ``--radix-eviction-policy`` is kept as given. Configurations the scheduler would
reject (``rsbcm`` without the ``rksc`` backend, ``rksc`` with the hierarchical cache, bad
RSBCM settings) fail here with one message, before any process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from rksc_sgl.config import default_cache_dir

__all__ = ["LaunchError", "LaunchPlan", "plan_launch", "sglang_parser", "CPU_MAX_TOTAL_TOKENS"]

CPU_MAX_TOTAL_TOKENS = 16384
"""KV slots of the CPU default pool (about 0.75 GB for SmolLM2-135M in float32)."""

CPU_SITE = Path(__file__).with_name("cpu_site")


class LaunchError(RuntimeError):
    """The server cannot be started with this configuration, or did not start."""


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What to run: SGLang's arguments, the environment added, and why."""

    argv: List[str]
    env: Dict[str, str]
    host: str
    port: int
    added: List[str]
    """Human-readable lines: each default the plan added."""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> List[str]:
        return [sys.executable, "-m", "sglang.launch_server", *self.argv]

    def shell_command(self) -> str:
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = " ".join(shlex.quote(a) for a in ["python", "-m", "sglang.launch_server", *self.argv])
        return f"{env} {cmd}".strip()


def sglang_parser() -> argparse.ArgumentParser:
    from rksc_sgl.runtime.plugin import register

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Only CUDA ... support AWQ" and the like, at import
        register()  # adds `rsbcm` to --radix-eviction-policy's choices, as in the server's processes
        from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="rksc-sgl launch-server")
    ServerArgs.add_cli_args(parser)
    return parser


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The flags ``argv`` really gives (SGLang's defaults suppressed)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_model(model_path: str) -> str:
    from rksc_sgl.model.loading import ModelNotFoundError, resolve_model_dir

    try:
        return str(resolve_model_dir(model_path, default_cache_dir()))
    except ModelNotFoundError as exc:
        raise LaunchError(str(exc)) from None


def _replace_flag(argv: List[str], flag: str, value: str) -> List[str]:
    """``argv`` with the value of ``flag`` (``--flag v`` or ``--flag=v``) replaced."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag:
            out += [flag, value]
            skip = True
        elif arg.startswith(flag + "="):
            out.append(f"{flag}={value}")
        else:
            out.append(arg)
    return out


def plan_launch(user_argv: Sequence[str], *, rksc_cache: bool = True, attention_stats: bool = True,
                asks=None, seeded_sampling: Optional[bool] = None, compression=None, cuda: Optional[bool] = None,
                sgl_kernel_installed: Optional[bool] = None, environ: Optional[Dict[str, str]] = None) -> LaunchPlan:
    """Validate SGLang arguments and add RKSC's and the CPU's defaults (see the module doc).

    ``rksc_cache=False`` adds no cache flag: SGLang's own cache choice, as its flags say
    (a stock server, for comparisons). ``asks`` (an ``ASKSConfig``): turn ASKS on in the
    ``rksc`` backend through ``RKSC_ASKS`` (an ``RKSC_ASKS`` already in the environment is
    checked and kept when ``asks`` is None). ``seeded_sampling``: honour each request's
    ``sampling_seed`` (``RKSC_SEEDED_SAMPLING``; None: as the environment says). ``compression``
    (a ``CompressionConfig``): compress running requests' decode KV through
    ``RKSC_COMPRESSION`` (None: as the environment says). ``cuda``/``sgl_kernel_installed``/``environ``
    default to this machine's. Raises :class:`LaunchError` (and SGLang's parser exits
    with status 2 on a bad flag).
    """
    from rksc_sgl.runtime.plugin import BACKEND_NAME, EVICTION_POLICY_NAME
    from rksc_sgl.rksc.rsbcm import RSBCMStrategy

    parser = sglang_parser()
    given = _explicit(parser, user_argv)
    args = parser.parse_args(list(user_argv))
    environ = dict(os.environ if environ is None else environ)
    cuda = _cuda_available() if cuda is None else cuda
    if sgl_kernel_installed is None:
        sgl_kernel_installed = importlib.util.find_spec("sgl_kernel") is not None
    argv, added, env = list(user_argv), [], {}

    def add(flag: str, *values: str, why: str) -> None:
        argv.extend([flag, *values])
        added.append(f"{' '.join([flag, *values])}  ({why})")

    resolved = _resolve_model(args.model_path)
    if resolved != args.model_path:
        argv = _replace_flag(argv, "--model-path", resolved)
        added.append(f"--model-path {resolved}  (the packaged model {args.model_path!r}, converted once)")

    backend = getattr(given, "radix_cache_backend", None)
    disabled = bool(getattr(given, "disable_radix_cache", False))
    if disabled and backend is not None:
        raise LaunchError("--disable-radix-cache turns the radix cache off; drop --radix-cache-backend "
                          f"{backend} (or drop --disable-radix-cache)")
    if backend is None and not disabled and rksc_cache:
        backend = BACKEND_NAME
        add("--radix-cache-backend", BACKEND_NAME, why="the RKSC tree cache")
    policy = getattr(given, "radix_eviction_policy", None)
    if policy is None and backend == BACKEND_NAME and rksc_cache:
        policy = EVICTION_POLICY_NAME
        add("--radix-eviction-policy", EVICTION_POLICY_NAME, why="RSBCM eviction")
    if policy == EVICTION_POLICY_NAME and backend != BACKEND_NAME:
        where = "with --disable-radix-cache" if disabled else f"with --radix-cache-backend {backend}" \
            if backend else "with SGLang's default cache"
        raise LaunchError(f"--radix-eviction-policy {EVICTION_POLICY_NAME} needs --radix-cache-backend "
                          f"{BACKEND_NAME}; it cannot run {where}")
    if backend == BACKEND_NAME and args.enable_hierarchical_cache:
        raise LaunchError(f"--radix-cache-backend {BACKEND_NAME} does not support --enable-hierarchical-cache "
                          "(it is a RadixCache: one device tier)")
    _plan_asks(asks, environ, env, added, backend, args, given, add)
    _plan_seeded_sampling(seeded_sampling, environ, env, added, cuda, given, add)
    hook_stride, hook_why = None, ""
    if policy == EVICTION_POLICY_NAME:
        try:
            strategy = RSBCMStrategy(**(args.radix_eviction_policy_config or {}))
        except (TypeError, ValueError) as exc:
            raise LaunchError(f"--radix-eviction-policy-config for {EVICTION_POLICY_NAME}: {exc}") from None
        if attention_stats:
            hook_stride, hook_why = strategy.attention_layer_stride, "RSBCM's attention statistics"
    kv = _plan_compression(compression, environ, env, added, backend, cuda, given, add)
    if kv is not None and kv.needs_attention:
        if not attention_stats:
            raise LaunchError(f"--kv-compression {kv.method} scores tokens by attention; drop --attention-stats off "
                              "(or use --kv-compression recent)")
        if hook_stride is not None and hook_stride != kv.attention_layer_stride:
            raise LaunchError(f"RSBCM's attention_layer_stride {hook_stride} (--radix-eviction-policy-config) and "
                              f"compression's {kv.attention_layer_stride} (--kv-compression-config) share one "
                              "attention hook; make them equal")
        hook_stride = kv.attention_layer_stride
        hook_why = "compression's attention scores" + (" and RSBCM's statistics" if hook_why else "")
    if hook_stride is not None:
        _add_attention_hook(argv, added, getattr(given, "forward_hooks", None), hook_stride, hook_why)

    if not cuda:
        if getattr(given, "dtype", None) is None:
            add("--dtype", "float32", why="CPU: 'auto' would run a float32 checkpoint in float16")
        if getattr(given, "max_total_tokens", None) is None:
            add("--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS), why="CPU: a bounded KV pool")
        if not getattr(given, "sleep_on_idle", False):
            add("--sleep-on-idle", why="CPU: no busy-polling when idle")
        if "SGLANG_USE_CPU_ENGINE" not in environ:
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            added.append("SGLANG_USE_CPU_ENGINE=1  (CPU: SGLang's CPU code paths)")
        _plan_cpu_threads_bind(args, environ, env, added)
    if not sgl_kernel_installed:
        path = os.pathsep.join(p for p in (str(CPU_SITE), environ.get("PYTHONPATH", "")) if p)
        env["PYTHONPATH"] = path
        added.append(f"PYTHONPATH={CPU_SITE}  (no sgl_kernel installed: an import-only stand-in)")
    _check_support(parser, argv, {**environ, **env})
    return LaunchPlan(argv=argv, env=env, host=args.host, port=int(args.port), added=added)


def _check_support(parser: argparse.ArgumentParser, argv: List[str], environ: Dict[str, str]) -> None:
    """The plugin's start-up refusals (``rksc_sgl.runtime.support``) on the final command
    line, here, before anything starts."""
    from rksc_sgl.runtime.support import unsupported

    problems = unsupported(parser.parse_args(argv), environ)
    if problems:
        raise LaunchError("; ".join(problems))


# ---- CPU ranks and cores (--dp-size / --tp-size / --pp-size above the NUMA node count) ----------
CPU_THREADS_BIND = "SGLANG_CPU_OMP_THREADS_BIND"


def _cpu_cores_by_node() -> List[List[int]]:
    """This process's usable physical cores, per NUMA node, as SGLang sees them
    (``get_cpu_ids_by_node``: lscpu, one CPU per core, the affinity mask); the affinity
    mask as one node if that fails."""
    try:
        from sglang.srt.utils import get_cpu_ids_by_node

        nodes = [[int(c) for c in ids.split(",") if c] for ids in get_cpu_ids_by_node()]
        nodes = [n for n in nodes if n]
    except Exception:
        nodes = []
    return nodes or [sorted(os.sched_getaffinity(0))]


def split_cores(ranks: int, cores: Sequence[int]) -> List[List[int]]:
    """``ranks`` groups of ``cores``, in order: contiguous and as even as possible, or, when
    there are more ranks than cores, one core each, taken in turn (ranks share cores)."""
    if ranks < 1 or not cores:
        raise ValueError(f"need at least one rank and one core, got {ranks} ranks, {len(cores)} cores")
    if ranks > len(cores):
        return [[cores[r % len(cores)]] for r in range(ranks)]
    size, extra = divmod(len(cores), ranks)
    groups, at = [], 0
    for r in range(ranks):
        n = size + (r < extra)
        groups.append(list(cores[at:at + n]))
        at += n
    return groups


def _plan_cpu_threads_bind(args, environ: Dict[str, str], env: Dict[str, str], added: List[str]) -> None:
    """``SGLANG_CPU_OMP_THREADS_BIND`` when the server has more ranks than NUMA nodes.

    SGLang's CPU path gives each rank (dp x tp x pp of them) a NUMA node unless this variable
    lists each rank's cores (``0|1``); with more ranks than nodes it refuses to start. The plan
    then splits this process's cores among the ranks; with more ranks than cores, ranks share
    cores (said in ``added``). With AMX, SGLang binds each rank's OpenMP threads to its cores;
    without (no ``sgl_kernel``) it only checks the list, and patch 0004 (``patches/``) gives
    each rank one torch thread per core listed. A variable already set is kept."""
    world = args.dp_size * args.tp_size * args.pp_size
    if CPU_THREADS_BIND in environ or world <= 1 or args.nnodes != 1:
        return
    nodes = _cpu_cores_by_node()
    if world <= len(nodes):
        return  # SGLang's default: one NUMA node per rank
    if args.base_gpu_id != 0 or args.gpu_id_step != 1:
        raise LaunchError(f"{world} ranks on {len(nodes)} NUMA node(s) with --base-gpu-id/--gpu-id-step: "
                          f"set {CPU_THREADS_BIND} yourself (one '|'-separated core list per rank)")
    # With DP attention the DP ranks live inside the TP group: tp x pp processes.
    processes = args.tp_size * args.pp_size if args.enable_dp_attention else world
    cores = [c for node in nodes for c in node]
    value = "|".join(",".join(map(str, group)) for group in split_cores(processes, cores))
    env[CPU_THREADS_BIND] = value
    shared = f"; {processes} ranks on {len(cores)} cores: ranks share cores" if processes > len(cores) else ""
    added.append(f"{CPU_THREADS_BIND}={value}  (CPU: {processes} ranks, {len(nodes)} NUMA node(s): "
                 f"the cores split among the ranks{shared})")


ASKS_CHUNKED_PREFILL_SIZE = 4096
"""``--chunked-prefill-size`` added with ASKS where SGLang would turn chunking off (its CPU
default is -1): a recipient's rounds are chunks. Prompts shorter than this are never split."""


def _plan_asks(asks, environ: Dict[str, str], env: Dict[str, str], added: List[str], backend, args,
               given, add) -> None:
    """Check the ASKS settings (from ``asks`` or an inherited ``RKSC_ASKS``) against the
    server's flags and put them in the environment the schedulers inherit."""
    from rksc_sgl.runtime.plugin import BACKEND_NAME
    from rksc_sgl.runtime.asks_settings import (ENV_VAR, asks_config_from_env, asks_unsupported, env_value)

    if asks is None:
        asks = _from_environ(asks_config_from_env, environ)
        inherited = True
    else:
        inherited = False
    if not asks.active:
        return
    if backend != BACKEND_NAME:
        raise LaunchError(f"ASKS runs in --radix-cache-backend {BACKEND_NAME}; it cannot run with "
                          f"{'--disable-radix-cache' if args.disable_radix_cache else backend or 'SGLang default cache'}"
                          f"{' (unset ' + ENV_VAR + ')' if inherited else ''}")
    chunk = getattr(given, "chunked_prefill_size", None)
    problems = asks_unsupported(tp_size=args.tp_size, page_size=args.page_size, chunked_prefill_size=chunk,
                                speculative_algorithm=getattr(args, "speculative_algorithm", None))
    if problems:
        raise LaunchError("; ".join(problems))
    if chunk is None:
        add("--chunked-prefill-size", str(ASKS_CHUNKED_PREFILL_SIZE),
            why="ASKS: a recipient's prefill rounds are chunks; SGLang's CPU default turns chunking off")
    if not inherited:
        env[ENV_VAR] = env_value(asks)
    shifted = {None: "float32 KV only", True: "on", False: "off"}[asks.shifted]
    added.append(f"{ENV_VAR}={env_value(asks)}  (ASKS: tau {asks.tau:g}, recompute {asks.recompute_fraction:g}, "
                 f"shifted reuse {shifted}{'; from the environment' if inherited else ''})")


def _from_environ(read, environ: Dict[str, str]):
    """``read(environ)`` (a feature's settings from the environment the schedulers inherit);
    a malformed setting is a :class:`LaunchError` with its message."""
    try:
        return read(environ)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def _plan_compression(config, environ: Dict[str, str], env: Dict[str, str], added: List[str], backend,
                      cuda: bool, given, add):
    """Check the compression settings (``config`` or an inherited ``RKSC_COMPRESSION``) against the
    server's flags, put them in the environment the schedulers inherit and, on a GPU, turn off
    what compression cannot run with (the overlap scheduler; decode CUDA graphs for the
    methods that score by attention). Returns the config (None: off)."""
    from rksc_sgl.runtime.compression_settings import ENV_VAR, compression_config_from_env, env_value
    from rksc_sgl.runtime.plugin import BACKEND_NAME

    inherited = config is None
    if inherited:
        config = _from_environ(compression_config_from_env, environ)
    if config is None:
        return None
    if backend != BACKEND_NAME:
        where = "--disable-radix-cache" if getattr(given, "disable_radix_cache", False) else \
            f"--radix-cache-backend {backend}" if backend else "SGLang's default cache (--rksc-tree off)"
        raise LaunchError(f"--kv-compression runs in --radix-cache-backend {BACKEND_NAME} with the radix cache on; "
                          f"it cannot run with {where}{' (unset ' + ENV_VAR + ')' if inherited else ''}")
    if cuda:
        if not getattr(given, "disable_overlap_schedule", False):
            add("--disable-overlap-schedule", why="compression rewrites rows between steps; a GPU forward in "
                                                  "flight would still read them")
        graphs_off = getattr(given, "disable_cuda_graph", False) or getattr(given, "disable_decode_cuda_graph", False)
        if config.needs_attention and not graphs_off:
            add("--disable-decode-cuda-graph", why=f"compression {config.method} scores by attention, which "
                                                   "replayed graphs do not report")
    if not inherited:
        env[ENV_VAR] = env_value(config)
    added.append(f"{ENV_VAR}={env_value(config)}  (decode-KV compression: {config.method}, budget "
                 f"{config.budget:g}{'; from the environment' if inherited else ''})")
    return config


def _plan_seeded_sampling(seeded: Optional[bool], environ: Dict[str, str], env: Dict[str, str],
                          added: List[str], cuda: bool, given, add) -> None:
    """Put ``RKSC_SEEDED_SAMPLING`` in the environment the SGLang processes inherit and check
    the sampling backend: the seeded path is SGLang's torch sampler."""
    from rksc_sgl.runtime.seeded_sampling import ENV_VAR, seeded_sampling_from_env

    inherited = seeded is None
    if inherited:
        seeded = _from_environ(seeded_sampling_from_env, environ)
    if not seeded:
        if not inherited and ENV_VAR in environ:
            env[ENV_VAR] = "0"  # off as asked, whatever the launching shell says
        return
    sampler = getattr(given, "sampling_backend", None)
    if sampler not in (None, "pytorch"):
        raise LaunchError(f"seeded sampling runs in SGLang's pytorch sampler; it cannot run with "
                          f"--sampling-backend {sampler}")
    if cuda and sampler is None:
        add("--sampling-backend", "pytorch", why="seeded sampling: SGLang's torch sampler takes per-row seeds")
    if not inherited:
        env[ENV_VAR] = "1"
    added.append(f"{ENV_VAR}=1  (each request's sampling_seed honoured{'; from the environment' if inherited else ''})")


def _add_attention_hook(argv: List[str], added: List[str], user_hooks, stride: int,
                        why: str = "RSBCM's attention statistics") -> None:
    from rksc_sgl.runtime.attention_stats import hook_spec, rksc_hook_strides

    hooks = list(user_hooks or [])
    if rksc_hook_strides(hooks):
        return
    value = json.dumps(hooks + [hook_spec(stride)], separators=(",", ":"))
    if user_hooks is None:
        argv.extend(["--forward-hooks", value])
    else:
        argv[:] = _replace_flag(argv, "--forward-hooks", value)
    added.append(f"--forward-hooks [...rksc_attention every {stride} layers]  ({why})")
