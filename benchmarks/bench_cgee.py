"""Benchmark of CGEE on verifier-heavy best-of-N (reasoning-gym, 8 branches), one CPU thread.

Runs ``programs/best_of_n_cgee.py`` on ``--problems`` problems of seed ``--seed``
(calibration used seed 1000: disjoint problem seeds) with the calibrated default
``CGEEConfig`` and ``audit_fraction=1``: in every verify call where a gate changed
something (a skip, or a branch leaving early) the full verifier pass runs as well in
the same call, so each call has both decisions and both timings:

- gated verifier time: the time ``verify`` spent deciding (0 verifier layers for a skip);
- full verifier time: the audit's full pass (or, for a call where no gate fired, the
  pass itself, which then *was* the full pass);
- error rate: calls whose chosen answer differs from the full pass's / verify calls,
  the first ``--warmup`` calls excluded, with a 95% Wilson interval; also per-branch
  choice disagreements;
- passes skipped, mean exit layer of the passes that ran, accuracy of both decisions.

    RKSC_SGL_HOME=/tmp/rkscache python benchmarks/bench_cgee.py --problems 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore")

from tqdm.auto import tqdm  # noqa: E402

import rksc_sgl  # noqa: E402
from rksc_sgl.rksc.cgee import AuditLog, CGEEConfig  # noqa: E402
from rksc_sgl.problems import load_problems, score  # noqa: E402
from rksc_sgl.bench.report import run_record, source_commit  # noqa: E402
from rksc_sgl.programs.best_of_n_cgee import best_of_n_cgee  # noqa: E402
from rksc_sgl.rksc.verifier import wilson_interval  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0, help="evaluation problem seed (calibration: 1000)")
    ap.add_argument("--dataset", default="basic_arithmetic")
    ap.add_argument("--difficulty", default="easy")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--calibration-seed", type=int, default=1000,
                    help="drop evaluation problems whose question also occurs among the calibration problems")
    ap.add_argument("--calibration-problems", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=1, help="verify calls excluded from the error rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "scratch"))
    ap.add_argument("--name", default="bench_cgee")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run_commit = source_commit()  # the code this run imports; the record is written at its end
    cfg = CGEEConfig(audit_fraction=1.0)
    log = AuditLog(warmup=args.warmup)
    # Seeds are disjoint, but easy presets have few distinct questions: drop repeats of
    # calibration questions so that no evaluation question was seen in calibration.
    seen = {p.question for p in load_problems(args.dataset, count=args.calibration_problems,
                                              seed=args.calibration_seed, difficulty=args.difficulty)}
    pool = load_problems(args.dataset, count=args.problems * 3, seed=args.seed, difficulty=args.difficulty)
    problems = [p for p in pool if p.question not in seen][: args.problems]
    calls = []
    with rksc_sgl.Engine(model="smollm2-135m", cache="radix", num_threads=args.threads,
                         kv_pool_tokens=16384, max_running_requests=16) as engine:
        for i, p in enumerate(tqdm(problems, desc="problems", file=sys.stderr)):
            t0 = time.perf_counter()
            r = best_of_n_cgee.run(question=p.question, num_branches=args.branches, max_tokens=args.max_tokens,
                                   sample_temperature=args.temperature, cgee=cfg, audit_log=log,
                                   backend=engine).ret_value
            wall = time.perf_counter() - t0
            g = r.gates
            audited = g["audited"]
            full_answer = g["audit_answer"] if audited else r.answer
            full_branch = g["audit_branch"] if audited else r.branch
            calls.append({
                "index": i, "warmup": i < args.warmup, "wall_s": wall,
                "skipped": g["skipped"], "vote_share": g["vote_share"], "top_confidence": g["top_confidence"],
                "layers_run": g["layers_run"], "mean_exit_layer": g["mean_exit_layer"],
                "gated_s": g["verifier_s"], "full_s": g["audit_s"] if audited else g["verifier_s"],
                "answer": r.answer, "full_answer": full_answer, "branch": r.branch, "full_branch": full_branch,
                "reference": p.answer, "correct": score(p, r.answer) >= 1.0,
                "correct_full": score(p, full_answer) >= 1.0, "answers": r.answers,
            })
        engine.check_integrity()
    counted = [c for c in calls if not c["warmup"]]
    n = len(counted)
    errors = sum(c["answer"] != c["full_answer"] for c in counted)
    branch_errors = sum(c["branch"] != c["full_branch"] for c in counted)
    lo, hi = wilson_interval(errors, n)
    ran = [c for c in counted if not c["skipped"]]
    exit_layers = [l for c in ran for l in c["layers_run"]]
    gated = sum(c["gated_s"] for c in counted)
    full = sum(c["full_s"] for c in counted)
    summary = {
        "verify_calls": n,
        "passes_skipped": sum(c["skipped"] for c in counted),
        "skip_fraction": sum(c["skipped"] for c in counted) / n,
        "mean_exit_layer": statistics.mean(exit_layers) if exit_layers else None,
        "num_layers": 30,
        "verifier_layers_run": sum(exit_layers),
        "verifier_layers_full": 30 * args.branches * n,
        "gated_verifier_s": gated, "full_verifier_s": full,
        "verifier_time_ratio_full_over_gated": full / gated if gated else None,
        "median_call_wall_s": statistics.median(c["wall_s"] for c in counted),
        "errors": errors, "error_rate": errors / n, "error_ci95": [lo, hi],
        "branch_disagreements": branch_errors,
        "accuracy_cgee": sum(c["correct"] for c in counted) / n,
        "accuracy_full": sum(c["correct_full"] for c in counted) / n,
        "audit_log": log.error_rate(),
    }
    result = {
        **run_record("bench_cgee", commit=run_commit),
        "what": "CGEE on best-of-N (8 branches), gated vs full verifier in the same calls",
        "config": vars(args), "cgee": dataclasses.asdict(cfg),
        "summary": summary, "calls": calls, "total_wall_s": time.perf_counter() - started,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    for k, v in summary.items():
        print(f"  {k + ':':<38}{v}")
    print(f"wrote {path} ({result['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
