"""Branch stop: end a fork's remaining branches once their majority vote is settled.

In an ordinary ``@sgl.function``::

    forks = s.fork(8)
    forks += sgl.gen("answer", max_tokens=256, temperature=0.7)
    result = rksc_sgl.vote(forks, "answer", rule="lossless")
    result.answer          # the voted answer
    result.stopped         # {branch index: why it was stopped}

``vote`` watches the branches finish, applies a stop rule after each, and when the rule
says the vote is settled asks the backend to stop the others: the embedded engine cancels
their requests, SGLang's runtime (through :class:`rksc_sgl.runtime.endpoint.RuntimeBackend`) aborts
them with its ``/abort_request`` API. A stopped branch's KV is freed at once and nothing it
decoded goes into the tree (only its prompt, which the other branches share): a later
lookup never finds a partial answer. Its text in the fork is the part decoded before the
stop; its vote is not counted.

Rules (``STOP_RULES``, chosen by name, settings as keyword arguments of ``vote``):

=========  ===============================================================  ====================
rule       stops when (c1, c2: the leader's and runner-up's votes,           voted answer against
           u: branches not finished)                                        the full run
=========  ===============================================================  ====================
lossless   c1 > c2 + u: no outcome of the unfinished branches can change     always equal
           the winner
beta       P(p1 > p2) >= confidence, p1 ~ Beta(c1 + 1, c2 + 1): the top-two  may differ
           Beta criterion of Adaptive-Consistency (Aggarwal et al., 2023)
window     the last ``window`` finished branches gave the same answer: ESC's  may differ
           window rule (Li et al., 2024) over finish order
deepconf   never settles the vote; stops each branch whose running           may differ
           confidence falls below a threshold learned from the first
           branches to finish (DeepConf online, Fu et al., 2025; see
           :class:`DeepConfRule`)
=========  ===============================================================  ====================

A rule that watches tokens (``deepconf``) reads each running branch's top-k log-probabilities
from the backend while it decodes (:class:`TokenReader`; the gen must ask for them:
:func:`rule_gen_args`) and stops that branch alone; its vote is not counted.

Branches that give no answer (``extract`` returns ``None``) count as finished and vote for
nothing, as :func:`rksc_sgl.problems.majority_vote` ignores them. Branches finishing at the
same poll are taken in branch order, so a given finish order gives one decision.

Waves (:func:`vote_waves`) launch ``first`` seeded branches of ``n`` and, each time every
launched branch has finished with the vote unsettled, the next ``step``; a rule's ``u`` is
then the running branches plus the ones not launched yet. Branch i samples with seed
``seed + i`` whenever it is launched, so an unlaunched branch is a running one that has not
answered yet, and the lossless rule stays exact: the voted answer is the full run's.
:func:`settle_waves` replays the schedule over recorded branches.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, runtime_checkable

from rksc_sgl.problems import extract_answer, majority_vote
from rksc_sgl.rksc.confidence import first_low_group, lowest_group_confidence, percentile, token_confidences

__all__ = ["BRANCH_RID_PREFIX", "STOP_RULES", "BranchStopper", "BranchVote", "ConfidenceReplay", "DeepConfRule",
           "StopRule", "StreamControls", "TokenReader", "WaveReplay", "WavesVote", "rule_gen_args", "seed_branches",
           "settle", "settle_confidence", "settle_waves", "vote", "vote_waves"]

BRANCH_RID_PREFIX = "rksc-branch-"
"""Request ids a :class:`RuntimeBackend` gives frontend requests; the ``rksc`` tree caches
only the prompt of such a request when it ends aborted (a stopped branch)."""

STOPPED_MESSAGE = "branch stopped"


# ---- rules -------------------------------------------------------------------------------------
class StopRule:
    """Decides, from the votes so far, whether the unfinished branches can be stopped."""

    name = ""
    watches_tokens = False
    """Whether the rule also judges single branches by their tokens (:class:`DeepConfRule`)."""

    def check(self, counts: Counter, finished: Sequence[Optional[str]], unfinished: int) -> Optional[str]:
        """The reason to stop now, or ``None`` to keep going. ``finished``: answers in finish order."""
        raise NotImplementedError

    def gen_args(self) -> Dict[str, Any]:
        """What the branches' gen must ask for this rule (``sgl.gen`` keyword arguments)."""
        return {}


