"""``serve``: concurrent multi-branch programs from closed-loop clients, with faults."""

from __future__ import annotations

import random
import time
from typing import Any, Dict, List, Tuple

from rksc_sgl.problems import load_problems, question_prompt, score
from rksc_sgl.bench.gym_workloads import MALFORMED_PARAMS, GymWorkload, branch_seed
from rksc_sgl.bench.inputs import program
from rksc_sgl.bench.workload import WAVES_DEFAULTS, StopPlan
from rksc_sgl.bench.workload import Item, Outcome, mode_target, register, speedup_target


def _is_engine(backend) -> bool:
    """The embedded engine (else SGLang's runtime, through ``RuntimeBackend``)."""
    from rksc_sgl.engine.backend import Engine

    return isinstance(backend, Engine)


def _disconnect(backend, text: str) -> None:
    """A client that reads two chunks of a streamed answer and goes away."""
    params = {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}
    if _is_engine(backend):  # closing the engine's stream cancels the request
        stream = backend.generate_request(text=text, sampling_params=params, stream=True)
        for _ in zip(range(2), stream):
            pass
        stream.close()
        return
    import requests

    with requests.post(backend.base_url + "/generate", json={"text": text, "sampling_params": params, "stream": True},
                       stream=True, timeout=60) as response:
        response.raise_for_status()
        for _ in zip(range(2), response.iter_lines()):
            pass  # leaving the block closes the connection: SGLang aborts the request


def _malformed(backend, params: Dict[str, Any]) -> bool:
    """Send a request with bad sampling parameters; whether it was refused."""
    if _is_engine(backend):
        try:
            backend.generate_request(text="Hello", sampling_params=params)
        except ValueError:
            return True
        return False
    import requests

    response = requests.post(backend.base_url + "/generate", json={"text": "Hello", "sampling_params": params},
                             timeout=60)
    return 400 <= response.status_code < 500


