"""Decode-KV compression (R-KV, CASK-style, a recent-window baseline) against the uncompressed engine, one CPU thread.

Workload: ``cot`` with long generations. Per problem (reasoning-gym ``gsm_symbolic``, seeded) a
few-shot prompt is shared by ``--branches`` hinted branches that each generate up to
``--max-tokens`` greedy tokens (stopping at the next ``Question:``). Every mode runs the same
problems in the same process, one engine per mode:

- ``full``: no compression (the reference);
- ``rkv@B`` for every budget B of ``--budgets`` and ``cask@B`` for ``--cask-budget``;
- ``recent@B`` for ``--recent-budget``: a baseline that keeps the newest decode tokens only
  (StreamingLLM-like window; the prompt plays the sink), to tell whether R-KV's scoring beats
  eviction that looks at nothing.

Reported per mode: answer agreement with ``full`` per branch (the final answer extracted from
its text) and per problem (the majority vote over its branches, the ``cot`` workload's
answer), accuracy (branch answers and votes against the reference answer), private decode KV (peak
KV working set minus the prompt, with a pool large enough that every mode runs all branches
at once, and its ratio to ``full``), tokens dropped, and throughput with the KV pool under
pressure: a second engine per mode gets a pool sized so that the uncompressed engine holds
about ``--pressure-branches`` branches at once; the branches of a problem are one batch
(decode tokens per second, median over problems, ratio to ``full``). One warm-up problem is
excluded. ``--skip-throughput`` leaves out the pressured engines (half the run time) for
sweeps that only look at agreement.

    RKSC_SGL_HOME=/tmp/rkscache python benchmarks/bench_compression.py --problems 6

``--fidelity`` measures continuation fidelity instead (``rksc_sgl.bench.fidelity``, CASK's
protocol): per trace (a few-shot ``gsm_symbolic`` prompt, ``--trace-tokens`` tokens sampled
with full KV at ``--trace-temperature``, seed = the trace's seed), every method of
``--methods`` at every budget of ``--fidelity-budgets`` replays the trace teacher-forced in
one batch, and each step's next-token distribution is compared with the full-KV one: top-1
and top-5 agreement, KL, NLL, first mismatch, KV kept; means over traces with 95% bootstrap
intervals, R-KV minus each baseline paired over traces, and per method the smallest budget
whose top-1 agreement reaches 0.95. ``recent`` and ``attention`` are the baselines; a method
may carry variants (``rkv+window``: importance from the queries since the last compression;
``+all``: redundancy over every layer).

    python benchmarks/bench_compression.py --fidelity --traces 40 --seed 5000

``--backend runtime`` runs the same protocol on SGLang's runtime through ``/generate``
(``rksc_sgl.bench.runtime_fidelity``): a full-KV server samples the traces and replays the
control, then one server per mode (its ``RKSC_COMPRESSION``) replays every trace, one server at a time.
``--traces-from <engine run's JSON>`` replays the engine's own traces instead (their token ids;
each backend scores against its own full-KV reference on those tokens) and pairs the two
backends' scores trace by trace: runtime minus engine with 95% paired bootstrap intervals and a
verdict per metric against ``runtime_fidelity.TOLERANCE``.

    python benchmarks/bench_compression.py --fidelity --traces 5 --seed 7000 --methods rkv \
        --fidelity-budgets 0.25,0.5 --trace-tokens 128 --out-dir engine-run
    python benchmarks/bench_compression.py --fidelity --backend runtime --methods rkv \
        --fidelity-budgets 0.25,0.5 --traces-from engine-run/bench_compression_fidelity.json
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch

warnings.simplefilter("ignore")

from tqdm.auto import tqdm  # noqa: E402

import rksc_sgl  # noqa: E402
from rksc_sgl.bench import extract_final, few_shot_problem, hints_for  # noqa: E402
from rksc_sgl.problems import majority_vote, score  # noqa: E402
from rksc_sgl.bench.report import (  # noqa: E402
    benchmark_parser, format_table, median, pyplot, run_record, save_and_report, save_figure, source_commit)


def modes(args) -> Dict[str, dict]:
    out = {"full": None}
    for b in args.budgets:
        out[f"rkv@{b:g}"] = {"method": "rkv", "budget": b, "buffer": args.buffer, "min_tokens": args.min_tokens}
    if args.cask_budget:
        out[f"cask@{args.cask_budget:g}"] = {"method": "cask", "budget": args.cask_budget, "buffer": args.buffer,
                                             "min_tokens": args.min_tokens}
    if args.recent_budget:
        out[f"recent@{args.recent_budget:g}"] = {"method": "recent", "budget": args.recent_budget,
                                                 "buffer": args.buffer, "min_tokens": args.min_tokens}
    return out


def run_problem(eng, prompt: str, hints: List[str], max_tokens: int) -> Dict:
    params = {"max_new_tokens": max_tokens, "temperature": 0, "stop": ["\nQuestion:"]}
    eng.flush_cache()
    before = eng.stats(reset_peak=True)
    t0 = time.perf_counter()
    outs = eng.generate_request(text=[prompt + h + "\n" for h in hints], sampling_params=params)
    seconds = time.perf_counter() - t0
    stats = eng.stats().since(before)
    return {"seconds": seconds, "texts": [o["text"] for o in outs],
            "decode_tokens": sum(o["meta_info"]["completion_tokens"] for o in outs),
            "peak_kv_tokens": stats.peak_kv_tokens, "dropped_tokens": stats.dropped_tokens}


def summarize(name: str, runs: List[Dict], full: List[Dict], problems, pressured: List[Dict],
              pressured_full: List[Dict]) -> Dict:
    pairs = [(a, b) for run, ref in zip(runs, full) for a, b in zip(run["answers"], ref["answers"])]
    graded = [score(p, a) for run, p in zip(runs, problems) for a in run["answers"]]
    votes = [majority_vote(run["answers"]) for run in runs]
    votes_full = [majority_vote(ref["answers"]) for ref in full]
    vote_agree = sum(a == b for a, b in zip(votes, votes_full))
    private = [r["peak_kv_tokens"] - r["prompt_tokens"] for r in runs]
    private_full = [r["peak_kv_tokens"] - r["prompt_tokens"] for r in full]
    out = {
        "mode": name,
        "agreement": sum(a == b for a, b in pairs) / len(pairs),
        "agree_count": [sum(a == b for a, b in pairs), len(pairs)],
        "vote_agreement": vote_agree / len(votes),
        "vote_agree_count": [vote_agree, len(votes)],
        "accuracy": sum(graded) / len(graded),
        "vote_accuracy": sum(score(p, v) for v, p in zip(votes, problems)) / len(votes),
        "votes": votes,
        "peak_private_kv_median": median(private),
        "private_kv_reduction": median(private_full) / max(median(private), 1),
        "dropped_tokens": sum(r["dropped_tokens"] for r in runs),
        "decode_tok_s_median": None, "throughput_ratio": None,
    }
    if pressured:
        tput = [r["decode_tokens"] / r["seconds"] for r in pressured]
        tput_full = [r["decode_tokens"] / r["seconds"] for r in pressured_full]
        out["decode_tok_s_median"] = median(tput)
        out["throughput_ratio"] = median([a / b for a, b in zip(tput, tput_full)])
    return out


def fmt_table(result: Dict) -> str:
    rows = [("mode", "branch agreement w/ full", "vote agreement w/ full", "accuracy (branch)", "accuracy (vote)",
             "peak private KV", "x less private KV", "dropped", "decode tok/s", "x full tok/s")]

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    for s in result["summary"]:
        rows.append((s["mode"], f"{s['agreement']:.3f} ({s['agree_count'][0]}/{s['agree_count'][1]})",
                     f"{s['vote_agreement']:.3f} ({s['vote_agree_count'][0]}/{s['vote_agree_count'][1]})",
                     f"{s['accuracy']:.3f}", f"{s['vote_accuracy']:.3f}", f"{s['peak_private_kv_median']:.0f}",
                     f"{s['private_kv_reduction']:.2f}", s["dropped_tokens"], num(s["decode_tok_s_median"], ".1f"),
                     num(s["throughput_ratio"], ".2f")))
    return format_table(rows)


def plot(result: Dict, path: Path) -> None:
    plt = pyplot()

    summary = result["summary"]
    names = [s["mode"] for s in summary]
    colors = {"full": "tab:gray", "rkv": "tab:blue", "cask": "tab:orange", "recent": "tab:green"}
    panels = [("agreement", "answer agreement with full (per branch)"),
              ("vote_agreement", "answer agreement with full (vote)"),
              ("private_kv_reduction", "x less private KV (peak)")]
    if summary[0]["throughput_ratio"] is not None:
        panels.append(("throughput_ratio", "decode tok/s vs full (pool under pressure)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        values = [s[key] for s in summary]
        ax.bar(range(len(names)), values, color=[colors[n.split("@")[0]] for n in names])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
    c = result["config"]
    save_figure(fig, path, f"rksc_sgl decode-KV compression: {c['model']}, {c['problems']} problems x "
                           f"{c['branches']} branches x <= {c['max_tokens']} tok, 1 thread, {result['cpu']}")


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--budgets", default="0.1,0.16,0.34", help="comma-separated R-KV budgets")
    ap.add_argument("--cask-budget", type=float, default=0.16, help="budget of the CASK-style mode (0: none)")
    ap.add_argument("--recent-budget", type=float, default=0.16,
                    help="budget of the recent-window baseline (keeps the newest decode tokens; 0: none)")
    ap.add_argument("--buffer", type=int, default=8)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--pressure-branches", type=int, default=2,
                    help="the pool holds the prompt plus about this many uncompressed branches")
    ap.add_argument("--skip-throughput", action="store_true",
                    help="no pressured engines: agreement and private KV only (throughput columns '-')")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "scratch"))
    ap.add_argument("--name", default=None, help="file name stem (default: bench_compression[_fidelity])")
    fid = ap.add_argument_group("continuation fidelity (--fidelity)")
    fid.add_argument("--fidelity", action="store_true", help="teacher-forced replay fidelity instead of answers")
    fid.add_argument("--traces", type=int, default=40)
    fid.add_argument("--trace-tokens", type=int, default=256)
    fid.add_argument("--trace-temperature", type=float, default=0.7)
    fid.add_argument("--methods", default="rkv,cask,recent,attention",
                     help="comma-separated methods (variants: rkv+window, rkv+all, rkv+window+all)")
    fid.add_argument("--fidelity-budgets", default="0.1,0.16,0.25,0.5")
    fid.add_argument("--bootstrap", type=int, default=2000)
    fid.add_argument("--backend", choices=("engine", "runtime"), default="engine",
                     help="runtime: replay on SGLang's runtime through /generate (a full-KV server, then one "
                          "server per mode; rksc_sgl.bench.runtime_fidelity)")
    fid.add_argument("--traces-from", default=None, metavar="ENGINE_JSON",
                     help="with --backend runtime: replay the traces of this engine fidelity run (its prompts, "
                          "trace token ids, seeds and trace length) and pair both backends' scores trace by trace")
    args = ap.parse_args(argv)
    if args.fidelity:
        return fidelity_main(ap, args)
    args.name = args.name or "bench_compression"
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if args.problems < 1 or args.branches < 1 or args.max_tokens < 2 or not args.budgets:
        ap.error("need --problems >= 1, --branches >= 1, --max-tokens >= 2 and at least one budget")

    torch.set_num_threads(1)
    started = time.time()
    run_commit = source_commit()  # the code this run imports; the record is written at its end
    probe = rksc_sgl.Engine(model=args.model, cache="radix", num_threads=1, kv_pool_tokens=1024)
    tokenizer = probe.tokenizer
    probe.shutdown()
    items = [few_shot_problem(tokenizer, args.prompt_tokens, args.seed + i) for i in range(args.problems + 1)]
    longest = max(len(tokenizer.encode(p)) for p, _ in items) + 32
    pool = longest + args.pressure_branches * (args.max_tokens + 32)
    hints = hints_for(args.branches)
    roomy = longest + args.branches * (args.max_tokens + 32)
    results: Dict[str, List[Dict]] = {}
    pressured: Dict[str, List[Dict]] = {}
    engines = ((roomy, results),) if args.skip_throughput else ((roomy, results), (pool, pressured))
    for name, compression in modes(args).items():
        for kv_pool, table in engines:
            eng = rksc_sgl.Engine(model=args.model, cache="radix", num_threads=1, seed=args.seed,
                                  kv_pool_tokens=kv_pool, max_running_requests=max(8, args.branches),
                                  compression=compression)
            try:
                runs = []
                for i, (prompt, problem) in enumerate(tqdm(items, desc=f"{name}, pool {kv_pool}")):
                    run = run_problem(eng, prompt, hints, args.max_tokens)
                    run["prompt_tokens"] = len(tokenizer.encode(prompt))
                    run["answers"] = [extract_final(t) for t in run["texts"]]
                    if i > 0:  # problem 0 is the warm-up
                        runs.append(run)
                eng.check_integrity()
            finally:
                eng.shutdown()
            table[name] = runs
    problems = [p for _, p in items[1:]]
    summary = [summarize(name, runs, results["full"], problems, pressured.get(name, []), pressured.get("full", []))
               for name, runs in results.items()]
    result = {
        **run_record("bench_compression", commit=run_commit),
        "config": {**vars(args), "kv_pool_tokens_pressure": pool, "kv_pool_tokens_roomy": roomy},
        "method": "one engine per mode, same problems and pool; per problem the branches are one batch after a "
                  "flush; private KV = peak KV working set minus the prompt; agreement per branch and of the "
                  "per-problem majority vote against the uncompressed run; problem 0 is a warm-up",
        "summary": summary, "runs": results, "pressured_runs": pressured, "total_wall_s": time.time() - started,
    }
    save_and_report(result, fmt_table(result), Path(args.out_dir), args.name, plot,
                    f"rksc_sgl decode-KV compression vs full: {args.model}, {args.problems} problems x {args.branches} "
                    f"branches x <= {args.max_tokens} tokens, "
                    + (f"pool {roomy} slots (no throughput runs)" if args.skip_throughput
                       else f"pool {roomy} slots (throughput: {pool})")
                    + f", 1 thread, {result['cpu']}")
    return 0


# ---- continuation fidelity ---------------------------------------------------------------------
def fidelity_main(ap, args) -> int:
    from rksc_sgl.bench import fidelity

    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [float(b) for b in args.fidelity_budgets.split(",") if b.strip()]
    if args.traces < 2 or args.trace_tokens < 16 or not specs or not budgets:
        ap.error("need --traces >= 2, --trace-tokens >= 16, a method and a budget")
    try:
        modes = fidelity.sweep_modes(specs, budgets, {"buffer": args.buffer, "min_tokens": args.min_tokens})
    except ValueError as exc:
        ap.error(str(exc))
    engine = None
    if args.traces_from:
        if args.backend != "runtime":
            ap.error("--traces-from needs --backend runtime")
        engine = load_engine_run(ap, args, modes)
    torch.set_num_threads(1)
    started = time.time()
    run_commit = source_commit()  # the code this run imports; the record is written at its end
    if args.backend == "runtime":
        per_trace, traces = runtime_fidelity_traces(args, modes, engine)
    else:
        per_trace, traces = engine_fidelity_traces(args, modes)
    summary = fidelity.summarize(per_trace, specs, budgets, args.bootstrap, args.seed)
    runtime = args.backend == "runtime"
    if engine is not None:
        return same_traces_report(args, modes, per_trace, traces, summary, engine, run_commit, started)
    result = {
        **run_record("bench_compression --fidelity" + (" --backend runtime" if runtime else ""), commit=run_commit),
        "config": vars(args), "modes": modes,
        "method": ("per trace: a few-shot gsm_symbolic prompt and trace_tokens tokens sampled with full KV (EOS "
                   "ignored), every step's log-probs kept; then every mode (and a full-KV control) replays the "
                   "trace teacher-forced" + (" on SGLang's runtime (one server per mode, rksc_sgl.bench."
                                             "runtime_fidelity)" if runtime else " in one batch")
                   + ", compared step by step with the full-KV distribution"),
        "summary": summary, "per_trace": per_trace, "traces": traces, "total_wall_s": time.time() - started,
    }
    name = args.name or ("bench_compression_fidelity_runtime" if runtime else "bench_compression_fidelity")
    save_and_report(result, fidelity_table(summary), Path(args.out_dir), name, plot_fidelity,
                    f"rksc_sgl decode-KV compression, continuation fidelity (teacher-forced replay"
                    f"{', SGLang runtime' if runtime else ''}): {args.model}, "
                    f"{args.traces} traces x {args.trace_tokens} tokens, seeds {args.seed}..{args.seed + args.traces - 1}, "
                    f"buffer {args.buffer}, min_tokens {args.min_tokens}, 1 thread, {result['cpu']}",
                    markdown=fidelity_markdown(summary))
    return 0


def load_engine_run(ap, args, modes):
    """The engine run of ``--traces-from``; its trace settings replace this run's, and each
    mode must be one it ran with the same settings."""
    from rksc_sgl.bench import runtime_fidelity

    try:
        engine = runtime_fidelity.engine_traces(args.traces_from)
    except (OSError, ValueError) as exc:
        ap.error(f"--traces-from: {exc}")
    for name, config in modes.items():
        if engine["modes"].get(name) != config:
            ap.error(f"--traces-from: the engine run has no mode {name} with {config} (it ran: {engine['modes']})")
    config = engine["config"]
    args.traces, args.trace_tokens = len(engine["traces"]), len(engine["traces"][0])
    args.seed, args.trace_temperature = engine["seeds"][0], config["trace_temperature"]
    args.prompt_tokens, args.model = config["prompt_tokens"], config["model"]
    return engine


def runtime_fidelity_traces(args, modes, engine=None):
    """The sweep on SGLang's runtime: a full-KV server makes the traces (or, with ``engine``,
    takes the engine run's and computes its own full-KV reference on them), one server per mode replays."""
    from rksc_sgl.bench import runtime_fidelity

    probe = rksc_sgl.Engine(model=args.model, cache="radix", num_threads=1, kv_pool_tokens=1024)
    if engine is None:
        seeds = list(range(args.seed, args.seed + args.traces))
        prompts = [probe.encode(few_shot_problem(probe.tokenizer, args.prompt_tokens, s)[0]) for s in seeds]
    else:
        seeds, prompts = engine["seeds"], engine["prompts"]
    vocab, tokenizer = probe.vocab_size, probe.tokenizer
    probe.shutdown()
    bar = tqdm(total=args.traces * (len(modes) + 1), desc="fidelity on the runtime")
    pool = max(len(p) for p in prompts) + args.trace_tokens + 256
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "runtime_fidelity_servers.log", "w") as log:
        per_trace, traces, top1 = runtime_fidelity.sweep(
            args.model, prompts, seeds, modes, args.trace_tokens, args.trace_temperature, vocab, log=log,
            extra=["--max-total-tokens", str(pool * 2)], progress=lambda *_: bar.update(),
            traces=None if engine is None else engine["traces"])
    bar.close()
    return per_trace, [{"seed": s, "prompt_tokens": len(p), "text": tokenizer.decode(t), "prompt_ids": list(p),
                        "trace_ids": list(t), "reference_top1": r}
                       for s, p, t, r in zip(seeds, prompts, traces, top1)]


