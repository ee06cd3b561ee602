"""``noreuse``: one request per problem, nothing shared, a pool far from full.

What RKSC's features cost where they cannot gain: no fork to share a prefix, no vote to
stop, no verify step, no eviction. Each problem's question is its own prompt (requests share
only the chat template's first tokens), answered by one greedy gen.
"""

from __future__ import annotations

from typing import Any, Dict

from rksc_sgl.bench.gym_workloads import GymWorkload
from rksc_sgl.bench.workload import Outcome, register, speedup_target
from rksc_sgl.problems import extract_answer

_PROGRAM: Dict[str, Any] = {}


def _answer_program():
    """``question -> gen("answer")``, defined on first use (importing SGLang takes seconds)."""
    if not _PROGRAM:
        import sglang as sgl

        @sgl.function
        def answer_once(s, question, max_tokens, sample_temperature):
            s += sgl.user(question)
            s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=sample_temperature))

        _PROGRAM["answer_once"] = answer_once
    return _PROGRAM["answer_once"]


@register
class NoReuseWorkload(GymWorkload):
    name = "noreuse"
    summary = "overhead: one greedy gen per problem, nothing to reuse"
    help = ("overhead: one greedy gen per problem, its own question as the prompt (no fork, no vote, no verify, "
            "the pool far from full): what the features cost where they gain nothing")
    defaults = {"max_tokens": 64, "temperature": 0.0, "dataset": "basic_arithmetic", "difficulty": "easy"}

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        state = _answer_program().run(question=item.problem.question, max_tokens=params["max_tokens"],
                                      sample_temperature=params["temperature"], backend=engine)
        if state.error() is not None:
            raise RuntimeError(f"workload 'noreuse': the program failed: {state.error()}")
        text = state["answer"]
        return Outcome(extract_answer(text), [text])

    def targets(self):
        return [speedup_target("rksc speed against radix, nothing to gain (issue 35: >= 0.99)", "radix", "rksc",
                               0.99)]
