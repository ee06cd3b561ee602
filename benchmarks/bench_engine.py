"""Benchmark of the embedded engine on one CPU thread.

Measures, in one run and one process:

(a) single-stream greedy decode speed: ``rksc_sgl.Engine`` vs ``transformers``
    ``model.generate`` on the very same model object (``eng.hf_model``), same prompt,
    same number of new tokens (EOS ignored on both sides), and whether the greedy tokens
    are identical. Decode speed excludes prefill: each side is timed generating N new
    tokens and generating 1 new token; decode tokens/s = (N - 1) / (median t_N - median t_1)
    (the first new token comes out of the prefill pass on both sides, the other N - 1 come
    from N - 1 one-token decode passes).
(b) ``radix`` vs ``none`` cache on ``rksc_sgl.bench``'s ``hinted_branches`` program
    (``@sgl.function``, ``s.fork(--branches)``, 8 by default, then ``join``; no vote, no
    verify step): a shared prompt of about ``--prompt-tokens`` tokens (few-shot
    reasoning-gym ``gsm_symbolic`` problems with their worked solutions, then a new
    problem), each branch appends a distinct approach hint and greedily generates exactly
    ``--short-tokens`` tokens (``ignore_eos``). By default the program forks first and every
    branch sends the prompt followed by its hint (``radix`` finds the prompt shared in its
    tree); ``--fork-commit`` appends the prompt before the fork, which commits it as one
    prefill-only request. Two engines (cache="none" and cache="radix") in this process get
    the same inputs; each repeat uses a different problem set and both caches are flushed
    before every program, so prefix reuse can only come from inside one program.
(c) the same with ``--long-tokens`` tokens per branch (``--skip-long`` skips it).

Every measurement runs one warm-up (excluded) and then ``--repeats`` timed repeats; the
table reports medians and ratios measured in this run. Results: JSON (config, versions,
CPU, raw timings) and a PNG bar chart in ``--out-dir``.

    RKSC_SGL_HOME=/tmp/rkscache python benchmarks/bench_engine.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch

warnings.simplefilter("ignore")

from tqdm.auto import tqdm  # noqa: E402

import rksc_sgl  # noqa: E402
from rksc_sgl.bench import build_prompt, hints_for, program  # noqa: E402
from rksc_sgl.bench.report import (  # noqa: E402
    benchmark_parser, format_table, median, pyplot, run_record, save_and_report, save_figure)

# The inputs and the program of (b)/(c) are rksc_sgl.bench's (its `paper` and `cot`
# workloads use them too); the report helpers are rksc_sgl.bench.report's. (b)/(c) keep
# their own 15-line loop, close to `rksc-sgl bench --workload paper|cot --modes none,radix`
# (which also interleaves the modes and flushes between problems), because they time the
# fork alone (no verify step, no vote), insist on exactly --short/--long-tokens per branch,
# and report next to (a) in one table and JSON: the one `make bench` prints and the README cites.


# ---- (a) decode speed ---------------------------------------------------------------------
def engine_generate(eng, ids: List[int], n: int):
    eng.flush_cache()
    t0 = time.perf_counter()
    out = eng.generate_request(input_ids=ids, sampling_params={
        "max_new_tokens": n, "min_new_tokens": n, "temperature": 0, "ignore_eos": True})
    return time.perf_counter() - t0, list(out["output_ids"])


@torch.inference_mode()
def hf_generate(model, tokenizer, ids: List[int], n: int):
    input_ids = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(input_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return time.perf_counter() - t0, out[0, len(ids):].tolist()


def bench_decode(eng, ids: List[int], n: int, repeats: int) -> Dict:
    """Interleave engine/HF and N/1-token runs within each repeat so drift hits all four."""
    model, tok = eng.hf_model, eng.tokenizer
    times = {"engine_n": [], "engine_1": [], "hf_n": [], "hf_1": []}
    tokens = {}
    for r in tqdm(range(repeats + 1), desc="(a) decode", leave=False):
        runs = [("engine_n", lambda: engine_generate(eng, ids, n)), ("hf_n", lambda: hf_generate(model, tok, ids, n)),
                ("engine_1", lambda: engine_generate(eng, ids, 1)), ("hf_1", lambda: hf_generate(model, tok, ids, 1))]
        if r % 2:
            runs = runs[1::-1] + runs[:1:-1]  # swap who goes first on odd repeats
        for key, fn in runs:
            dt, out = fn()
            if r > 0:  # r == 0 is the warm-up
                times[key].append(dt)
            tokens[key] = out
    med = {k: median(v) for k, v in times.items()}
    eng_tps = (n - 1) / (med["engine_n"] - med["engine_1"])
    hf_tps = (n - 1) / (med["hf_n"] - med["hf_1"])
    same = tokens["engine_n"] == tokens["hf_n"]
    first_diff = None
    if not same:
        first_diff = next((i for i, (a, b) in enumerate(zip(tokens["engine_n"], tokens["hf_n"])) if a != b),
                          min(len(tokens["engine_n"]), len(tokens["hf_n"])))
    return {
        "prompt_tokens": len(ids), "new_tokens": n, "times_s": times, "median_s": med,
        "engine_decode_tok_s": eng_tps, "hf_decode_tok_s": hf_tps, "ratio_engine_over_hf": eng_tps / hf_tps,
        "engine_prefill_plus_1_s": med["engine_1"], "hf_prefill_plus_1_s": med["hf_1"],
        "greedy_tokens_identical": same, "first_mismatch_index": first_diff,
        "engine_tokens": tokens["engine_n"], "hf_tokens": tokens["hf_n"],
        "engine_new_tokens_generated": len(tokens["engine_n"]), "hf_new_tokens_generated": len(tokens["hf_n"]),
    }


# ---- (b)/(c) radix vs none ------------------------------------------------------------------
def run_program(eng, prompt: str, hints: List[str], max_tokens: int, fork_commit: bool) -> Dict:
    """One end-to-end program run, from an empty cache; returns wall time, counters, outputs."""
    eng.flush_cache()
    before = eng.stats(reset_peak=True)
    t0 = time.perf_counter()
    state = program("hinted_branches").run(prompt=prompt, hints=hints, max_tokens=max_tokens,
                                           fork_commit=fork_commit, backend=eng)
    answers = state["answer"]
    wall = time.perf_counter() - t0
    stats = eng.stats().since(before)
    counts = state.ret_value["completion_tokens"]
    if counts != [max_tokens] * len(hints):
        raise RuntimeError(f"branches generated {counts} tokens, expected {max_tokens} each")
    return {"wall_s": wall, "stats": stats.as_dict(), "answers": list(answers)}


def bench_programs(engines: Dict, prompts: List[str], hints: List[str], max_tokens: int, label: str,
                   fork_commit: bool) -> Dict:
    """prompts[0] is the warm-up; prompts[1:] are the timed repeats (one per repeat)."""
    modes = list(engines)
    rows = {m: [] for m in modes}
    outputs = {m: [] for m in modes}
    for r, prompt in enumerate(tqdm(prompts, desc=f"({label}) {max_tokens} tok/branch", leave=False)):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            res = run_program(engines[mode], prompt, hints, max_tokens, fork_commit)
            if r > 0:
                rows[mode].append({"wall_s": res["wall_s"], **res["stats"]})
                outputs[mode].append(res["answers"])
    agree = sum(a == b for ra, rb in zip(outputs["none"], outputs["radix"]) for a, b in zip(ra, rb))
    total = sum(len(ra) for ra in outputs["none"])
    summary = {}
    for m in modes:
        summary[m] = {
            "median_wall_s": median([x["wall_s"] for x in rows[m]]),
            "min_wall_s": min(x["wall_s"] for x in rows[m]),
            "max_wall_s": max(x["wall_s"] for x in rows[m]),
            "median_requests": median([x["requests"] for x in rows[m]]),
            "median_peak_kv_tokens": median([x["peak_kv_tokens"] for x in rows[m]]),
            "median_prefill_tokens": median([x["prefill_tokens"] for x in rows[m]]),
            "median_cached_tokens": median([x["cached_tokens"] for x in rows[m]]),
            "median_decode_tokens": median([x["decode_tokens"] for x in rows[m]]),
            "median_forward_passes": median([x["forward_passes"] for x in rows[m]]),
            "median_busy_time_s": median([x["busy_time_s"] for x in rows[m]]),
        }
    return {"max_tokens": max_tokens, "runs": rows, "summary": summary,
            "ratio_none_over_radix": summary["none"]["median_wall_s"] / summary["radix"]["median_wall_s"],
            "branch_outputs_identical": f"{agree}/{total}", "sample_outputs": outputs}


# ---- report -------------------------------------------------------------------------------
def fmt_table(result: Dict) -> str:
    rows = [("measurement", "A", "B", "A/B", "target", "")]

    def row(name, a, b, ratio, target, ok):
        rows.append((name, a, b, ratio, target, "" if ok is None else ("ok" if ok else "MISS")))

    d = result["decode"]
    row(f"(a) decode tok/s, 1 stream, {d['new_tokens']} new tok: A=engine B=HF",
        f"{d['engine_decode_tok_s']:.1f}", f"{d['hf_decode_tok_s']:.1f}", f"{d['ratio_engine_over_hf']:.3f}",
        ">= 0.90", d["ratio_engine_over_hf"] >= 0.90)
    row("(a) prefill+1 tok s (median): A=engine B=HF", f"{d['engine_prefill_plus_1_s']:.3f}",
        f"{d['hf_prefill_plus_1_s']:.3f}", f"{d['engine_prefill_plus_1_s'] / d['hf_prefill_plus_1_s']:.3f}", "", None)
    row("(a) greedy tokens engine == HF", "yes" if d["greedy_tokens_identical"] else
        f"no (first diff @ {d['first_mismatch_index']})", "", "", "identical", d["greedy_tokens_identical"])
    for key, label in (("short", "b"), ("long", "c")):
        p = result.get(key)
        if not p:
            continue
        n, r = p["summary"]["none"], p["summary"]["radix"]
        tag = f"({label}) {result['config']['branches']}x{p['max_tokens']} tok"
        row(f"{tag} wall s/program (median): A=none B=radix", f"{n['median_wall_s']:.2f}",
            f"{r['median_wall_s']:.2f}", f"{p['ratio_none_over_radix']:.2f}",
            ">= 3.0" if key == "short" else "", p["ratio_none_over_radix"] >= 3.0 if key == "short" else None)
        row(f"{tag} prefill tokens computed: A=none B=radix", f"{n['median_prefill_tokens']:.0f}",
            f"{r['median_prefill_tokens']:.0f}", f"{n['median_prefill_tokens'] / max(r['median_prefill_tokens'], 1):.2f}",
            "", None)
        row(f"{tag} requests / peak KV tokens: A=none B=radix",
            f"{n['median_requests']:.0f} / {n['median_peak_kv_tokens']:.0f}",
            f"{r['median_requests']:.0f} / {r['median_peak_kv_tokens']:.0f}", "", "", None)
        row(f"{tag} cached (hit) tokens: A=none B=radix", f"{n['median_cached_tokens']:.0f}",
            f"{r['median_cached_tokens']:.0f}", "", "", None)
        row(f"{tag} branch outputs none == radix", p["branch_outputs_identical"], "", "", "", None)
    return format_table(rows)


def plot(result: Dict, path: Path) -> None:
    plt = pyplot()

    progs = [(k, result[k]) for k in ("short", "long") if result.get(k)]
    fig, axes = plt.subplots(1, 1 + len(progs), figsize=(4.2 * (1 + len(progs)), 3.8))
    d = result["decode"]
    ax = axes[0]
    vals = [d["engine_decode_tok_s"], d["hf_decode_tok_s"]]
    ax.bar(["rksc_sgl engine", "HF generate"], vals, color=["tab:blue", "tab:gray"])
    for i, v in enumerate(vals):
        ax.text(i, v * 1.01, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylim(0, max(vals) * 1.15)
    ax.set_ylabel("decode tokens/s (1 stream, 1 thread)")
    ax.set_title(f"(a) decode, ratio {d['ratio_engine_over_hf']:.2f}")
    for ax, (key, p) in zip(axes[1:], progs):
        modes = ["none", "radix"]
        med = [p["summary"][m]["median_wall_s"] for m in modes]
        err = [[med[i] - p["summary"][m]["min_wall_s"] for i, m in enumerate(modes)],
               [p["summary"][m]["max_wall_s"] - med[i] for i, m in enumerate(modes)]]
        ax.bar(modes, med, yerr=err, capsize=4, color=["tab:gray", "tab:green"])
        top = max(med[i] + err[1][i] for i in range(2))
        for i, v in enumerate(med):
            ax.text(i, v + err[1][i] + 0.02 * top, f"{v:.2f}s", ha="center", va="bottom")
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel("wall s / program (median, min-max)")
        ax.set_title(f"({'b' if key == 'short' else 'c'}) {result['config']['branches']} branches x "
                     f"{p['max_tokens']} tok: {p['ratio_none_over_radix']:.2f}x")
    save_figure(fig, path, f"rksc_sgl {result['config']['model']}, 1 CPU thread, {result['cpu']}", fontsize=9)


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (+1 warm-up)")
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="shared prompt length for (b)/(c)")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--short-tokens", type=int, default=32, help="new tokens per branch in (b)")
    ap.add_argument("--long-tokens", type=int, default=256, help="new tokens per branch in (c)")
    ap.add_argument("--skip-long", action="store_true", help="skip (c)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens in (a)")
    ap.add_argument("--decode-prompt-tokens", type=int, default=256, help="prompt length in (a)")
    ap.add_argument("--kv-pool-tokens", type=int, default=32768, help="KV slots per engine")
    ap.add_argument("--fork-commit", action="store_true",
                    help="append the shared prompt before fork and let SGLang's fork commit it as its own "
                         "prefill request (default: fork first, prompt inside each branch, no commit request)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "scratch"))
    ap.add_argument("--name", default="bench_engine", help="stem of the JSON/PNG file names")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.decode_tokens < 2 or args.branches < 2:
        ap.error("need --repeats >= 1, --decode-tokens >= 2, --branches >= 2")

    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    engines = {mode: rksc_sgl.Engine(model=args.model, cache=mode, num_threads=1,
                                     kv_pool_tokens=args.kv_pool_tokens, seed=args.seed)
               for mode in ("none", "radix")}
    try:
        tok = engines["none"].tokenizer
        result: Dict = {
            **run_record("bench_engine"),
            "config": {**vars(args), "hints": hints_for(args.branches),
                       "engine_config": {m: {k: str(v) for k, v in vars(e.config).items()} for m, e in engines.items()}},
            "engine_num_threads": 1,
            "hf_attn_implementation": getattr(engines["none"].hf_model.config, "_attn_implementation", None),
            "decode_method": "decode tok/s = (N-1) / (median t(N new tokens) - median t(1 new token)); "
                             "prefill and the first token cancel out. Engine side: cache='none' engine, "
                             "generate_request(input_ids=...), ignore_eos. HF side: eng.hf_model.generate, "
                             "greedy, min_new_tokens=max_new_tokens=N.",
            "program_method": "end-to-end hinted_branches.run() wall time (fork(branches); each branch gets the "
                              "shared prompt (or, with --fork-commit, the prompt goes before the fork and is "
                              "committed by fork) plus a distinct hint, gen max_tokens=min_tokens=T ignore_eos "
                              "temperature 0; join); "
                              "cache flushed before every program; repeat r uses reasoning-gym seed "
                              "seed+1+r (r=0 is the warm-up, excluded); mode order alternates per repeat.",
        }

        # (a)
        decode_ids = engines["none"].encode(build_prompt(tok, args.decode_prompt_tokens, args.seed))
        result["decode"] = bench_decode(engines["none"], decode_ids, args.decode_tokens, args.repeats)

        # (b), (c)
        prompts = [build_prompt(tok, args.prompt_tokens, args.seed + 1 + r) for r in range(args.repeats + 1)]
        result["config"]["actual_prompt_tokens"] = [len(engines["none"].encode(p)) for p in prompts]
        hints = hints_for(args.branches)
        result["short"] = bench_programs(engines, prompts, hints, args.short_tokens, "b", args.fork_commit)
        if not args.skip_long:
            result["long"] = bench_programs(engines, prompts, hints, args.long_tokens, "c", args.fork_commit)
        for eng in engines.values():
            eng.check_integrity()
    finally:
        for eng in engines.values():
            eng.shutdown()
    result["total_wall_s"] = time.time() - started

    save_and_report(result, fmt_table(result), out_dir, args.name, plot,
                    f"rksc_sgl engine benchmark: {args.model}, 1 thread, {result['cpu']}, median of {args.repeats} "
                    f"(+1 warm-up), torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
                    f"sglang {result['versions']['sglang']}; prompt {result['config']['actual_prompt_tokens'][1:]} tok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
