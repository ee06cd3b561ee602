"""The data-parallel controller's loop under ``--sleep-on-idle`` (``rksc_sgl.runtime.dp_controller``):
a real ``zmq`` socket pair and a stand-in controller, whose watchdog counts the loop's turns."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import zmq

from sglang.srt.managers.io_struct import sock_send

from rksc_sgl.runtime import dp_controller


class Stop(Exception):
    pass


STOP = threading.Event()


def _controller(sleep_on_idle: bool, received: list, turns_limit: int):
    context = zmq.Context.instance()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    turns = []

    def feed():
        turns.append(time.monotonic())
        if len(turns) > turns_limit or STOP.is_set():
            raise Stop

    controller = SimpleNamespace(server_args=SimpleNamespace(sleep_on_idle=sleep_on_idle), recv_from_tokenizer=pull,
                                 soft_watchdog=SimpleNamespace(feed=feed), _request_dispatcher=received.append)
    return controller, push, turns


def _run(controller, original):
    errors = []

    def target():
        try:
            dp_controller.event_loop_sleeping_on_idle(original, controller)
        except Stop:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_with_sleep_on_idle_the_loop_waits_for_requests_and_hands_each_on():
    received: list = []
    dp_controller.POLL_MS, saved = 200, dp_controller.POLL_MS
    STOP.clear()
    try:
        controller, push, turns = _controller(True, received, turns_limit=10_000)
        thread, errors = _run(controller, original=lambda *_: (_ for _ in ()).throw(AssertionError("SGLang's loop ran")))
        time.sleep(1.0)
        idle_turns = len(turns)
        for request in ({"rid": "a"}, {"rid": "b"}):
            sock_send(push, request)
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [{"rid": "a"}, {"rid": "b"}]
        # Idle for a second: a few waits of 200 ms, not a spinning loop (SGLang's turns
        # millions of times a second).
        assert 2 <= idle_turns <= 10, idle_turns
        STOP.set()
        thread.join(timeout=10)
        assert not thread.is_alive() and not errors
    finally:
        dp_controller.POLL_MS = saved


def test_without_the_flag_sglangs_own_loop_runs():
    calls = []
    controller = SimpleNamespace(server_args=SimpleNamespace(sleep_on_idle=False))
    dp_controller.event_loop_sleeping_on_idle(lambda c: calls.append(c), controller)
    assert calls == [controller]


def test_the_plugin_registers_the_hook():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from rksc_sgl.runtime import plugin

    plugin.register()
    hooks = HookRegistry._hooks[dp_controller.TARGET]
    assert sum(h is dp_controller.event_loop_sleeping_on_idle for _, h, _ in hooks) == 1
