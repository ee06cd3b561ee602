"""``rksc-sgl launch-server``: SGLang's own server with the RKSC cache, from one command line.

The command line is SGLang's (``python -m sglang.launch_server ...``) plus a few flags of
the launcher's own (:func:`launcher_parser`). :func:`launch_server_main` plans the launch
(:mod:`rksc_sgl.runtime.launch_plan`: SGLang's parser checks every flag before anything
starts, then RKSC's and the CPU's defaults are added), runs it as one process group
(:mod:`rksc_sgl.runtime.server_process`) and ends that group on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Sequence

from rksc_sgl.rksc.compression_config import METHODS
from rksc_sgl.runtime.launch_plan import LaunchError, plan_launch, sglang_parser
from rksc_sgl.runtime.server_process import DEFAULT_STARTUP_TIMEOUT_S, RuntimeServer

__all__ = ["launch_server_main", "launcher_parser"]


def launcher_parser() -> argparse.ArgumentParser:
    """rksc-sgl's own flags of ``launch-server`` (everything else is SGLang's)."""
    from rksc_sgl.arg_types import add_deprecated_alias, on_off_flag, on_off

    parser = argparse.ArgumentParser(
        prog="rksc-sgl launch-server", add_help=False,
        description="Start SGLang's own server (python -m sglang.launch_server) with RKSC's tree "
                    "(--radix-cache-backend rksc), RSBCM eviction (--radix-eviction-policy rsbcm) and RSBCM's "
                    "attention hook unless your SGLang flags say otherwise (bench mode rsbcm; add --asks-tau "
                    "for ASKS: the server side of bench mode rksc; --kv-compression for decode-KV compression "
                    "of running requests, the radix cache kept on); on a CPU also float32, a bounded KV pool and "
                    "--sleep-on-idle. Every other argument is SGLang's (see `python -m sglang.launch_server "
                    "--help`).")
    group = parser.add_argument_group("rksc-sgl launcher")
    group.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S,
                       help=f"seconds to wait for /health before giving up (default: {DEFAULT_STARTUP_TIMEOUT_S:.0f})")
    group.add_argument("--rksc-tree", dest="rksc_cache", **on_off_flag(
        default=True, help="on: RKSC's tree with RSBCM eviction where your flags choose no cache; off: add no "
                           "cache flag, so SGLang's own default cache serves (bench mode radix; default: on)"))
    add_deprecated_alias(group, "--rksc-cache", "--rksc-tree", "rksc_cache", type=on_off, choices=(True, False))
    group.add_argument("--attention-stats", **on_off_flag(
        default=True, help="with rsbcm, collect RSBCM's attention statistics with a forward hook (default: on)"))
    group.add_argument("--asks-tau", type=float, default=None, metavar="TAU",
                       help="turn ASKS semantic KV reuse on with this key-cosine threshold (default: off)")
    group.add_argument("--asks-recompute", type=float, default=None, metavar="FRACTION",
                       help="ASKS: share of the reused span tokens computed anyway (default: 0.5)")
    group.add_argument("--asks-shifted", choices=("auto", "on", "off"), default="auto",
                       help="ASKS: reuse identical donor tokens at another position as rotated copies "
                            "(auto: only with a float32 KV pool; default: auto)")
    group.add_argument("--kv-compression", choices=METHODS, default=None, metavar="{" + ",".join(METHODS) + "}",
                       help="compress each running request's own decode KV with this method, the radix cache "
                            "kept on (RKSC_COMPRESSION; every method runs on the runtime; default: off, "
                            "or as RKSC_COMPRESSION says)")
    group.add_argument("--kv-budget", type=float, default=None, metavar="B",
                       help="compression: share of the decoded tokens whose KV is kept, in (0, 1] (default: 0.16)")
    group.add_argument("--kv-compression-config", default=None, metavar="JSON",
                       help="compression: other CompressionConfig fields as a JSON object, e.g. "
                            "'{\"buffer\": 16, \"min_tokens\": 32, \"lam\": 0.1}' (see docs/kv-compression.md)")
    group.add_argument("--seeded-sampling", **on_off_flag(default=None),
                       help="on: honour each request's sampling_seed (SGLang does only with "
                            "--enable-deterministic-inference, which the CPU runtime cannot run); "
                            "min_p must then be 0 (default: off, or as RKSC_SEEDED_SAMPLING says)")
    group.add_argument("--print-command", action="store_true",
                       help="print the SGLang command (environment included) and exit without starting it")
    return parser


def _asks_from_flags(ours: argparse.Namespace):
    """The ``ASKSConfig`` of ``--asks-*`` (``None`` without ``--asks-tau``: the environment's)."""
    from rksc_sgl.rksc.asks_config import ASKSConfig

    if ours.asks_tau is None:
        if ours.asks_recompute is not None or ours.asks_shifted != "auto":
            raise LaunchError("--asks-recompute and --asks-shifted need --asks-tau (which turns ASKS on)")
        return None
    shifted = {"auto": None, "on": True, "off": False}[ours.asks_shifted]
    recompute = 0.5 if ours.asks_recompute is None else ours.asks_recompute
    return ASKSConfig(enabled=True, tau=ours.asks_tau, recompute_fraction=recompute, shifted=shifted)


def _compression_from_flags(ours: argparse.Namespace):
    """The ``CompressionConfig`` of ``--kv-*`` (``None`` without ``--kv-compression``: the environment's)."""
    import json

    from rksc_sgl.rksc.compression_config import compression_config

    if ours.kv_compression is None:
        if ours.kv_budget is not None or ours.kv_compression_config is not None:
            raise LaunchError("--kv-budget and --kv-compression-config need --kv-compression (which turns "
                              "compression on)")
        return None
    fields = {}
    if ours.kv_compression_config is not None:
        try:
            fields = json.loads(ours.kv_compression_config)
        except json.JSONDecodeError as exc:
            raise LaunchError(f"--kv-compression-config must be a JSON object, got "
                              f"{ours.kv_compression_config!r} ({exc})") from None
        if not isinstance(fields, dict):
            raise LaunchError(f"--kv-compression-config must be a JSON object, got {ours.kv_compression_config!r}")
        for name, flag in (("method", "--kv-compression"), ("budget", "--kv-budget")):
            if name in fields:
                raise LaunchError(f"--kv-compression-config: give {name} with {flag}")
    fields["method"] = ours.kv_compression
    if ours.kv_budget is not None:
        fields["budget"] = ours.kv_budget
    try:
        return compression_config(fields)
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"--kv-compression: {exc}") from None


