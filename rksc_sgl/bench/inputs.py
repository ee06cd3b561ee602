"""Inputs every workload builds on: approach hints, few-shot problems, prompts, the
benchmark's SGLang programs and the repository programs it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from rksc_sgl.problems import CHAIN_STOP, SYSTEM_PROMPT, Problem, extract_answer, load_problems, majority_vote, question_prompt

if TYPE_CHECKING:  # imported where used: they import torch and SGLang
    from rksc_sgl.rksc.cgee import CGEEConfig


# ---- inputs (shared with benchmarks/bench_engine.py) -------------------------------------------
HINTS = [
    "Approach: set up an equation for the unknown and solve it.",
    "Approach: work backwards from what the question asks for.",
    "Approach: list every quantity first, then combine them one at a time.",
    "Approach: estimate the answer roughly, then compute it exactly.",
    "Approach: draw a small table of before/after amounts.",
    "Approach: split the problem into two smaller sub-problems.",
    "Approach: compute each person's or item's total separately, then add.",
    "Approach: check units and percentages carefully at every step.",
]


def hints_for(n: int) -> List[str]:
    """``n`` distinct approach hints (the list repeats with a variant number past 8)."""
    return [HINTS[i % len(HINTS)] + (f" (variant {i // len(HINTS) + 1})" if i >= len(HINTS) else "")
            for i in range(n)]


NEXT_QUESTION = "\n\nQuestion:"
"""Where a few-shot answer ends: the model goes on with the next question."""
FEW_SHOT_HEADER = "Solve each math word problem. Reason step by step, then give the final answer.\n\n"


def few_shot_problem(tokenizer, prompt_tokens: int, seed: int) -> Tuple[str, Problem]:
    """A deterministic few-shot prompt of about ``prompt_tokens`` tokens ending in a new
    problem, and that problem. Worked examples come from reasoning-gym ``gsm_symbolic``
    (seeded); the example block is cut at a token boundary so the total is close to the
    target."""
    data = load_problems("gsm_symbolic", count=64, seed=seed)
    target = data[0]
    tail = f"\n\nQuestion: {target.question}\nAnswer: Let's think step by step.\n"

    def n_tok(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    budget = prompt_tokens - n_tok(FEW_SHOT_HEADER) - n_tok(tail)
    shots, used = [], 0
    for item in data[1:]:
        shot = f"Question: {item.question}\nAnswer: {item.entry['metadata'].get('answer_cot', '')}\n" \
               f"Final answer: {item.answer}\n\n"
        shots.append(shot)
        used += n_tok(shot)
        if used >= budget:
            break
    block_ids = tokenizer.encode("".join(shots), add_special_tokens=False)[: max(budget, 0)]
    block = tokenizer.decode(block_ids).rstrip()
    return FEW_SHOT_HEADER + block + tail, target


def build_prompt(tokenizer, prompt_tokens: int, seed: int) -> str:
    """The prompt of :func:`few_shot_problem` alone."""
    return few_shot_problem(tokenizer, prompt_tokens, seed)[0]


def extract_final(text: Optional[str]) -> Optional[str]:
    """The answer of a few-shot continuation: the text up to the next example's
    ``Question:`` (the model tends to go on with a new one), then :func:`extract_answer`."""
    if text is None:
        return None
    return extract_answer(text.split("\nQuestion:", 1)[0])


_PROGRAMS: Dict[str, Any] = {}


def program(name: str):
    """The benchmark's SGLang programs by name (``hinted_branches``, ``paraphrased_question``).

    They are defined on first use, so that importing this module (``rksc-sgl --help``)
    does not import SGLang, which takes seconds.
    """
    if not _PROGRAMS:
        _define_programs()
    return _PROGRAMS[name]


def _define_programs() -> None:
    import sglang as sgl

    from rksc_sgl.bench.workload import StopPlan
    from rksc_sgl.rksc.branch_stop import rule_gen_args, seed_branches, vote, vote_waves
    from rksc_sgl.rksc.cgee import verify

    @sgl.function
    def hinted_branches(s, prompt: str, hints: List[str], max_tokens: int, fork_commit: bool = False,
                        sample_temperature: float = 0.0, verify_config: Optional["CGEEConfig"] = None,
                        audit_log: Any = None,
                        extract: Callable[[str], Optional[str]] = extract_final,
                        stop_rule: Optional[str] = None, until_answer: bool = False) -> Dict[str, Any]:
        """One shared prompt, ``len(hints)`` branches with one approach hint each, exactly
        ``max_tokens`` new tokens per branch, then (with ``verify_config``) ``rksc_sgl.verify``.

        (``sample_temperature``, not ``temperature``: ``SglFunction.run`` takes a
        ``temperature`` of its own, as a default for every gen, and never passes it on.)

        SGLang's ``fork`` commits the text so far as a prefill-only request, but only if the
        interpreter thread has already applied it (``StreamExecutor.fork`` tests ``text_``
        before it syncs), which is a race. Both variants below are deterministic:
        ``fork_commit=False`` forks first and appends the shared prompt in every branch (no
        commit request; the engine sees exactly ``len(hints)`` requests); ``fork_commit=True``
        syncs before forking, so the prefix is always committed first (one extra request).
        With ``stop_rule``, ``rksc_sgl.vote`` stops branches once their vote is settled (the
        verify step then sees the vote); the gens ask for what the rule reads (``deepconf``:
        top-k log-probabilities). Every branch decodes exactly ``max_tokens``, so they
        all finish at the same step and none is ever stopped, unless ``until_answer``: then a
        branch ends where the few-shot format starts the next question (``\n\nQuestion:``),
        or at ``max_tokens``.
        Returns ``{"completion_tokens": [...], "verify": VerifyResult or None, "vote": BranchVote
        or None}``; the branches' texts are gathered into ``s["answer"]`` by the join.
        """
        if fork_commit:
            s += prompt
            s.sync()
            forks = s.fork(len(hints))
            shared = ""
        else:
            forks = s.fork(len(hints))
            shared = prompt
        reads = rule_gen_args(stop_rule) if stop_rule else {}
        for f, hint in zip(forks, hints):
            f += shared + hint + "\n"
            if until_answer:
                f += sgl.gen("answer", max_tokens=max_tokens, stop=[NEXT_QUESTION], temperature=sample_temperature,
                             **reads)
            else:
                f += sgl.gen("answer", max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                             temperature=sample_temperature, **reads)
        voted = vote(forks, "answer", rule=stop_rule, extract=extract) if stop_rule else None
        metas = [f.get_meta_info("answer") for f in forks]  # waits for every branch
        checked = None
        if verify_config is not None:
            checked = verify(forks, answer="answer", config=verify_config, audit_log=audit_log, extract=extract,
                             branch_vote=voted)
        forks.join()  # gathers the branches' "answer" into a list on s
        return {"completion_tokens": [m["completion_tokens"] for m in metas], "verify": checked, "vote": voted}

    @sgl.function
    def seeded_vote(s, question: str, branches: int, max_tokens: int, sample_temperature: float, seed: int,
                    stop_rule: Any = None, verify_config: Optional["CGEEConfig"] = None,
                    audit_log: Any = None) -> Dict[str, Any]:
        """The ``vote``, ``serve`` and ``load`` workloads' program: self-consistency over
        ``branches`` sampled chains, branch i seeded ``seed + i`` (the same samples in every
        mode), each ending at its first paragraph. ``stop_rule`` (a rule name or a ``StopPlan``;
        not ``stop``, which ``SglFunction.run`` takes for itself):
        ``rksc_sgl.vote`` stops the rest once the rule settles the vote, or, with waves,
        ``rksc_sgl.vote_waves`` launches the branches a wave at a time while it is unsettled
        (``texts``: the launched branches'); with ``verify_config``, best-of-N:
        ``rksc_sgl.verify`` picks the answer among the finished branches."""
        plan = StopPlan(stop_rule) if isinstance(stop_rule, str) else stop_rule
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user(question_prompt(question))
        s.sync()  # the shared prompt is committed before the fork, every time (see hinted_branches)
        reads = rule_gen_args(plan.rule) if plan is not None else {}  # deepconf: top-k log-probabilities
        gen = sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=sample_temperature,
                                    stop=list(CHAIN_STOP), **reads))
        if plan is not None and plan.waves:
            voted = vote_waves(s, branches, gen, seed=seed, first=plan.first, step=plan.step, rule=plan.rule)
            forks = voted.forks
        else:
            forks = s.fork(branches)
            seed_branches(forks, seed)
            forks += gen
            voted = vote(forks, "answer", rule=plan.rule) if plan is not None else None
        texts = [f["answer"] for f in forks]
        answer = voted.answer if voted else majority_vote([extract_answer(t) for t in texts])
        checked = None
        if verify_config is not None:  # best-of-N: the verifier picks among the (finished) branches
            checked = verify(forks, answer="answer", config=verify_config, audit_log=audit_log, branch_vote=voted)
            answer = checked.answer
        return {"answer": answer, "texts": texts, "vote": voted, "verify": checked}

    @sgl.function
    def paraphrased_question(s, question: str, instruction: str, max_tokens: int, sample_temperature: float = 0.0):
        """The ``paraphrase`` workload's program: one problem under one instruction wording."""
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user(f"{instruction} {question_prompt(question)}")
        s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=sample_temperature,
                                   stop=list(CHAIN_STOP)))

    @sgl.function
    def restated_check(s, question: str, reasoning: str):
        """The ``paraphrase`` workload's verifier turn: a fresh prompt that restates one
        wording's reasoning and asks for a YES/NO judgement (one greedy token)."""
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user(f"Check this solution.\nProblem: {question.strip()}\nSolution: {reasoning.strip()}\n"
                      "Is the solution correct? Answer Yes or No.")
        s += sgl.assistant(sgl.gen("verdict", max_tokens=1, temperature=0.0))

    _PROGRAMS.update(hinted_branches=hinted_branches, paraphrased_question=paraphrased_question,
                     restated_check=restated_check, seeded_vote=seeded_vote)


PARAPHRASES = [
    "Solve this problem.",
    "Answer this question.",
    "Work out this problem.",
    "Calculate the result.",
    "Find the answer.",
    "Please solve this.",
    "Compute this problem.",
    "Figure this out.",
]