class _Registry(dict):
    def register(self, cls):
        self[cls.name] = cls
        return cls

    def build(self, name: str, **settings) -> StopRule:
        if name not in self:
            raise ValueError(f"unknown stop rule {name!r}; choose from {', '.join(sorted(self))}")
        try:
            return self[name](**settings)
        except TypeError as exc:
            raise ValueError(f"stop rule {name!r}: {exc}") from None


STOP_RULES = _Registry()


def _top_two(counts: Counter):
    ranked = counts.most_common(2) + [(None, 0), (None, 0)]
    return ranked[0], ranked[1][1]


@STOP_RULES.register
class LosslessRule(StopRule):
    name = "lossless"

    def check(self, counts, finished, unfinished):
        (leader, c1), c2 = _top_two(counts)
        if leader is not None and c1 > c2 + unfinished:
            return f"lossless: {leader!r} leads {c1}-{c2} with {unfinished} unfinished"
        return None


def beta_leader_probability(c1: int, c2: int) -> float:
    """P(p1 > 1/2) for p1 ~ Beta(c1 + 1, c2 + 1), exactly: sum_{j<=c1} C(n, j) / 2^n, n = c1 + c2 + 1."""
    n = c1 + c2 + 1
    return math.fsum(math.comb(n, j) for j in range(c1 + 1)) / 2.0 ** n


@STOP_RULES.register
class BetaRule(StopRule):
    name = "beta"

    def __init__(self, confidence: float = 0.95, min_votes: int = 2):
        if not isinstance(confidence, (int, float)) or not 0.5 < confidence < 1.0:
            raise ValueError(f"confidence must be a number in (0.5, 1), got {confidence!r}")
        if not isinstance(min_votes, int) or min_votes < 1:
            raise ValueError(f"min_votes must be an integer >= 1, got {min_votes!r}")
        self.confidence, self.min_votes = float(confidence), min_votes

    def check(self, counts, finished, unfinished):
        (leader, c1), c2 = _top_two(counts)
        if leader is None or c1 < self.min_votes:
            return None
        p = beta_leader_probability(c1, c2)
        if p >= self.confidence:
            return f"beta: P({leader!r} leads) = {p:.3f} >= {self.confidence} at {c1}-{c2}"
        return None


@STOP_RULES.register
class WindowRule(StopRule):
    name = "window"

    def __init__(self, window: int = 4):
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        self.window = window

    def check(self, counts, finished, unfinished):
        last = list(finished[-self.window:])
        if len(last) == self.window and last[0] is not None and all(a == last[0] for a in last):
            return f"window: the last {self.window} finished branches answered {last[0]!r}"
        return None


