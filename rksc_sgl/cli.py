"""The ``rksc-sgl`` command: ``run PROGRAM.py``, ``demo``, ``serve``, ``launch-server``, ``patch``,
``bench``. Each subcommand parses here and hands over to the package that does the work:

==================  ===================================================================
command             runs
==================  ===================================================================
``run``             the program as ``__main__`` on an engine installed as SGLang's default
                    (or, with ``--endpoint URL``, on a running SGLang server)
``demo``            :func:`rksc_sgl.demo.demo_command`: stock radix and RKSC side by side
``serve``           :func:`rksc_sgl.serving.server.serve` over an embedded engine
``launch-server``   :func:`rksc_sgl.runtime.launcher.launch_server_main` (SGLang's own server)
``patch``           :mod:`rksc_sgl.runtime.sglang_patches`
``bench``           :func:`rksc_sgl.bench.bench_command` (``--list``: workloads and modes)
==================  ===================================================================
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from rksc_sgl.arg_types import positive_int
from rksc_sgl.engine_flags import add_engine_args, endpoint_backend, engine_kwargs
from rksc_sgl.program_runner import print_stats


DESCRIPTION = """\
rksc-sgl extends SGLang's radix-tree KV cache for multi-branch reasoning programs: ASKS
(semantic KV reuse between similar spans), RSBCM (Reasoning-Selective Block Cache Manager:
attention-aware eviction), CGEE (confidence-gated verification), branch stop and decode-KV
compression.

Two backends run the same SGLang programs (@sgl.function):
  SGLang's runtime   rksc-sgl launch-server --model-path MODEL [SGLang flags]
                     starts SGLang's own server with RKSC's tree (--radix-cache-backend rksc);
                     programs reach it with sgl.RuntimeEndpoint(URL), or `run --endpoint URL`.
  embedded engine    rksc-sgl run PROGRAM.py --cache rksc-tree ...
                     an engine in this process, built on SGLang's cache classes (CPU or CUDA);
                     `serve` puts it behind SGLang's HTTP API.
