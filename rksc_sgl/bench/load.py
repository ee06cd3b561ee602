"""``load``: programs arriving as a Poisson process (open loop), served at a latency target.

Each timed problem is a rate step: ``programs`` programs (self-consistency and best-of-N with
the verifier, alternating; seeded branches, as ``serve`` runs them) arrive at ``rate`` per
second with exponential gaps, faults mixed in (abandoned streams, malformed requests). A
program's latency runs from its scheduled arrival to its end, so queueing counts. The
arrival schedule is drawn from the run's seed and the step, the same in every mode.

The SLO is ``slo_factor`` x radix's p50 latency at the lowest rate (the least loaded step; the
first mode's when radix is not run). Per mode and rate: latency p50/p90/p99, SLO attainment,
goodput (programs that met the SLO per second of the steps' wall time), and the highest rate
up to which every step's p90 meets the SLO (the rate the mode sustains) with the first rate that
missed it: the mode's true sustained rate lies between the two, so a ratio of sustained rates
is judged on that bracket.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from rksc_sgl.bench.serve import ServeWorkload
from rksc_sgl.bench.workload import WAVES_DEFAULTS
from rksc_sgl.bench.workload import Item, Target, mode_target, register

__all__ = ["LoadWorkload", "arrival_times", "parse_rates", "load_summary"]


def parse_rates(text: Any) -> List[float]:
    """``"0.05,0.1,0.2"`` -> rates in programs per second (positive, finite, increasing)."""
    try:
        rates = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"rates must be comma-separated numbers (programs per second), got {text!r}") from None
    if not rates or any(not (r > 0 and r < float("inf")) for r in rates):
        raise ValueError(f"rates must be positive numbers (programs per second), got {text!r}")
    if sorted(set(rates)) != rates:
        raise ValueError(f"rates must be given in increasing order without repeats, got {text!r}")
    return rates


def arrival_times(count: int, rate: float, seed: Any) -> List[float]:
    """``count`` arrival offsets (seconds from the step's start) of a Poisson process of ``rate``
    per second: cumulative exponential gaps drawn from ``random.Random(seed)``."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _percentile(values: List[float], q: float) -> Optional[float]:
    from rksc_sgl.bench.stats import percentile

    return percentile(values, q) if values else None


@register
class LoadWorkload(ServeWorkload):
    name = "load"
    summary = "open loop: Poisson arrivals per rate step, latency and SLO attainment"
    help = ("open loop at a latency target: problem i is a rate step, `programs` programs (self-consistency and "
            "best-of-N with the verifier, alternating, seeded branches) arriving as a Poisson process at "
            "rates[i % len(rates)] per second, faults mixed in as in serve; reports latency p50/p90/p99, "
            "goodput and SLO attainment per rate (SLO: slo_factor x radix's p50 at the lowest rate) and each "
            "mode's highest rate whose p90 meets the SLO; give --problems a multiple of the number of rates")
    defaults = {"rates": "0.05,0.1,0.2", "programs": 8, "branches": 8, "max_tokens": 64, "temperature": 0.7,
                "pool_fraction": 1.0, "disconnect_share": 0.25, "malformed_share": 0.25, "slo_factor": 3.0,
                "dataset": "basic_arithmetic", "difficulty": "easy", **WAVES_DEFAULTS}

    def resolve(self, overrides, backend="engine"):
        params = super().resolve(overrides, backend)
        parse_rates(params["rates"])
        if not params["slo_factor"] > 0:
            raise ValueError(f"slo-factor must be > 0, got {params['slo_factor']!r}")
        return params

    def check_settings(self, settings, params):
        rates = parse_rates(params["rates"])
        if settings.problems < len(rates):
            raise ValueError(
                f"load: problem i runs rate i mod {len(rates)}, so --problems {settings.problems} would run only rates "
                f"{','.join(f'{r:g}' for r in rates[:settings.problems])}; give --problems a multiple of {len(rates)}")

    def items(self, tokenizer, params, seed, count):
        rates = parse_rates(params["rates"])
        out = []
        for item in super().items(tokenizer, params, seed, count):
            rate = rates[item.index % len(rates)]
            jobs = self.jobs(item, params)
            # Programs arrive at `rate`; the faults come in between, so all jobs arrive at
            # rate x jobs / programs.
            times = arrival_times(len(jobs), rate * len(jobs) / params["programs"], f"{seed}:{item.index}")
            out.append(Item(item.index, item.problem, {**item.inputs, "rate": rate, "jobs": jobs, "arrivals": times}))
        return out

    def engine_overrides(self, tokenizer, params, items):
        # Every program of a step may be in flight at once at a high rate.
        return super().engine_overrides(tokenizer, {**params, "clients": params["programs"]}, items)

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        jobs, arrivals = item.inputs["jobs"], item.inputs["arrivals"]
        done: List[Any] = [None] * len(jobs)
        start = time.perf_counter()

        def do(k: int) -> None:
            delay = start + arrivals[k] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            done[k] = self.run_job(engine, jobs[k], item, params, cgee, audit_log, stop, start + arrivals[k])

        threads = [threading.Thread(target=do, args=(k,), name=f"rksc-load-{k}", daemon=True)
                   for k in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcome = self._outcome(engine, item.inputs["problems"], done)
        outcome.extra.update(rate=item.inputs["rate"], window_s=time.perf_counter() - start)
        return outcome

    def summarize_modes(self, result: Dict[str, Any], params: Dict[str, Any]) -> None:
        result["load"] = load_summary(result["runs"], params)

    def targets(self):
        return [Target("rksc highest rate at the SLO over radix's (issue 35: >= 1.66)", _rate_ratio("rksc"), ">=",
                       1.66, _rate_ratio_bracket("rksc"), undecided=GRID_UNDECIDED),
                mode_target("rksc programs' voted answers agreeing with radix's", "rksc",
                            "program_agreement_with_radix", ">=", 0.97, "program_agreement_ci95")]


GRID_UNDECIDED = "undecided (rate grid too coarse)"


def _sustained(result, mode: str) -> Tuple[Optional[float], Optional[float]]:
    """``mode``'s highest rate at the SLO and the first rate above it that missed (None: none)."""
    m = ((result.get("load") or {}).get("modes") or {}).get(mode) or {}
    return m.get("max_rate_at_slo"), m.get("first_rate_over_slo")


def _rate_ratio(mode: str):
    def value(result):
        (base, _), (mine, _) = _sustained(result, "radix"), _sustained(result, mode)
        return None if not base else (mine or 0.0) / base
    return value


def _rate_ratio_bracket(mode: str):
    """Where the ratio of the true sustained rates lies, given the grid: a mode's true rate is
    at least its highest rate at the SLO and below the first rate that missed it."""
    def bracket(result):
        (base, base_over), (mine, mine_over) = _sustained(result, "radix"), _sustained(result, mode)
        if not base:
            return None
        low = 0.0 if base_over is None else (mine or 0.0) / base_over
        high = math.inf if mine_over is None else mine_over / base
        return low, high
    return bracket


def load_summary(runs: Dict[str, List[Dict[str, Any]]], params: Dict[str, Any]) -> Dict[str, Any]:
    """The SLO, and per mode and rate what the module doc lists, from each mode's timed runs
    (records with ``rate``, ``window_s`` and ``program_latency_s``)."""
    rates = parse_rates(params["rates"])
    reference = "radix" if "radix" in runs else next(iter(runs), None)
    if reference is None:
        return {"slo_s": None, "reference": None, "modes": {}}
    unloaded = [x for r in runs[reference] if r["rate"] == rates[0] for x in r["program_latency_s"]]
    p50 = _percentile(unloaded, 50)
    slo = None if p50 is None else params["slo_factor"] * p50
    modes: Dict[str, Any] = {}
    for label, records in runs.items():
        per_rate, sustained, over = {}, None, None
        for rate in rates:
            at = [r for r in records if r["rate"] == rate]
            if not at:
                continue
            lat = [x for r in at for x in r["program_latency_s"]]
            window = sum(r["window_s"] for r in at)
            met = sum(1 for x in lat if slo is not None and x <= slo)
            p90 = _percentile(lat, 90)
            per_rate[f"{rate:g}"] = {"programs": len(lat), "p50_s": _percentile(lat, 50), "p90_s": p90,
                                     "p99_s": _percentile(lat, 99), "slo_attainment": met / len(lat) if lat else None,
                                     "goodput_per_s": met / window if window else None, "window_s": window}
            if over is None and slo is not None and p90 is not None:
                if p90 <= slo:
                    sustained = rate
                else:
                    over = rate
        modes[label] = {"rates": per_rate, "max_rate_at_slo": sustained, "first_rate_over_slo": over}
    return {"slo_s": slo, "slo_rule": f"{params['slo_factor']:g} x {reference}'s p50 at rate {rates[0]:g}",
            "reference": reference, "modes": modes}
