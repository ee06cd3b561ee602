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
=========  ===============================================================  ====================

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

__all__ = ["BRANCH_RID_PREFIX", "STOP_RULES", "BranchStopper", "BranchVote", "StopRule", "StreamControls",
           "WaveReplay", "WavesVote", "seed_branches", "settle", "settle_waves", "vote", "vote_waves"]

BRANCH_RID_PREFIX = "rksc-branch-"
"""Request ids a :class:`RuntimeBackend` gives frontend requests; the ``rksc`` tree caches
only the prompt of such a request when it ends aborted (a stopped branch)."""

STOPPED_MESSAGE = "branch stopped"


# ---- rules -------------------------------------------------------------------------------------
class StopRule:
    """Decides, from the votes so far, whether the unfinished branches can be stopped."""

    name = ""

    def check(self, counts: Counter, finished: Sequence[Optional[str]], unfinished: int) -> Optional[str]:
        """The reason to stop now, or ``None`` to keep going. ``finished``: answers in finish order."""
        raise NotImplementedError


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
    _check_named(executors, var, 0)
    deadline = time.monotonic() + timeout
    pending = list(range(len(executors)))
    reason = _watch(executors, pending, tally, len(executors), var, extract, deadline, poll_s)
    stopped = {i: reason for i in pending} if reason is not None else {}
    _stop_and_wait(backend, executors, stopped, var, deadline)
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
    deadline = time.monotonic() + timeout
    states: List[Any] = []
    for count, wave in enumerate(schedule, start=1):
        states += _launch(s, wave, branch, seed)
        executors = [state.stream_executor for state in states]
        _check_named(executors, var, wave.start)
        pending = list(wave)
        reason = _watch(executors, pending, tally, n, var, extract, deadline, poll_s)
        if reason is not None:
            break
    stopped = {i: reason for i in pending} if reason is not None else {}
    _stop_and_wait(backend, executors, stopped, var, deadline)
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
           poll_s: float) -> Optional[str]:
    """Wait for the ``pending`` branches, counting each that finishes (removed from
    ``pending``) into ``tally``, until none is left or the rule gives a reason to stop. The
    rule's unfinished: the ``total`` branches (launched or not) less the finished ones."""
    while pending:
        done = [i for i in pending if executors[i].variable_event[var].is_set()]
        if not done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"vote: {len(pending)} branches unfinished at the timeout")
            executors[pending[0]].variable_event[var].wait(poll_s)
            continue
        for i in done:
            _raise_branch_error(executors[i], i)
            pending.remove(i)
            reason = tally.finish(i, extract(executors[i].variables[var]), total - len(tally.order) - 1)
            if reason is not None:
                return reason
    return None


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
