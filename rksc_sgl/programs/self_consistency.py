"""Self-consistency, the program behind ``rksc-sgl demo`` and ``programs/self_consistency.py``.

It is an ordinary SGLang frontend program: the question is asked once, the state is
forked into N branches that each sample a chain of thought, and the branches' final
answers are majority-voted. All branches share the prompt, so with ``cache="radix"`` its
KV is computed once and referenced by every branch.

It lives in the package (not only under ``programs/``) so that ``rksc-sgl demo`` works
from an installed wheel.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

import sglang as sgl

from rksc_sgl.problems import CHAIN_STOP, SYSTEM_PROMPT, Problem, Solution, extract_answer, majority_vote, question_prompt


@sgl.function
def self_consistency(s, question: str, num_branches: int = 4, max_tokens: int = 96,
                     sample_temperature: float = 0.7) -> List[Optional[str]]:
    """Fork ``num_branches`` sampled chains of thought; return each branch's answer."""
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question_prompt(question))
    branches = s.fork(num_branches)
    for branch in branches:
        branch += sgl.assistant(sgl.gen("reasoning", max_tokens=max_tokens, temperature=sample_temperature,
                                        stop=list(CHAIN_STOP)))
    branches.join()
    return [extract_answer(text) for text in s["reasoning"]]


def solve(problem: Problem, num_branches: int = 4, max_tokens: int = 96, sample_temperature: float = 0.7,
          backend: Any = None) -> Solution:
    """Run :func:`self_consistency` on one problem and majority-vote the branches."""
    state = self_consistency.run(question=problem.question, num_branches=num_branches, max_tokens=max_tokens,
                                 sample_temperature=sample_temperature, backend=backend)
    answers = state.ret_value
    answer = majority_vote(answers)
    votes = sum(1 for a in answers if a is not None and a == answer)
    return Solution(answer=answer, candidates=list(answers), detail=f"majority {votes}/{len(answers)}")


def main(argv: Optional[List[str]] = None) -> int:
    from rksc_sgl.program_runner import program_main

    return program_main(solve, description=__doc__, argv=argv, title="self-consistency",
                        problems=3, branches=4, max_tokens=96)


if __name__ == "__main__":
    sys.exit(main())
