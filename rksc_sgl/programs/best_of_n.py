"""Best-of-N with a verifier: N sampled solutions, a YES/NO ``select`` judges each one.

    python programs/best_of_n.py --cache radix --problems 3 --branches 4
    rksc-sgl run programs/best_of_n.py --cache radix -- --problems 3

Each branch solves the problem, then is asked "Is this solution correct?" and picks YES
or NO with ``sgl.select``; the verifier continues each branch's own conversation, so its
prompt is the branch's cached KV plus one short turn. The answer is that of the branch
whose YES has the highest (token-length normalized) log-probability among the branches
judged YES; if no branch with an answer is judged YES, the branches' majority vote.

Its command line is ``programs/best_of_n.py``; the program lives in the package so
that the bench and an installed wheel have it.
"""

from typing import Any, Dict, List

import sglang as sgl

from rksc_sgl.problems import (CHAIN_STOP, SYSTEM_PROMPT, Problem, Solution, extract_answer, majority_vote,
                               question_prompt)

VERIFY_PROMPT = "Is this solution correct? Answer YES or NO."
VERDICTS = ["YES", "NO"]


@sgl.function
def best_of_n(s, question: str, num_branches: int = 4, max_tokens: int = 96,
              sample_temperature: float = 0.7) -> List[Dict[str, Any]]:
    """N solutions, each verified; returns per branch its answer, verdict and scores."""
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question_prompt(question))
    branches = s.fork(num_branches)
    for branch in branches:  # all branches are submitted before any result is read: they batch
        branch += sgl.assistant(sgl.gen("solution", max_tokens=max_tokens, temperature=sample_temperature,
                                        stop=list(CHAIN_STOP)))
        branch += sgl.user(VERIFY_PROMPT)
        branch += sgl.assistant(sgl.select("verdict", choices=VERDICTS))
    results = []
    for branch in branches:
        yes, no = branch.get_meta_info("verdict")["normalized_prompt_logprobs"]
        results.append({"answer": extract_answer(branch["solution"]), "verdict": branch["verdict"],
                        "yes_logprob": float(yes), "no_logprob": float(no)})
    return results


def pick(results: List[Dict[str, Any]]) -> Solution:
    """The verified branch with the highest YES score, else the majority vote."""
    answers = [r["answer"] for r in results]
    approved = [(r["yes_logprob"], i) for i, r in enumerate(results) if r["answer"] is not None and r["verdict"] == "YES"]
    verdicts = "".join("Y" if r["verdict"] == "YES" else "N" for r in results)
    if approved:
        score, best = max(approved, key=lambda t: (t[0], -t[1]))
        return Solution(answer=answers[best], candidates=answers,
                        detail=f"verdicts {verdicts}; branch {best} verified, YES logprob {score:.2f}")
    vote = majority_vote(answers)
    return Solution(answer=vote, candidates=answers, detail=f"verdicts {verdicts}; none verified, majority vote")


def solve(problem: Problem, num_branches: int = 4, max_tokens: int = 96, sample_temperature: float = 0.7,
          backend: Any = None) -> Solution:
    state = best_of_n.run(question=problem.question, num_branches=num_branches, max_tokens=max_tokens,
                          sample_temperature=sample_temperature, backend=backend)
    return pick(state.ret_value)
