"""Waves (``rksc_sgl.vote_waves``): launch a vote's branches a wave at a time, while unsettled.

The lossless rule over launched and unlaunched branches is replayed over the recorded
branches of test_branch_stop in every finish order within the waves: its vote equals the
full vote, with fewer branches launched where a clear majority exists. A rule that counted
only the running branches would change a recorded vote. On the engine, a waves vote with
seeded branches equals the vote of the same branches run all at once, branch by branch.
"""

from __future__ import annotations

import itertools
import random
import time

import pytest
import sglang as sgl

from rksc_sgl.problems import majority_vote
from rksc_sgl.rksc.branch_stop import STOP_RULES, BranchVote, WavesVote, settle_waves, vote_waves, waves

from branch_programs import WAVES_PROMPT, first_word, random_answers, seeded_all, seeded_waves, uneven_waves
from test_branch_stop import RECORDED

SCHEDULES = [(1, 1), (2, 2), (3, 2), (4, 1), (5, 3), (8, 1)]  # (first, step) for 8 branches


def _orders(n: int, every: int = 7):
    """Every ``every``-th permutation of the branches: finish orders, taken within each wave."""
    return itertools.islice(itertools.permutations(range(n)), 0, None, every)


# ---- the schedule and the replay, without a model ------------------------------------------------
def test_waves_launch_first_then_step_at_a_time():
    assert waves(8, 3, 2) == [range(0, 3), range(3, 5), range(5, 7), range(7, 8)]
    assert waves(8, 8, 1) == [range(0, 8)]
    assert waves(1, 1, 5) == [range(0, 1)]


@pytest.mark.parametrize("n, first, step, message", [
    (8, 0, 1, "first must be an integer >= 1, got 0"),
    (8, 2, 0, "step must be an integer >= 1, got 0"),
    (3, 4, 1, r"first \(4\) must not exceed n \(3\)"),
    (0, 1, 1, "n must be an integer >= 1, got 0"),
    (8, 2.0, 1, "first must be an integer >= 1, got 2.0"),
])
def test_bad_schedules_are_refused(n, first, step, message):
    with pytest.raises(ValueError, match=message):
        waves(n, first, step)


@pytest.mark.parametrize("answers", RECORDED)
def test_lossless_waves_vote_equals_the_full_vote_in_every_finish_order(answers):
    rule = STOP_RULES.build("lossless")
    full = majority_vote(answers)
    fewest = len(answers)
    for first, step in SCHEDULES:
        for order in _orders(len(answers)):
            replay = settle_waves(rule, answers, order, first, step)
            assert replay.answer == full, (first, step, order, replay)
            assert len(replay.order) <= replay.launched <= len(answers)
            fewest = min(fewest, replay.launched)
    if answers.count(full) > len(answers) / 2:
        assert fewest < len(answers)  # a clear majority launches fewer branches


def test_lossless_waves_vote_equals_the_full_vote_on_random_branches():
    rng = random.Random(1)
    rule = STOP_RULES.build("lossless")
    for _ in range(3000):
        answers = random_answers(rng)
        n = len(answers)
        first, step = rng.randint(1, n), rng.randint(1, n)
        replay = settle_waves(rule, answers, rng.sample(range(n), n), first, step)
        assert replay.answer == majority_vote(answers), (answers, first, step, replay)


class _RunningOnly:
    """Lossless over the running branches only, the unlaunched ignored: not lossless."""

    def __init__(self, n: int, first: int, step: int):
        self.rule, self.stops = STOP_RULES.build("lossless"), [w.stop for w in waves(n, first, step)]

    def check(self, counts, finished, unfinished):
        launched = next(stop for stop in self.stops if stop >= len(finished))
        return self.rule.check(counts, finished, launched - len(finished))


def test_counting_only_the_running_branches_would_change_a_recorded_vote():
    # The replay test above has teeth: this broken rule, given the same schedules and
    # orders, votes against the full run on a recorded case.
    changed = [(i, first, step, order) for i, answers in enumerate(RECORDED) for first, step in SCHEDULES
               for order in _orders(len(answers), 97)
               if settle_waves(_RunningOnly(len(answers), first, step), answers, order, first, step).answer
               != majority_vote(answers)]
    assert changed
    assert settle_waves(_RunningOnly(8, 3, 2), RECORDED[1], [1, 2, 0, 3, 4, 5, 6, 7], 3, 2).answer == "5"
    assert majority_vote(RECORDED[1]) == "3"


def test_lossless_waves_settle_when_the_unlaunched_cannot_catch_up():
    rule = STOP_RULES.build("lossless")
    replay = settle_waves(rule, ["x"] * 8, range(8), 2, 2)  # 5 > 0 + 3 at the first of wave 3
    assert (replay.launched, replay.waves, replay.order, replay.settled) == (6, 3, [0, 1, 2, 3, 4], True)
    replay = settle_waves(rule, ["x", "y"] * 4, range(8), 2, 2)
    assert (replay.launched, replay.waves, replay.settled, replay.answer) == (8, 4, False, "x")


