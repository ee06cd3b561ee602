"""``--sleep-on-idle`` for SGLang's data-parallel controller.

With ``--dp-size N`` SGLang 0.5.23 starts a controller process that hands each request to a
rank. Its ``DataParallelController.event_loop`` drains its socket without blocking, in an
endless loop, so it keeps a core about half busy for as long as the server is up, whatever
``--sleep-on-idle`` says (9 min 47 s of CPU in 18 min on the 2-core test machine). The
plugin registers :func:`event_loop_sleeping_on_idle` as an AROUND hook on it: with
``--sleep-on-idle`` the controller waits for its socket (``zmq`` poll, up to
:data:`POLL_MS`, feeding SGLang's watchdog between waits) before it drains it, as SGLang's
loop does; a request is handed on as soon as it arrives. Without the flag SGLang's own loop
runs.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.data_parallel_controller.DataParallelController.event_loop"
POLL_MS = 1000


def event_loop_sleeping_on_idle(original, controller, *args, **kwargs):
    """AROUND hook of ``DataParallelController.event_loop`` (see the module docstring)."""
    if not getattr(controller.server_args, "sleep_on_idle", False):
        return original(controller, *args, **kwargs)
    import zmq

    from sglang.srt.managers.io_struct import sock_recv

    socket = controller.recv_from_tokenizer
    while True:
        controller.soft_watchdog.feed()
        if not socket.poll(timeout=POLL_MS):
            continue
        while True:
            try:
                request = sock_recv(socket, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            controller._request_dispatcher(request)
            controller.soft_watchdog.feed()


def register_hook() -> None:
    """Register the hook with SGLang's plugin ``HookRegistry`` (once per process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not any(h is event_loop_sleeping_on_idle for _, h, _ in HookRegistry._hooks.get(TARGET, ())):
        HookRegistry.register(TARGET, event_loop_sleeping_on_idle, HookType.AROUND)
