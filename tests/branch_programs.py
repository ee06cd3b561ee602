"""Fork programs the branch-stop tests run on the engine and on SGLang's runtime."""

import re
from typing import Optional

import sglang as sgl

from rksc_sgl.rksc.branch_stop import rule_gen_args, seed_branches, vote, vote_waves


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


WAVES_PROMPT = "Question: What is 2 + 2?\nAnswer:"


def first_word(text: str) -> Optional[str]:
    """A branch's answer for the waves tests: its first word (``None`` if it has none)."""
    found = re.match(r"\s*(\w+)", text)
    return found.group(1) if found else None


@sgl.function
def seeded_all(s, prompt: str, branches: int, seed: int, temperature: float = 0.7, max_tokens: int = 8):
    """The full run :func:`seeded_waves` is checked against: every branch at once, branch i
    seeded ``seed + i``; each branch's text."""
    from rksc_sgl.rksc.branch_stop import seed_branches

    s += prompt
    forks = s.fork(branches)
    seed_branches(forks, seed)
    forks += sgl.gen("answer", max_tokens=max_tokens, temperature=temperature)
    return [f["answer"] for f in forks]


@sgl.function
def seeded_waves(s, prompt: str, branches: int, seed: int, first: int, step: int, rule: str = "lossless",
                 settings: Optional[dict] = None, temperature: float = 0.7, max_tokens: int = 8):
    """``rksc_sgl.vote_waves`` over the branches of :func:`seeded_all`, answers by :func:`first_word`;
    the vote and the launched branches' texts."""
    gen = sgl.gen("answer", max_tokens=max_tokens, temperature=temperature)
    s += prompt
    result = vote_waves(s, branches, gen, seed=seed, first=first, step=step, rule=rule, extract=first_word,
                        **(settings or {}))
    return result, [f["answer"] for f in result.forks]


@sgl.function
def uneven_waves(s, prompt: str, long_tokens: int):
    """Five branches in waves of 4 then 1; branches 0-2 answer in 3 tokens, branch 3 would run
    ``long_tokens``. All vote the same, so after three finish the lossless rule (3 > 0 + 2:
    branch 3 running, branch 4 not launched) stops branch 3 and launches no more. Then
    best-of-N verification sees the vote."""
    from rksc_sgl.rksc.cgee import verify

    def branch(i):
        return sgl.gen("answer", max_tokens=3 if i != 3 else long_tokens, ignore_eos=True, temperature=0)

    s += prompt
    result = vote_waves(s, 5, branch, seed=0, first=4, step=1, extract=lambda text: "same")
    checked = verify(result.forks, "answer", branch_vote=result, extract=lambda text: "same")
    return result, [f.get_meta_info("answer") for f in result.forks], checked


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


def random_answers(rng, most: int = 12) -> list:
    """1..``most`` branch answers drawn from a few values, ``a`` twice as likely, ``None`` (no
    answer) among them: the random vote the stop-rule tests replay."""
    return [rng.choice(["a", "a", "b", "c", None]) for _ in range(rng.randint(1, most))]


LOGPROBS = rule_gen_args("deepconf", top_k=5)
"""What a branch's gen asks for the deepconf rule: its top-5 log-probabilities."""


@sgl.function
def confident_and_gibberish(s, long_tokens: int):
    """Branch 0 counts on greedily for 8 tokens (confident) and sets the threshold alone
    (warm-up 1); branch 1 samples gibberish at temperature 1.5 for up to ``long_tokens``."""
    s += "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    forks = s.fork(2)
    seed_branches(forks, 3)
    forks[0] += sgl.gen("answer", max_tokens=8, temperature=0, ignore_eos=True, **LOGPROBS)
    forks[1] += " zq#v plorb" + sgl.gen("answer", max_tokens=long_tokens, temperature=1.5, ignore_eos=True,
                                        **LOGPROBS)
    result = vote(forks, "answer", rule="deepconf", warmup=1, window=4, extract=lambda text: "counted")
    return result, [f.get_meta_info("answer") for f in forks]