@STOP_RULES.register
class DeepConfRule(StopRule):
    """DeepConf's online mode (Fu et al., 2025, "Deep Think with Confidence"), as a branch
    filter: the first ``warmup`` branches to finish (with at least one token) run to the end
    and set the threshold, the ``percentile``-th percentile of their lowest group confidences
    (:mod:`rksc_sgl.rksc.confidence`: token confidence = -mean of the ``top_k`` most likely
    tokens' log-probabilities, group = the mean over ``window`` tokens; ``percentile=10`` is
    DeepConf-high, 90 DeepConf-low). Afterwards a branch is stopped at the first token whose
    group confidence falls below the threshold, and its vote is not counted; a branch that
    ends by itself with such a group (before a poll saw it) is not counted either. It never
    settles the vote as a whole: the others run on.

    Approximate, not lossless: a dropped branch's answer is left out, so the majority of the
    rest can differ from the full run's (most where the low-confidence branches held the
    majority), and a vote can end with no branch counted beyond the warm-up. What is decided
    depends only on the branches' tokens and which ``warmup`` branches finish first
    (:func:`settle_confidence` replays it), not on when the watch polls: a branch is judged on
    every window of its trace, from its first token. Its gen must return the top-k
    log-probabilities (:meth:`gen_args`: ``return_logprob=True, top_logprobs_num=top_k``); the
    backend must read them while the branch runs (:class:`TokenReader`)."""

    name = "deepconf"
    watches_tokens = True

    def __init__(self, warmup: int = 3, window: int = 16, top_k: int = 5, percentile: float = 10.0):
        for key, value in (("warmup", warmup), ("window", window), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if not isinstance(percentile, (int, float)) or isinstance(percentile, bool) or not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
        self.warmup, self.window, self.top_k, self.percentile = warmup, window, top_k, float(percentile)
        self.warmup_branches: List[int] = []
        """The branches whose traces set the threshold, in finish order."""
        self.lowest: List[float] = []
        """Their lowest group confidences."""
        self.threshold: Optional[float] = None
        self.stops: Dict[int, int] = {}
        """Branch -> the token (1-based) that ends its first group below the threshold."""
        self._confidences: Dict[int, List[float]] = {}
        self._checked: Dict[int, int] = {}

    def check(self, counts, finished, unfinished):
        return None

    def gen_args(self) -> Dict[str, Any]:
        return {"return_logprob": True, "top_logprobs_num": self.top_k}

    def known(self, branch: int) -> int:
        """How many of the branch's tokens the rule has seen."""
        return len(self._confidences.get(branch, ()))

    def running(self, branch: int, steps: Sequence[Sequence[float]]) -> Optional[str]:
        """The running branch's next tokens (each its top-k log-probabilities; those after the
        :meth:`known` ones): the reason to stop it now, or ``None``."""
        self._add(branch, steps)
        return None if self.threshold is None else self._low(branch)

    def finished(self, branch: int, trace: Sequence[Sequence[float]]) -> Optional[str]:
        """The branch ended by itself with ``trace`` (all its tokens): while warming up, its
        lowest group confidence goes towards the threshold (``None``: its vote counts); after,
        the reason not to count it, or ``None``."""
        confidences = self._add(branch, trace[self.known(branch):])
        if self.threshold is not None:
            return self._low(branch)
        lowest = lowest_group_confidence(confidences, self.window)
        if lowest is not None:
            self.warmup_branches.append(branch)
            self.lowest.append(lowest)
            if len(self.lowest) == self.warmup:
                self.threshold = percentile(self.lowest, self.percentile)
        return None

    def _add(self, branch: int, steps: Sequence[Sequence[float]]) -> List[float]:
        confidences = self._confidences.setdefault(branch, [])
        confidences += token_confidences(steps, self.top_k)
        return confidences

    def _low(self, branch: int) -> Optional[str]:
        confidences = self._confidences.get(branch, [])
        found = first_low_group(confidences, self.window, self.threshold, start=self._checked.get(branch, 0))
        self._checked[branch] = len(confidences)
        if found is None:
            return None
        token, mean = found
        self.stops[branch] = token
        return (f"deepconf: group confidence {mean:.3f} < threshold {self.threshold:.3f} at token {token} "
                f"(window {self.window})")


def rule_gen_args(rule: str, **settings) -> Dict[str, Any]:
    """The ``sgl.gen`` keyword arguments the branches need for ``vote(..., rule=rule,
    **settings)``: ``{}``, or for ``deepconf`` the top-k log-probabilities it reads."""
    return STOP_RULES.build(rule, **settings).gen_args()


@dataclasses.dataclass(frozen=True)
class ConfidenceReplay:
    """What :func:`settle_confidence` found: the ``threshold`` (``None``: fewer than ``warmup``
    branches finished) set by the ``warmup`` branches, the ``stopped`` branches (branch -> the
    token at which its group confidence fell below it), the ``counted`` ones (finish order) and
    their vote, ``answer``."""

    threshold: Optional[float]
    warmup: List[int]
    stopped: Dict[int, int]
    counted: List[int]
    answer: Optional[str]


def settle_confidence(rule: "DeepConfRule", answers: Sequence[Optional[str]], traces: Sequence[Sequence[Sequence[float]]],
                      finish_order: Sequence[int]) -> ConfidenceReplay:
    """Replay what :func:`vote` with ``rule`` (a fresh :class:`DeepConfRule`) decides over
    recorded branches: ``traces[i]``, branch i's whole trace (top-k log-probabilities per token)
    and ``answers[i]`` its answer when it runs to the end; ``finish_order``, the order in which
    the branches end when none is stopped (it decides the warm-up). Pure."""
    n = len(answers)
    if len(traces) != n or sorted(finish_order) != list(range(n)):
        raise ValueError(f"needs a trace per answer and a permutation of range({n}) as finish_order")
    for branch in finish_order:
        rule.finished(branch, traces[branch])
    counted = [b for b in finish_order if b not in rule.stops]
    return ConfidenceReplay(rule.threshold, list(rule.warmup_branches), dict(rule.stops), counted,
                            majority_vote(answers[b] for b in sorted(counted)))


class _Tally:
    """The vote so far: each finished branch's answer, the finish order, the counts; after a
    finish, ``rule`` decides whether the ``unfinished`` branches can be stopped (asked only
    while some are). What :func:`settle`, :func:`settle_waves`, :func:`vote` and
    :func:`vote_waves` all apply."""

    def __init__(self, rule: StopRule):
        self.rule = rule
        self.answers: Dict[int, Optional[str]] = {}
        self.order: List[int] = []
        self.counts: Counter = Counter()
        self.dropped: Dict[int, str] = {}
        """Branches a token rule stopped or left out (their votes not counted), with why."""

    def drop(self, branch: int, reason: str) -> None:
        self.dropped[branch] = reason

    def unfinished(self, total: int) -> int:
        """Of ``total`` branches, those neither counted nor dropped."""
        return total - len(self.order) - len(self.dropped)

    def finish(self, branch: int, answer: Optional[str], unfinished: int) -> Optional[str]:
        """Count ``branch``'s answer; the rule's reason to stop the ``unfinished`` ones, or ``None``."""
        self.answers[branch] = answer
        self.order.append(branch)
        if answer is not None:
            self.counts[answer] += 1
        if unfinished <= 0:
            return None
        return self.rule.check(self.counts, [self.answers[i] for i in self.order], unfinished)

    def voted(self) -> Optional[str]:
        """The majority of the finished branches, taken in branch order (ties: the lowest branch)."""
        return majority_vote(self.answers[i] for i in sorted(self.order))


def settle(rule: StopRule, finished: Sequence[Optional[str]], total: int) -> Optional[int]:
    """How many branches had finished (in this order) when ``rule`` settled the vote, or
    ``None`` if it never did before the last one finished. Pure: what :func:`vote` applies
    after every finish, and what the tests replay recorded branches through."""
    tally = _Tally(rule)
    for k, answer in enumerate(finished[: total - 1], start=1):
        if tally.finish(k - 1, answer, total - k) is not None:
            return k
    return None


def check_waves(n: int, first: int, step: int) -> None:
    """Refuse a wave schedule that cannot run: ``1 <= first <= n``, ``step >= 1``."""
    for name, value in (("n", n), ("first", first), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"waves: {name} must be an integer >= 1, got {value!r}")
    if first > n:
        raise ValueError(f"waves: first ({first}) must not exceed n ({n})")


def waves(n: int, first: int, step: int) -> List[range]:
    """The branches of each wave, in launch order: ``range(0, first)``, then ``step`` at a time."""
    check_waves(n, first, step)
    return [range(0, first)] + [range(a, min(a + step, n)) for a in range(first, n, step)]


@dataclasses.dataclass(frozen=True)
class WaveReplay:
    """What :func:`settle_waves` found: ``launched`` branches in ``waves`` waves, ``order``
    the ones that finished (in finish order), ``answer`` their vote; ``settled``: the rule
    stopped the vote before every branch had finished."""

    answer: Optional[str]
    launched: int
    waves: int
    order: List[int]
    settled: bool


def settle_waves(rule: StopRule, answers: Sequence[Optional[str]], finish_order: Sequence[int], first: int,
                 step: int) -> WaveReplay:
    """Replay :func:`vote_waves` over recorded branches. ``answers[i]``: branch i's answer
    (seeded, so the same whenever it is launched); ``finish_order``: a permutation of the
    branches whose order within each wave is the order they finish in. The rule's
    ``unfinished`` counts running and unlaunched branches. Pure."""
    n = len(answers)
    if sorted(finish_order) != list(range(n)):
        raise ValueError(f"finish_order must be a permutation of range({n}), got {list(finish_order)!r}")
    rank = {branch: k for k, branch in enumerate(finish_order)}
    tally = _Tally(rule)
    schedule = waves(n, first, step)
    for count, wave in enumerate(schedule, start=1):
        for branch in sorted(wave, key=rank.__getitem__):
            if tally.finish(branch, answers[branch], n - len(tally.order) - 1) is not None:
                return WaveReplay(tally.voted(), wave.stop, count, list(tally.order), True)
    return WaveReplay(tally.voted(), n, len(schedule), list(tally.order), False)


# ---- the backends' side -----------------------------------------------------------------------
@runtime_checkable
class BranchStopper(Protocol):
    """What a backend gives :func:`vote` and :func:`seed_branches`: stop a frontend stream
    (``StreamExecutor.sid``): abort its request in flight and refuse its next until
    ``resume_stream``; seed the stream's next gen."""

    def stop_stream(self, sid: str, reason: str) -> None: ...

    def resume_stream(self, sid: str) -> None: ...

    def seed_stream(self, sid: str, seed: int) -> None: ...


@runtime_checkable
class TokenReader(Protocol):
    """What a backend gives a rule that watches tokens (``deepconf``): the top-k
    log-probabilities of each token the stream's request in flight has decoded so far, from
    token ``start`` on (``None``: no request in flight, or its gen asked for none)."""

    def stream_top_logprobs(self, sid: str, start: int = 0) -> Optional[List[List[float]]]: ...


class StreamControls:
    """A backend's table of what programs asked of their frontend streams
    (``StreamExecutor.sid``): stops, and seeds for their next gen.

    ============  =======================================================================
    state         meaning
    ============  =======================================================================
    running[sid]  the handle of the stream's request in flight (an engine ``Request``, a
                  runtime rid); ``abort(handle, reason)`` ends it
    stopped[sid]  the reason it was stopped; its next request is refused until resumed
    seeds[sid]    the ``sampling_seed`` of its next gen, taken (and forgotten) by that gen
    ============  =======================================================================
    """

    def __init__(self, abort: Callable[[Any, str], None]):
        self._abort = abort
        self._lock = threading.Lock()
        self._running: Dict[str, Any] = {}
        self._stopped: Dict[str, str] = {}
        self._seeds: Dict[str, int] = {}

    def start(self, sid: str, handle: Any, launch: Callable[[], None] = lambda: None) -> Optional[str]:
        """Record ``handle`` as the stream's request and ``launch`` it, unless the stream is
        stopped: then return the reason and launch nothing."""
        with self._lock:
            if sid in self._stopped:
                return self._stopped[sid]
            self._running[sid] = handle
            launch()
        return None

    def finished(self, sid: str) -> None:
        with self._lock:
            self._running.pop(sid, None)

    def handle(self, sid: str) -> Any:
        """The handle of the stream's request in flight, or ``None``."""
        with self._lock:
            return self._running.get(sid)

    def reason(self, sid: str) -> Optional[str]:
        with self._lock:
            return self._stopped.get(sid)

    def stop(self, sid: str, reason: str) -> None:
        with self._lock:
            self._stopped[sid] = reason
            handle = self._running.get(sid)
        if handle is not None:
            self._abort(handle, reason)

    def resume(self, sid: str) -> None:
        with self._lock:
            self._stopped.pop(sid, None)

    def seed(self, sid: str, seed: int) -> None:
        with self._lock:
            self._seeds[sid] = seed

    def take_seed(self, sid: str) -> Optional[int]:
        with self._lock:
            return self._seeds.pop(sid, None)

    def active(self) -> int:
        """Streams stopped and not resumed, seeds not taken, requests in flight (0 when idle)."""
        with self._lock:
            return len(self._stopped) + len(self._running) + len(self._seeds)


def stopped_meta_info(prompt_tokens: int, reason: str) -> Dict[str, Any]:
    """The ``meta_info`` of a request a stopped stream refused (nothing was run)."""
    return {"id": None, "finish_reason": {"type": "abort", "message": f"{STOPPED_MESSAGE}: {reason}"},
            "prompt_tokens": prompt_tokens, "completion_tokens": 0, "cached_tokens": 0}


# ---- the program's side -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BranchVote:
    """What :func:`vote` decided. ``answers[i]``: branch i's extracted answer (``None`` for a
    stopped branch or one without an answer); ``order``: the branches that finished, in
    order; ``stopped``: branch -> reason; ``settled_after``: finished branches when the rule
    settled (``None``: every branch finished)."""

    answer: Optional[str]
    rule: str
    answers: List[Optional[str]]
    order: List[int]
    stopped: Dict[int, str]
    settled_after: Optional[int]

    @property
    def counts(self) -> Dict[str, int]:
        return dict(Counter(a for a in self.answers if a is not None))


def _stopper(forks) -> tuple:
    """The forks' executors and their backend, checked to be a :class:`BranchStopper`."""
    executors = [f.stream_executor for f in forks]
    if not executors:
        raise ValueError("needs at least one branch")
    backend = executors[0].backend
    if not isinstance(backend, BranchStopper):
        raise TypeError(f"the backend {type(backend).__name__} cannot stop or seed branches; use rksc_sgl.Engine "
                        "or rksc_sgl.runtime.endpoint.RuntimeBackend")
    return executors, backend


def seed_branches(forks, seed: int) -> None:
    """Branch i's next gen samples with ``sampling_seed = seed + i``: the same samples in
    every run, whatever else runs beside it (so modes of a comparison see the same
    branches). SGLang's runtime honours the seed only with
    ``--enable-deterministic-inference``."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    executors, backend = _stopper(forks)
    for i, executor in enumerate(executors):
        backend.seed_stream(executor.sid, seed + i)


def vote(forks, var: str = "answer", rule: str = "lossless", *, extract: Callable[[str], Optional[str]] = extract_answer,
         timeout: float = 600.0, poll_s: float = 0.005, **settings) -> BranchVote:
    """Wait for the branches of ``forks`` (``s.fork(n)`` after ``forks += sgl.gen(var, ...)``)
    and stop the rest once ``rule`` settles their vote; see the module doc.

    The forks' backend must be a :class:`BranchStopper` (``rksc_sgl.Engine``,
    ``rksc_sgl.runtime.endpoint.RuntimeBackend``). Returns after every stopped branch has ended, so
    their KV is free when the program goes on. ``timeout`` bounds the whole wait."""
    tally = _Tally(STOP_RULES.build(rule, **settings))
    executors, backend = _stopper(forks)
    screen = _screen(tally, backend, var)
    _check_named(executors, var, 0)
    deadline = time.monotonic() + timeout
    pending = list(range(len(executors)))
    reason = _watch(executors, pending, tally, len(executors), var, extract, deadline, poll_s, screen)
    stopped = _end_pending(backend, executors, pending, tally, reason, var, deadline)
    return BranchVote(**_decided(tally, rule, len(executors), stopped, reason))


@dataclasses.dataclass(frozen=True)
class WavesVote(BranchVote):
    """What :func:`vote_waves` decided, as :class:`BranchVote` over the ``launched`` branches
    (of ``n``, in ``waves`` waves); ``forks``: those branches' states, in branch order
    (``result.forks[i]["answer"]``, ``verify(result.forks, ..., branch_vote=result)``)."""

    n: int
    launched: int
    waves: int
    forks: Any = dataclasses.field(compare=False, repr=False)


def vote_waves(s, n: int, branch, var: str = "answer", *, seed: int, first: Optional[int] = None, step: int = 2,
               rule: str = "lossless", extract: Callable[[str], Optional[str]] = extract_answer,
               timeout: float = 600.0, poll_s: float = 0.005, **settings) -> WavesVote:
    """Vote over up to ``n`` branches of the program state ``s``, launched in waves: fork
    ``first`` (default ``n // 2 + 1``, the fewest whose agreement can settle a lossless
    vote), and while the vote is unsettled when all launched branches have finished, the
    next ``step``. Branch i appends ``branch`` (an expression with a gen named ``var``, or a
    callable ``i -> expression``) and samples with ``sampling_seed = seed + i``. The rule
    counts unlaunched branches as unfinished; once it settles, running branches are stopped
    as :func:`vote` stops them and no more are launched."""
    if first is None:
        first = n // 2 + 1 if isinstance(n, int) else n  # a bad n is refused by waves()
    schedule = waves(n, first, step)
    tally = _Tally(STOP_RULES.build(rule, **settings))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    _, backend = _stopper([s])
    screen = _screen(tally, backend, var)
    deadline = time.monotonic() + timeout
    states: List[Any] = []
    for count, wave in enumerate(schedule, start=1):
        states += _launch(s, wave, branch, seed)
        executors = [state.stream_executor for state in states]
        _check_named(executors, var, wave.start)
        pending = list(wave)
        reason = _watch(executors, pending, tally, n, var, extract, deadline, poll_s, screen)
        if reason is not None:
            break
    stopped = _end_pending(backend, executors, pending, tally, reason, var, deadline)
    return WavesVote(**_decided(tally, rule, len(states), stopped, reason), n=n, launched=len(states), waves=count,
                     forks=tuple(states))


def _launch(s, wave: range, branch, seed: int) -> list:
    """Fork the ``wave``'s branches from ``s``, seed branch i ``seed + i``, append ``branch``."""
    group = s.fork(len(wave))
    seed_branches(group, seed + wave.start)
    for i, state in zip(wave, group.states):
        state += branch(i) if callable(branch) else branch
    return group.states


