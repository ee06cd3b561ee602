"""Shared fixtures: one engine per cache mode for the whole session (model loads once each)."""

from __future__ import annotations

import faulthandler
import gc
import os
import threading
import warnings

import pytest
import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)

import sglang as sgl  # noqa: E402

import rksc_sgl  # noqa: E402

SMALL_POOL = 4096


def _engine(cache: str, **kwargs) -> rksc_sgl.Engine:
    # device="cpu": the suite checks the CPU engine, also on a machine that has a GPU.
    return rksc_sgl.Engine(model="smollm2-135m", cache=cache, num_threads=1, device="cpu", **kwargs)


@pytest.fixture(scope="session")
def radix_engine():
    eng = _engine("radix", kv_pool_tokens=SMALL_POOL, max_running_requests=16)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def none_engine():
    eng = _engine("none", kv_pool_tokens=SMALL_POOL, max_running_requests=16)
    yield eng
    eng.shutdown()


@pytest.fixture()
def use_backend():
    """Install an engine as SGLang's default backend for one test, then restore."""
    from sglang.lang.global_config import global_config

    previous = global_config.default_backend if hasattr(global_config, "default_backend") else None

    def install(engine):
        sgl.set_default_backend(engine)
        return engine

    yield install
    sgl.set_default_backend(previous)


@pytest.fixture()
def checked(radix_engine):
    """The radix engine, with the integrity invariant asserted after the test."""
    yield radix_engine
    radix_engine.check_integrity()


SERVER_GROUP = "sglang-servers"
"""The test modules whose names start with ``test_runtime`` start SGLang servers (about 3 GB
each); all but :data:`BESIDE_THE_GROUP` are this group. Under ``pytest -n 2 --dist loadgroup`` (``make test``) they form one unit of work, run
on one worker one module at a time, first; the other worker takes the in-process modules, a
whole module at a time (their module fixtures start once)."""


BESIDE_THE_GROUP = ("test_runtime_compression_cask.py", "test_runtime_fidelity.py")
"""Server modules of one server each that run outside the group, each its own unit of work,
last: the worker that has finished the in-process modules takes them while the group is still
running (one more server beside the group's, within this machine's memory)."""


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def _starts_servers(nodeid: str) -> bool:
    return _module(nodeid).startswith("test_runtime")


def _in_server_group(nodeid: str) -> bool:
    return _starts_servers(nodeid) and _module(nodeid) not in BESIDE_THE_GROUP


def pytest_collection_modifyitems(session, config, items):
    """On an xdist worker, the SGLang-server group first (the longest unit of work starts at
    once instead of after the others) and the modules beside it last."""
    if hasattr(config, "workerinput"):
        rank = {True: 0, False: 1}
        items.sort(key=lambda item: 2 if _module(item.nodeid) in BESIDE_THE_GROUP
                   else rank[_in_server_group(item.nodeid)])


def pytest_configure(config):
    """On an xdist worker, ``free_port`` draws from this worker's own share of its port band, so
    two workers' servers, each chosen a minute before it binds, cannot pick the same port."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return
    from rksc_sgl.runtime import server_process

    low, high = server_process.QUIET_PORTS
    index, count = int(worker["workerid"].lstrip("gw") or 0), int(worker.get("workercount", 1))
    share = (high - low) // max(count, 1)
    server_process.QUIET_PORTS = (low + index * share, low + (index + 1) * share)


def pytest_runtest_setup(item):
    """On an xdist worker: the in-process modules at a lower CPU priority than the SGLang-server
    group, the longest unit of work (its servers inherit the worker's priority when they start)."""
    if hasattr(item.config, "workerinput"):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0 if _starts_servers(item.nodeid) else 10)
        except OSError:  # lowering a priority back needs privileges: then it stays as it is
            pass


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: the units of work are the SGLang-server group and each other module
    (xdist's own ``xdist_group`` marks do not reach test ids under pytest 9)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServerGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SERVER_GROUP if _in_server_group(nodeid) else nodeid.split("::", 1)[0]

    return ServerGroupScheduling(config, log)


def _leaked_sglang_executors() -> list:
    """SGLang StreamExecutors whose worker thread is still running.

    Each worker is a non-daemon thread that holds its executor, so an executor nobody ended
    keeps the interpreter from exiting: pytest prints its summary and then hangs forever.
    """
    gc.collect()  # ProgramStates caught in reference cycles end their executor when collected
    # By class name: a test may load its own copy of SGLang's interpreter module.
    return [obj for obj in gc.get_objects()
            if type(obj).__name__ == "StreamExecutor" and getattr(obj, "use_thread", False)
            and obj.worker.is_alive()]


def pytest_sessionfinish(session, exitstatus):
    """Fail, rather than hang, when a test leaves SGLang executor threads running."""
    leaked = _leaked_sglang_executors()
    for exe in leaked:
        exe.end()
    for exe in leaked:
        exe.worker.join(timeout=10)
    if leaked:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: {len(leaked)} SGLang StreamExecutor(s) were never ended; their "
              "worker threads would have kept the test process alive at exit.")
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()
             and "tqdm" not in t.name]
    if stuck:
        print(f"\nWARNING: non-daemon threads still running at exit: {stuck}")


def pytest_unconfigure(config):
    """Last resort against a hang at exit: dump every thread's stack and exit with an error.
    Not on an xdist worker: it lives on, idle, until the controller ends it after the last
    worker is done (the controller's own exit is guarded)."""
    if not hasattr(config, "workerinput"):
        faulthandler.dump_traceback_later(120, exit=True)
