"""CGEE's decisions from what the branches gave, with no model: each branch's generation
confidence, the vote, gate 1 (skip the verifier when the branches agree decisively) and the
choice among verifier scores. :mod:`rksc_sgl.rksc.cgee` calls them; the calibration script
replays them over recorded branches (``benchmarks/calibrate_cgee.py``)."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

if TYPE_CHECKING:
    from rksc_sgl.rksc.cgee import CGEEConfig


def cut_at_eos(token_ids: Sequence[int], eos_ids) -> int:
    """Number of tokens before the first EOS (all of them when there is none)."""
    eos = set(eos_ids)
    for i, t in enumerate(token_ids):
        if t in eos:
            return i
    return len(token_ids)


def generation_confidence(meta_info: Optional[Dict[str, Any]], eos_ids=()) -> Optional[float]:
    """Mean probability of the tokens a branch generated, up to (not including) EOS.

    Uses ``output_token_logprobs`` ((logprob, token id, text) triples) when the gen
    asked for them, else ``output_token_probs_mean``; ``None`` when neither is there.
    """
    if not meta_info:
        return None
    triples = meta_info.get("output_token_logprobs")
    if triples:
        ids = [t[1] for t in triples]
        n = cut_at_eos(ids, eos_ids)
        lps = [t[0] for t in triples[:n] if t[0] is not None]
        if not lps:
            return None
        return sum(math.exp(lp) for lp in lps) / len(lps)
    mean = meta_info.get("output_token_probs_mean")
    return float(mean) if mean is not None else None


def vote(answers: Sequence[Optional[str]]) -> tuple:
    """``(top answer, its count)``; ``None`` answers do not vote; ties -> first seen."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None, 0
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best), best


def skip_decision(answers: Sequence[Optional[str]], confidences: Sequence[Optional[float]],
                  config: CGEEConfig) -> Dict[str, Any]:
    """Gate 1 on its own: ``{"skip", "branch", "answer", "vote_share", "confidence"}``."""
    top, count = vote(answers)
    share = count / len(answers) if answers else 0.0
    agreeing = [i for i, a in enumerate(answers) if a is not None and a == top]
    confs = [confidences[i] for i in agreeing if confidences[i] is not None]
    conf = sum(confs) / len(confs) if confs else None
    out = {"skip": False, "branch": None, "answer": top, "vote_share": share, "confidence": conf}
    if not config.skip_gate or top is None:
        return out
    if share + 1e-12 < config.skip_min_vote_share:
        return out
    if sum(1 for c in Counter(a for a in answers if a is not None).values() if c == count) > 1:
        return out  # a tie for the top answer is not decisive
    if config.skip_min_confidence > 0 and (conf is None or conf < config.skip_min_confidence):
        return out
    best = max(agreeing, key=lambda i: (confidences[i] if confidences[i] is not None else -1.0, -i))
    out.update(skip=True, branch=best)
    return out


def choose(answers: Sequence[Optional[str]], p_yes: Sequence[float], selection: str) -> tuple:
    """``(branch, answer)`` picked from verifier scores."""
    n = len(answers)
    answered = [i for i in range(n) if answers[i] is not None]
    if not answered:
        best = max(range(n), key=lambda i: (p_yes[i], -i)) if n else None
        return best, None
    if selection == "max_yes":
        best = max(answered, key=lambda i: (p_yes[i], -i))
        return best, answers[best]
    totals: Dict[str, float] = {}
    counts: Counter = Counter()
    first: Dict[str, int] = {}
    for i in answered:
        a = answers[i]
        totals[a] = totals.get(a, 0.0) + p_yes[i]
        counts[a] += 1
        first.setdefault(a, i)
    answer = max(totals, key=lambda a: (totals[a], counts[a], -first[a]))
    best = max((i for i in answered if answers[i] == answer), key=lambda i: (p_yes[i], -i))
    return best, answer
