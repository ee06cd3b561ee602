"""``rksc-sgl bench``'s arguments, their validation, and the command itself."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, List, Tuple

from rksc_sgl.arg_types import add_model_path
from rksc_sgl.config import DTYPES
from rksc_sgl.bench.modes import (BACKENDS, ROUTER_POLICIES, SERVER_SCHEDULES, BenchSettings, MODES, Mode,
                                  parse_modes)
from rksc_sgl.bench.runner import run_bench
from rksc_sgl.bench.tables import command_line, save
from rksc_sgl.bench.workload import WORKLOADS, Workload, check_modes, parse_workloads

DEFAULT_OUT_DIR = "benchmarks/scratch"  # git ignores it; runs kept go to benchmarks/results/<backend>/<feature>/<run>/


# ---- command line ------------------------------------------------------------------------------
PARAM_FLAGS = {"branches": int, "max_tokens": int, "prompt_tokens": int, "temperature": float, "keep": int,
               "expand": int, "programs": int, "pool_fraction": float, "prefixes": int, "restate": int,
               "difficulty": str, "until_answer": int, "fork_commit": int, "clients": int, "disconnect_share": float, "malformed_share": float,
               "rates": str, "slo_factor": float, "waves_first": int, "waves_step": int}


SWITCHES = ("until_answer", "fork_commit", "restate")
"""Workload parameters that are 0/1 switches (their choices declared)."""


def _switch(name: str):
    """The argparse type of a 0/1 workload switch."""
    def parse(text: str) -> int:
        if str(text).strip() not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"{name.replace('_', '-')} must be 0 or 1, got {text!r}")
        return int(text)
    parse.__name__ = name
    return parse


def workload_summary(workload: Workload) -> str:
    """One line about ``workload``: its ``summary``, or its help up to the first colon."""
    return workload.summary or workload.help.split(":")[0]


def bench_description() -> str:
    """``rksc-sgl bench --help``'s description: what a run does, a line per workload and mode."""
    width = max(len(n) for n in list(WORKLOADS) + list(MODES)) + 2
    lines = ["Run each chosen mode on the same seeded problems, warm-up excluded, the modes taking turns "
             "problem by problem;",
             "print a table and write bench_<workload>.json/.md/.png (speedups with bootstrap intervals, "
             "hit tokens, answers",
             "agreeing with radix). --backend engine: every mode on an embedded engine in this process "
             "(--threads torch",
             "threads each); --backend runtime: every mode as a real SGLang server.",
             "",
             "workloads (--workload; `rksc-sgl bench --list`: each one's description and parameters):"]
    lines += [f"  {w.name:<{width}}{workload_summary(w)}" for w in WORKLOADS.values()]
    lines += ["", "modes (--modes; `rksc-sgl bench --list`: each one's engine arguments and SGLang flags):"]
    lines += [f"  {m.name:<{width}}{m.help}" for m in MODES.values()]
    return "\n".join(lines)


def list_text(settings: BenchSettings) -> str:
    """``rksc-sgl bench --list``: every workload's description and parameters, every mode's
    configuration on both backends (:func:`rksc_sgl.bench.modes.mode_table`)."""
    import textwrap

    from rksc_sgl.bench.modes import format_mode_table

    lines = ["WORKLOADS (--workload NAME[,NAME...]; a parameter is set with its flag, e.g. --max-tokens 64)", ""]
    for w in WORKLOADS.values():
        lines += textwrap.wrap(f"{w.name}: {w.help}", width=100, subsequent_indent="    ")
        params = ", ".join((f"--{k.replace('_', '-')} {v}" if k in PARAM_FLAGS else f"{k}={v} (fixed)")
                           + (f" (runtime {w.runtime_defaults[k]})" if k in w.runtime_defaults else "")
                           for k, v in w.defaults.items())
        lines += textwrap.wrap(f"parameters (defaults): {params}", width=100, initial_indent="    ",
                               subsequent_indent="        ")
        lines.append("")
    lines += ["MODES (--modes NAME[,NAME...]; an ASKS mode takes its own tau and key layer as NAME@TAU:L<layer>, "
              "e.g. asks@0.9:L4; NAME+METHOD@BUDGET adds decode-KV compression, e.g. radix+rkv@0.25: on the "
              "engine Engine(compression=...), on the runtime RKSC_COMPRESSION in the rksc tree)", "",
              "Each mode on the embedded engine (Engine keyword arguments), as the SGLang server --backend runtime "
              "starts (its mode-specific",
              "flags and environment: every server also gets --model-path, --host/--port, --max-total-tokens, "
              "--max-running-requests,",
              "--random-seed and --sleep-on-idle, on a CPU launch-server's CPU defaults, and for a workload that "
              "seeds its branches",
              "RKSC_SEEDED_SAMPLING=1), the same server from rksc-sgl launch-server, and what the program does "
              "differently.", "",
              format_mode_table(settings)]
    return "\n".join(lines)


