"""DeepConf's confidence measures over a branch's tokens (Fu et al., 2025, "Deep Think with
Confidence"), as :class:`rksc_sgl.rksc.branch_stop.DeepConfRule` applies them online.

A *trace* is a branch's decoded tokens, each given as the log-probabilities of the ``k`` most
likely tokens at that step (SGLang's ``output_top_logprobs`` with ``top_logprobs_num=k``; the
model's distribution before sampling, whatever the temperature).

=====================  =====================================================================
measure                definition
=====================  =====================================================================
token confidence       C_t = -(1/k) * sum of the top-k log-probabilities at step t: high
                       where the distribution is peaked, low where it is flat
group confidence       the mean of C over the ``window`` tokens ending at token t (1-based),
                       defined from t = window on
lowest group conf.     the least group confidence of a trace; a trace shorter than ``window``
                       has one group, all of its tokens
threshold              the ``percentile``-th percentile (linear interpolation between order
                       statistics) of the warm-up traces' lowest group confidences. DeepConf-low
                       keeps the top 10% of warm-up traces (percentile 90, aggressive),
                       DeepConf-high the top 90% (percentile 10, conservative)
=====================  =====================================================================

All functions are pure; bad input is a ``ValueError``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

__all__ = ["first_low_group", "group_confidences", "lowest_group_confidence", "percentile", "token_confidence",
           "token_confidences"]


def token_confidence(top_logprobs: Sequence[float], k: int) -> float:
    """C = -(1/k) * (sum of the first ``k`` of ``top_logprobs``, the step's most likely tokens)."""
    if len(top_logprobs) < k:
        raise ValueError(f"a token has {len(top_logprobs)} top log-probabilities, the confidence needs {k} "
                         f"(gen(..., return_logprob=True, top_logprobs_num={k}))")
    return -math.fsum(top_logprobs[:k]) / k


def token_confidences(trace: Sequence[Sequence[float]], k: int) -> List[float]:
    """:func:`token_confidence` of every token of ``trace``."""
    return [token_confidence(step, k) for step in trace]


def group_confidences(confidences: Sequence[float], window: int) -> List[float]:
    """The mean confidence of every ``window`` consecutive tokens: entry j covers tokens j+1 to
    j+window (1-based); empty when the trace is shorter than ``window``."""
    _check_window(window)
    return [math.fsum(confidences[j:j + window]) / window for j in range(len(confidences) - window + 1)]


def lowest_group_confidence(confidences: Sequence[float], window: int) -> Optional[float]:
    """The trace's least group confidence; the mean of all its tokens when it is shorter than
    ``window``; ``None`` for a trace without tokens."""
    if not confidences:
        return None
    groups = group_confidences(confidences, window)
    return min(groups) if groups else math.fsum(confidences) / len(confidences)


def first_low_group(confidences: Sequence[float], window: int, threshold: float,
                    start: int = 0) -> Optional[Tuple[int, float]]:
    """``(t, mean)``: the first token t (1-based, t > ``start``, t >= ``window``) whose group
    (tokens t-window+1 to t) has a mean confidence below ``threshold``; ``None`` if none has."""
    _check_window(window)
    for end in range(max(start + 1, window), len(confidences) + 1):
        mean = math.fsum(confidences[end - window:end]) / window
        if mean < threshold:
            return end, mean
    return None


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (0 <= p <= 100), interpolating linearly between the
    sorted values at rank p/100 * (n - 1) (numpy's default)."""
    if not values:
        raise ValueError("the percentile of no values")
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be a number in [0, 100], got {p!r}")
    ordered = sorted(values)
    rank = p / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
