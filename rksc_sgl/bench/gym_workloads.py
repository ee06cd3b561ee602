"""Workloads over generated problems: ``paper``, ``cot``, ``tot``, ``paraphrase``, ``vote``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Optional

from rksc_sgl.problems import DIFFICULTY_LEVELS, extract_answer, load_problems, majority_vote
from rksc_sgl.bench.inputs import PARAPHRASES, extract_final, few_shot_problem, hints_for, program
from rksc_sgl.bench.workload import WAVES_DEFAULTS, StopPlan
from rksc_sgl.bench.workload import (Item, NOT_SLOWER_THAN_RADIX, Outcome, Target, Workload, fewer_prefill, mode_field,
                                     mode_target, register, speedup_target)

if TYPE_CHECKING:  # imported where used: they import torch and SGLang
    from rksc_sgl.rksc.cgee import VerifyResult


class GymWorkload(Workload):
    """A workload over plain reasoning-gym problems (``dataset``/``difficulty`` parameters)."""

    def resolve(self, overrides, backend="engine"):
        params = super().resolve(overrides, backend)
        if params["difficulty"] not in DIFFICULTY_LEVELS:
            raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTY_LEVELS)}, got {params['difficulty']!r}")
        return params

    def items(self, tokenizer, params, seed, count):
        problems = load_problems(params["dataset"], count, seed, difficulty=params["difficulty"])
        return [Item(i, p) for i, p in enumerate(problems)]


def branch_seed(seed: int, program: int, branches: int) -> int:
    """The seed of program ``program``'s first branch (branch i: + i), distinct across the
    run's programs and the same in every mode."""
    return seed * 1000 + program * branches


def _vote_record(voted) -> Optional[Dict[str, Any]]:
    """What a run's ``rksc_sgl.vote`` decided, for its record (``None`` without one)."""
    if voted is None:
        return None
    record = {"rule": voted.rule, "stopped": sorted(voted.stopped), "settled_after": voted.settled_after}
    if getattr(voted, "launched", None) is not None:  # waves (rksc_sgl.vote_waves)
        record.update(launched=voted.launched, waves=voted.waves)
    return record


class _HintedWorkload(Workload):
    """``paper`` and ``cot``: :func:`hinted_branches` on a few-shot gsm_symbolic prompt.

    ``fork_commit=1`` sends the shared prompt as one prefill-only request before the fork
    (as SGLang's own ``fork`` does when its text is applied; the default on SGLang's runtime);
    0 (the engine's default) sends it with every branch, so a server that admits the branches
    in one batch computes it more than once.
    """

    votes = True
    switches = ("fork_commit",)

    def resolve(self, overrides, backend="engine"):
        params = super().resolve(overrides, backend)
        for key in self.switches:
            if params[key] not in (0, 1):
                raise ValueError(f"{key.replace('_', '-')} must be 0 or 1, got {params[key]!r}")
        return params

    def items(self, tokenizer, params, seed, count):
        out = []
        for i in range(count):
            prompt, problem = few_shot_problem(tokenizer, params["prompt_tokens"], seed + i)
            out.append(Item(i, problem, {"prompt": prompt, "prompt_tokens": len(tokenizer.encode(prompt))}))
        return out

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        state = program("hinted_branches").run(
            prompt=item.inputs["prompt"], hints=hints_for(params["branches"]), max_tokens=params["max_tokens"],
            sample_temperature=params["temperature"], verify_config=cgee if self.has_verify else None,
            audit_log=audit_log, stop_rule=StopPlan.coerce(stop).rule if stop else None, until_answer=bool(params.get("until_answer")),
            fork_commit=bool(params["fork_commit"]), backend=engine)
        ret = state.ret_value
        if not isinstance(ret, dict):
            raise RuntimeError(f"workload {self.name!r}: the program failed: {ret!r}")
        outputs = list(state["answer"])
        voted = _vote_record(ret["vote"])
        if ret["verify"] is not None:
            checked: VerifyResult = ret["verify"]
            return Outcome(checked.answer, outputs, checked, float(checked.gates.get("audit_s") or 0.0), voted)
        if ret["vote"] is not None:
            return Outcome(ret["vote"].answer, outputs, vote=voted)
        return Outcome(majority_vote([extract_final(t) for t in outputs]), outputs)


