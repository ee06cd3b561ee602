"""``long-branches``: concurrent long decoding branches on a pressured pool, for decode-KV compression.

Each problem is ``programs`` programs sharing a few-shot prefix, each forking ``branches`` hinted
branches that decode exactly ``max_tokens`` tokens (greedy by default), on a KV pool of
``pool_fraction`` of that problem's working set (the prefix once, each program's question, every
branch's hint and decode). The cache is flushed between problems, so what a program finds cached
is what the radix tree shares within the problem: the prefix across programs and branches.

Run with an uncompressed mode and its compressed variants (``radix,radix+rkv@0.25``; see
:func:`rksc_sgl.bench.modes.parse_modes`). Per mode (:func:`compression_summary`): programs per
second; the peak number of running requests, sampled from SGLang's ``/v1/loads`` while the
program runs (:class:`RunningPoller`); decode tokens; prompt tokens, those computed and those the
radix tree served (what a port with the radix cache off, as R-KV's SGLang port, computes again);
compactions and dropped tokens (``/server_info``'s ``rksc.compression``); and, against the same
mode uncompressed on the same problems: throughput ratio (medians per problem, a 95% paired
bootstrap interval), peak running ratio, and answers agreeing (each branch's final answer and
each program's vote, 95% Wilson intervals) and identical branch texts.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Dict, List, Optional

from rksc_sgl.problems import majority_vote
from rksc_sgl.bench.inputs import extract_final, hints_for, program
from rksc_sgl.bench.pressure import PressureWorkload
from rksc_sgl.bench.workload import Item, Outcome, register

__all__ = ["LongBranchesWorkload", "RunningPoller", "compression_counters", "compression_summary"]

POLL_INTERVAL_S = 0.25
"""How often :class:`RunningPoller` reads ``/v1/loads``: a branch runs for hundreds of decode
steps, so the number running holds far longer than this."""


class RunningPoller:
    """Samples SGLang's ``/v1/loads?include=core`` of every server behind a ``RuntimeBackend`` in
    a thread while the ``with`` block runs: the peaks of running and waiting requests and of
    used KV tokens (summed over the servers' DP ranks at each sample). Bounded: each read waits
    at most ``timeout`` s, the thread ends when the block does, and a failed read is counted, not
    raised. ``urls`` empty (an embedded engine): nothing is sampled, the peaks are ``None``."""

    def __init__(self, urls: List[str], interval: float = POLL_INTERVAL_S, timeout: float = 5.0):
        self.urls, self.interval, self.timeout = list(urls), interval, timeout
        self.samples = self.failures = 0
        self.peaks: Dict[str, Optional[int]] = {"running": None, "waiting": None, "used_tokens": None}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def of(cls, backend, **kwargs) -> "RunningPoller":
        """A poller of ``backend``'s servers (none for an embedded engine)."""
        client = getattr(backend, "client", None)
        urls = [server.url for server in client.servers()] if client is not None else []
        return cls(urls, **kwargs)

    def sample(self) -> None:
        import requests

        totals = {"running": 0, "waiting": 0, "used_tokens": 0}
        for url in self.urls:
            response = requests.get(url + "/v1/loads", params={"include": "core"}, timeout=self.timeout)
            response.raise_for_status()
            for load in response.json()["loads"]:
                totals["running"] += int(load.get("num_running_reqs", 0))
                totals["waiting"] += int(load.get("num_waiting_reqs", 0))
                totals["used_tokens"] += int(load.get("num_used_tokens", 0))
        for key, value in totals.items():
            self.peaks[key] = value if self.peaks[key] is None else max(self.peaks[key], value)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a slow or refused read: counted, the run goes on
                self.failures += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RunningPoller":
        if self.urls:
            self._thread = threading.Thread(target=self._loop, name="rksc-running-poller", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + self.interval + 1.0)

    def record(self) -> Dict[str, Any]:
        return {"peak_running": self.peaks["running"], "peak_waiting": self.peaks["waiting"],
                "peak_used_tokens": self.peaks["used_tokens"], "load_samples": self.samples,
                "load_sample_failures": self.failures}


COUNTERS = ("compactions", "dropped_tokens", "compressed_requests")


def compression_counters(backend) -> Optional[Dict[str, int]]:
    """Decode-KV compression's counters, summed over ``backend``'s schedulers (``/server_info``'s
    ``rksc.compression``); ``None`` where no scheduler compresses (or an embedded engine)."""
    client = getattr(backend, "client", None)
    if client is None:
        return None
    states = [(state or {}).get("compression") for state in client.rksc_states()]
    states = [s for s in states if s]
    if not states:
        return None
    return {key: sum(int(s.get(key, 0)) for s in states) for key in COUNTERS}


@register
class LongBranchesWorkload(PressureWorkload):
    name = "long-branches"
    summary = "decode-KV compression: concurrent long branches on a pressured pool"
    help = ("decode-KV compression under memory pressure: each problem is `programs` programs sharing a "
            "few-shot prefix, each with `branches` hinted branches that decode exactly max_tokens tokens, all "
            "at once, on a KV pool of pool_fraction of the problem's working set; the cache is flushed between "
            "problems. Run an uncompressed mode with its compressed variants (radix,radix+rkv@0.25): reports "
            "programs per second, the peak of running requests (SGLang's /v1/loads, sampled), decode tokens, "
            "prompt tokens computed and served by the radix tree, compactions, dropped tokens, and answer "
            "agreement with the uncompressed mode")
    defaults = {"programs": 2, "branches": 4, "max_tokens": 256, "prompt_tokens": 300, "pool_fraction": 0.4,
                "temperature": 0.0, "fork_commit": 0}
    runtime_defaults = {"fork_commit": 1}
    flush_between_problems = True

    def items(self, tokenizer, params, seed, count):
        # A few-shot block of its own per problem (the cache is flushed between problems).
        return super().items(tokenizer, {**params, "prefixes": max(count, 1)}, seed, count)

    def working_set(self, params, items: List[Item], tokenizer) -> int:
        """The largest problem's distinct KV tokens: its prefix once, each program's question,
        every branch's hint and decoded tokens."""
        return max((super(LongBranchesWorkload, self).working_set(params, [item], tokenizer) for item in items),
                   default=0)

    def engine_overrides(self, tokenizer, params, items):
        need = self.working_set(params, items, tokenizer)
        hint = max(len(tokenizer.encode(h + "\n")) for h in hints_for(params["branches"]))
        one = max(n for it in items for n in it.inputs["prompt_tokens"]) + hint + params["max_tokens"] + 32
        return {"kv_pool_tokens": max(int(need * params["pool_fraction"]), one)}

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        hints = hints_for(params["branches"])
        before = compression_counters(engine)
        with RunningPoller.of(engine) as poller:
            states = program("hinted_branches").run_batch(
                [{"prompt": p, "hints": hints, "max_tokens": params["max_tokens"],
                  "sample_temperature": params["temperature"], "fork_commit": bool(params["fork_commit"])}
                 for p in item.inputs["prompts"]], backend=engine, num_threads=len(item.inputs["prompts"]))
        after = compression_counters(engine)
        outputs: List[str] = []
        branch_answers: List[Optional[str]] = []
        program_answers: List[Optional[str]] = []
        for st in states:
            texts = list(st["answer"])
            answers = [extract_final(t) for t in texts]
            outputs.extend(texts)
            branch_answers.extend(answers)
            program_answers.append(majority_vote(answers))
        extra: Dict[str, Any] = {"programs_run": len(states), "branch_answers": branch_answers,
                                 "program_answers": program_answers, **poller.record()}
        if after is not None:
            extra.update({key: after[key] - (before or {}).get(key, 0) for key in COUNTERS})
        return Outcome(program_answers[0], outputs, extra=extra)

    def summarize_modes(self, result: Dict[str, Any], params: Dict[str, Any]) -> None:
        st = result["config"]["settings"]
        result["compression"] = compression_summary(result["runs"], result["modes"], st["bootstrap"], st["seed"])

    def targets(self):
        return []


def base_label(label: str) -> str:
    """The uncompressed mode of a compressed mode's label (``radix+rkv@0.25`` -> ``radix``):
    ``Mode.base_label`` of the parsed label."""
    from rksc_sgl.bench.modes import parse_modes

    return parse_modes(label)[0].base_label


def _agree(records, reference, field: str) -> Dict[str, Any]:
    """Entries of ``field`` (a list per run) equal to the reference's on the same problem (first
    repeats): ``k``, ``n``, the share and its 95% Wilson interval."""
    from rksc_sgl.bench.stats import wilson

    ref = {r["problem"]: r for r in reference if r["repeat"] == 0}
    pairs = [(a, b) for r in records if r["repeat"] == 0 and r["problem"] in ref
             for a, b in zip(r[field], ref[r["problem"]][field])]
    k = sum(a == b for a, b in pairs)
    return {"k": k, "n": len(pairs), "share": k / len(pairs) if pairs else None,
            "ci95": list(wilson(k, len(pairs))) if pairs else None}


def _sum(records, field: str) -> Optional[int]:
    values = [r.get(field) for r in records]
    return None if not values or any(v is None for v in values) else sum(values)


def _peak(records, field: str):
    """``(max, median)`` of a per-run peak over the runs; ``None``s where it was not sampled."""
    values = [r.get(field) for r in records]
    if not values or any(v is None for v in values):
        return None, None
    return max(values), statistics.median(values)


def compression_summary(runs: Dict[str, List[Dict[str, Any]]], modes: Dict[str, Dict[str, Any]],
                        bootstrap: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Per mode label, from its timed runs (``runs``) and its summary (``modes``: ``per_problem_s``,
    the per-problem medians over repeats): what the module doc lists. ``vs_base`` compares a
    compressed mode with its uncompressed one (``None`` when that mode was not run or for an
    uncompressed mode)."""
    from rksc_sgl.bench.stats import bootstrap_ratio_ci, ratio_of_medians

    out: Dict[str, Any] = {}
    for label, records in runs.items():
        time_s = sum(r["time_s"] for r in records)
        programs = sum(r["programs_run"] for r in records)
        prefill, cached = _sum(records, "prefill_tokens"), _sum(records, "cached_tokens")
        semantic = _sum(records, "semantic_tokens") or 0
        peak_max, peak_median = _peak(records, "peak_running")
        base = base_label(label)
        row = {
            "base": base if base != label else None, "runs": len(records), "programs": programs,
            "programs_per_s": programs / time_s if time_s > 0 else None,
            "per_problem_s": list(modes[label]["per_problem_s"]),
            "peak_running": peak_max, "peak_running_median": peak_median,
            "peak_waiting": _peak(records, "peak_waiting")[0], "peak_used_tokens": _peak(records, "peak_used_tokens")[0],
            "load_samples": _sum(records, "load_samples"),
            "decode_tokens": _sum(records, "decode_tokens"),
            "prompt_tokens": None if prefill is None or cached is None else prefill + cached + semantic,
            "computed_prompt_tokens": prefill, "cached_prompt_tokens": cached,
            **{key: _sum(records, key) for key in COUNTERS},
            "vs_base": None,
        }
        out[label] = row
    for label, row in out.items():
        base = row["base"]
        if base is None or base not in out:
            continue
        b, m = out[base], row
        lo, hi = bootstrap_ratio_ci(b["per_problem_s"], m["per_problem_s"], bootstrap, seed)
        row["vs_base"] = {
            "throughput_ratio": ratio_of_medians(b["per_problem_s"], m["per_problem_s"]), "throughput_ci95": [lo, hi],
            "peak_running_ratio": (m["peak_running_median"] / b["peak_running_median"]
                                   if m["peak_running_median"] is not None and b["peak_running_median"] else None),
            "branch_answers": _agree(runs[label], runs[base], "branch_answers"),
            "program_answers": _agree(runs[label], runs[base], "program_answers"),
            "identical_texts": _agree(runs[label], runs[base], "outputs"),
        }
    return out