def same_traces_report(args, modes, per_trace, traces, summary, engine, run_commit, started) -> int:
    """``--traces-from``: the runtime's scores on the engine's traces, paired with the engine's."""
    from rksc_sgl.bench import runtime_fidelity

    engine_per_trace = [{name: t[name] for name in per_trace[0]} for t in engine["per_trace"]]
    comparison = runtime_fidelity.compare_backends(engine_per_trace, per_trace, args.bootstrap, args.seed)
    agreement = runtime_fidelity.reference_agreement(engine["reference_top1"], [t["reference_top1"] for t in traces])
    comparison["reference_top1_agreement"] = agreement
    result = {
        **run_record("bench_compression --fidelity --backend runtime --traces-from", commit=run_commit),
        "config": vars(args), "modes": modes,
        "method": ("the engine run's traces (prompt and trace token ids, --traces-from) replayed teacher-forced on "
                   "SGLang's runtime: a full-KV server replays each trace twice (the first replay is the runtime's "
                   "full-KV reference, the second the control), then one server per mode; each backend is scored "
                   "against its own full-KV reference on the same tokens; per mode and metric the runtime-minus-"
                   "engine difference, paired over traces, with a 95% percentile bootstrap interval"),
        "engine_run": args.traces_from, "summary": summary, "comparison": comparison, "per_trace": per_trace,
        "engine_per_trace": engine_per_trace, "traces": traces, "total_wall_s": time.time() - started,
    }
    name = args.name or "bench_compression_fidelity_same_traces"
    seeds = [t["seed"] for t in traces]
    save_and_report(result, same_traces_table(result, format_table), Path(args.out_dir), name, plot_same_traces,
                    f"rksc_sgl continuation fidelity, the engine's traces replayed on SGLang's runtime: {args.model}, "
                    f"{args.traces} traces x {args.trace_tokens} tokens, seeds {seeds[0]}..{seeds[-1]}, buffer "
                    f"{args.buffer}, min_tokens {args.min_tokens}, 1 thread, {result['cpu']}",
                    markdown=same_traces_table(result, None))
    return 0


