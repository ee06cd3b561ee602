"""Run a command whose whole process group ends when the process that started it ends.

``python -m rksc_sgl.runtime.lifeline -- CMD...`` starts ``CMD`` in this process's group and
reads its own stdin, the read end of a pipe whose write end only the owner holds. The kernel
closes that end when the owner exits, however it exits (SIGKILL included), and the read
returns EOF; the lifeline then ends every process of the group (SIGTERM, then SIGKILL after
``--grace`` seconds or as soon as ``CMD`` has exited, itself included). Otherwise it exits
with ``CMD``'s status (``128 + N`` for signal N).

Without it, an owner killed before its ``finally`` runs (a ``kill`` of ``rksc-sgl bench``, a
CI timeout) leaves ``launch_server`` and its scheduler running with nobody to stop them.

Why a pipe and not ``PR_SET_PDEATHSIG``: that signal follows the *thread* that forked the
child, so a server started from a short-lived thread would die with the thread.

| process | group | ends when |
|---|---|---|
| owner (``RuntimeServer``) | its own | - |
| lifeline (this module) | its own (a new session from ``RuntimeServer``; a new group otherwise) | ``CMD`` exits (same status), or its stdin reaches EOF |
| ``CMD`` and its children (``sglang::*``) | the lifeline's | the owner's :meth:`stop`, or the lifeline's SIGTERM/SIGKILL |

Standard library only: it runs before, and apart from, anything heavy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from typing import List, Optional, Sequence

__all__ = ["lifeline_command", "main"]

DEFAULT_GRACE_S = 20.0


def lifeline_command(command: Sequence[str], grace_s: float = DEFAULT_GRACE_S) -> List[str]:
    """``command`` wrapped so that it ends with its owner (who must pass ``stdin=PIPE`` and keep it)."""
    return [sys.executable, "-m", __name__, "--grace", str(grace_s), "--", *command]


def _end_group(grace_s: float, child: subprocess.Popen) -> None:
    """The owner is gone: SIGTERM the whole group, and SIGKILL it if ``child`` outlives the grace."""
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)  # this process ignores SIGTERM (see main)
        child.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)  # ends this process too, and whatever is left


def _watch_owner(grace_s: float, child: subprocess.Popen, ending: threading.Event) -> None:
    """Block until the owner's end of stdin closes, then end the group."""
    # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts the
    # interpreter's shutdown when CMD exits first.
    while os.read(0, 4096):
        pass  # the owner never writes; anything it does write is ignored
    ending.set()
    _end_group(grace_s, child)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rksc_sgl.runtime.lifeline",
                                     description="Run CMD; end its process group when stdin closes.")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help=f"seconds between SIGTERM and SIGKILL (default: {DEFAULT_GRACE_S:.0f})")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        _parser().error("no command given (python -m rksc_sgl.runtime.lifeline -- CMD ...)")
    if args.grace < 0:
        _parser().error(f"--grace must be >= 0, got {args.grace}")
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # lead a group of our own, so that ending "the group" ends no one else's
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    # Ignored after the start, since CMD would inherit an ignored SIGTERM. The owner's stop()
    # sends SIGTERM to the whole group: this process stays until CMD has exited, so that its
    # exit status is CMD's, and the owner's SIGKILL ends it if CMD does not exit.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ending = threading.Event()
    watcher = threading.Thread(target=_watch_owner, args=(args.grace, child, ending), name="lifeline", daemon=True)
    watcher.start()
    code = child.wait()
    if ending.is_set():
        watcher.join()  # its SIGKILL ends this process too: no exit status of CMD's to pass on
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
