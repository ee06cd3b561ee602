"""Calibrate CGEE's thresholds on problem seeds disjoint from the benchmark's.

For each calibration problem: 8 sampled branches (the ``best_of_n_cgee`` program's
prompts), their extracted answers and generation confidences, and one *full* verifier
pass with a per-layer logit-lens trace. Every candidate setting is then replayed
offline on these records (a skip decision needs only answers and confidences; an exit
decision is a replay of the trace, exactly what the engine does -- see
``rksc_sgl.rksc.verifier.simulate_exit``, checked against the engine in tests/test_cgee.py):

- decision = the chosen answer; an error is a call whose decision differs from the
  full pass's;
- cost = verifier layers run (a skipped call costs 0; a full call 8 x 30).

The chosen setting is the cheapest one with zero calibration errors (ties: more
conservative thresholds). Written to ``benchmarks/scratch/calibrate_cgee.json`` (``--out-dir``); the
defaults of ``rksc_sgl.rksc.cgee.CGEEConfig`` are copied from the committed run,
``benchmarks/results/engine/cgee/calibration-seed1000/``.

    RKSC_SGL_HOME=/tmp/rkscache python benchmarks/calibrate_cgee.py --problems 40 --seed 1000
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

warnings.simplefilter("ignore")

import sglang as sgl  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import rksc_sgl  # noqa: E402
from rksc_sgl.rksc.cgee import CGEEConfig, verifier_prompt  # noqa: E402
from rksc_sgl.rksc.cgee_decisions import choose, generation_confidence, skip_decision  # noqa: E402
from rksc_sgl.problems import (CHAIN_STOP, SYSTEM_PROMPT, extract_answer, load_problems,  # noqa: E402
                               question_prompt, score)
from rksc_sgl.bench.report import run_record, source_commit  # noqa: E402
from rksc_sgl.rksc.verifier import ExitPolicy, simulate_exit  # noqa: E402


@sgl.function
def branches(s, question: str, num_branches: int, max_tokens: int, sample_temperature: float, eos: Any):
    """The generation half of ``programs/best_of_n_cgee.py``; returns what verify() reads."""
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question_prompt(question))
    forks = s.fork(num_branches)
    forks += sgl.assistant(sgl.gen("solution", max_tokens=max_tokens, temperature=sample_temperature,
                                   stop=list(CHAIN_STOP), return_logprob=True))
    cfg = CGEEConfig()
    return {"answers": [extract_answer(f["solution"]) for f in forks.states],
            "confidences": [generation_confidence(f.get_meta_info("solution"), eos) for f in forks.states],
            "prompts": [verifier_prompt(f, cfg, question) for f in forks.states]}


def collect(engine, problems, args) -> List[Dict[str, Any]]:
    records = []
    for p in tqdm(problems, desc="calibration problems", file=sys.stderr):
        out = branches.run(question=p.question, num_branches=args.branches, max_tokens=args.max_tokens,
                           sample_temperature=args.temperature, eos=engine.eos_ids, backend=engine).ret_value
        full = engine.verify_yes_no(out.pop("prompts"), trace=True)
        out["traces"] = [r.trace for r in full]
        out["question"] = p.question
        out["reference"] = p.answer
        out["problem"] = p
        records.append(out)
    return records


GRID_SKIP = {"skip_min_vote_share": [0.5, 0.625, 0.75, 0.875, 1.0],
             "skip_min_confidence": [0.0, 0.5, 0.6, 0.7, 0.8]}
GRID_EXIT = {"exit_entropy_bits": [0.02, 0.05, 0.1, 0.2, 0.4],
             "exit_window": [1, 2, 3, 4, 6],
             "exit_min_layer": [1, 10, 16, 20, 24, 26, 28]}


def search(records) -> Dict[str, Any]:
    """Every grid point, replayed; the exit replays are shared by all skip settings."""
    base = CGEEConfig()
    full = []
    for rec in records:
        _, full_answer = choose(rec["answers"], [t[-1][0] for t in rec["traces"]], base.selection)
        full.append(full_answer)
    L = len(records[0]["traces"][0])
    full_layers = sum(L * len(rec["traces"]) for rec in records)
    exit_runs = {}
    for ent, win, minl in [(None, None, None), *itertools.product(*GRID_EXIT.values())]:
        policy = ExitPolicy(enabled=False) if ent is None else ExitPolicy(True, ent, win, minl)
        per = []
        for rec in records:
            sims = [simulate_exit(t, policy) for t in rec["traces"]]
            _, answer = choose(rec["answers"], [p for p, _ in sims], base.selection)
            per.append((answer, sum(n for _, n in sims)))
        exit_runs[(ent, win, minl)] = per
    skip_runs = {None: [None] * len(records)}
    for share, conf in itertools.product(*GRID_SKIP.values()):
        cfg = CGEEConfig(skip_min_vote_share=share, skip_min_confidence=conf)
        skip_runs[(share, conf)] = [skip_decision(r["answers"], r["confidences"], cfg) for r in records]
    rows = []
    for skey, skips in skip_runs.items():
        for ekey, per in exit_runs.items():
            errors = layers = skipped = correct = correct_full = 0
            for rec, d, (answer, n), fa in zip(records, skips, per, full):
                if d is not None and d["skip"]:
                    answer = d["answer"]
                    skipped += 1
                else:
                    layers += n
                errors += int(answer != fa)
                correct += score(rec["problem"], answer) >= 1.0
                correct_full += score(rec["problem"], fa) >= 1.0
            rows.append({"skip_gate": skey is not None, "skip_min_vote_share": skey and skey[0],
                         "skip_min_confidence": skey and skey[1], "exit_gate": ekey[0] is not None,
                         "exit_entropy_bits": ekey[0], "exit_window": ekey[1], "exit_min_layer": ekey[2],
                         "errors": errors, "calls": len(records), "skipped": skipped, "layers_run": layers,
                         "full_layers": full_layers, "cost_ratio": layers / full_layers,
                         "accuracy": correct / len(records), "accuracy_full": correct_full / len(records)})

    def conservative(r):
        return (r["layers_run"], -(r["skip_min_vote_share"] or 2), -(r["skip_min_confidence"] or 2),
                -(r["exit_min_layer"] or 99), r["exit_entropy_bits"] or 0, -(r["exit_window"] or 99))

    safe = [r for r in rows if r["errors"] == 0]
    both = [r for r in safe if r["skip_gate"] and r["exit_gate"]]
    skip_only = [r for r in safe if r["skip_gate"] and not r["exit_gate"]]
    exit_only = [r for r in rows if r["exit_gate"] and not r["skip_gate"]]
    return {"chosen": min(both, key=conservative) if both else None,
            "grid_size": len(rows), "safe_settings": len(safe),
            "rows_top": sorted(safe, key=conservative)[:20],
            "skip_only_best": min(skip_only, key=conservative) if skip_only else None,
            "exit_only_best_safe": min([r for r in exit_only if r["errors"] == 0], key=conservative, default=None),
            "exit_only_cheapest_any": min(exit_only, key=lambda r: (r["layers_run"], r["errors"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1000, help="calibration problem seed (benchmark uses 0)")
    ap.add_argument("--dataset", default="basic_arithmetic")
    ap.add_argument("--difficulty", default="easy")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "scratch"))
    ap.add_argument("--name", default="calibrate_cgee")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run_commit = source_commit()  # the code this run imports; the record is written at its end
    problems = load_problems(args.dataset, count=args.problems, seed=args.seed, difficulty=args.difficulty)
    with rksc_sgl.Engine(model="smollm2-135m", cache="radix", num_threads=args.threads,
                         kv_pool_tokens=16384, max_running_requests=16) as engine:
        records = collect(engine, problems, args)
        found = search(records)
    result = {
        **run_record("calibrate_cgee", commit=run_commit),
        "what": "CGEE threshold calibration (offline replay of recorded full verifier passes)",
        "config": vars(args),
        "questions": [r["question"] for r in records],
        "grid": {**GRID_SKIP, **GRID_EXIT},
        **found,
        "total_wall_s": time.perf_counter() - started,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    c = found["chosen"]
    print(json.dumps(c, indent=2))
    print("skip gate alone:", json.dumps(found["skip_only_best"]))
    print("exit gate alone (no error):", json.dumps(found["exit_only_best_safe"]))
    print(f"wrote {path} ({result['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