@register
class PaperWorkload(_HintedWorkload):
    name = "paper"
    summary = "the original RKSC shape: 8 hinted branches on a ~1000-token prompt, then verify"
    help = ("the original RKSC evaluation's shape: a ~1000-token prompt shared by 8 branches with different "
            "approach hints, 32 new tokens each, then a verify step (rksc_sgl.verify)")
    defaults = {"branches": 8, "max_tokens": 32, "prompt_tokens": 1000, "temperature": 0.0, "fork_commit": 0}
    runtime_defaults = {"fork_commit": 1}
    has_verify = True

    def targets(self):
        return [speedup_target("rksc speedup over none", "none", "rksc", 3.0),
                speedup_target("rksc speedup over radix", "radix", "rksc", 1.66),
                mode_target("rksc answer agreement with radix", "rksc", "agreement_with_radix", ">=", 0.99,
                            "agreement_with_radix_ci95"),
                mode_target("rksc CGEE error rate (per verify call)", "rksc", "cgee_error_rate", "<=", 0.0037,
                            "cgee_error_ci95")]


@register
class CotWorkload(_HintedWorkload):
    name = "cot"
    summary = "self-consistency: 8 hinted branches x 256 tokens on a few-shot prompt, majority vote"
    help = ("self-consistency: the same few-shot prompt, 8 hinted branches x 256 new tokens, majority vote "
            "(until_answer=1: a branch ends where it starts the next question, so branch stop can end the rest)")
    defaults = {"branches": 8, "max_tokens": 256, "prompt_tokens": 1000, "temperature": 0.0, "until_answer": 0,
                "fork_commit": 0}
    runtime_defaults = {"fork_commit": 1}
    switches = ("fork_commit", "until_answer")

    def targets(self):
        return [NOT_SLOWER_THAN_RADIX, speedup_target("rksc speedup over radix (issue 19: >= 1.3x)", "radix", "rksc",
                                                      1.3)]


@register
class TreeOfThoughtWorkload(GymWorkload):
    name = "tot"
    summary = "tree of thought: propose, judge with select, expand the best, vote"
    help = ("tree of thought (rksc_sgl/programs/tree_of_thought.py): propose approaches, judge them with select, expand "
            "the best (forks inside forks), vote")
    defaults = {"branches": 3, "keep": 2, "expand": 2, "max_tokens": 96, "temperature": 0.0,
                "dataset": "basic_arithmetic", "difficulty": "easy"}

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        from rksc_sgl.programs import tree_of_thought as tot

        state = tot.tree_of_thought.run(
            question=item.problem.question, num_branches=params["branches"], max_tokens=params["max_tokens"],
            sample_temperature=params["temperature"], keep=params["keep"], expand=params["expand"], backend=engine)
        result = state.ret_value
        if not isinstance(result, dict):
            raise RuntimeError(f"workload 'tot': the program failed: {result!r}")
        answers = [a for _, a in result["leaves"]]
        outputs = [a["text"] for a in result["approaches"]] + ["" if a is None else a for a in answers]
        return Outcome(majority_vote(answers), outputs)

    def targets(self):
        return [NOT_SLOWER_THAN_RADIX]


