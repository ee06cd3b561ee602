"""Command line: ``rksc-sgl run PROGRAM.py``, ``demo``, ``serve``, ``launch-server``, ``patch``, ``bench``, and the helpers programs share.

Every reasoning program under ``programs/`` is a plain script; the argument parsing,
engine construction, problem loop and statistics printing they have in common live
here, once:

- :func:`add_engine_args` / :func:`engine_from_args` -- ``--cache/--model/--kv-pool-tokens/
  --threads`` and the engine they describe. If ``rksc-sgl run`` already installed an
  :class:`~rksc_sgl.Engine` as SGLang's default backend, that engine is used instead.
- :func:`add_program_args` -- ``--problems/--seed/--branches/--max-tokens/...``.
- :func:`run_problems` -- solve each problem (tqdm progress), print answers, accuracy, stats.
- :func:`program_main` -- all of the above for a program's ``solve`` function.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from rksc_sgl.config import CACHE_MODES, EngineConfig
from rksc_sgl.problems import DATASETS, DEFAULT_DATASET, DIFFICULTY_LEVELS, Problem, Solution, load_problems, score

DEFAULT_MODEL = EngineConfig.model
DEFAULT_CACHE = "radix"
DEFAULT_THREADS = 1

SolveFn = Callable[..., Solution]


# ---- engine arguments and construction ------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Engine flags. Their defaults are ``None`` so that an explicit flag can be told
    apart from a default when an already-installed engine is reused."""
    group = parser.add_argument_group("engine")
    group.add_argument("--endpoint", metavar="URL", default=None,
                       help="run on a running SGLang server (rksc-sgl launch-server, python -m "
                            "sglang.launch_server, rksc-sgl serve) instead of an embedded engine; "
                            "the engine flags below then do not apply")
    group.add_argument("--cache", choices=CACHE_MODES, default=None,
                       help=f"KV cache mode (default: {DEFAULT_CACHE})")
    group.add_argument("--model", default=None,
                       help=f"packaged model alias or local Hugging Face folder (default: {DEFAULT_MODEL})")
    group.add_argument("--kv-pool-tokens", type=_positive_int, default=None,
                       help=f"KV slots in the token pool (default: {EngineConfig.kv_pool_tokens})")
    group.add_argument("--max-running", type=_positive_int, default=None,
                       help=f"largest decode batch (default: {EngineConfig.max_running_requests})")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help=f"torch CPU threads of the engine (default: {DEFAULT_THREADS})")
    group.add_argument("--engine-seed", type=int, default=None,
                       help="sampling seed of the engine (default: 0)")
    group.add_argument("--asks-tau", type=float, default=None,
                       help="turn ASKS on (needs --cache rksc): reuse KV of cached spans whose "
                            "key has cosine similarity >= this threshold")
    group.add_argument("--asks-recompute", type=float, default=None,
                       help="ASKS: fraction of the aligned (reusable) tokens of a span to compute anyway "
                            "(default: 0.5)")
    group.add_argument("--asks-key-layer", type=int, default=None,
                       help="ASKS: layer of the semantic keys (0: token embeddings, free; L: hidden states "
                            "after L blocks, stored per slot at prefill; default: 0)")
    group.add_argument("--kv-compression", choices=("rkv", "cask", "recent"), default=None,
                       help="compress each request's decode KV (R-KV scoring, the CASK-style core/scratch "
                            "variant, or the newest-tokens baseline 'recent'); the prompt stays exact and shared")
    group.add_argument("--kv-budget", type=fraction, default=None,
                       help="share of decoded tokens whose KV is kept with --kv-compression (default: 0.16)")
    return parser


ENGINE_ONLY_FLAGS = ("cache", "model", "kv_pool_tokens", "max_running", "threads", "engine_seed", "asks_tau",
                     "asks_recompute", "asks_key_layer", "kv_compression", "kv_budget")
"""Engine flags a server given with ``--endpoint`` does not take from the program."""