def add_bench_args(parser) -> None:
    """The flags of ``rksc-sgl bench`` (see :func:`bench_command`)."""
    d = BenchSettings()
    parser.add_argument("--list", action="store_true",
                        help="print each workload's description and parameters and each mode's engine arguments "
                             "and SGLang flags, then exit")
    parser.add_argument("--workload", default="paper", metavar="NAME[,NAME...]",
                        help="comma-separated workloads, listed above (default: paper)")
    parser.add_argument("--modes", default="none,radix,rksc", metavar="MODE[,MODE...]",
                        help="comma-separated modes, listed above; an ASKS mode takes its own tau as NAME@TAU and "
                             "key layer as :L<layer>, e.g. asks@0.8 or asks@0.9:L4; +METHOD@BUDGET adds decode-KV "
                             "compression to a mode, e.g. radix+rkv@0.25 (default: none,radix,rksc)")
    parser.add_argument("--problems", type=int, default=d.problems, help=f"timed problems (default: {d.problems})")
    parser.add_argument("--seed", type=int, default=d.seed, help="reasoning-gym seed of the problems (default: 0)")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help=f"timed runs of every problem per mode (default: {d.repeats})")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help=f"warm-up problems per mode, not counted (default: {d.warmup})")
    add_model_path(parser, d.model, f"model alias or local folder (default: {d.model})")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch CPU threads of each engine, or CPU cores of each server with --backend runtime "
                             "(default: 1)")
    parser.add_argument("--backend", choices=BACKENDS, default=d.backend,
                        help="engine: every mode on an embedded engine in this process; runtime: every mode as a "
                             "real SGLang server (launch_server), all started at once and taking turns (default: engine)")
    parser.add_argument("--server-args", default=d.server_args, metavar="FLAGS",
                        help="with --backend runtime: further SGLang flags for every mode's server, as one "
                             "string (e.g. '--schedule-policy lpm')")
    parser.add_argument("--servers", choices=SERVER_SCHEDULES, default=d.servers,
                        help="with --backend runtime: together: every mode's server up at once, the modes taking "
                             "turns problem by problem; one-at-a-time: each server serves every problem before the "
                             f"next starts, for a GPU that cannot hold them all (default: {d.servers})")
    parser.add_argument("--scale-out", default=d.scale_out, metavar="single|workers:N|dp:N",
                        help="with --backend runtime: each mode as one server (single), as N servers behind "
                             "SGLang's router (workers:N; on a CPU each worker gets --threads cores of its own, "
                             "worker i from core i*threads on, wrapping around), or as one server with --dp-size N "
                             "(dp:N, the cores split among its ranks); the run reports each worker's (or DP "
                             f"rank's) prompt and cached tokens (default: {d.scale_out})")
    parser.add_argument("--router-policy", choices=ROUTER_POLICIES, default=d.router_policy,
                        help="with --scale-out workers:N: the router's policy; cache_aware sends a program's "
                             "requests where its prefix went (default: cache_aware)")
    parser.add_argument("--router-args", default=d.router_args, metavar="FLAGS",
                        help="with --scale-out workers:N: further flags for SGLang's router, as one string (e.g. "
                             "'--cache-threshold 0.8': a new program, which matches only the shared instructions, "
                             "goes to the worker with the smallest tree, its branches to the worker holding it)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default=d.device,
                        help=f"where the engines or servers run (default: {d.device})")
    parser.add_argument("--dtype", choices=("auto",) + DTYPES, default=d.dtype,
                        help="the engines' dtype (default: auto, float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--kv-pool-tokens", type=int, default=d.kv_pool_tokens,
                        help=f"KV slots per engine or server (default: {d.kv_pool_tokens}; pressure sets its own)")
    parser.add_argument("--asks-tau", type=float, default=d.asks_tau,
                        help=f"ASKS threshold of the ASKS modes without @TAU (default: {d.asks_tau})")
    parser.add_argument("--asks-recompute", type=float, default=d.asks_recompute,
                        help=f"ASKS recompute fraction (default: {d.asks_recompute})")
    parser.add_argument("--asks-key-layer", type=int, default=d.asks_key_layer,
                        help="ASKS key layer of the ASKS modes without :L<layer> (0: token embeddings, free; "
                             f"L: hidden states after L blocks, the recipient's span runs through them) "
                             f"(default: {d.asks_key_layer})")
    parser.add_argument("--audit-fraction", type=float, default=d.audit_fraction,
                        help="share of gated verify calls that also run the full pass to count errors; its time "
                             f"is left out (default: {d.audit_fraction})")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap,
                        help=f"bootstrap resamples of the speedup intervals (default: {d.bootstrap})")
    group = parser.add_argument_group("workload parameters (default: the workload's own)")
    for key, kind in PARAM_FLAGS.items():
        takes = ", ".join(f"{w.name} {w.defaults[key]}" + (f" (runtime {w.runtime_defaults[key]})"
                                                          if key in w.runtime_defaults else "")
                          for w in WORKLOADS.values() if key in w.defaults)
        if key in SWITCHES:
            group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_switch(key), choices=(0, 1),
                               default=None, help=f"a switch, 0 or 1; defaults: {takes}")
            continue
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=None,
                           help=f"defaults: {takes}")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where bench_<workload>.json/.md/.png go (default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args) -> BenchSettings:
    return BenchSettings(problems=args.problems, seed=args.seed, repeats=args.repeats, warmup=args.warmup,
                         model=args.model, threads=args.threads, device=args.device, dtype=args.dtype,
                         kv_pool_tokens=args.kv_pool_tokens,
                         asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                         asks_key_layer=args.asks_key_layer,
                         audit_fraction=args.audit_fraction, bootstrap=args.bootstrap, backend=args.backend,
                         server_args=args.server_args, servers=args.servers, scale_out=args.scale_out,
                         router_policy=args.router_policy, router_args=args.router_args,
                         params={k: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k) is not None})


