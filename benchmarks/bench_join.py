"""Joining forked branches by KV concatenation vs by text, on the embedded engine, one CPU thread.

``forks.join(mode="concate_and_append")`` on the engine concatenates the branches' cached KV
(rksc_sgl/kv/join.py): the prefix and the first branch are exact, later branches are moved to
their positions but never attended to the branches before them. This measures, in one run
and one process, what that buys and what it costs against joining by text (a plain prefill
of the joined tokens, what SGLang's runtime does today):

- per problem (reasoning-gym ``gsm_symbolic``, seeded): a few-shot prompt, ``--branches``
  branches with different approach hints (greedy, ``--branch-tokens`` new tokens each), every
  branch committed as the interpreter does, then the join and a greedy continuation after
  ``"\\nFinal answer:"``;
- time of the join plus the post-join request (KV: ``KVCacheManager.concatenate`` then the
  request in the join's namespace; text: the same token ids as a plain request), median over
  ``--repeats`` (the cache is flushed and the branches are committed again before each repeat;
  modes alternate in order); prefill tokens the post-join request computed;
- fidelity: whether the first post-join token, the whole greedy continuation and the extracted
  answer are the same as the text join's, and the text join's first token's log-probability
  under both.

    RKSC_SGL_HOME=/tmp/rkscache python benchmarks/bench_join.py --problems 6
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
from rksc_sgl.bench import few_shot_problem, hints_for  # noqa: E402
from rksc_sgl.kv.join import concatenate, join_namespace, joined_tokens, split_segments  # noqa: E402
from rksc_sgl.problems import extract_answer  # noqa: E402
from rksc_sgl.bench.report import (  # noqa: E402
    benchmark_parser, format_table, median, pyplot, run_record, save_and_report, save_figure, source_commit)

TAIL = "\nFinal answer:"


def branch_texts(eng, prompt: str, hints: List[str], tokens: int) -> List[str]:
    """Every branch's text after the fork point: its hint and its greedy reasoning."""
    starts = [f"{hint}\n" for hint in hints]
    outs = eng.generate_request(text=[prompt + s for s in starts],
                                sampling_params={"max_new_tokens": tokens, "temperature": 0, "stop": ["\n\n"]})
    return [s + o["text"] for s, o in zip(starts, outs)]


def commit(eng, prompt: str, branches: List[str]) -> None:
    eng.flush_cache()
    eng.generate_request(text=[prompt + b for b in branches], sampling_params={"max_new_tokens": 0})


def run_mode(eng, mode: str, prefix_ids, segments, tail_ids, new_tokens: int) -> Dict:
    """Join (by KV or text) and generate after it; the wall time covers both."""
    tokens = joined_tokens(prefix_ids, segments) + tail_ids
    params = {"max_new_tokens": new_tokens, "temperature": 0}
    t0 = time.perf_counter()
    key = None
    if mode == "kv":
        key = join_namespace(prefix_ids, segments)
        if not eng.scheduler.call(lambda: concatenate(eng.kv, prefix_ids, segments, eng.runner.rotate_keys, key)):
            raise RuntimeError("the branches' KV was not cached")
    out = eng.generate_request(input_ids=tokens, sampling_params=params, extra_key=key,
                               return_logprob=True, top_logprobs_num=1)
    seconds = time.perf_counter() - t0
    meta = out["meta_info"]
    return {"seconds": seconds, "text": out["text"], "output_ids": out["output_ids"],
            "prefill_tokens": meta["prompt_tokens"] - meta["cached_tokens"],
            "first_logprob": meta["output_token_logprobs"][0][0]}


def first_token_logprob(eng, prefix_ids, segments, tail_ids, token: int, joined: bool) -> float:
    tokens = joined_tokens(prefix_ids, segments) + tail_ids + [token]
    key = join_namespace(prefix_ids, segments) if joined else None
    out = eng.generate_request(input_ids=tokens, sampling_params={"max_new_tokens": 0}, extra_key=key,
                               return_logprob=True, logprob_start_len=len(tokens) - 2)
    return out["meta_info"]["input_token_logprobs"][-1][0]


def bench_problem(eng, seed: int, args) -> Dict:
    prompt, problem = few_shot_problem(eng.tokenizer, args.prompt_tokens, seed)
    branches = branch_texts(eng, prompt, hints_for(args.branches), args.branch_tokens)
    split = split_segments(eng.encode, prompt, branches)
    if split is None:
        raise RuntimeError(f"seed {seed}: a token spans the fork point")
    prefix_ids, segments = split
    tail_ids = eng.encode(TAIL)
    times = {"kv": [], "text": []}
    runs = {}
    for r in range(args.repeats + 1):  # r == 0: warm-up
        for mode in (("kv", "text") if r % 2 == 0 else ("text", "kv")):
            commit(eng, prompt, branches)
            runs[mode] = run_mode(eng, mode, prefix_ids, segments, tail_ids, args.new_tokens)
            if r > 0:
                times[mode].append(runs[mode]["seconds"])
    kv, text = runs["kv"], runs["text"]
    reference_token = text["output_ids"][0]
    kv_lp_of_reference = first_token_logprob(eng, prefix_ids, segments, tail_ids, reference_token, joined=True)
    return {
        "seed": seed, "answer": problem.answer, "branch_tokens": [len(s) for s in segments],
        "prefix_tokens": len(prefix_ids), "times_s": times,
        "median_s": {m: median(v) for m, v in times.items()},
        "prefill_tokens": {"kv": kv["prefill_tokens"], "text": text["prefill_tokens"]},
        "same_first_token": kv["output_ids"][0] == reference_token,
        "same_continuation": kv["output_ids"] == text["output_ids"],
        "answers": {"kv": extract_answer(kv["text"]), "text": extract_answer(text["text"])},
        "same_answer": extract_answer(kv["text"]) == extract_answer(text["text"]),
        "reference_first_logprob": {"text": text["first_logprob"], "kv": kv_lp_of_reference},
        "texts": {"kv": kv["text"], "text": text["text"]},
    }