def _decided(tally: _Tally, rule: str, launched: int, stopped: Dict[int, str], reason: Optional[str]) -> dict:
    """The :class:`BranchVote` fields of a finished watch over ``launched`` branches."""
    return {"answer": tally.voted(), "rule": rule, "answers": [tally.answers.get(i) for i in range(launched)],
            "order": list(tally.order), "stopped": stopped,
            "settled_after": len(tally.order) if reason is not None else None}


def _check_named(executors, var: str, start: int) -> None:
    missing = [i for i in range(start, len(executors)) if var not in executors[i].variable_event]
    if missing:
        raise ValueError(f"vote: branches {missing} have no gen named {var!r}")


def _watch(executors, pending: List[int], tally: _Tally, total: int, var: str, extract, deadline: float,
           poll_s: float, screen: Optional["_TokenScreen"] = None) -> Optional[str]:
    """Wait for the ``pending`` branches, counting each that finishes (removed from
    ``pending``) into ``tally``, until none is left or the rule gives a reason to stop. The
    rule's unfinished: the ``total`` branches (launched or not) less the finished and dropped
    ones. With a token ``screen``, running branches are judged by their tokens between polls."""
    while pending:
        done = [i for i in pending if executors[i].variable_event[var].is_set()]
        if not done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"vote: {len(pending)} branches unfinished at the timeout")
            if screen is not None:
                screen.poll(executors, pending)
            executors[pending[0]].variable_event[var].wait(poll_s)
            continue
        for i in done:
            _raise_branch_error(executors[i], i)
            pending.remove(i)
            if screen is not None and not screen.counts(executors, i):
                continue
            reason = tally.finish(i, extract(executors[i].variables[var]), tally.unfinished(total) - 1)
            if reason is not None:
                return reason
    return None


