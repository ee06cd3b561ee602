"""``rksc-sgl launch-server``: SGLang's own server with the RKSC cache, started and ended safely.

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
CPU only: ``--dtype float32``             ``auto`` turns a float32 checkpoint into float16
CPU only: ``--max-total-tokens 16384``    else the KV pool takes 72% of RAM
CPU only: ``--sleep-on-idle``             else the idle scheduler spins a core
CPU only: ``SGLANG_USE_CPU_ENGINE=1``     SGLang's CPU code paths
no ``sgl_kernel``: ``PYTHONPATH+=cpu_site``  an import-only stand-in in every SGLang process
=======================================  =============================================

``--disable-radix-cache`` (or any ``--radix-cache-backend``) keeps SGLang's choice; an
explicit ``--radix-eviction-policy`` is kept as given. Configurations the scheduler would
reject (``rsbcm`` without the ``rksc`` backend, ``rksc`` with the hierarchical cache, bad
RSBCM settings) fail here with one message, before any process starts.

:class:`RuntimeServer` runs the plan: the server is a new process group; start-up is
bounded (``startup_timeout``) and watched (the launcher process, and every ``sglang::*``
process it spawned, must stay alive until ``/health`` answers 200); :meth:`RuntimeServer.stop`
ends the whole group (SIGTERM, then SIGKILL) and reaps every process that left it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import IO, Any, Deque, Dict, Iterator, List, Optional, Sequence

from rksc_sgl.config import default_cache_dir

__all__ = ["LaunchError", "LaunchPlan", "RuntimeServer", "free_port", "plan_launch", "launch_server_main",
           "CPU_MAX_TOTAL_TOKENS", "running_server"]

CPU_MAX_TOTAL_TOKENS = 16384
"""KV slots of the CPU default pool (about 0.75 GB for SmolLM2-135M in float32)."""

DEFAULT_STARTUP_TIMEOUT_S = 600.0
CPU_SITE = Path(__file__).with_name("cpu_site")
SGLANG_PROCESS_PREFIX = "sglang::"


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


# ---- planning ---------------------------------------------------------------------------
def _sglang_parser() -> argparse.ArgumentParser:
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
                asks=None, seeded_sampling: Optional[bool] = None, cuda: Optional[bool] = None,
                sgl_kernel_installed: Optional[bool] = None, environ: Optional[Dict[str, str]] = None) -> LaunchPlan:
    """Validate SGLang arguments and add RKSC's and the CPU's defaults (see the module doc).

    ``rksc_cache=False`` adds no cache flag: SGLang's own cache choice, as its flags say
    (a stock server, for comparisons). ``asks`` (an ``ASKSConfig``): turn ASKS on in the
    ``rksc`` backend through ``RKSC_ASKS`` (an ``RKSC_ASKS`` already in the environment is
    checked and kept when ``asks`` is None). ``seeded_sampling``: honour each request's
    ``sampling_seed`` (``RKSC_SEEDED_SAMPLING``; None: as the environment says). ``cuda``/``sgl_kernel_installed``/``environ``
    default to this machine's. Raises :class:`LaunchError` (and SGLang's parser exits
    with status 2 on a bad flag).
    """
    from rksc_sgl.runtime.plugin import BACKEND_NAME, EVICTION_POLICY_NAME
    from rksc_sgl.rksc.rsbcm import RSBCMStrategy

    parser = _sglang_parser()
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
    stride = 4
    if policy == EVICTION_POLICY_NAME:
        try:
            strategy = RSBCMStrategy(**(args.radix_eviction_policy_config or {}))
        except (TypeError, ValueError) as exc:
            raise LaunchError(f"--radix-eviction-policy-config for {EVICTION_POLICY_NAME}: {exc}") from None
        stride = strategy.attention_layer_stride
        if attention_stats:
            _add_attention_hook(argv, added, getattr(given, "forward_hooks", None), stride)

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
    if not sgl_kernel_installed:
        path = os.pathsep.join(p for p in (str(CPU_SITE), environ.get("PYTHONPATH", "")) if p)
        env["PYTHONPATH"] = path
        added.append(f"PYTHONPATH={CPU_SITE}  (no sgl_kernel installed: an import-only stand-in)")
    return LaunchPlan(argv=argv, env=env, host=args.host, port=int(args.port), added=added)


ASKS_CHUNKED_PREFILL_SIZE = 4096
"""``--chunked-prefill-size`` added with ASKS where SGLang would turn chunking off (its CPU
default is -1): a recipient's rounds are chunks. Prompts shorter than this are never split."""


def _plan_asks(asks, environ: Dict[str, str], env: Dict[str, str], added: List[str], backend, args,
               given, add) -> None:
    """Check the ASKS settings (from ``asks`` or an inherited ``RKSC_ASKS``) against the
    server's flags and put them in the environment the schedulers inherit."""
    from rksc_sgl.runtime.plugin import BACKEND_NAME
    from rksc_sgl.runtime.asks import ENV_VAR, ASKSSettingsError, asks_config_from_env, asks_unsupported, env_value

    if asks is None:
        try:
            asks = asks_config_from_env(environ)
        except ASKSSettingsError as exc:
            raise LaunchError(str(exc)) from None
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