def engine_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments of ``Engine(...)`` from the parsed engine flags."""
    kwargs: Dict[str, Any] = {
        "model": getattr(args, "model", None) or DEFAULT_MODEL,
        "cache": getattr(args, "cache", None) or DEFAULT_CACHE,
        "num_threads": getattr(args, "threads", None) or DEFAULT_THREADS,
    }
    for flag, field in (("kv_pool_tokens", "kv_pool_tokens"), ("max_running", "max_running_requests"),
                        ("engine_seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[field] = value
    tau = getattr(args, "asks_tau", None)
    recompute = getattr(args, "asks_recompute", None)
    layer = getattr(args, "asks_key_layer", None)
    if tau is not None or recompute is not None or layer is not None:
        kwargs["asks"] = {"enabled": tau is not None, **({"tau": tau} if tau is not None else {}),
                          **({"recompute_fraction": recompute} if recompute is not None else {}),
                          **({"key_layer": layer} if layer is not None else {})}
    method = getattr(args, "kv_compression", None)
    budget = getattr(args, "kv_budget", None)
    if budget is not None and method is None:
        raise ValueError("--kv-budget needs --kv-compression rkv|cask")
    if method is not None:
        kwargs["compression"] = {"method": method, **({"budget": budget} if budget is not None else {})}
    return kwargs


def installed_engine():
    """The :class:`~rksc_sgl.Engine` installed as SGLang's default backend, if any."""
    from sglang.lang.global_config import global_config

    from rksc_sgl.engine.backend import Engine

    backend = getattr(global_config, "default_backend", None)
    return backend if isinstance(backend, Engine) else None


def engine_from_args(args: argparse.Namespace) -> Tuple[Any, bool]:
    """``(engine, owned)``: the installed default engine (``owned=False``), or a new one.

    A new engine is the caller's to shut down (:func:`program_engine` does that).
    """
    endpoint = getattr(args, "endpoint", None)
    if endpoint:
        from rksc_sgl.runtime.endpoint import RuntimeBackend

        given = [f"--{name.replace('_', '-')}" for name in ENGINE_ONLY_FLAGS if getattr(args, name, None) is not None]
        if given:
            print(f"note: --endpoint {endpoint}: the server decides; ignoring {', '.join(given)}", file=sys.stderr)
        return RuntimeBackend(endpoint), True
    engine = installed_engine()
    if engine is not None:
        _warn_ignored_flags(args, engine)
        return engine, False
    from rksc_sgl.engine.backend import Engine

    return Engine(**engine_kwargs(args)), True


@contextlib.contextmanager
def program_engine(args: argparse.Namespace) -> Iterator[Any]:
    """The engine a program runs on, installed as SGLang's default backend meanwhile.

    An engine built here is integrity-checked and shut down afterwards, and the previous
    default backend restored; an engine installed by ``rksc-sgl run`` is left alone.
    """
    import sglang as sgl
    from sglang.lang.global_config import global_config

    engine, owned = engine_from_args(args)
    if not owned:
        yield engine
        return
    previous = global_config.default_backend
    sgl.set_default_backend(engine)
    try:
        yield engine
        engine.check_integrity()
    finally:
        sgl.set_default_backend(previous)
        engine.shutdown()


def _warn_ignored_flags(args: argparse.Namespace, engine) -> None:
    cfg = engine.config
    actual = {"cache": cfg.cache, "model": cfg.model, "kv_pool_tokens": cfg.kv_pool_tokens,
              "max_running": cfg.max_running_requests, "threads": cfg.num_threads, "engine_seed": cfg.seed,
              "asks_tau": cfg.asks.tau if cfg.asks.enabled else None,
              "asks_recompute": cfg.asks.recompute_fraction, "asks_key_layer": cfg.asks.key_layer}
    ignored = [f"--{flag.replace('_', '-')}" for flag, value in actual.items()
               if getattr(args, flag, None) is not None and getattr(args, flag) != value]
    if ignored:
        print(f"note: using the engine installed by `rksc-sgl run` (cache={cfg.cache}, model={cfg.model}); "
              f"ignoring {', '.join(ignored)}", file=sys.stderr)