def test_beta_and_window_take_waves_too():
    beta = settle_waves(STOP_RULES.build("beta", confidence=0.95), ["x"] * 8, range(8), 2, 2)
    assert (beta.launched, beta.waves, len(beta.order)) == (4, 2, 4)  # 31/32 after four agree
    window = settle_waves(STOP_RULES.build("window", window=3), ["y", "x", "x", "x", "y", "y", "y", "y"],
                          range(8), 2, 1)
    assert (window.launched, window.waves, window.answer) == (4, 3, "x")  # may differ from the full vote ("y")


def test_settle_waves_needs_a_permutation():
    with pytest.raises(ValueError, match=r"finish_order must be a permutation of range\(3\)"):
        settle_waves(STOP_RULES.build("lossless"), ["a", "b", "c"], [0, 0, 1], 1, 1)


# ---- on the engine ------------------------------------------------------------------------------------
@pytest.mark.parametrize("first, step, fewer", [(1, 1, True), (2, 2, True), (5, 3, False), (8, 1, False)])
def test_waves_vote_equals_the_full_seeded_vote_on_the_engine(checked, first, step, fewer):
    n, seed = 8, 1
    texts = seeded_all.run(prompt=WAVES_PROMPT, branches=n, seed=seed, backend=checked).ret_value
    answers = [first_word(t) for t in texts]
    result, launched_texts = seeded_waves.run(prompt=WAVES_PROMPT, branches=n, seed=seed, first=first, step=step,
                                              backend=checked).ret_value
    assert isinstance(result, WavesVote) and isinstance(result, BranchVote)
    assert result.answer == majority_vote(answers)
    for i in result.order:  # a branch samples the same text whichever wave launched it
        assert launched_texts[i] == texts[i] and result.answers[i] == answers[i]
    # The live run decided what the replay of the full run's answers, in its finish order, decides.
    rest = [i for i in range(n) if i not in result.order]
    replay = settle_waves(STOP_RULES.build("lossless"), answers, result.order + rest, first, step)
    assert (result.launched, result.waves, result.order) == (replay.launched, replay.waves, replay.order)
    assert result.launched == len(result.forks) == len(result.answers) and result.n == n
    assert (result.launched < n) == fewer  # these seeds answer "4" six times in eight
    assert checked.stream_controls.active() == 0


def test_waves_stop_a_running_branch_and_launch_no_more_on_the_engine(checked):
    state = uneven_waves.run(prompt="The numbers are 1, 2, 3 and", long_tokens=400, backend=checked)
    result, metas, verified = state.ret_value
    assert (result.answer, result.launched, result.waves, result.settled_after) == ("same", 4, 1, 3)
    assert list(result.stopped) == [3] and "with 2 unfinished" in result.stopped[3]
    assert metas[3]["finish_reason"]["type"] == "abort" and metas[3]["completion_tokens"] < 400
    assert verified.gates["stopped"] == [3] and verified.answers == ["same", "same", "same", None]
    assert checked.stream_controls.active() == 0


def test_window_rule_with_waves_on_the_engine(checked):
    result, _ = seeded_waves.run(prompt=WAVES_PROMPT, branches=8, seed=1, first=2, step=2, rule="window",
                                 settings={"window": 2}, backend=checked).ret_value
    assert result.rule == "window" and result.settled_after is not None and result.launched < 8
    assert checked.stream_controls.active() == 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"first": 0}, ValueError, "first must be an integer >= 1"),
    ({"step": 0}, ValueError, "step must be an integer >= 1"),
    ({"first": 9}, ValueError, r"first \(9\) must not exceed n \(8\)"),
    ({"rule": "majority"}, ValueError, "unknown stop rule 'majority'"),
    ({"window": 4}, ValueError, "stop rule 'lossless'"),
    ({"seed": "1"}, TypeError, "seed must be an integer"),
])
def test_bad_waves_are_refused_before_a_branch_runs(checked, kwargs, error, message):
    @sgl.function
    def program(s):
        s += "Hello"
        vote_waves(s, 8, sgl.gen("answer", max_tokens=1), **{"seed": 0, "first": 2, **kwargs})

    with pytest.raises(error, match=message):
        program.run(backend=checked)
    assert checked.stream_controls.active() == 0  # nothing was forked or seeded


def test_waves_need_a_gen_named_var(checked):
    @sgl.function
    def program(s):
        s += "Hello"
        vote_waves(s, 8, sgl.gen("other", max_tokens=1), seed=0, first=2)

    with pytest.raises(ValueError, match=r"branches \[0, 1\] have no gen named 'answer'"):
        program.run(backend=checked)
    deadline = time.monotonic() + 60  # the first wave's one-token gens still end
    while checked.stream_controls.active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checked.stream_controls.active() == 0
