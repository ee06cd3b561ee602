"""RuntimeServer's watch over SGLang's processes: a fork of a scheduler is no scheduler.

No model and no SGLang: the "launcher" starts one ``sglang::scheduler_TP0`` process that, like
a real scheduler running ``lscpu`` or (TP on a CPU) inductor's ``g++``, forks short-lived
children that bear its name until they end. In a ``--tp-size 2`` run here one such fork was
taken for a dead scheduler and the start-up failed.
"""

import os
import signal
import sys
import time

from rksc_sgl.runtime.launch_plan import LaunchPlan
from rksc_sgl.runtime.server_process import RuntimeServer, free_port
from processes import alive

WAIT_S = 30.0
SCHEDULER = """
import os, time, setproctitle
setproctitle.setproctitle("sglang::scheduler_TP0")
for _ in range(40):  # about 4 s of forks that live 0.2 s each
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(0)
    time.sleep(0.1)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:  # every fork reaped already (a loaded machine): none left to wait for
        pass
time.sleep(600)
"""
LAUNCHER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SCHEDULER!r}]); time.sleep(600)"


class ForkingPlan(LaunchPlan):
    def command(self):
        return [sys.executable, "-c", LAUNCHER]


def _scheduler(server: RuntimeServer) -> int:
    deadline = time.monotonic() + WAIT_S
    while True:
        assert server.problem() is None, server.problem()
        if server._watched:
            return next(iter(server._watched))
        assert time.monotonic() < deadline, "the fake scheduler did not start"
        time.sleep(0.05)


def test_forks_of_a_scheduler_are_not_watched_but_the_scheduler_is():
    server = RuntimeServer(ForkingPlan(argv=[], env={}, host="127.0.0.1", port=free_port(), added=[])).launch()
    pids = set()
    try:
        scheduler = _scheduler(server)
        pids = {server.process.pid, scheduler} | {p.pid for p in server._children()}
        end = time.monotonic() + 5.0  # while the forks come and go
        while time.monotonic() < end:
            assert server.problem() is None, server.problem()
            time.sleep(0.05)
        assert list(server._watched) == [scheduler]
        os.kill(scheduler, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while (problem := server.problem()) is None:
            assert time.monotonic() < deadline, "a dead scheduler went unnoticed"
            time.sleep(0.05)
        assert problem == f"the sglang::scheduler_TP0 process (pid {scheduler}) died"
    finally:
        server.stop()
    assert not alive(pids)