def plot_same_traces(result: Dict, path: Path) -> None:
    """Per trace and mode, the runtime's score against the engine's (top-1, KL): on the diagonal when equal."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, metric, label in ((axes[0], "top1", "top-1 agreement"), (axes[1], "kl", "KL(full || compressed), nats")):
        values = []
        for name in result["per_trace"][0]:
            xs = [t[name][metric] for t in result["engine_per_trace"]]
            ys = [t[name][metric] for t in result["per_trace"]]
            values += xs + ys
            ax.scatter(xs, ys, label=name, s=18)
        lo, hi = min(values), max(values)
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"engine {label}")
        ax.set_ylabel(f"runtime {label}")
    axes[0].legend(fontsize=8)
    c = result["config"]
    save_figure(fig, path, f"the engine's traces replayed on the runtime: {c['traces']} traces x {c['trace_tokens']} "
                           f"tokens, seeds from {c['seed']}, one point per trace and mode")


METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "kl": "KL", "nll": "NLL", "first_mismatch": "first mismatch",
                 "kv_kept": "KV kept", "nll_full": "NLL under full KV"}


def _same_traces_rows(result: Dict) -> List[List[tuple]]:
    """Per trace and mode, engine / runtime per metric; then per mode and metric the paired difference."""
    from rksc_sgl.bench.runtime_fidelity import PAIRED_METRICS

    metrics = [m for m in PAIRED_METRICS if m != "nll_full"]
    comparison = result["comparison"]
    per = [("trace (seed)", "mode", *(f"{METRIC_LABELS[m]} engine / runtime" for m in metrics), "reference top-1 same")]
    for i, (trace, eng, run) in enumerate(zip(result["traces"], result["engine_per_trace"], result["per_trace"])):
        agree = comparison["reference_top1_agreement"][i]
        for name in run:
            per.append((str(trace["seed"]), name, *(_pair(eng[name][m], run[name][m], m) for m in metrics),
                        "-" if agree is None or name != "full" else f"{agree:.3f}"))
    paired = [("mode", "metric", "engine", "runtime", "runtime - engine [95% CI]", "tolerance", "verdict")]
    for name, mode in comparison["modes"].items():
        for m, row in mode["metrics"].items():
            spec = ".1f" if m == "first_mismatch" else ".3f"
            d = row["difference"]
            paired.append((name, METRIC_LABELS[m], format(row["engine"], spec), format(row["runtime"], spec),
                           f"{d['mean']:+{spec}} [{d['ci95'][0]:+{spec}}, {d['ci95'][1]:+{spec}}]",
                           f"{row['tolerance']:g}", row["verdict"]))
    return [paired, per]


def _pair(a: float, b: float, metric: str) -> str:
    spec = ".0f" if metric == "first_mismatch" else ".3f"
    return f"{a:{spec}} / {b:{spec}}"


def same_traces_table(result: Dict, formatter=None) -> str:
    from rksc_sgl.bench.report import markdown_table

    fmt = formatter or markdown_table
    modes = result["comparison"]["modes"]
    verdict = "same scores on the same traces: " + ", ".join(
        f"{name} {'yes' if m['same'] else 'no'}" for name, m in modes.items())
    paired, per = _same_traces_rows(result)
    return "\n\n".join([fmt(paired), verdict, fmt(per)]) + ("\n" if formatter is None else "")


def engine_fidelity_traces(args, modes):
    from rksc_sgl.bench import fidelity

    eng = rksc_sgl.Engine(model=args.model, cache="radix", num_threads=1, seed=args.seed,
                          kv_pool_tokens=(len(modes) + 2) * (args.prompt_tokens + args.trace_tokens + 64),
                          max_running_requests=len(modes) + 1, compression=next(iter(modes.values())))
    per_trace, traces = [], []
    try:
        for i in tqdm(range(args.traces), desc=f"fidelity: {len(modes)} replays per trace"):
            seed = args.seed + i
            prompt, _ = few_shot_problem(eng.tokenizer, args.prompt_tokens, seed)
            ids = eng.encode(prompt)
            trace, reference = fidelity.full_kv_trace(eng, ids, args.trace_tokens, args.trace_temperature, seed)
            per_trace.append(fidelity.trace_fidelity(eng, ids, trace, reference, modes))
            traces.append({"seed": seed, "prompt_tokens": len(ids), "text": eng.tokenizer.decode(trace),
                           "prompt_ids": list(ids), "trace_ids": list(trace),
                           "reference_top1": reference.argmax(-1).tolist()})
            eng.flush_cache()
        eng.check_integrity()
    finally:
        eng.shutdown()
    return per_trace, traces


def _ci(stat, spec=".3f") -> str:
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _fidelity_rows(summary: Dict) -> List[tuple]:
    rows = [("mode", "top-1 agreement [95% CI]", "top-5", "KL nats [95% CI]", "NLL (full)", "first mismatch",
             "KV kept")]
    for name, s in summary["modes"].items():
        rows.append((name, _ci(s["top1"]), f"{s['top5']['mean']:.3f}", _ci(s["kl"]),
                     f"{s['nll']['mean']:.3f} ({s['nll_full']['mean']:.3f})", f"{s['first_mismatch']['mean']:.1f}",
                     f"{s['kv_kept']['mean']:.3f}"))
    return rows


def _paired_rows(summary: Dict) -> List[tuple]:
    rows = [("paired over traces", "top-1 difference [95% CI]", "KL difference [95% CI]")]
    for name, d in summary["paired"].items():
        rows.append((name, _ci(d["top1"], "+.3f"), _ci(d["kl"], "+.3f")))
    return rows


def _smallest_line(summary: Dict) -> str:
    return "smallest budget with mean top-1 >= {:g}: ".format(summary["top1_bar"]) + ", ".join(
        f"{m} {'none of those run' if b is None else format(b, 'g')}" for m, b in summary["smallest_budget_top1"].items())


def fidelity_table(summary: Dict) -> str:
    return "\n\n".join([format_table(_fidelity_rows(summary)), format_table(_paired_rows(summary)),
                         _smallest_line(summary)])


def fidelity_markdown(summary: Dict) -> str:
    from rksc_sgl.bench.report import markdown_table

    return "\n\n".join([markdown_table(_fidelity_rows(summary)), markdown_table(_paired_rows(summary)),
                         _smallest_line(summary)]) + "\n"


def plot_fidelity(result: Dict, path: Path) -> None:
    plt = pyplot()
    summary = result["summary"]
    specs, budgets = summary["specs"], summary["budgets"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in ((axes[0], "top1", "top-1 agreement with full KV"), (axes[1], "kl", "KL(full || compressed), nats")):
        for spec in specs:
            stats = [summary["modes"][f"{spec}@{b:g}"][metric] for b in budgets]
            means = [s["mean"] for s in stats]
            errs = [[m - s["ci95"][0] for m, s in zip(means, stats)], [s["ci95"][1] - m for m, s in zip(means, stats)]]
            ax.errorbar(budgets, means, yerr=errs, marker="o", capsize=3, label=spec)
        ax.set_xlabel("budget (share of decode KV kept)")
        ax.set_title(label, fontsize=9)
    axes[0].axhline(summary["top1_bar"], color="gray", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    c = result["config"]
    save_figure(fig, path, f"continuation fidelity: {c['traces']} traces x {c['trace_tokens']} tokens, seeds from {c['seed']}")


if __name__ == "__main__":
    raise SystemExit(main())
