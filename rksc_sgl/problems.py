"""Problems with known answers, generated offline by ``reasoning-gym``, and answer handling.

``load_problems("basic_arithmetic", count=3, seed=0)`` returns the same problems for the
same seed on every machine (reasoning-gym generates them procedurally; nothing is
downloaded). ``extract_answer`` pulls the final number out of a chain of thought,
``score`` grades it with the dataset's own ``score_answer``, and ``majority_vote``
combines the answers of several branches.

A 135M-parameter model gets almost nothing right on reasoning-gym's default arithmetic
(up to six terms of four digits, with ``*`` and ``/``), so each dataset has difficulty
presets; ``easy`` (the default) is one-digit addition and subtraction of two terms.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional

DATASETS = ("basic_arithmetic", "gsm_symbolic")
DEFAULT_DATASET = "basic_arithmetic"

DIFFICULTIES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "basic_arithmetic": {
        "easy": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"),
                     allow_parentheses=False, allow_negation=False),
        "medium": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-", "*"),
                       allow_parentheses=False, allow_negation=False),
        "default": {},
    },
    # gsm_symbolic's only knob is its own ``difficulty`` field; its defaults are kept.
    "gsm_symbolic": {"easy": {}, "medium": {}, "default": {}},
}
DIFFICULTY_LEVELS = ("easy", "medium", "default")

SYSTEM_PROMPT = "You are a helpful assistant."
ANSWER_INSTRUCTION = "Give the result. End with 'Answer: <number>'."
"""What the programs ask of the model, so that :func:`extract_answer` finds the answer.
(Short prompts work best with a 135M model; longer "think step by step" prompts made
SmolLM2-135M-Instruct ramble and answer less often.)"""
CHAIN_STOP = ("\n\n",)
"""Stop strings of a chain of thought: the small model's first paragraph holds its answer."""


def question_prompt(question: str) -> str:
    """The user turn that asks ``question`` in the answer format :func:`extract_answer` reads."""
    return f"{question.strip()} {ANSWER_INSTRUCTION}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question with its reference answer; ``entry``/``dataset`` grade answers."""

    question: str
    answer: str
    index: int = 0
    entry: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    dataset: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)


@dataclasses.dataclass
class Solution:
    """What a reasoning program concluded for one problem."""

    answer: Optional[str]
    candidates: List[Optional[str]] = dataclasses.field(default_factory=list)
    """The answers of the individual branches, in branch order (``None``: none found)."""
    detail: str = ""
    """A short, human-readable note (e.g. how the answer was picked)."""


def load_problems(dataset: str = DEFAULT_DATASET, count: int = 3, seed: int = 0,
                  difficulty: str = "easy", **config: Any) -> List[Problem]:
    """``count`` problems of a reasoning-gym dataset, deterministic for ``seed``.

    ``difficulty`` picks a preset of the dataset's config (see ``DIFFICULTIES``);
    extra keyword arguments override single config fields (e.g. ``max_terms=3``).
    """
    if count <= 0:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if difficulty not in DIFFICULTY_LEVELS:
        raise ValueError(f"difficulty={difficulty!r}; choose one of {', '.join(DIFFICULTY_LEVELS)}")
    import reasoning_gym  # imported here: it is only needed for problems

    kwargs = dict(DIFFICULTIES.get(dataset, {}).get(difficulty, {}))
    kwargs.update(config)
    try:
        ds = reasoning_gym.create_dataset(dataset, size=count, seed=seed, **kwargs)
    except (KeyError, ValueError) as exc:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r} (tested: {', '.join(DATASETS)}): {exc}") from exc
        raise
    return [Problem(question=e["question"], answer=str(e["answer"]), index=i, entry=e, dataset=ds)
            for i, e in enumerate(ds)]


# A number: optional sign, thousands separators or plain digits, optional decimals.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}")
_FULL_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)\s*(?:[:=]\s*)?", re.IGNORECASE)
_SEGMENT_END_RE = re.compile(r"\n|\.(?:\s|$)")


def normalize_number(text: str) -> str:
    """``"1,234.0"`` -> ``"1234"``; ``"+3"`` -> ``"3"``; ``"-0"`` -> ``"0"``; ``"2.50"`` -> ``"2.5"``."""
    text = text.replace(",", "").replace("\u2212", "-").lstrip("+")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def _numbers(text: str) -> List[str]:
    return _NUMBER_RE.findall(text.replace("\u2212", "-"))


def extract_answer(text: Optional[str]) -> Optional[str]:
    """The final numeric answer in a chain of thought, normalized, or ``None``.

    The last "Answer: X" / "the answer is X" wins; within it, the number after the last
    ``=`` (so "answer is 4 - 1 = 3" gives 3), else its first number. Without such a
    phrase, the last number in the text.
    """
    if not text:
        return None
    text = text.replace("**", "").replace("$", "")
    for marker in reversed(list(_ANSWER_RE.finditer(text))):
        rest = text[marker.end():]
        end = _SEGMENT_END_RE.search(rest)
        segment = rest[: end.start()] if end else rest
        if "=" in segment:
            found = _numbers(segment.rsplit("=", 1)[1])
        else:
            found = _numbers(segment)
        if found:
            return normalize_number(found[0])
    found = _numbers(text)
    return normalize_number(found[-1]) if found else None


def score(problem: Problem, answer: Optional[str]) -> float:
    """The dataset's own grade of ``answer`` (1.0 is correct); ``None`` scores 0."""
    if answer is None:
        return 0.0
    answer = answer.strip()
    if _FULL_NUMBER_RE.fullmatch(answer):
        answer = normalize_number(answer)  # "3.0" and "3" are the same answer
    if problem.dataset is None:
        return 1.0 if normalize_number(answer) == normalize_number(problem.answer) else 0.0
    return float(problem.dataset.score_answer(answer, dict(problem.entry)))


def majority_vote(answers: Iterable[Optional[str]]) -> Optional[str]:
    """The most common answer, ``None`` ignored; ties go to the one seen first."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)