def _plan_seeded_sampling(seeded: Optional[bool], environ: Dict[str, str], env: Dict[str, str],
                          added: List[str], cuda: bool, given, add) -> None:
    """Put ``RKSC_SEEDED_SAMPLING`` in the environment the SGLang processes inherit and check
    the sampling backend: the seeded path is SGLang's torch sampler."""
    from rksc_sgl.runtime.seeded_sampling import ENV_VAR, seeded_sampling_from_env

    inherited = seeded is None
    if inherited:
        try:
            seeded = seeded_sampling_from_env(environ)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
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


def _add_attention_hook(argv: List[str], added: List[str], user_hooks, stride: int) -> None:
    from rksc_sgl.runtime.attention_stats import HOOK_FACTORY, hook_spec

    hooks = list(user_hooks or [])
    if any(h.get("hook_factory") == HOOK_FACTORY for h in hooks if isinstance(h, dict)):
        return
    value = json.dumps(hooks + [hook_spec(stride)], separators=(",", ":"))
    if user_hooks is None:
        argv.extend(["--forward-hooks", value])
    else:
        argv[:] = _replace_flag(argv, "--forward-hooks", value)
    added.append(f"--forward-hooks [...rksc_attention every {stride} layers]  (RSBCM's attention statistics)")


# ---- running ------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for servers started on an ephemeral port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return False
    return True


class RuntimeServer:
    """One SGLang server process group: start it, wait for it, watch it, end it.

    ``log``: where the server's output goes (a text stream; default: this process's
    stdout). The last lines are kept for error messages either way.
    """

    def __init__(self, plan: LaunchPlan, *, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
                 log: Optional[IO[str]] = None):
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {startup_timeout}")
        self.plan = plan
        self.startup_timeout = startup_timeout
        self.log = log
        self.process: Optional[subprocess.Popen] = None
        self.tail: Deque[str] = collections.deque(maxlen=60)
        self._reader: Optional[threading.Thread] = None
        self._watched: Dict[int, str] = {}

    @property
    def url(self) -> str:
        return self.plan.url

    # -- start ---------------------------------------------------------------------------
    def start(self) -> "RuntimeServer":
        """Launch and wait until ready (stopping everything if it does not get there)."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> "RuntimeServer":
        """Start the process group without waiting (then :meth:`wait_ready`, or :meth:`stop`)."""
        if self.process is not None:
            raise RuntimeError("server already started")
        if not _port_free(self.plan.host, self.plan.port):
            raise LaunchError(f"port {self.plan.port} on {self.plan.host} is already in use "
                              "(pass --port to choose another)")
        self.process = subprocess.Popen(
            self.plan.command(), env={**os.environ, **self.plan.env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True)
        self._reader = threading.Thread(target=self._pump, name="sglang-output", daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        out = self.log or sys.stdout
        for line in self.process.stdout:
            self.tail.append(line.rstrip("\n"))
            with contextlib.suppress(ValueError, OSError):
                out.write(line)
                out.flush()

    def wait_ready(self) -> None:
        """Until ``/health`` answers 200; :class:`LaunchError` if a process dies or time runs out."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            problem = self.problem()
            if problem:
                raise LaunchError(f"SGLang server failed during start-up: {problem}\n{self.last_lines()}")
            if self.healthy(timeout=2.0):
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"SGLang server not ready after {self.startup_timeout:.0f} s "
                                  f"(--startup-timeout)\n{self.last_lines()}")
            time.sleep(0.5)

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def problem(self) -> Optional[str]:
        """Why the server is broken (the launcher exited, an ``sglang::`` process died), or ``None``."""
        import psutil

        if self.process is None:
            return "not started"
        code = self.process.poll()
        if code is not None:
            return f"the launcher process exited with status {code}"
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    name = child.name()
                    if name.startswith(SGLANG_PROCESS_PREFIX) and child.status() != psutil.STATUS_ZOMBIE:
                        self._watched.setdefault(child.pid, name)
        except psutil.NoSuchProcess:
            return "the launcher process is gone"
        for pid, name in list(self._watched.items()):
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                return f"the {name} process (pid {pid}) died"
        return None

    def last_lines(self, n: int = 25) -> str:
        lines = list(self.tail)[-n:]
        return "last server output:\n  " + "\n  ".join(lines) if lines else "(no server output)"

    # -- stop ----------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """End every process of the server (idempotent); returns the launcher's exit status."""
        import psutil

        if self.process is None:
            return None
        procs = []
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.process.pid)
            procs = [parent, *parent.children(recursive=True)]
        procs += [p for pid in self._watched if (p := _process(pid)) is not None]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        code = self.process.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def wait(self, poll_s: float = 1.0) -> str:
        """Block while the server is healthy; return why it stopped."""
        while True:
            problem = self.problem()
            if problem:
                return problem
            time.sleep(poll_s)

    def __enter__(self) -> "RuntimeServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