@register
class ParaphraseWorkload(GymWorkload):
    name = "paraphrase"
    summary = "ASKS: each problem under several paraphrased instructions, on a warm cache"
    help = ("ASKS: each problem asked under several paraphrased instructions, one after another on a warm cache "
            "(the first wording is the donor), greedy, each followed (restate=1) by a verifier prompt that "
            "restates that wording's reasoning; the answer is the majority vote of the wordings")
    defaults = {"branches": 4, "max_tokens": 48, "temperature": 0.0, "dataset": "basic_arithmetic",
                "difficulty": "easy", "restate": 1}

    def resolve(self, overrides, backend="engine"):
        params = super().resolve(overrides, backend)
        if params["branches"] > len(PARAPHRASES):
            raise ValueError(f"workload 'paraphrase' has {len(PARAPHRASES)} wordings; branches must be <= that")
        if params["restate"] not in (0, 1):
            raise ValueError(f"restate must be 0 or 1, got {params['restate']!r}")
        return params

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        outputs = []
        for instruction in PARAPHRASES[: params["branches"]]:
            state = program("paraphrased_question").run(question=item.problem.question, instruction=instruction,
                                             max_tokens=params["max_tokens"], sample_temperature=params["temperature"],
                                             backend=engine)
            outputs.append(state["answer"])
        answer = majority_vote([extract_answer(t) for t in outputs])
        if params["restate"]:
            # Verifier prompts that restate each wording's reasoning: same template, so the
            # reasonings sit at the same positions after an exact prefix (ASKS's case).
            for reasoning in list(outputs):
                check = program("restated_check").run(question=item.problem.question, reasoning=reasoning,
                                                      backend=engine)
                outputs.append(check["verdict"])
        return Outcome(answer, outputs)

    def targets(self):
        # The bar the ASKS defaults are chosen by (run it on held-out seeds).
        return [mode_target("asks answer agreement with radix", "asks", "agreement_with_radix", ">=", 0.99,
                            "agreement_with_radix_ci95"),
                Target("asks: x fewer prefill tokens than radix (run totals)", fewer_prefill("radix", "asks"),
                       ">", 1.0)]


@register
class VoteWorkload(GymWorkload):
    name = "vote"
    summary = "self-consistency with branch stop: seeded sampled branches, majority vote"
    help = ("self-consistency with branch stop: `branches` sampled chains of thought per problem (branch i of "
            "problem k seeded seed*1000 + k*branches + i, the same in every mode), each ending at its first "
            "paragraph, majority vote; stop-* modes (and rksc) stop the remaining branches once their rule "
            "settles the vote")
    # easy: the packaged model answers it often (medium's answers are mostly wrong and
    # scattered, so no vote settles; see the README's branch-stop measurements).
    defaults = {"branches": 8, "max_tokens": 128, "temperature": 0.7, "dataset": "basic_arithmetic",
                "difficulty": "easy", **WAVES_DEFAULTS}
    votes = True
    waves = True

    def items(self, tokenizer, params, seed, count):
        return [dataclasses.replace(item, inputs={"seed": branch_seed(seed, item.index, params["branches"])})
                for item in super().items(tokenizer, params, seed, count)]

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        state = program("seeded_vote").run(
            question=item.problem.question, branches=params["branches"], max_tokens=params["max_tokens"],
            sample_temperature=params["temperature"], seed=item.inputs["seed"],
            stop_rule=StopPlan.coerce(stop).with_params(params) if stop else None, backend=engine)
        ret = state.ret_value
        if not isinstance(ret, dict):
            raise RuntimeError(f"workload 'vote': the program failed: {ret!r}")
        return Outcome(ret["answer"], ret["texts"], vote=_vote_record(ret["vote"]))

    def targets(self):
        # Lossless is exact by construction: every run must agree (a count, not an estimate).
        return [Target("stop-lossless voted answer agrees with radix in every run", mode_field("stop-lossless",
                                                                                              "agreement_with_radix"),
                       ">=", 1.0)]


MALFORMED_PARAMS = ({"temperature": -1.0}, {"max_new_tokens": -5}, {"top_p": 2.0})
"""The sampling parameters of ``serve``'s malformed requests, taken in turn: each must be refused."""