class _TokenScreen:
    """A token rule's side of the watch (``tally.rule.watches_tokens``): each poll reads the
    running branches' new tokens from the backend and stops the ones the rule drops (the stop
    is sent again while such a branch runs: the runtime ignores an abort that reaches it
    before the request does); a branch that ends is judged on its whole trace."""

    RESEND_S = 0.25

    def __init__(self, tally: _Tally, backend: TokenReader, var: str):
        self.tally, self.rule, self.backend, self.var = tally, tally.rule, backend, var
        self._sent: Dict[int, float] = {}

    def poll(self, executors, pending: List[int]) -> None:
        now = time.monotonic()
        for i in pending:
            sid = executors[i].sid
            if i in self.tally.dropped:
                if now - self._sent[i] > self.RESEND_S:
                    self._stop(sid, i, self.tally.dropped[i], now)
                continue
            steps = self.backend.stream_top_logprobs(sid, self.rule.known(i))
            why = self.rule.running(i, steps) if steps else None
            if why is not None:
                self.tally.drop(i, why)
                self._stop(sid, i, why, now)

    def counts(self, executors, i: int) -> bool:
        """Branch i has ended: whether its vote counts (not when the rule dropped it)."""
        if i in self.tally.dropped:
            self.backend.resume_stream(executors[i].sid)  # it has ended: its stream may run again
            return False
        why = self.rule.finished(i, _finished_trace(executors[i], self.var, i))
        if why is not None:
            self.tally.drop(i, why)
            return False
        return True

    def _stop(self, sid: str, i: int, why: str, now: float) -> None:
        self.backend.stop_stream(sid, why)
        self._sent[i] = now