@register
class ServeWorkload(GymWorkload):
    name = "serve"
    summary = "serving: closed-loop clients running multi-branch programs, faults mixed in"
    help = ("serving: each problem is a window of `programs` multi-branch programs (self-consistency and "
            "best-of-N with a verifier, alternating; seeded branches) that `clients` closed-loop clients run "
            "concurrently, on a KV pool of pool_fraction of those clients' working set, with faults mixed in: "
            "streams abandoned after two chunks (disconnect_share of the programs) and requests with bad "
            "sampling parameters (malformed_share); reports programs per second, program latency, errors by "
            "class and an integrity check after every window")
    defaults = {"programs": 8, "clients": 4, "branches": 4, "max_tokens": 64, "temperature": 0.7,
                "pool_fraction": 0.5, "disconnect_share": 0.25, "malformed_share": 0.25,
                "dataset": "basic_arithmetic", "difficulty": "easy", **WAVES_DEFAULTS}
    votes = True
    waves = True
    has_verify = True

    def resolve(self, overrides, backend="engine"):
        params = super().resolve(overrides, backend)
        for key in ("disconnect_share", "malformed_share"):
            if not 0.0 <= params[key] <= 1.0:
                raise ValueError(f"{key.replace('_', '-')} must be in [0, 1], got {params[key]!r}")
        return params

    def items(self, tokenizer, params, seed, count):
        k = params["programs"]
        problems = load_problems(params["dataset"], count * k, seed, difficulty=params["difficulty"])
        out = []
        for i in range(count):
            group = problems[i * k:(i + 1) * k]
            out.append(Item(i, group[0], {
                "problems": group, "seeds": [branch_seed(seed, i * k + j, params["branches"]) for j in range(k)],
                "prompt_tokens": max(len(tokenizer.encode(question_prompt(p.question))) for p in group)}))
        return out

    def engine_overrides(self, tokenizer, params, items):
        # The working set of `clients` programs at once: each one's prompt (plus its chat
        # template) and every branch's tokens, plus the verify turn of best-of-N.
        per_program = max(it.inputs["prompt_tokens"] for it in items) + 48 + params["branches"] * (
            params["max_tokens"] + 24)
        need = params["clients"] * per_program
        return {"kv_pool_tokens": max(int(need * params["pool_fraction"]), 2 * per_program)}

    def jobs(self, item, params) -> List[Tuple[str, int]]:
        """The window's work in the order clients take it: programs, with the faults spread in."""
        k = params["programs"]
        jobs = [("program", j) for j in range(k)]
        jobs += [("disconnect", j) for j in range(round(params["disconnect_share"] * k))]
        jobs += [("malformed", j) for j in range(round(params["malformed_share"] * k))]
        random.Random(item.index).shuffle(jobs)
        return jobs

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        from concurrent.futures import ThreadPoolExecutor

        def do(job):
            return self.run_job(engine, job, item, params, cgee, audit_log, stop, time.perf_counter())

        with ThreadPoolExecutor(max_workers=params["clients"]) as pool:
            done = list(pool.map(do, self.jobs(item, params)))
        return self._outcome(engine, item.inputs["problems"], done)

    def run_job(self, engine, job, item, params, cgee, audit_log, stop, arrived: float):
        """One job of the window: ``(kind, j, value, seconds from arrived)``; a program's value is
        its return value, or the exception it failed with (an error of its class)."""
        kind, j = job
        problems, seeds = item.inputs["problems"], item.inputs["seeds"]
        if kind == "disconnect":
            _disconnect(engine, f"Tell a long story about the number {j}.")
            return kind, j, None, time.perf_counter() - arrived
        if kind == "malformed":
            return kind, j, _malformed(engine, MALFORMED_PARAMS[j % len(MALFORMED_PARAMS)]), 0.0
        try:
            state = program("seeded_vote").run(
                question=problems[j].question, branches=params["branches"], max_tokens=params["max_tokens"],
                sample_temperature=params["temperature"], seed=seeds[j],
                stop_rule=StopPlan.coerce(stop).with_params(params) if stop else None,
                verify_config=cgee if j % 2 else None, audit_log=audit_log, backend=engine)
        except Exception as exc:  # a failed program is an error of its class, not the end of the run
            return kind, j, exc, time.perf_counter() - arrived
        return kind, j, state.ret_value, time.perf_counter() - arrived

    @staticmethod
    def _outcome(engine, problems, done) -> Outcome:
        rets: Dict[int, Any] = {}
        latency: Dict[int, float] = {}
        errors = {"disconnected": 0, "malformed_refused": 0, "malformed_accepted": 0, "program_failed": 0}
        failures: List[str] = []
        for kind, j, value, seconds in done:
            if kind == "disconnect":
                errors["disconnected"] += 1
            elif kind == "malformed":
                errors["malformed_refused" if value else "malformed_accepted"] += 1
            elif isinstance(value, dict):
                rets[j], latency[j] = value, seconds
            else:
                errors["program_failed"] += 1
                failures.append(f"program {j}: {value!r}")
        try:
            engine.check_integrity()
            integrity = None
        except Exception as exc:  # recorded, and the report says it
            integrity = f"{type(exc).__name__}: {exc}"
        answers = [rets[j]["answer"] if j in rets else None for j in range(len(problems))]
        stopped = [len(rets[j]["vote"].stopped) for j in rets if rets[j]["vote"] is not None]
        extra = {"programs": len(problems), "program_latency_s": [latency[j] for j in sorted(latency)],
                 "program_answers": answers,
                 "program_correct": [bool(a is not None and score(p, a) >= 1.0) for p, a in zip(problems, answers)],
                 "errors": errors, "program_failures": failures, "integrity_error": integrity,
                 "branches_stopped_in_window": sum(stopped)}
        outputs = [t for j in sorted(rets) for t in rets[j]["texts"]]
        return Outcome(answers[0], outputs, extra=extra)

    def targets(self):
        return [speedup_target("rksc programs per second over radix's (pressured pool)", "radix", "rksc", 1.66),
                mode_target("rksc programs' voted answers agreeing with radix's", "rksc",
                            "program_agreement_with_radix", ">=", 0.97, "program_agreement_ci95")]
