"""Tree of thought: propose approaches, judge each, expand the promising ones, vote.

    python programs/tree_of_thought.py --cache radix --problems 3 --branches 3 --keep 2 --expand 2
    rksc-sgl run programs/tree_of_thought.py --cache radix -- --problems 3

1. The question is forked into K branches (``--branches``), each proposing a one-line
   approach (sampled).
2. Each branch is asked whether its approach is promising; ``sgl.select`` picks yes/no.
   Approaches are ranked by the log-probability margin of "yes" over "no".
3. The best ``--keep`` approaches are expanded: each is forked again (``--expand``
   branches; forks inside forks) into full solutions that follow the approach.
4. The answer is the majority vote over all solutions (ties go to the better-ranked
   approach). The tree shares KV at two levels: the question, then each approach.

Its command line is ``programs/tree_of_thought.py``; the program lives in the package so
that the bench and an installed wheel have it.
"""

from typing import Any, Dict

import sglang as sgl

from rksc_sgl.problems import (ANSWER_INSTRUCTION, CHAIN_STOP, SYSTEM_PROMPT, Problem, Solution, extract_answer,
                               majority_vote)

PROPOSE_PROMPT = "Do not solve it yet. In one sentence, how would you solve it?"
JUDGE_PROMPT = "Is this approach promising? Answer yes or no."
EXPAND_PROMPT = f"Now solve the problem with this approach. {ANSWER_INSTRUCTION}"
OPTIONS = {
    "keep": (int, 2, "approaches to expand"),
    "expand": (int, 2, "solutions per expanded approach"),
}


@sgl.function
def tree_of_thought(s, question: str, num_branches: int = 3, max_tokens: int = 96, sample_temperature: float = 0.7,
                    keep: int = 2, expand: int = 2) -> Dict[str, Any]:
    """Returns the approaches (text, yes/no margin, rank) and the solutions' answers."""
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(f"{question.strip()}\n{PROPOSE_PROMPT}")
    approaches = s.fork(num_branches)
    for a in approaches:
        a += sgl.assistant(sgl.gen("approach", max_tokens=min(max_tokens, 48), temperature=sample_temperature,
                                   stop=["\n"]))
        a += sgl.user(JUDGE_PROMPT)
        a += sgl.assistant(sgl.select("promising", choices=["yes", "no"]))
    margins = []
    for a in approaches:
        yes, no = a.get_meta_info("promising")["normalized_prompt_logprobs"]
        margins.append(float(yes) - float(no))
    ranked = sorted(range(num_branches), key=lambda i: -margins[i])[: max(1, keep)]

    leaves = []  # (approach index, state); all nested forks are submitted before any is read
    for i in ranked:
        approaches[i] += sgl.user(EXPAND_PROMPT)
        solutions = approaches[i].fork(expand)
        for sol in solutions:
            sol += sgl.assistant(sgl.gen("solution", max_tokens=max_tokens, temperature=sample_temperature,
                                         stop=list(CHAIN_STOP)))
            leaves.append((i, sol))
    return {
        "approaches": [{"text": a["approach"], "margin": m} for a, m in zip(approaches, margins)],
        "expanded": ranked,
        "leaves": [(i, extract_answer(sol["solution"])) for i, sol in leaves],
    }


def solve(problem: Problem, num_branches: int = 3, max_tokens: int = 96, sample_temperature: float = 0.7,
          keep: int = 2, expand: int = 2, backend: Any = None) -> Solution:
    state = tree_of_thought.run(question=problem.question, num_branches=num_branches, max_tokens=max_tokens,
                                sample_temperature=sample_temperature, keep=keep, expand=expand, backend=backend)
    result = state.ret_value
    answers = [answer for _, answer in result["leaves"]]
    margins = ", ".join(f"{a['margin']:+.2f}" for a in result["approaches"])
    return Solution(answer=majority_vote(answers), candidates=answers,
                    detail=f"yes-no margins [{margins}], expanded {result['expanded']}")
