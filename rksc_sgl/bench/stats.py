"""Statistics: medians, ratios with paired bootstrap intervals, agreement, per-mode summaries."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rksc_sgl.bench.report import bootstrap_mean_ci, median


# ---- statistics ---------------------------------------------------------------------------------
def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not len(xs):
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio_of_medians(base: Sequence[float], other: Sequence[float]) -> float:
    """``median(base) / median(other)``: how many times faster ``other`` is than ``base``."""
    m = median(other)
    return median(base) / m if m > 0 else float("nan")


def bootstrap_ratio_ci(base: Sequence[float], other: Sequence[float], samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> Tuple[float, float]:
    """Paired percentile bootstrap of :func:`ratio_of_medians` over problems.

    ``base[i]`` and ``other[i]`` are the same problem's times; each resample draws problem
    indices with replacement (``random.Random(seed).choices``) and keeps the pairs together.
    """
    if len(base) != len(other) or not base:
        raise ValueError("bootstrap needs two equally long, non-empty lists of per-problem times")
    rng = random.Random(seed)
    n = len(base)
    ratios = []
    for _ in range(samples):
        idx = rng.choices(range(n), k=n)
        ratios.append(ratio_of_medians([base[i] for i in idx], [other[i] for i in idx]))
    tail = (1.0 - level) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)


def wilson(k: int, n: int) -> Tuple[float, float]:
    from rksc_sgl.rksc.verifier import wilson_interval

    return wilson_interval(k, n)


def summarize_mode(records: List[Dict[str, Any]], problems: int) -> Dict[str, Any]:
    """Per-mode statistics from its timed runs (every problem x repeat)."""
    per_problem = []
    for p in range(problems):
        times = [r["time_s"] for r in records if r["problem"] == p]
        per_problem.append(median(times))
    first = [r for r in records if r["repeat"] == 0]

    def med(field):
        return median([r[field] for r in records])

    out: Dict[str, Any] = {
        "per_problem_s": per_problem,
        "median_s": median(per_problem), "p25_s": percentile(per_problem, 25), "p75_s": percentile(per_problem, 75),
        "min_s": min(per_problem), "max_s": max(per_problem), "mean_s": statistics.fmean(per_problem),
        "median_wall_s_incl_audit": median([r["wall_s"] for r in records]),
        "requests": med("requests"), "prefill_tokens": med("prefill_tokens"),
        "prefill_tokens_total": sum(r["prefill_tokens"] for r in records),
        "exact_hit_tokens": med("cached_tokens"), "semantic_hit_tokens": med("semantic_tokens"),
        "recomputed_tokens": med("recomputed_tokens"), "key_tokens": med("key_tokens"),
        "decode_tokens": med("decode_tokens"), "peak_kv_tokens": _median_or_none(records, "peak_kv_tokens"),
        "max_peak_kv_tokens": _max_or_none(records, "peak_kv_tokens"),
        "accuracy": statistics.fmean(1.0 if r["correct"] else 0.0 for r in first),
        "hit_rate": _hit_rate(records),
        "decode_tokens_total": sum(r["decode_tokens"] for r in records),
    }
    if any("places" in r for r in records):
        out["places"] = places_summary(records)
    if records and "programs" in records[0]:
        out.update(_serve_summary(records))
    votes = [r["vote"] for r in records if r.get("vote")]
    if votes:
        out.update({"stop_rule": votes[0]["rule"], "branches_stopped": sum(len(v["stopped"]) for v in votes),
                    "runs_settled_early": sum(1 for v in votes if v["settled_after"] is not None)})
        if any("launched" in v for v in votes):  # waves: the branches launched, over the runs
            out["branches_launched"] = sum(v["launched"] for v in votes if "launched" in v)
    calls = [r["verify"] for r in records if r.get("verify")]
    if calls:
        ran = [c for c in calls if not c["skipped"]]
        layers = [l for c in ran for l in (c["layers_run"] or [])]
        compared = [c for c in calls if not c["gated"] or c["audited"]]
        errors = sum(1 for c in compared if c["gated"] and c["audit_agrees"] is False)
        lo, hi = wilson(errors, len(compared))
        out.update({
            "verify_calls": len(calls), "verifier_passes_run": len(ran),
            "verifier_passes_skipped": len(calls) - len(ran),
            "verifier_passes_exited_early": sum(1 for c in ran if c["exited_early"]),
            "verifier_branches_exited_early": sum(c["exited_early"] for c in ran),
            "mean_exit_layer": statistics.fmean(layers) if layers else None,
            "num_layers": next((c["num_layers"] for c in ran if c["num_layers"]), None),
            "verifier_new_tokens": median([c["verifier_new_tokens"] or 0 for c in calls]),
            "median_verifier_s": median([c["verifier_s"] for c in calls]),
            "cgee_compared_calls": len(compared), "cgee_errors": errors,
            "cgee_error_rate": errors / len(compared) if compared else None, "cgee_error_ci95": [lo, hi],
        })
    return out


def places_summary(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """The runtime's per-scheduler counters (``places`` of each run: a worker behind the router,
    a DP rank) summed over the mode's timed runs, places in name order: ``requests``,
    ``prompt_tokens``, ``cached_tokens``."""
    total: Dict[str, Dict[str, int]] = {}
    for r in records:
        for place, counts in (r.get("places") or {}).items():
            into = total.setdefault(place, {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
            for key, value in counts.items():
                into[key] = into.get(key, 0) + value
    return dict(sorted(total.items()))


def _serve_summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``serve``: programs per second over the windows' time, program latency percentiles,
    program accuracy, errors by class, and the windows whose integrity check failed."""
    latencies = [x for r in records for x in r["program_latency_s"]]
    correct = [c for r in records for c in r["program_correct"]]
    errors: Dict[str, int] = {}
    for r in records:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    return {"programs_per_s": sum(r["programs"] for r in records) / sum(r["time_s"] for r in records),
            "program_latency_p50_s": percentile(latencies, 50) if latencies else None,
            "program_latency_p90_s": percentile(latencies, 90) if latencies else None,
            "program_accuracy": statistics.fmean(correct) if correct else None,
            "errors": errors, "integrity_failures": [r["integrity_error"] for r in records if r["integrity_error"]]}


