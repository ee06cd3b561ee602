"""The ``rksc-sgl`` command: ``run PROGRAM.py``, ``demo``, ``serve``, ``launch-server``, ``patch``,
``bench``. Each subcommand parses here and hands over to the package that does the work:

==================  ===================================================================
command             runs
==================  ===================================================================
``run``             the program as ``__main__`` on an engine installed as SGLang's default
``demo``            :func:`rksc_sgl.program_runner.run_program` of self-consistency
``serve``           :func:`rksc_sgl.serving.server.serve` over an embedded engine
``launch-server``   :func:`rksc_sgl.runtime.launcher.launch_server_main` (SGLang's own server)
``patch``           :mod:`rksc_sgl.runtime.sglang_patches`
``bench``           :func:`rksc_sgl.bench.bench_command`
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
from rksc_sgl.engine_flags import add_engine_args, engine_kwargs
from rksc_sgl.program_runner import add_program_args, print_stats, run_program


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rksc-sgl",
        description="Run SGLang frontend programs (@sgl.function) on the embedded rksc-sgl engine.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run", help="run an SGLang program file on an embedded engine",
        description="Build an engine, install it as SGLang's default backend, run PROGRAM as "
                    "__main__, then print the engine statistics of the whole run. Arguments "
                    "after `--` are passed to the program.",
        usage="rksc-sgl run PROGRAM.py [engine options] [-- program arguments]",
    )
    run.add_argument("program", metavar="PROGRAM.py", help="path of the Python program to run")
    run.set_defaults(subparser=run)
    add_engine_args(run)

    demo = sub.add_parser(
        "demo", help="self-consistency on a few arithmetic problems with the packaged model",
        description="Self-consistency (sampled chains of thought + majority vote) on reasoning-gym "
                    "problems, on the packaged SmolLM2-135M-Instruct model; prints answers, "
                    "accuracy and the engine statistics.",
    )
    add_program_args(demo, problems=3, branches=4, max_tokens=96)
    add_engine_args(demo)
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
    add_engine_args(serve)
    serve.set_defaults(subparser=serve)

    sub.add_parser(
        "launch-server", add_help=False,
        help="start SGLang's own server (launch_server) with the RKSC cache; takes SGLang's flags",
        description="See `rksc-sgl launch-server --help`.")

    from rksc_sgl.bench import add_bench_args

    bench = sub.add_parser(
        "bench", help="compare cache modes (none, radix, rksc, ...) on reasoning workloads",
        description="Run every chosen mode on the same seeded reasoning-gym problems, in this process, "
                    "one CPU thread, warm-up excluded; print a table and write bench_<workload>.json, "
                    ".md and .png (speedups with bootstrap intervals, hit tokens, fidelity against tau).",
        usage="rksc-sgl bench [--workload paper] [--modes none,radix,rksc] [--problems N] [--seed S] [options]",
    )
    add_bench_args(bench)
    bench.set_defaults(subparser=bench)
    return parser


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
        hint = " (put the program's own arguments after `--`)" if args.command == "run" else ""
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if args.command == "run":
        return run_command(args, program_argv, parser)
    if args.command == "demo":
        from rksc_sgl.programs.self_consistency import solve

        return run_program(solve, args, title="rksc-sgl demo: self-consistency with majority vote")
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
        states = sglang_patches.apply() if args.apply else sglang_patches.status()
    except (RuntimeError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"rksc-sgl patch: error: {exc}", file=sys.stderr)
        return 1
    for st in states:
        print(f"{st.name}: {st.state}{' (' + st.detail + ')' if st.detail else ''}")
    return 0 if all(st.state == sglang_patches.APPLIED for st in states) else 1


def run_command(args: argparse.Namespace, program_argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    """``rksc-sgl run``: the program runs as ``__main__`` on an engine installed here."""
    path = Path(args.program)
    if not path.is_file():
        what = "is a directory, not a Python file" if path.is_dir() else "does not exist"
        print(f"rksc-sgl run: error: program {str(path)!r} {what}", file=sys.stderr)
        return 2
    import sglang as sgl
    from sglang.lang.global_config import global_config

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
