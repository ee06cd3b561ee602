"""Which processes are still running: the check behind every "nothing left running" assertion."""

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
