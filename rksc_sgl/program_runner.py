"""What every reasoning program's command line has in common, written once: its flags, the
problem loop and the statistics it prints.

- :func:`add_program_args` -- ``--problems/--seed/--dataset/--branches/--max-tokens/...``.
- :func:`run_problems` -- solve each problem (tqdm progress), print answers, accuracy, stats.
- :func:`program_main` -- all of the above, plus the engine flags of
  :mod:`rksc_sgl.engine_flags`, for a program's ``solve`` function
  (``sys.exit(program_main(solve, ...))`` ends each script under ``programs/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rksc_sgl.arg_types import on_off, on_off_flag, on_off_text, positive_int
from rksc_sgl.engine_flags import add_engine_args, program_engine
from rksc_sgl.problems import DATASETS, DEFAULT_DATASET, DIFFICULTY_LEVELS, Problem, Solution, load_problems, score

SolveFn = Callable[..., Solution]


def add_program_args(parser: argparse.ArgumentParser, *, problems: int = 3, branches: int = 4,
                     max_tokens: int = 96, temperature: float = 0.7) -> argparse.ArgumentParser:
    """The flags every reasoning program takes, with the program's own defaults."""
    group = parser.add_argument_group("program")
    group.add_argument("--problems", type=positive_int, default=problems,
                       help=f"number of problems (default: {problems})")
    group.add_argument("--seed", type=int, default=0, help="seed of the problem generator (default: 0)")
    group.add_argument("--dataset", default=DEFAULT_DATASET,
                       help=f"reasoning-gym dataset (tested: {', '.join(DATASETS)}; default: {DEFAULT_DATASET})")
    group.add_argument("--difficulty", choices=DIFFICULTY_LEVELS, default="easy",
                       help="difficulty preset of the dataset (default: easy)")
    group.add_argument("--branches", type=positive_int, default=branches,
                       help=f"branches per problem (default: {branches})")
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                       help=f"max new tokens per generation (default: {max_tokens})")
    group.add_argument("--temperature", type=float, default=temperature,
                       help=f"sampling temperature of the branches (default: {temperature})")
    return parser


def solve_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments every program's ``solve(problem, **kwargs)`` accepts."""
    return {"num_branches": args.branches, "max_tokens": args.max_tokens,
            "sample_temperature": args.temperature}


def program_parser(description: Optional[str], options: Optional[Dict[str, Tuple[type, Any, str]]] = None,
                   **defaults: Any) -> argparse.ArgumentParser:
    """A reasoning program's parser: :func:`add_program_args` (``defaults``), the engine flags,
    and ``options``, the program's own (``name: (type, default, help)``, each a flag; an
    ``on_off`` type makes a switch that lists its choices)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_program_args(parser, **defaults)
    add_engine_args(parser)
    if options:
        group = parser.add_argument_group("options of this program")
        for name, (kind, default, help_text) in options.items():
            flag = f"--{name.replace('_', '-')}"
            if kind is on_off:
                group.add_argument(flag, dest=name,
                                   **on_off_flag(default=default, help=f"{help_text} (default: {on_off_text(default)})"))
            else:
                group.add_argument(flag, dest=name, type=kind, default=default, help=f"{help_text} (default: {default})")
    return parser


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
    from rksc_sgl.engine.request import EngineStats

    engine = isinstance(stats, EngineStats)
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
    options = options or {}
    parser = program_parser(description, options, **defaults)
    args = parser.parse_args(argv)
    return run_program(solve, args, title, extra={name: getattr(args, name) for name in options})


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