`bench` and `demo` compare stock radix with RKSC on either (--backend engine|runtime)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rksc-sgl", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run", help="run an SGLang program file on an embedded engine (or a server: --endpoint)",
        description="Build an engine, install it as SGLang's default backend, run PROGRAM as "
                    "__main__, then print the engine statistics of the whole run (with --endpoint URL: "
                    "the server's). Arguments after `--` are passed to the program.",
        usage="rksc-sgl run PROGRAM.py [engine options] [-- program arguments]",
    )
    run.add_argument("program", metavar="PROGRAM.py", help="path of the Python program to run")
    run.set_defaults(subparser=run)
    add_engine_args(run)

    from rksc_sgl.demo import add_demo_args

    demo = sub.add_parser(
        "demo", help="the same reasoning program on stock radix and on RKSC, side by side",
        description="Self-consistency (sampled chains of thought, majority vote) on a few reasoning-gym "
                    "problems under bench mode radix (stock SGLang) and bench mode rksc (every RKSC feature), "
                    "on the packaged SmolLM2-135M-Instruct model; prints wall time, prompt tokens computed "
                    "and cached, decode tokens and answers agreeing, per mode. --backend runtime runs each "
                    "mode as a real SGLang server instead of an embedded engine.",
    )
    add_demo_args(demo)
    demo.set_defaults(subparser=demo)

    patch = sub.add_parser(
        "patch", help="check or apply rksc-sgl's fixes to the installed SGLang frontend",
        description="Unified diffs in patches/ fix SGLang 0.5.23 frontend bugs that hurt fork "
                    "programs (see patches/README.md). --check lists their state (exit 1 if one "
                    "is missing); --apply applies the missing ones to the installed sglang.",
    )
    mode = patch.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report each patch's state")
    mode.add_argument("--apply", action="store_true", help="apply the patches not yet applied")
    patch.set_defaults(subparser=patch)

    serve = sub.add_parser(
        "serve", help="serve SGLang's native HTTP API (for sgl.RuntimeEndpoint) and OpenAI's /v1 API on an "
                 "embedded engine",
        description="Start an HTTP server speaking SGLang's native API (/generate, /health, "
                    "/get_model_info, /get_server_info, /flush_cache) over an embedded engine, "
                    "so unmodified programs can use sgl.RuntimeEndpoint(URL).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=positive_int, default=30000, help="port (default: 30000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--max-request-bytes", type=positive_int, default=4 * 1024 * 1024,
                       help="largest request body accepted (default: 4 MiB)")
    serve.add_argument("--max-new-tokens-cap", type=positive_int, default=4096,
                       help="largest max_new_tokens a request may ask for (default: 4096)")
    add_engine_args(serve, endpoint=False)
    serve.set_defaults(subparser=serve)

    sub.add_parser(
        "launch-server", add_help=False,
        help="start SGLang's own server (launch_server) with the RKSC cache; takes SGLang's flags",
        description="See `rksc-sgl launch-server --help`.")

    from rksc_sgl.bench import add_bench_args, bench_description

    bench = sub.add_parser(
        "bench", help="compare cache modes (none, radix, rksc, ...) on reasoning workloads",
        description=bench_description(), formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="rksc-sgl bench [--workload paper] [--modes none,radix,rksc] [--problems N] [--seed S] "
              "[--backend engine|runtime] [options]\n       rksc-sgl bench --list",
    )
    add_bench_args(bench)
    bench.set_defaults(subparser=bench)
    return parser


SERVE_HAS_NO_ENDPOINT = ("serve runs its own embedded engine, so it takes no --endpoint; a running server is "
                         "used directly: sgl.RuntimeEndpoint(URL) in a program, or rksc-sgl run PROGRAM.py "
                         "--endpoint URL")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch-server"]:
        # Every argument but the launcher's own is SGLang's: SGLang's parser reads them.
        from rksc_sgl.runtime.launcher import launch_server_main

        return launch_server_main(argv[1:])
    program_argv: List[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        cut = argv.index("--")
        argv, program_argv = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command == "serve" and any(u == "--endpoint" or u.startswith("--endpoint=") for u in unknown):
            args.subparser.error(SERVE_HAS_NO_ENDPOINT)
        hint = " (put the program's own arguments after `--`)" if args.command == "run" else ""
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if args.command == "run":
        return run_command(args, program_argv, parser)
    if args.command == "demo":
        from rksc_sgl.demo import demo_command

        return demo_command(args, args.subparser.error)
    if args.command == "serve":
        from rksc_sgl.engine.backend import Engine
        from rksc_sgl.serving.server import serve

        engine = Engine(**engine_kwargs(args))
        try:
            serve(engine, host=args.host, port=args.port, api_key=args.api_key,
                  max_request_bytes=args.max_request_bytes, max_new_tokens_cap=args.max_new_tokens_cap)
        finally:
            engine.shutdown()
        return 0
    if args.command == "patch":
        return patch_command(args)
    if args.command == "bench":
        from rksc_sgl.bench import bench_command

        return bench_command(args, args.subparser.error)
    parser.error(f"unknown command {args.command!r}")
    return 2


def patch_command(args: argparse.Namespace) -> int:
    """``rksc-sgl patch --check|--apply``."""
    from rksc_sgl.runtime import sglang_patches

    try:
        states = sglang_patches.apply() if args.apply else sglang_patches.status() if args.check else []
    except (RuntimeError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"rksc-sgl patch: error: {exc}", file=sys.stderr)
        return 1
    for st in states:
        print(f"{st.name}: {st.state}{' (' + st.detail + ')' if st.detail else ''}")
    return 0 if all(st.state == sglang_patches.APPLIED for st in states) else 1


def run_command(args: argparse.Namespace, program_argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    """``rksc-sgl run``: the program runs as ``__main__`` on an engine installed here (or on the
    server ``--endpoint`` names, through a :class:`~rksc_sgl.runtime.endpoint.RuntimeBackend`)."""
    path = Path(args.program)
    if not path.is_file():
        what = "is a directory, not a Python file" if path.is_dir() else "does not exist"
        print(f"rksc-sgl run: error: program {str(path)!r} {what}", file=sys.stderr)
        return 2
    import sglang as sgl
    from sglang.lang.global_config import global_config

    if args.endpoint:  # a running server: the engine flags are the server's to decide
        engine = endpoint_backend(args)
    else:
        from rksc_sgl.engine.backend import Engine

        engine = Engine(**engine_kwargs(args))
    previous = global_config.default_backend
    sgl.set_default_backend(engine)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *program_argv]
    sys.path.insert(0, str(path.resolve().parent))  # as `python PROGRAM.py` would
    before = engine.stats(reset_peak=True)
    started = time.perf_counter()
    code = 0
    try:
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            code = _exit_code(exc.code)
        wall = time.perf_counter() - started
        engine.check_integrity()
        print(f"\n== rksc-sgl run: {path.name} (exit {code}) ==")
        print_stats(engine.stats().since(before), wall, cache=engine.config.cache)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        sgl.set_default_backend(previous)
        engine.shutdown()
    return code


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _version() -> str:
    from rksc_sgl import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