# ---- program arguments ------------------------------------------------------------------
def add_program_args(parser: argparse.ArgumentParser, *, problems: int = 3, branches: int = 4,
                     max_tokens: int = 96, temperature: float = 0.7) -> argparse.ArgumentParser:
    """The flags every reasoning program takes, with the program's own defaults."""
    group = parser.add_argument_group("program")
    group.add_argument("--problems", type=_positive_int, default=problems,
                       help=f"number of problems (default: {problems})")
    group.add_argument("--seed", type=int, default=0, help="seed of the problem generator (default: 0)")
    group.add_argument("--dataset", default=DEFAULT_DATASET,
                       help=f"reasoning-gym dataset (tested: {', '.join(DATASETS)}; default: {DEFAULT_DATASET})")
    group.add_argument("--difficulty", choices=DIFFICULTY_LEVELS, default="easy",
                       help="difficulty preset of the dataset (default: easy)")
    group.add_argument("--branches", type=_positive_int, default=branches,
                       help=f"branches per problem (default: {branches})")
    group.add_argument("--max-tokens", type=_positive_int, default=max_tokens,
                       help=f"max new tokens per generation (default: {max_tokens})")
    group.add_argument("--temperature", type=float, default=temperature,
                       help=f"sampling temperature of the branches (default: {temperature})")
    return parser


def solve_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments every program's ``solve(problem, **kwargs)`` accepts."""
    return {"num_branches": args.branches, "max_tokens": args.max_tokens,
            "sample_temperature": args.temperature}


