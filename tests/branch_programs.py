"""A fork program the branch-stop tests run on the engine and on SGLang's runtime."""

import sglang as sgl

from rksc_sgl.rksc.branch_stop import vote


@sgl.function
def uneven_branches(s, prompt: str, long_tokens: int, rule: str = "lossless"):
    """Four branches; three answer in 3 tokens, the fourth would run ``long_tokens``. Every
    branch votes the same, so the lossless rule stops the fourth after three finish."""
    s += prompt
    forks = s.fork(4)
    for i, f in enumerate(forks):
        f += sgl.gen("answer", max_tokens=3 if i < 3 else long_tokens, ignore_eos=True, temperature=0)
    result = vote(forks, "answer", rule=rule, extract=lambda text: "same")
    return result, [f.get_meta_info("answer") for f in forks]


@sgl.function
def uneven_branches_verified(s, prompt: str, long_tokens: int):
    """As :func:`uneven_branches`, then best-of-N verification that sees the vote."""
    from rksc_sgl.rksc.cgee import verify

    s += prompt
    forks = s.fork(4)
    for i, f in enumerate(forks):
        f += sgl.gen("answer", max_tokens=3 if i < 3 else long_tokens, ignore_eos=True, temperature=0)
    result = vote(forks, "answer", extract=lambda text: "same")
    return result, verify(forks, "answer", branch_vote=result, skip_gate=False, extract=lambda text: "same")


@sgl.function
def seeded_branches(s, prompt: str, seed: int, n: int = 3):
    """``n`` sampled branches, branch i seeded with ``seed + i``."""
    from rksc_sgl.rksc.branch_stop import seed_branches

    s += prompt
    forks = s.fork(n)
    seed_branches(forks, seed)
    forks += sgl.gen("answer", max_tokens=8, temperature=1.0)
    return [f["answer"] for f in forks]


@sgl.function
def hinted_branches(s, question, hints, out, max_tokens: int):
    """One branch per hint after a shared system and user prompt; ``out`` gets each branch's
    (answer, cached tokens)."""
    s += sgl.system("You are a careful assistant. Think step by step.")
    s += sgl.user(question)
    forks = s.fork(len(hints))
    for fork, hint in zip(forks, hints):
        fork += sgl.assistant(hint + sgl.gen("answer", max_tokens=max_tokens, temperature=0))
    forks.join()
    out.extend((f["answer"], f.get_meta_info("answer")["cached_tokens"]) for f in forks)
