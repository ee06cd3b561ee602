"""``rksc-sgl demo``: one reasoning program on stock radix and on RKSC, side by side.

The program is the bench's ``vote`` workload (self-consistency: sampled chains of thought,
each branch seeded the same in both modes, then a majority vote) on a few reasoning-gym
problems, run by :func:`rksc_sgl.bench.run_bench` under the bench modes ``radix`` (stock
SGLang) and ``rksc`` (every RKSC feature; here lossless branch stop is the one that acts: it
stops the branches that can no longer change the vote). The table gives each mode's wall
time, prompt tokens computed and served from the cache, decode tokens, and how many voted
answers agree with radix's.

``--backend engine`` (the default) runs both modes on embedded engines in this process;
``--backend runtime`` runs each mode as a real SGLang server (``rksc-sgl launch-server``'s
plan), both started first and taking turns, as ``rksc-sgl bench --backend runtime`` does.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List

from rksc_sgl.arg_types import add_model_path, positive_int

WORKLOAD = "vote"
MODES = "radix,rksc"
DEFAULTS = {"problems": 4, "branches": 8, "max_tokens": 128, "seed": 0}
"""The vote workload's own branches and tokens; four problems take about a minute here (2 CPU cores)."""


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rksc-sgl demo``."""
    from rksc_sgl.bench.modes import BACKENDS, BenchSettings

    d = BenchSettings()
    parser.add_argument("--backend", choices=BACKENDS, default="engine",
                        help="engine: both modes on embedded engines in this process; runtime: each mode as a "
                             "real SGLang server (started here, ended at the end) (default: engine)")
    parser.add_argument("--problems", type=positive_int, default=DEFAULTS["problems"],
                        help=f"problems (default: {DEFAULTS['problems']})")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help=f"seed of the problems and the branches (default: {DEFAULTS['seed']})")
    parser.add_argument("--branches", type=positive_int, default=DEFAULTS["branches"],
                        help=f"sampled chains of thought per problem (default: {DEFAULTS['branches']})")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULTS["max_tokens"],
                        help=f"new tokens per branch at most (default: {DEFAULTS['max_tokens']})")
    add_model_path(parser, d.model, f"packaged model alias or local Hugging Face folder (default: {d.model})")
    parser.add_argument("--threads", type=positive_int, default=d.threads,
                        help=f"CPU threads of each engine or server (default: {d.threads})")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default=d.device,
                        help=f"where the engines or servers run (default: {d.device})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo_settings(args: argparse.Namespace):
    """``(workload, modes, BenchSettings)`` of the demo the flags describe: one warm-up problem,
    one timed run per problem and mode."""
    from rksc_sgl.bench.modes import BenchSettings, parse_modes
    from rksc_sgl.bench.workload import get_workload

    settings = BenchSettings(problems=args.problems, seed=args.seed, repeats=1, warmup=1, model=args.model,
                             threads=args.threads, device=args.device, backend=args.backend, bootstrap=200,
                             params={"branches": args.branches, "max_tokens": args.max_tokens})
    return get_workload(WORKLOAD), parse_modes(MODES), settings


def demo_rows(result: Dict[str, Any]) -> List[tuple]:
    """The side-by-side table: per mode, run totals over the timed problems."""
    runs = result["runs"]
    reference = {r["problem"]: r["answer"] for r in runs["radix"]}
    rows = [("mode", "wall time s", "prompt tok computed", "prompt tok cached", "decode tok",
             "answers = radix", "correct")]
    for label, records in runs.items():
        agree = sum(r["answer"] == reference[r["problem"]] for r in records)
        rows.append((label, f"{sum(r['time_s'] for r in records):.1f}", str(sum(r["prefill_tokens"] for r in records)),
                     str(sum(r["cached_tokens"] for r in records)), str(sum(r["decode_tokens"] for r in records)),
                     "(reference)" if label == "radix" else f"{agree}/{len(records)}",
                     f"{sum(bool(r['correct']) for r in records)}/{len(records)}"))
    return rows


def demo_report(result: Dict[str, Any]) -> str:
    """The demo's output: a title, the table, one line of what it shows, the bench command."""
    from rksc_sgl.bench.report import format_table

    params = result["config"]["params"]
    st = result["config"]["settings"]
    where = "SGLang servers" if result.get("backend") == "runtime" else "embedded engines"
    title = (f"rksc-sgl demo: self-consistency ({params['branches']} sampled branches of at most "
             f"{params['max_tokens']} tokens, majority vote) on {st['problems']} {params['dataset']} problems, "
             f"{st['model']} on {where}")
    runs = result["runs"]

    def total(label: str, field: str) -> float:
        return sum(r[field] for r in runs[label])

    stopped = result["modes"]["rksc"].get("branches_stopped", 0)
    reference = {r["problem"]: r["answer"] for r in runs["radix"]}
    agree = sum(r["answer"] == reference[r["problem"]] for r in runs["rksc"])
    speed = total("radix", "time_s") / total("rksc", "time_s") if total("rksc", "time_s") > 0 else float("nan")
    summary = (f"rksc against radix: {speed:.2f}x the speed; "
               f"{_fewer(total('radix', 'decode_tokens') - total('rksc', 'decode_tokens'))} decode tokens "
               f"({stopped} branches stopped once the vote was settled); "
               f"{_fewer(total('radix', 'prefill_tokens') - total('rksc', 'prefill_tokens'))} prompt tokens computed; "
               f"the same voted answer on {agree} of {len(runs['rksc'])} problems.")
    return "\n".join([title, "", format_table(demo_rows(result)), "", summary,
                      "radix: stock SGLang (exact prefix reuse, LRU). rksc: RKSC's tree with ASKS and RSBCM, CGEE "
                      "gates, lossless branch stop (rksc-sgl bench --list shows every mode's flags).",
                      f"The same run with every statistic: {result['command']}"])


def _fewer(n: float) -> str:
    return f"{n:g} fewer" if n >= 0 else f"{-n:g} more"


def demo_command(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    """``rksc-sgl demo``: run the two modes, print the table."""
    from rksc_sgl.bench.runner import run_bench
    from rksc_sgl.bench.tables import command_line

    try:
        workload, modes, settings = demo_settings(args)
        workload.resolve(settings.params)
    except ValueError as exc:
        error(str(exc))
        return 2
    result = run_bench(workload, modes, settings, progress=not args.no_progress,
                       command=command_line(workload.name, modes, settings))
    print(demo_report(result), flush=True)
    return 0