def _median_or_none(records: List[Dict[str, Any]], field: str) -> Optional[float]:
    """A counter's median, ``None`` where a backend does not measure it (the runtime's KV peak)."""
    values = [r[field] for r in records]
    return None if any(v is None for v in values) else median(values)


def _max_or_none(records: List[Dict[str, Any]], field: str) -> Optional[float]:
    values = [r[field] for r in records]
    return None if any(v is None for v in values) else max(values)


def _hit_rate(records: List[Dict[str, Any]]) -> float:
    """Prompt tokens served from the cache (exact or semantic) / all prompt tokens."""
    hits = sum(r["cached_tokens"] + r["semantic_tokens"] for r in records)
    total = hits + sum(r["prefill_tokens"] - r["recomputed_tokens"] for r in records)
    return hits / total if total else 0.0


def agreement(records: List[Dict[str, Any]], reference: List[Dict[str, Any]]) -> Tuple[float, float]:
    """``(answers, outputs)``: share of runs whose answer equals the reference run's answer on
    the same problem (its first repeat), and share of generated texts that are identical."""
    ref = {r["problem"]: r for r in reference if r["repeat"] == 0}
    answers = [r["answer"] == ref[r["problem"]]["answer"] for r in records]
    texts = [a == b for r in records for a, b in zip(r["outputs"], ref[r["problem"]]["outputs"])]
    return (statistics.fmean(answers) if answers else float("nan"),
            statistics.fmean(texts) if texts else float("nan"))


def paired_with_radix(records: List[Dict[str, Any]], reference: List[Dict[str, Any]], samples: int,
                      seed: int) -> Dict[str, Any]:
    """Against ``radix`` on the same problems (first repeats): answers agreeing, with a 95%
    Wilson interval; the accuracy change, with a 95% paired bootstrap interval over problems;
    decode tokens, ``radix``'s total over this mode's."""
    ref = {r["problem"]: r for r in reference if r["repeat"] == 0}
    mine = [r for r in records if r["repeat"] == 0]
    agree = sum(r["answer"] == ref[r["problem"]]["answer"] for r in mine)
    diffs = [float(r["correct"]) - float(ref[r["problem"]]["correct"]) for r in mine]
    decode = sum(r["decode_tokens"] for r in mine)
    programs = {}
    if mine and "program_answers" in mine[0]:
        pairs = [(a, b) for r in mine for a, b in zip(r["program_answers"], ref[r["problem"]]["program_answers"])]
        same = sum(a == b for a, b in pairs)
        programs = {"program_agreement_with_radix": same / len(pairs) if pairs else None,
                    "program_agreement_ci95": list(wilson(same, len(pairs)))}
    return {**programs, "agreement_with_radix_ci95": list(wilson(agree, len(mine))),
            "accuracy_change_vs_radix": statistics.fmean(diffs) if diffs else None,
            "accuracy_change_ci95": bootstrap_mean_ci(diffs, samples, seed) if diffs and samples else None,
            "fewer_decode_tokens_than_radix": (sum(ref[r["problem"]]["decode_tokens"] for r in mine) / decode
                                               if decode else None)}
