"""A server's process group ends with the process that started it, however that one ends.

No model and no SGLang: the "server" is a Python process that starts a child of its own and
sleeps, launched by the real :class:`RuntimeServer` through the real lifeline.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rksc_sgl.runtime.launch_plan import LaunchPlan
from rksc_sgl.runtime.lifeline import lifeline_command
from rksc_sgl.runtime.server_process import RuntimeServer, free_port
from processes import alive

WAIT_S = 30.0

# A stand-in for launch_server: one child of its own (as SGLang's scheduler is), then sleep.
FAKE_SERVER = ("import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")


class FakePlan(LaunchPlan):
    def command(self):
        return [sys.executable, "-c", FAKE_SERVER]


def fake_plan() -> FakePlan:
    return FakePlan(argv=[], env={}, host="127.0.0.1", port=free_port(), added=[])


def server_pids(server: RuntimeServer) -> list:
    """The lifeline, the fake server and its child, once all three run."""
    deadline = time.monotonic() + WAIT_S
    while len(tree := psutil.Process(server.process.pid).children(recursive=True)) < 2:
        assert time.monotonic() < deadline, "the fake server did not start its child"
        time.sleep(0.05)
    return [server.process.pid, *[p.pid for p in tree]]


# The owner: launches the fake server, reports every pid of it, then waits to be killed.
OWNER = f"""
import json, sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_lifeline import fake_plan, server_pids
from rksc_sgl.runtime.server_process import RuntimeServer

server = RuntimeServer(fake_plan()).launch()
print(json.dumps(server_pids(server)), flush=True)
time.sleep(600)
"""


def _wait_gone(pids, timeout=WAIT_S):
    """The pids still alive after up to ``timeout`` seconds (empty once all have ended)."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_owner_that_dies_takes_its_server_group_with_it(sig):
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    pids = []
    try:
        line = owner.stdout.readline()
        pids = json.loads(line)
        assert len(pids) == 3, f"lifeline, fake server and its child expected, got {pids}"
        time.sleep(0.5)
        assert alive(pids) == pids, "the server ended before its owner did"
        owner.send_signal(sig)  # no finally, no stop(): the kernel closes the owner's pipe
        owner.wait(timeout=WAIT_S)
        assert not _wait_gone(pids), "server processes outlived their owner"
    finally:
        for pid in pids:  # never leave anything behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        owner.kill()
        owner.wait(timeout=WAIT_S)
        owner.stdout.close()


def test_stop_ends_the_group_and_the_pipe():
    server = RuntimeServer(fake_plan(), log=open(os.devnull, "w")).launch()
    try:
        pids = server_pids(server)
    finally:
        code = server.stop()
        server.log.close()
    assert code == 128 + signal.SIGTERM  # the fake server's status, passed on by the lifeline
    assert server.process.stdin.closed
    assert not alive(pids)  # stop() has reaped them all before returning


def test_the_command_exit_status_passes_through():
    proc = subprocess.Popen(lifeline_command([sys.executable, "-c", "import sys; sys.exit(3)"]),
                            stdin=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.wait(timeout=WAIT_S) == 3
    finally:
        proc.stdin.close()


def test_a_closed_pipe_ends_the_command_at_once():
    proc = subprocess.Popen(lifeline_command([sys.executable, "-c", "import time; time.sleep(600)"], grace_s=5),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL  # the lifeline's last signal ends its own group


def test_bad_usage_is_refused_by_name():
    for argv, message in (([], "no command given"), (["--grace", "-1", "--", "true"], "--grace must be >= 0")):
        done = subprocess.run(lifeline_command([])[:3] + argv, stdin=subprocess.PIPE, capture_output=True,
                              text=True, timeout=WAIT_S)
        assert done.returncode == 2
        assert message in done.stderr
