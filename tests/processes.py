"""Which processes are still running: the check behind every "nothing left running" assertion."""

import contextlib
from typing import Iterator

import psutil


def alive(pids) -> list:
    """The pids that still name a running process (a zombie has ended: it only awaits its reaper)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def server_pids(server) -> set:
    """A ``RuntimeServer``'s (or router's) launcher, its watched ``sglang::`` processes and
    every process below the launcher now."""
    pids = {server.process.pid} | set(server._watched)
    try:
        pids |= {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
    except psutil.Error:
        pass
    return pids


def assert_gone(pids) -> None:
    left = alive(pids)
    assert not left, f"processes left running: {left}"


@contextlib.contextmanager
def left_nothing(server_context) -> Iterator:
    """``with left_nothing(running_server(...)) as server``: the server of ``server_context``
    (a context that starts and always ends one ``RuntimeServer``, or a ``RuntimeServer``
    itself, which starts on entering unless already launched and stops on leaving); on
    leaving, none of its processes, seen on entering and at the end, is still running."""
    pids = set()
    with server_context as running:
        pids = server_pids(running)
        yield running
        pids |= server_pids(running)
    assert_gone(pids)
