"""SGLang's router (``sglang-router``) in front of rksc workers, run as one process group.

The router is PyPI's ``sglang-router`` (pinned in ``requirements/``; a Rust binary wheel)
started as ``python -m sglang_router.launch_router``. :func:`plan_router` checks the flags
with the router's own parser, before anything starts, and adds what the workers need:

=======================================  =============================================
added unless the flags say so             why
=======================================  =============================================
``--host 127.0.0.1 --port <free>``        a port of its own
``--policy cache_aware``                  a program's requests go where its prefix is
``--prometheus-port <free>``              the default (29000) is one port for every
                                          router on the machine: a second one fails
``--health-check-timeout-secs 60``        SGLang's ``/health`` waits for the scheduler;
                                          a CPU worker in a long forward answers after
                                          the default 5 s, and 3 such misses took it
                                          out of the rotation in a run here
=======================================  =============================================

:class:`RuntimeRouter` runs the plan as :class:`~rksc_sgl.runtime.server_process.RuntimeServer`
runs a server (a new process group under the lifeline, the ``sglang::router`` process
watched, :meth:`~rksc_sgl.runtime.server_process.RuntimeServer.stop` ends the group); it is
ready once ``/health`` answers and ``/workers`` lists every worker healthy (the router
registers them in the background after it starts answering).

What the router (0.3.2) does and does not carry is in :mod:`rksc_sgl.runtime.client`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
import sys
import time
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence

import requests

from rksc_sgl.runtime.client import _DP_RANK_SUFFIX
from rksc_sgl.runtime.launch_plan import LaunchError
from rksc_sgl.runtime.server_process import RuntimeServer, free_port

__all__ = ["RouterPlan", "RuntimeRouter", "plan_router", "running_router", "ROUTER_HEALTH_TIMEOUT_S"]

ROUTER_HEALTH_TIMEOUT_S = 60
DEFAULT_ROUTER_STARTUP_TIMEOUT_S = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the router colours its log even into a pipe


@dataclasses.dataclass(frozen=True)
class RouterPlan:
    """What to run: the router's arguments, and the workers it must list before it is ready."""

    argv: List[str]
    host: str
    port: int
    worker_urls: List[str]
    added: List[str]
    env: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> List[str]:
        return [sys.executable, "-m", "sglang_router.launch_router", *self.argv]

    def shell_command(self) -> str:
        return " ".join(shlex.quote(a) for a in ["python", "-m", "sglang_router.launch_router", *self.argv])


def _router_args(argv: Sequence[str]):
    try:
        from sglang_router.launch_router import parse_router_args
    except ImportError as exc:
        raise LaunchError(f"sglang-router is not installed ({exc}); it is pinned in requirements/lock.txt "
                          "(make setup)") from None
    return parse_router_args(list(argv))


def plan_router(worker_urls: Sequence[str], argv: Sequence[str] = (), *, policy: Optional[str] = None) -> RouterPlan:
    """The router's command line: ``argv`` (the router's own flags) plus the module doc's
    defaults, checked by the router's parser (which exits with status 2 on a bad flag)."""
    if not worker_urls:
        raise LaunchError("the router needs at least one worker URL")
    if "--worker-urls" in argv:
        raise LaunchError("give the workers as worker_urls, not --worker-urls")
    argv, added = list(argv), []

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    def add(flag: str, value: str, why: str) -> None:
        argv.extend([flag, value])
        added.append(f"{flag} {value}  ({why})")

    if not given("--host"):
        add("--host", "127.0.0.1", "this machine only")
    if not given("--port"):
        add("--port", str(free_port()), "a free port")
    if policy is not None:
        if given("--policy"):
            raise LaunchError("give the policy once (policy= or --policy)")
        argv += ["--policy", policy]
    if not given("--prometheus-port"):
        add("--prometheus-port", str(free_port()), "the default 29000 would be every router's")
    if not given("--health-check-timeout-secs"):
        add("--health-check-timeout-secs", str(ROUTER_HEALTH_TIMEOUT_S),
            "a busy CPU worker answers /health late")
    urls = [u.rstrip("/") for u in worker_urls]
    argv += ["--worker-urls", *urls]
    args = _router_args(argv)
    return RouterPlan(argv=argv, host=args.host, port=int(args.port), worker_urls=urls, added=added)


class RuntimeRouter(RuntimeServer):
    """The router as one process group: started, watched and ended as a server is."""

    def __init__(self, plan: RouterPlan, *, startup_timeout: float = DEFAULT_ROUTER_STARTUP_TIMEOUT_S,
                 log: Optional[IO[str]] = None):
        super().__init__(plan, startup_timeout=startup_timeout, log=log)

    def wait_ready(self) -> None:
        """Until ``/health`` answers and ``/workers`` lists every planned worker healthy;
        :class:`LaunchError` (with the router's last lines) if it dies or time runs out."""
        deadline = time.monotonic() + self.startup_timeout
        missing: List[str] = list(self.plan.worker_urls)
        while True:
            problem = self.problem()
            if problem:
                raise LaunchError(f"SGLang router failed during start-up: {problem}\n{self.last_lines()}")
            if self.healthy(timeout=2.0):
                missing = sorted(set(self.plan.worker_urls) - self.healthy_workers())
                if not missing:
                    return
            if time.monotonic() > deadline:
                raise LaunchError(f"SGLang router not ready after {self.startup_timeout:.0f} s (workers not yet "
                                  f"listed healthy: {', '.join(missing)})\n{self.last_lines()}")
            time.sleep(0.5)

    def healthy_workers(self) -> set:
        """The worker URLs the router lists as healthy now."""
        try:
            response = requests.get(self.url + "/workers", timeout=5)
            response.raise_for_status()
            listed = [w for w in response.json()["workers"] if isinstance(w, dict)]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return set()
        # --dp-aware lists each DP rank of a server as URL@rank: the server is ready when all are.
        ranks: Dict[str, List[bool]] = {}
        for worker in listed:
            url = _DP_RANK_SUFFIX.sub("", str(worker.get("url", "")).rstrip("/"))
            ranks.setdefault(url, []).append(bool(worker.get("is_healthy")))
        return {url for url, healthy in ranks.items() if all(healthy)}

    def last_lines(self, n: int = 25) -> str:
        lines = [_ANSI.sub("", line) for line in list(self.tail)[-n:]]
        return "last router output:\n  " + "\n  ".join(lines) if lines else "(no router output)"


@contextlib.contextmanager
def running_router(worker_urls: Sequence[str], argv: Sequence[str] = (), *,
                   startup_timeout: float = DEFAULT_ROUTER_STARTUP_TIMEOUT_S, log: Optional[IO[str]] = None,
                   **plan_kwargs: Any) -> Iterator[RuntimeRouter]:
    """``with running_router([worker urls], policy="round_robin") as router:`` -- planned, started, always ended."""
    router = RuntimeRouter(plan_router(worker_urls, argv, **plan_kwargs), startup_timeout=startup_timeout, log=log)
    try:
        yield router.start()
    finally:
        router.stop()