def _screen(tally: _Tally, backend, var: str) -> Optional[_TokenScreen]:
    """The token screen of a rule that watches tokens, on a backend that reads them; ``None``
    for the other rules."""
    if not tally.rule.watches_tokens:
        return None
    if not isinstance(backend, TokenReader):
        raise TypeError(f"the backend {type(backend).__name__} cannot read its branches' tokens while they run, "
                        f"which rule {tally.rule.name!r} needs")
    return _TokenScreen(tally, backend, var)


def _finished_trace(executor, var: str, index: int) -> List[List[float]]:
    """A finished gen's top-k log-probabilities per token, from its ``meta_info``."""
    tops = (executor.meta_info.get(var) or {}).get("output_top_logprobs")
    if tops is None or any(step is None for step in tops):
        raise ValueError(f"vote: branch {index} returned no top-k log-probabilities; a rule that watches tokens "
                         "needs gen(..., return_logprob=True, top_logprobs_num=k) (see rule_gen_args)")
    return [[float(entry[0]) for entry in step] for step in tops]


def _end_pending(backend, executors, pending: List[int], tally: _Tally, reason: Optional[str], var: str,
                 deadline: float) -> Dict[int, str]:
    """Stop the branches still ``pending`` when the rule settled (``reason``) and wait for them;
    every branch stopped or dropped, in branch order, with why."""
    ending = {i: tally.dropped.get(i, reason) for i in pending} if reason is not None else {}
    _stop_and_wait(backend, executors, ending, var, deadline)
    return dict(sorted({**tally.dropped, **ending}.items()))


def _raise_branch_error(executor, index: int) -> None:
    if executor.error_ is not None:
        raise RuntimeError(f"vote: branch {index} failed: {executor.error_}") from executor.error_


def _stop_and_wait(backend, executors, stopped: Dict[int, str], var: str, deadline: float) -> None:
    """Stop the branches, wait for each to end, resume their streams for later gens.

    The abort is sent again while a branch runs: the runtime ignores an abort that reaches
    it before the request does."""
    try:
        for i, why in stopped.items():
            backend.stop_stream(executors[i].sid, why)
        for i, why in stopped.items():
            event = executors[i].variable_event[var]
            while not event.wait(0.25):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vote: stopped branch {i} did not end")
                backend.stop_stream(executors[i].sid, why)
    finally:
        for i in stopped:
            backend.resume_stream(executors[i].sid)