def summarize(problems: List[Dict]) -> Dict:
    n = len(problems)
    kv = median([p["median_s"]["kv"] for p in problems])
    text = median([p["median_s"]["text"] for p in problems])
    return {
        "problems": n,
        "median_s": {"kv": kv, "text": text},
        "speedup_kv_over_text": median([p["median_s"]["text"] / p["median_s"]["kv"] for p in problems]),
        "prefill_tokens": {m: sum(p["prefill_tokens"][m] for p in problems) for m in ("kv", "text")},
        "same_first_token": sum(p["same_first_token"] for p in problems),
        "same_continuation": sum(p["same_continuation"] for p in problems),
        "same_answer": sum(p["same_answer"] for p in problems),
        "mean_abs_logprob_gap": sum(abs(p["reference_first_logprob"]["kv"] - p["reference_first_logprob"]["text"])
                                    for p in problems) / n,
    }


def fmt_table(result: Dict) -> str:
    s = result["summary"]
    n = s["problems"]
    rows = [("measurement", "KV join", "text join", "")]
    rows.append(("join + post-join request, s (median of problem medians)",
                 f"{s['median_s']['kv']:.3f}", f"{s['median_s']['text']:.3f}",
                 f"text/KV {s['speedup_kv_over_text']:.2f}x (median per problem)"))
    rows.append(("prefill tokens computed after the join (sum)", s["prefill_tokens"]["kv"],
                 s["prefill_tokens"]["text"], ""))
    rows.append(("same first token as the text join", f"{s['same_first_token']}/{n}", "reference", ""))
    rows.append(("same greedy continuation", f"{s['same_continuation']}/{n}", "reference", ""))
    rows.append(("same extracted answer", f"{s['same_answer']}/{n}", "reference", ""))
    rows.append(("mean |logprob gap| of the reference first token", f"{s['mean_abs_logprob_gap']:.3f}", "0", ""))
    return format_table(rows)


def plot(result: Dict, path: Path) -> None:
    plt = pyplot()

    problems = result["problems"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(problems), 3.6))
    width = 0.4
    for i, p in enumerate(problems):
        for j, (mode, color) in enumerate((("kv", "tab:blue"), ("text", "tab:gray"))):
            ax.bar(i + (j - 0.5) * width, p["median_s"][mode], width, color=color,
                   label=("KV join" if mode == "kv" else "text join") if i == 0 else None)
        mark = "same" if p["same_continuation"] else ("same answer" if p["same_answer"] else "differs")
        ax.text(i, max(p["median_s"].values()) * 1.03, mark, ha="center", fontsize=7)
    ax.set_xticks(range(len(problems)), [f"seed {p['seed']}" for p in problems], fontsize=8)
    ax.set_ylabel("join + post-join request, s")
    ax.legend(fontsize=8)
    c = result["config"]
    ax.set_title(f"{c['branches']} branches x {c['branch_tokens']} tok, prompt ~{c['prompt_tokens']} tok; "
                 f"label: continuation vs text join", fontsize=8)
    save_figure(fig, path, f"rksc_sgl join by KV vs text, {c['model']}, 1 thread, {result['cpu']}")


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--branch-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens after the join")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per problem (+1 warm-up)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "scratch"))
    ap.add_argument("--name", default="bench_join")
    args = ap.parse_args(argv)
    if args.problems < 1 or args.branches < 2 or args.repeats < 1 or args.new_tokens < 1:
        ap.error("need --problems >= 1, --branches >= 2, --repeats >= 1, --new-tokens >= 1")

    torch.set_num_threads(1)
    started = time.time()
    run_commit = source_commit()  # the code this run imports; the record is written at its end
    eng = rksc_sgl.Engine(model=args.model, cache="radix", num_threads=1, seed=args.seed,
                          max_running_requests=max(16, args.branches))
    try:
        problems = [bench_problem(eng, args.seed + i, args) for i in tqdm(range(args.problems), desc="problems")]
        eng.check_integrity()
    finally:
        eng.shutdown()
    result = {
        **run_record("bench_join", commit=run_commit),
        "config": vars(args),
        "method": "per problem: branches generated once; before every timed run the cache is flushed and the "
                  "branches are committed (prefilled) again, so both modes start from the same cached KV; "
                  "a run is the join (KV: concatenate; text: nothing) plus one greedy post-join request; modes "
                  "alternate in order; repeat 0 is a warm-up.",
        "problems": problems,
        "summary": summarize(problems),
        "total_wall_s": time.time() - started,
    }
    save_and_report(result, fmt_table(result), Path(args.out_dir), args.name, plot,
                    f"rksc_sgl fork join, KV concatenation vs text: {args.model}, {args.branches} branches x "
                    f"{args.branch_tokens} tokens, 1 thread, {result['cpu']}, median of {args.repeats} (+1 warm-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