def program_parser(description: Optional[str], **defaults: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_program_args(parser, **defaults)
    add_engine_args(parser)
    return parser


# ---- running programs over problems -------------------------------------------------------
def run_problems(solve: SolveFn, problems: Sequence[Problem], engine, *, out=None,
                 **kwargs: Any) -> Dict[str, Any]:
    """Solve each problem on ``engine``; print per-problem answers, accuracy and stats.

    Returns ``{"solutions", "scores", "accuracy", "stats", "wall_s", "per_problem_s"}``.
    """
    from tqdm import tqdm

    out = out or sys.stdout
    before = engine.stats(reset_peak=True)
    started = time.perf_counter()
    solutions: List[Solution] = []
    scores: List[float] = []
    per_problem: List[float] = []
    with tqdm(problems, desc="problems", unit="problem", file=sys.stderr, dynamic_ncols=True) as bar:
        for problem in bar:
            t0 = time.perf_counter()
            solution = solve(problem, backend=engine, **kwargs)
            per_problem.append(time.perf_counter() - t0)
            solutions.append(solution)
            scores.append(score(problem, solution.answer))
            bar.write(format_solution(problem, solution, scores[-1]), file=out)
    wall = time.perf_counter() - started
    engine.check_integrity()
    stats = engine.stats().since(before)
    accuracy = sum(scores) / len(scores) if scores else 0.0
    correct = sum(1 for s in scores if s >= 1.0)
    print(f"accuracy: {accuracy:.3f} ({correct}/{len(scores)} correct)", file=out)
    print_stats(stats, wall, out=out, per_problem=per_problem, cache=engine.config.cache)
    return {"solutions": solutions, "scores": scores, "accuracy": accuracy, "stats": stats,
            "wall_s": wall, "per_problem_s": per_problem}


def format_solution(problem: Problem, solution: Solution, grade: float) -> str:
    mark = "ok" if grade >= 1.0 else "wrong"
    candidates = ", ".join("-" if c is None else c for c in solution.candidates)
    line = (f"[{problem.index}] {_short(problem.question)}  reference={problem.answer}  "
            f"answer={solution.answer}  [{mark}]  branches=[{candidates}]")
    return f"{line}  ({solution.detail})" if solution.detail else line


def format_stats(stats, wall_s: float, per_problem: Optional[Sequence[float]] = None,
                 cache: Optional[str] = None) -> str:
    """Engine (or, with ``--endpoint``, server) statistics as aligned ``name: value`` lines.

    A server's statistics have only the counters its answers carry; the rows of the
    others are left out.
    """
    prompt = stats.prefill_tokens + stats.cached_tokens
    hit = stats.cached_tokens / prompt if prompt else 0.0
    engine = hasattr(stats, "forward_passes")
    rows = [
        ("requests", f"{stats.requests}"),
        ("prefill tokens computed", f"{stats.prefill_tokens}"),
        ("tokens served from cache", f"{stats.cached_tokens} ({hit:.1%} of prompt tokens)"),
        *([("semantic (ASKS) tokens", f"{stats.semantic_tokens} reused, {stats.recomputed_tokens} "
                                       f"recomputed, {stats.key_tokens} keyed")]
          if engine and (stats.semantic_tokens or stats.key_tokens) else []),
        ("decode tokens", f"{stats.decode_tokens}"),
        *([("forward passes", f"{stats.forward_passes}"), ("peak KV tokens", f"{stats.peak_kv_tokens}"),
           ("engine busy time", f"{stats.busy_time_s:.2f} s")] if engine else []),
        ("wall time", f"{wall_s:.2f} s"),
    ]
    if per_problem:
        rows.append(("per problem (median)", f"{statistics.median(per_problem):.2f} s "
                                             f"(min {min(per_problem):.2f}, max {max(per_problem):.2f})"))
    title = ("engine" if engine else "server") + " statistics" + (f" (cache={cache})" if cache else "") + ":"
    return "\n".join([title] + [f"  {name + ':':<26}{value}" for name, value in rows])


def print_stats(stats, wall_s: float, *, out=None, per_problem: Optional[Sequence[float]] = None,
                cache: Optional[str] = None) -> None:
    print(format_stats(stats, wall_s, per_problem, cache), file=out or sys.stdout, flush=True)


def run_program(solve: SolveFn, args: argparse.Namespace, title: str = "",
                extra: Optional[Dict[str, Any]] = None) -> int:
    """Load the problems the flags describe and run ``solve`` over them (see :func:`run_problems`).

    ``extra`` are further keyword arguments of ``solve`` (a program's own options).
    """
    try:
        problems = load_problems(args.dataset, args.problems, args.seed, difficulty=args.difficulty)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kwargs = {**solve_kwargs(args), **(extra or {})}
    with program_engine(args) as engine:
        settings = " ".join(f"{k}={v}" for k, v in kwargs.items())
        plural = "s" if len(problems) != 1 else ""
        print(f"{title + ': ' if title else ''}{len(problems)} {args.dataset} problem{plural} "
              f"(seed {args.seed}, {args.difficulty}); model={engine.config.model} cache={engine.config.cache} "
              f"{settings}", flush=True)
        run_problems(solve, problems, engine, **kwargs)
    return 0


def program_main(solve: SolveFn, description: Optional[str] = None, argv: Optional[Sequence[str]] = None,
                 title: str = "", options: Optional[Dict[str, Tuple[type, Any, str]]] = None,
                 **defaults: Any) -> int:
    """Entry point of a reasoning program script: parse its flags, then :func:`run_program`.

    ``defaults`` are the program's own defaults of :func:`add_program_args`; ``options``
    maps further ``solve`` keyword arguments to ``(type, default, help)``, each becoming a
    flag (``keep`` -> ``--keep``).
    """
    parser = program_parser(description, **defaults)
    options = options or {}
    if options:
        group = parser.add_argument_group("options of this program")
        for name, (kind, default, help_text) in options.items():
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=default,
                               help=f"{help_text} (default: {default})")
    args = parser.parse_args(argv)
    return run_program(solve, args, title, extra={name: getattr(args, name) for name in options})


# ---- the rksc-sgl command ---------------------------------------------------------------------
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
    serve.add_argument("--port", type=_positive_int, default=30000, help="port (default: 30000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=4 * 1024 * 1024,
                       help="largest request body accepted (default: 4 MiB)")
    serve.add_argument("--max-new-tokens-cap", type=_positive_int, default=4096,
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


def on_off(text: str) -> bool:
    """An argparse type for switches that default on or off: ``on``/``off`` (or yes/no, 1/0)."""
    value = str(text).strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def fraction(text: str) -> float:
    """An argparse type for a share: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _version() -> str:
    from rksc_sgl import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