@contextlib.contextmanager
def running_server(user_argv: Sequence[str], *, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
                   log: Optional[IO[str]] = None, **plan_kwargs: Any) -> Iterator[RuntimeServer]:
    """``with running_server([...sglang args]) as server:`` -- planned, started, always ended."""
    server = RuntimeServer(plan_launch(user_argv, **plan_kwargs), startup_timeout=startup_timeout, log=log)
    try:
        yield server.start()
    finally:
        server.stop()


# ---- the command --------------------------------------------------------------------------
def launcher_parser() -> argparse.ArgumentParser:
    """rksc-sgl's own flags of ``launch-server`` (everything else is SGLang's)."""
    from rksc_sgl.cli import on_off

    parser = argparse.ArgumentParser(
        prog="rksc-sgl launch-server", add_help=False,
        description="Start SGLang's own server (python -m sglang.launch_server) with the RKSC cache "
                    "(--radix-cache-backend rksc --radix-eviction-policy rsbcm and RSBCM's attention hook) "
                    "unless your SGLang flags say otherwise; on a CPU also float32, a bounded KV pool and "
                    "--sleep-on-idle. Every other argument is SGLang's (see `python -m sglang.launch_server "
                    "--help`).")
    group = parser.add_argument_group("rksc-sgl launcher")
    group.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S,
                       help=f"seconds to wait for /health before giving up (default: {DEFAULT_STARTUP_TIMEOUT_S:.0f})")
    group.add_argument("--rksc-cache", type=on_off, default=True,
                       help="off: add no cache flag, so SGLang's own default cache serves (for comparisons; "
                            "default: on)")
    group.add_argument("--attention-stats", type=on_off, default=True,
                       help="with rsbcm, collect RSBCM's attention statistics with a forward hook (default: on)")
    group.add_argument("--asks-tau", type=float, default=None, metavar="TAU",
                       help="turn ASKS semantic KV reuse on with this key-cosine threshold (default: off)")
    group.add_argument("--asks-recompute", type=float, default=None, metavar="FRACTION",
                       help="ASKS: share of the reused span tokens computed anyway (default: 0.5)")
    group.add_argument("--asks-shifted", choices=("auto", "on", "off"), default="auto",
                       help="ASKS: reuse identical donor tokens at another position as rotated copies "
                            "(auto: only with a float32 KV pool; default: auto)")
    group.add_argument("--seeded-sampling", type=on_off, default=None,
                       help="on: honour each request's sampling_seed (SGLang does only with "
                            "--enable-deterministic-inference, which the CPU runtime cannot run); "
                            "min_p must then be 0 (default: off, or as RKSC_SEEDED_SAMPLING says)")
    group.add_argument("--print-command", action="store_true",
                       help="print the SGLang command (environment included) and exit without starting it")
    return parser


def _asks_from_flags(ours: argparse.Namespace):
    """The ``ASKSConfig`` of ``--asks-*`` (``None`` without ``--asks-tau``: the environment's)."""
    from rksc_sgl.rksc.tree_cache import ASKSConfig

    if ours.asks_tau is None:
        if ours.asks_recompute is not None or ours.asks_shifted != "auto":
            raise LaunchError("--asks-recompute and --asks-shifted need --asks-tau (which turns ASKS on)")
        return None
    shifted = {"auto": None, "on": True, "off": False}[ours.asks_shifted]
    recompute = 0.5 if ours.asks_recompute is None else ours.asks_recompute
    return ASKSConfig(enabled=True, tau=ours.asks_tau, recompute_fraction=recompute, shifted=shifted)


def launch_server_main(argv: Sequence[str]) -> int:
    """``rksc-sgl launch-server [launcher flags] [SGLang flags]``: run until stopped."""
    ours, sglang_argv = launcher_parser().parse_known_args(list(argv))
    if any(a in ("-h", "--help") for a in sglang_argv):
        launcher_parser().print_help()
        print("\nSGLang's own flags follow.\n")
        _sglang_parser().print_help()
        return 0
    try:
        plan = plan_launch(sglang_argv, rksc_cache=ours.rksc_cache, attention_stats=ours.attention_stats,
                           asks=_asks_from_flags(ours), seeded_sampling=ours.seeded_sampling)
    except (LaunchError, ValueError) as exc:
        print(f"rksc-sgl launch-server: error: {exc}", file=sys.stderr)
        return 2
    for line in plan.added:
        print(f"[rksc-sgl] added {line}", file=sys.stderr)
    if ours.print_command:
        print(plan.shell_command())
        return 0
    server = RuntimeServer(plan, startup_timeout=ours.startup_timeout)
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        stop_requested.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start()
        print(f"[rksc-sgl] SGLang server ready at {server.url} (Ctrl-C stops it and every process it started)",
              file=sys.stderr, flush=True)
        reason = server.wait()
        print(f"rksc-sgl launch-server: error: server stopped: {reason}", file=sys.stderr)
        return 1
    except LaunchError as exc:
        print(f"rksc-sgl launch-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[rksc-sgl] stopping the server", file=sys.stderr)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
