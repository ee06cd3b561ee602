"""Benchmark of constrained decoding (xgrammar regex) on the embedded engine, one CPU thread.

Measures, in one run and one process, on one ``cache="none"`` engine:

(a) decode tokens/s with and without a regex (default ``[0-9]{1,200}``), for batches of
    ``--batch-sizes`` concurrent requests (one ``generate_request`` with a list of prompts,
    so they are admitted, prefilled and decoded together). Both modes use the same
    prompts and the same parameters: greedy, ``min_new_tokens = max_new_tokens = N``
    (EOS is masked until N in both, so both generate exactly N tokens; checked), the only
    difference being ``regex``. As in ``bench_engine.py`` prefill cancels out: each mode is
    timed generating N and 1 new tokens, and decode tok/s = B * (N - 1) / (median t_N -
    median t_1). Overhead = 1 - constrained / unconstrained (target: under 15%).
(b) the per-step cost of the mask alone (``RequestGrammar.mask``: xgrammar's
    ``fill_next_token_bitmask`` and the bitmask applied to one logits row), and
    the time to compile the regex once (the engine caches it per pattern afterwards).

Every measurement runs one warm-up (excluded) and ``--repeats`` timed repeats, modes
interleaved with alternating order; the table reports medians and ratios from this run.
Results: JSON (config, versions, CPU, raw timings) and a PNG bar chart in ``--out-dir``.

    RKSC_SGL_HOME=/tmp/rkscache python benchmarks/bench_grammar.py
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
from rksc_sgl.bench import build_prompt  # noqa: E402
from rksc_sgl.engine.grammar import GrammarCache, RequestGrammar  # noqa: E402
from rksc_sgl.bench.report import (  # noqa: E402
    benchmark_parser, format_table, median, pyplot, run_record, save_and_report, save_figure)

TARGET_OVERHEAD = 0.15


def run_batch(eng, prompts: List[List[int]], n: int, regex) -> float:
    """Generate exactly ``n`` tokens for every prompt in one batch; return wall seconds."""
    params = {"max_new_tokens": n, "min_new_tokens": n, "temperature": 0}
    if regex:
        params["regex"] = regex
    eng.flush_cache()
    t0 = time.perf_counter()
    outs = eng.generate_request(input_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t0
    counts = [o["meta_info"]["completion_tokens"] for o in outs]
    if counts != [n] * len(prompts):
        raise RuntimeError(f"generated {counts} tokens, expected {n} each (regex={regex!r})")
    return dt


def bench_decode(eng, prompts: List[List[int]], n: int, regex: str, repeats: int) -> Dict:
    """Interleave the four runs (mode x {N, 1} tokens) inside every repeat, swapping the
    order on odd repeats, so drift on a shared machine hits both modes alike."""
    keys = [("free_n", None, n), ("regex_n", regex, n), ("free_1", None, 1), ("regex_1", regex, 1)]
    times = {k: [] for k, _, _ in keys}
    for r in tqdm(range(repeats + 1), desc=f"batch {len(prompts)}", leave=False):
        order = keys if r % 2 == 0 else [keys[1], keys[0], keys[3], keys[2]]
        for key, pattern, tokens in order:
            dt = run_batch(eng, prompts, tokens, pattern)
            if r > 0:  # r == 0 is the warm-up
                times[key].append(dt)
    med = {k: median(v) for k, v in times.items()}
    b = len(prompts)
    free = b * (n - 1) / (med["free_n"] - med["free_1"])
    constrained = b * (n - 1) / (med["regex_n"] - med["regex_1"])
    return {"batch": b, "new_tokens": n, "times_s": times, "median_s": med,
            "free_decode_tok_s": free, "regex_decode_tok_s": constrained,
            "ratio_regex_over_free": constrained / free, "overhead": 1 - constrained / free}


def bench_mask(eng, regex: str, steps: int = 2000) -> Dict:
    """Cost of the mask alone per decode step, and of compiling the regex once."""
    cache = GrammarCache(eng.tokenizer, eng.vocab_size, eng.eos_ids)
    cache.compiled("regex", "x")  # builds the tokenizer info outside the timing
    t0 = time.perf_counter()
    compiled = cache.compiled("regex", regex)
    compile_s = time.perf_counter() - t0
    grammar = RequestGrammar(compiled, eng.vocab_size)
    logits = torch.randn(eng.vocab_size)
    digit = eng.encode("7")[-1]
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            grammar.mask(logits)
        samples.append((time.perf_counter() - t0) / steps)
        grammar.accept(digit)
    assert compiled is cache.compiled("regex", regex)
    return {"mask_us_per_step": median(samples) * 1e6, "mask_us_samples": [s * 1e6 for s in samples],
            "compile_ms": compile_s * 1e3}


# ---- report -----------------------------------------------------------------------------------
def fmt_table(result: Dict) -> str:
    rows = [("measurement", "unconstrained", "regex", "regex/free", "overhead", "target", "")]
    for d in result["decode"]:
        ok = d["overhead"] < TARGET_OVERHEAD
        rows.append((f"decode tok/s, batch {d['batch']}, {d['new_tokens']} new tok",
                     f"{d['free_decode_tok_s']:.1f}", f"{d['regex_decode_tok_s']:.1f}",
                     f"{d['ratio_regex_over_free']:.3f}", f"{100 * d['overhead']:+.1f}%",
                     f"< {100 * TARGET_OVERHEAD:.0f}%", "ok" if ok else "MISS"))
    m = result["mask"]
    rows.append(("mask alone, us/step/request (fill+apply)", "", f"{m['mask_us_per_step']:.1f}", "", "", "", ""))
    rows.append(("compile regex once, ms (then cached)", "", f"{m['compile_ms']:.2f}", "", "", "", ""))
    return format_table(rows)


def plot(result: Dict, path: Path) -> None:
    plt = pyplot()

    decode = result["decode"]
    fig, ax = plt.subplots(figsize=(1.8 + 2.4 * len(decode), 3.8))
    width = 0.38
    top = max(max(d["free_decode_tok_s"], d["regex_decode_tok_s"]) for d in decode) * 1.25
    for i, d in enumerate(decode):
        vals = [d["free_decode_tok_s"], d["regex_decode_tok_s"]]
        for j, (v, color) in enumerate(zip(vals, ["tab:gray", "tab:blue"])):
            x = i + (j - 0.5) * width
            ax.bar(x, v, width, color=color, label=["unconstrained", "regex"][j] if i == 0 else None)
            ax.text(x, v * 1.01, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.text(i, max(vals) + 0.09 * top, f"overhead {100 * d['overhead']:+.1f}%", ha="center", fontsize=9)
    ax.set_xticks(range(len(decode)), [f"batch {d['batch']}" for d in decode])
    ax.set_ylim(0, top)
    ax.set_ylabel("decode tokens/s (1 thread)")
    ax.set_title(f"regex {result['config']['regex']} vs unconstrained, {decode[0]['new_tokens']} tok", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, f"rksc_sgl {result['config']['model']}, xgrammar, {result['cpu']}")


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--regex", default="[0-9]{1,200}")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (+1 warm-up)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of each request")
    ap.add_argument("--batch-sizes", default="1,4", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "scratch"))
    ap.add_argument("--name", default="bench_grammar", help="stem of the JSON/PNG file names")
    args = ap.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.repeats < 1 or args.new_tokens < 2 or min(batch_sizes) < 1:
        ap.error("need --repeats >= 1, --new-tokens >= 2, batch sizes >= 1")

    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    eng = rksc_sgl.Engine(model=args.model, cache="none", num_threads=1, seed=args.seed,
                          max_running_requests=max(batch_sizes))
    try:
        base = build_prompt(eng.tokenizer, args.prompt_tokens, args.seed).rstrip() + "\nFinal answer (digits only):"
        result: Dict = {
            **run_record("bench_grammar"),
            "config": {**vars(args), "engine_config": {k: str(v) for k, v in vars(eng.config).items()}},
            "method": "decode tok/s = B*(N-1) / (median t(N new tokens) - median t(1 new token)) for a batch of B "
                      "prompts in one generate_request; both modes greedy with min_new_tokens=max_new_tokens=N, "
                      "the constrained mode adds regex; cache='none', flushed before every run; mode order "
                      "alternates per repeat; repeat 0 is a warm-up.",
            "decode": [],
        }
        for b in batch_sizes:
            # Distinct prompts (a different first line each), so every request prefills its own.
            prompts = [eng.encode(f"Request {i}.\n" + base) for i in range(b)]
            result["decode"].append(bench_decode(eng, prompts, args.new_tokens, args.regex, args.repeats))
        result["config"]["actual_prompt_tokens"] = len(eng.encode(base))
        result["mask"] = bench_mask(eng, args.regex)
        eng.check_integrity()
    finally:
        eng.shutdown()
    result["total_wall_s"] = time.time() - started

    save_and_report(result, fmt_table(result), out_dir, args.name, plot,
                    f"rksc_sgl constrained decoding benchmark: {args.model}, regex {args.regex!r}, 1 thread, "
                    f"{result['cpu']}, median of {args.repeats} (+1 warm-up), xgrammar {result['versions']['xgrammar']}; "
                    f"prompt ~{result['config']['actual_prompt_tokens']} tok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
