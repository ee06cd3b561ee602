"""SGLang's server as one process group, started and ended safely.

:class:`RuntimeServer` runs a :class:`~rksc_sgl.runtime.launch_plan.LaunchPlan`: the server is a new process group; start-up is
bounded (``startup_timeout``) and watched (the launcher process, and every ``sglang::*``
process it spawned, must stay alive until ``/health`` answers 200); :meth:`RuntimeServer.stop`
ends the whole group (SIGTERM, then SIGKILL) and reaps every process that left it.

The group is also ended when this process ends without calling :meth:`RuntimeServer.stop`
(killed, or a ``finally`` that never ran): the server runs under
:mod:`rksc_sgl.runtime.lifeline`, whose stdin is a pipe only this process holds.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import IO, Any, Deque, Dict, Iterator, Optional, Sequence

from rksc_sgl.runtime.launch_plan import LaunchError, LaunchPlan, plan_launch
from rksc_sgl.runtime.lifeline import lifeline_command

__all__ = ["RuntimeServer", "free_port", "running_server", "DEFAULT_STARTUP_TIMEOUT_S"]

DEFAULT_STARTUP_TIMEOUT_S = 600.0
SGLANG_PROCESS_PREFIX = "sglang::"
BIND_ERROR = "error while attempting to bind on address"
"""uvicorn's message when the server's port is taken."""


QUIET_PORTS = (30000, 32768)
"""Where :func:`free_port` looks first: above SGLang's own picks (22000-29999, its NCCL and
dist-init ports) and below the kernel's ephemeral range (32768 up by default), which every
outgoing connection and every ``bind(0)`` (gloo's listeners among them) draws from. A
server binds its port a minute after it was chosen; in an ephemeral port, a server
starting beside it took it first in a run here, and uvicorn's bind failed."""


class _PortPicker:
    """Free ports from :data:`QUIET_PORTS`, drawn from the OS's entropy (not the ``random``
    module's shared state, which a library or a test may seed) and never the same port twice while it is among the last :attr:`REMEMBERED`
    handed out by this process (a server binds its port a minute after it is chosen, so a
    second pick meanwhile would find it still free)."""

    REMEMBERED = 512

    def __init__(self):
        self._draw = random.SystemRandom()
        self._handed_out: Deque[int] = collections.deque(maxlen=self.REMEMBERED)
        self._lock = threading.Lock()

    def pick(self, host: str) -> int:
        low, high = QUIET_PORTS
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                high = min(high, int(f.read().split()[0]))
        with self._lock:
            for port in self._draw.sample(range(low, high), min(64, max(0, high - low))):
                if port in self._handed_out:
                    continue
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    try:
                        sock.bind((host, port))
                    except OSError:
                        continue
                self._handed_out.append(port)
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]


_PORTS = _PortPicker()
"""This process's one picker: its memory of handed-out ports is what keeps two picks apart."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody uses now and this process has not handed out lately, from
    :data:`QUIET_PORTS` below the ephemeral range (any free port if that range starts lower
    or the band is taken)."""
    return _PORTS.pick(host)


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
            lifeline_command(self.plan.command()), env={**os.environ, **self.plan.env}, stdin=subprocess.PIPE,
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
                stranger = self._stranger_on_port()
                if stranger:
                    raise LaunchError(f"SGLang server failed during start-up: port {self.plan.port} answers, but "
                                      f"from {stranger}, not from this server (pass --port to choose another)\n"
                                      f"{self.last_lines()}")
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"SGLang server not ready after {self.startup_timeout:.0f} s "
                                  f"(--startup-timeout)\n{self.last_lines()}")
            time.sleep(0.5)

    def _stranger_on_port(self) -> Optional[str]:
        """The process listening on the server's port when it is not one of this server's
        (another server that took the port first answers ``/health`` as well), else ``None``;
        ``None`` too where the system does not say who listens."""
        import psutil

        ours = {self.process.pid, *(p.pid for p in self._children())}
        try:
            listeners = [c for c in psutil.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.plan.port]
        except (psutil.Error, OSError):
            return None
        if not listeners or any(c.pid in ours or c.pid is None for c in listeners):
            return None
        pid = listeners[0].pid
        proc = _process(pid)
        with contextlib.suppress(psutil.Error):
            return f"process {pid} ({' '.join(' '.join(proc.cmdline()).split())[:120]})"
        return f"process {pid}"

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
        bind_error = next((line for line in list(self.tail) if BIND_ERROR in line), None)
        if bind_error is not None:  # uvicorn gives up, but the launcher and its schedulers stay up
            return f"its HTTP server could not bind port {self.plan.port}: {bind_error.strip()}"
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.pid in self._watched:
                        continue
                    name = child.name()
                    if (name.startswith(SGLANG_PROCESS_PREFIX) and child.status() != psutil.STATUS_ZOMBIE
                            and time.time() - child.create_time() >= WATCH_AFTER_S
                            and not _forked_helper(child, name)):
                        self._watched[child.pid] = name
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

    def memory_bytes(self) -> int:
        """What the server's processes hold that no other process shares (their USS, summed):
        the memory one more such server would take."""
        import psutil

        total = 0
        for proc in self._children():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().uss
        return total

    def _children(self) -> list:
        """Every process below the lifeline now (none once it is gone, or before it starts)."""
        import psutil

        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def last_lines(self, n: int = 25) -> str:
        lines = list(self.tail)[-n:]
        return "last server output:\n  " + "\n  ".join(lines) if lines else "(no server output)"

    # -- stop ----------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """End every process of the server (idempotent); returns the launcher's exit status."""
        import psutil

        if self.process is None:
            return None
        procs = self._children() + [p for pid in self._watched if (p := _process(pid)) is not None]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        # The lifeline (self.process) outlives its command by a moment and passes on its status;
        # it is waited for by Popen only, since psutil's wait would reap it and lose the status.
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        code = self.process.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # the lifeline's pipe: nothing is left for it to end
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


WATCH_AFTER_S = 1.0
"""An ``sglang::`` process is watched once it has lived this long: a scheduler's short-lived
forks (``lscpu``, inductor's ``g++``), which bear its name, are mostly gone by then."""


def _forked_helper(child, name: str) -> bool:
    """Whether ``child`` is a short-lived fork of an ``sglang::`` process rather than one of
    SGLang's own: it bears its parent's name (a fork keeps the title until it execs), as a
    scheduler's ``lscpu`` or, with TP on a CPU, inductor's ``g++`` does for a moment, or it is
    already gone by the time it is looked at. Its exit is no failure. SGLang's processes are named apart from their parents (``sglang::scheduler_DP0``
    below ``sglang::data_parallel_controller``)."""
    import psutil

    try:
        parent = child.parent()
        return parent is not None and parent.name() == name
    except psutil.NoSuchProcess:
        return True  # ended (and was reaped) while we looked: a fork's way; nothing to watch
    except psutil.Error:
        return False


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