def validate_args(args) -> Tuple[List[Workload], List[Mode], BenchSettings]:
    """Every input checked before anything is loaded; ``ValueError`` says what is wrong."""
    workloads = parse_workloads(args.workload)
    modes = parse_modes(args.modes)
    settings = settings_from_args(args)
    for w in workloads:
        w.check_settings(settings, w.resolve(settings.params, settings.backend))
        check_modes(w, modes)
        stopping = [m.label for m in modes if m.name.startswith("stop-")]
        if stopping and not w.votes:
            raise ValueError(f"workload {w.name!r} does not vote over forks, so mode(s) {', '.join(stopping)} "
                             f"would stop nothing; they run with {', '.join(x.name for x in WORKLOADS.values() if x.votes)}")
    if settings.backend == "runtime":
        from rksc_sgl.runtime.bench_servers import router_flags, server_flags

        for mode in modes:
            server_flags(mode, settings, {}, 0)
        router_flags(settings)  # the router's parser checks them now, not after the servers start
    return workloads, modes, settings


def bench_command(args, error: Callable[[str], None]) -> int:
    """``rksc-sgl bench``: run each workload, write its report, print its table (``--list``: print
    the workloads and modes instead)."""
    if args.list:
        try:
            settings = BenchSettings(asks_tau=args.asks_tau, asks_recompute=args.asks_recompute)
        except ValueError as exc:
            error(str(exc))
            return 2
        print(list_text(settings))
        return 0
    try:
        workloads, modes, settings = validate_args(args)
    except ValueError as exc:
        error(str(exc))
        return 2
    for workload in workloads:
        params = {k: v for k, v in settings.params.items() if k in workload.defaults}
        ws = dataclasses.replace(settings, params=params)
        result = run_bench(workload, modes, ws, progress=not args.no_progress,
                           command=command_line(workload.name, modes, ws))
        save(result, Path(args.out_dir))
    return 0