def launch_server_main(argv: Sequence[str]) -> int:
    """``rksc-sgl launch-server [launcher flags] [SGLang flags]``: run until stopped."""
    ours, sglang_argv = launcher_parser().parse_known_args(list(argv))
    if any(a in ("-h", "--help") for a in sglang_argv):
        launcher_parser().print_help()
        print("\nSGLang's own flags follow.\n")
        sglang_parser().print_help()
        return 0
    try:
        plan = plan_launch(sglang_argv, rksc_cache=ours.rksc_cache, attention_stats=ours.attention_stats,
                           asks=_asks_from_flags(ours), seeded_sampling=ours.seeded_sampling,
                           compression=_compression_from_flags(ours))
    except (LaunchError, ValueError) as exc:
        print(f"rksc-sgl launch-server: error: {exc}", file=sys.stderr)
        return 2
    for line in plan.added:
        print(f"[rksc-sgl] added {line}", file=sys.stderr)
    if ours.print_command:
        print(plan.shell_command())
        return 0
    server = RuntimeServer(plan, startup_timeout=ours.startup_timeout)
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        stop_requested.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start()
        print(f"[rksc-sgl] SGLang server ready at {server.url} (Ctrl-C stops it and every process it started)",
              file=sys.stderr, flush=True)
        reason = server.wait()
        print(f"rksc-sgl launch-server: error: server stopped: {reason}", file=sys.stderr)
        return 1
    except LaunchError as exc:
        print(f"rksc-sgl launch-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[rksc-sgl] stopping the server", file=sys.stderr)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
