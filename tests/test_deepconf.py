"""The DeepConf-style online rule (``rksc_sgl.vote(forks, "answer", rule="deepconf")``).

Hand-made traces (top-2 log-probabilities per token, chosen so that every token confidence
is a round number) are replayed through the rule and checked against a computation by hand:
the threshold the warm-up branches give, and the exact token at which each other branch is
stopped. On the engine, a branch of gibberish is stopped while it decodes, at the token the
replay of its own trace names, and the engine's integrity check passes afterwards.
"""

from __future__ import annotations


import numpy as np
import pytest
import sglang as sgl

from branch_programs import confident_and_gibberish

from rksc_sgl.rksc.branch_stop import STOP_RULES, BranchVote, DeepConfRule, rule_gen_args, settle_confidence, vote
from rksc_sgl.rksc.confidence import (first_low_group, group_confidences, lowest_group_confidence, percentile,
                                      token_confidence, token_confidences)

# A token whose top-2 log-probabilities are STEP[c] has confidence c: -(a + b) / 2 = c.
STEP = {1.0: [-1.0, -1.0], 1.5: [-0.5, -2.5], 2.0: [0.0, -4.0], 3.0: [0.0, -6.0]}


def trace(*confidences: float):
    return [STEP[c] for c in confidences]


# Six branches, window 2, top-2, warm-up 2, the 50th percentile. By hand:
#   b0  2 2 1 3    groups 2, 1.5, 2      lowest 1.5
#   b1  3 3 2 2    groups 3, 2.5, 2      lowest 2.0    -> threshold (1.5 + 2.0) / 2 = 1.75
#   b2  3 2 1 1 3  groups 2.5, 1.5 < 1.75             -> stopped at token 3
#   b3  2 2 2 1.5  groups 2, 2, 1.75 (not below)       -> counted
#   b4  1          shorter than the window: no group   -> counted
#   b5  1 1 3      group 1.0 < 1.75                     -> stopped at token 2
TRACES = [trace(2, 2, 1, 3), trace(3, 3, 2, 2), trace(3, 2, 1, 1, 3), trace(2, 2, 2, 1.5), trace(1),
          trace(1, 1, 3)]
ANSWERS = ["A", "A", "B", "B", "B", "B"]
SETTINGS = {"warmup": 2, "window": 2, "top_k": 2, "percentile": 50}


# ---- the measures ---------------------------------------------------------------------------------
def test_token_and_group_confidences_by_hand():
    assert token_confidence([-0.5, -2.5, -9.0], 2) == 1.5  # the first k only
    assert token_confidences(TRACES[0], 2) == [2.0, 2.0, 1.0, 3.0]
    assert group_confidences([2.0, 2.0, 1.0, 3.0], 2) == [2.0, 1.5, 2.0]
    assert group_confidences([2.0, 2.0, 1.0, 3.0], 5) == []
    assert lowest_group_confidence([2.0, 2.0, 1.0, 3.0], 2) == 1.5
    assert lowest_group_confidence([1.0, 2.0], 4) == 1.5  # shorter than the window: one group
    assert lowest_group_confidence([], 4) is None
    assert first_low_group([3.0, 2.0, 1.0, 1.0, 3.0], 2, 1.75) == (3, 1.5)
    assert first_low_group([3.0, 2.0, 1.0, 1.0, 3.0], 2, 1.75, start=3) == (4, 1.0)  # after token 3
    assert first_low_group([2.0, 2.0, 2.0, 1.5], 2, 1.75) is None  # strictly below


def test_percentile_interpolates_as_numpy():
    values = [4.0, 1.0, 3.0, 9.5, 2.0]
    for p in (0, 10, 25, 50, 90, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))


@pytest.mark.parametrize("call, message", [
    (lambda: token_confidence([-1.0], 2), r"a token has 1 top log-probabilities, the confidence needs 2"),
    (lambda: group_confidences([1.0], 0), "window must be an integer >= 1, got 0"),
    (lambda: percentile([], 10), "the percentile of no values"),
    (lambda: percentile([1.0], 101), r"percentile must be a number in \[0, 100\], got 101"),
])
def test_bad_measures_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- the rule, replayed -------------------------------------------------------------------------
def test_replay_sets_the_threshold_from_the_warmup_and_stops_at_the_hand_computed_token():
    replay = settle_confidence(STOP_RULES.build("deepconf", **SETTINGS), ANSWERS, TRACES, [1, 0, 3, 2, 5, 4])
    assert replay.warmup == [1, 0] and replay.threshold == 1.75
    assert replay.stopped == {2: 3, 5: 2}
    assert replay.counted == [1, 0, 3, 4]
    # Approximate: the full vote is B (4-2); without the two stopped B's it ties 2-2, and a tie
    # goes to the lowest branch's answer.
    assert replay.answer == "A"


def test_the_warmup_is_whichever_branches_finish_first():
    # b2 and b5 finish first: both lowest groups are 1.0, so the threshold is 1.0 and no
    # group of the others is below it.
    replay = settle_confidence(STOP_RULES.build("deepconf", **SETTINGS), ANSWERS, TRACES, [2, 5, 0, 1, 3, 4])
    assert (replay.warmup, replay.threshold, replay.stopped, replay.answer) == ([2, 5], 1.0, {}, "B")
    # DeepConf-low (the 90th percentile) from the first warm-up: 1.5 + 0.9 * 0.5 = 1.95.
    low = settle_confidence(STOP_RULES.build("deepconf", **{**SETTINGS, "percentile": 90}), ANSWERS, TRACES,
                            [1, 0, 3, 2, 5, 4])
    assert low.threshold == pytest.approx(1.95) and low.stopped == {2: 3, 3: 4, 5: 2}  # b3: 1.75 ends at 4


def test_a_running_branch_is_stopped_at_the_same_token_however_its_tokens_arrive():
    rule = DeepConfRule(**SETTINGS)
    assert rule.running(2, TRACES[2][:2]) is None  # warming up: nothing is stopped
    for branch in (1, 0):
        assert rule.finished(branch, TRACES[branch]) is None
    assert rule.threshold == 1.75
    why = rule.running(2, TRACES[2][2:3])  # the first two tokens were seen before the threshold
    assert why == "deepconf: group confidence 1.500 < threshold 1.750 at token 3 (window 2)"
    assert rule.stops == {2: 3} and rule.known(2) == 3
    assert rule.running(3, TRACES[3]) is None and rule.finished(3, TRACES[3]) is None  # seen: judged once
    assert rule.finished(5, TRACES[5]).endswith("at token 2 (window 2)")  # ended by itself, still left out
    assert rule.check({"A": 2}, ["A", "A"], 4) is None  # it never settles the vote as a whole


def test_a_warmup_branch_without_tokens_does_not_count_towards_the_threshold():
    rule = DeepConfRule(warmup=1, window=2, top_k=2)
    assert rule.finished(0, []) is None and rule.threshold is None
    assert rule.finished(1, trace(2, 3)) is None and rule.threshold == 2.5 and rule.warmup_branches == [1]


@pytest.mark.parametrize("settings, message", [
    ({"warmup": 0}, "warmup must be an integer >= 1, got 0"),
    ({"window": 1.5}, "window must be an integer >= 1, got 1.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
    ({"percentile": 101}, r"percentile must be a number in \[0, 100\], got 101"),
    ({"percentile": "10"}, r"percentile must be a number in \[0, 100\], got '10'"),
    ({"threshold": 3.0}, "stop rule 'deepconf': .*unexpected keyword argument 'threshold'"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        STOP_RULES.build("deepconf", **settings)


def test_the_rule_says_what_its_branches_must_return():
    assert rule_gen_args("deepconf", top_k=3) == {"return_logprob": True, "top_logprobs_num": 3}
    assert rule_gen_args("lossless") == {}


def test_replay_needs_a_trace_per_branch_and_a_permutation():
    with pytest.raises(ValueError, match="a permutation of range"):
        settle_confidence(DeepConfRule(), ANSWERS, TRACES, [0, 1])
    with pytest.raises(ValueError, match="a trace per answer"):
        settle_confidence(DeepConfRule(), ANSWERS, TRACES[:2], range(6))


# ---- on the engine ------------------------------------------------------------------------------------
def trace_of(meta):
    """A gen's top-k log-probabilities per token, from its meta_info."""
    return [[entry[0] for entry in step] for step in meta["output_top_logprobs"]]


def test_a_low_confidence_branch_is_stopped_on_the_engine(checked):
    result, metas = confident_and_gibberish.run(long_tokens=300, backend=checked).ret_value
    assert isinstance(result, BranchVote) and result.rule == "deepconf"
    assert result.answer == "counted" and result.order == [0] and result.answers == ["counted", None]
    assert list(result.stopped) == [1] and metas[1]["finish_reason"]["type"] == "abort"
    assert metas[1]["completion_tokens"] < 300
    # The token it was stopped at is the one a replay of its (partial) trace names.
    threshold = lowest_group_confidence(token_confidences(trace_of(metas[0]), 5), 4)
    token, mean = first_low_group(token_confidences(trace_of(metas[1]), 5), 4, threshold)
    assert result.stopped[1] == (f"deepconf: group confidence {mean:.3f} < threshold {threshold:.3f} "
                                 f"at token {token} (window 4)")
    assert checked.stream_controls.active() == 0
    checked.check_integrity()


def test_deepconf_needs_the_branches_top_logprobs(checked):
    @sgl.function
    def without_logprobs(s):
        s += "Hello"
        forks = s.fork(2)
        forks += sgl.gen("answer", max_tokens=2, temperature=0)
        vote(forks, "answer", rule="deepconf", warmup=1)

    with pytest.raises(ValueError, match=r"vote: branch [01] returned no top-k log-probabilities; .* needs gen\(\.\.\., "
                                         r"return_logprob=True, top_logprobs_num=k\)"):
        without_logprobs.run(backend=checked)


def test_deepconf_needs_a_backend_that_reads_tokens_while_they_run():
    class StopsButCannotRead:  # a BranchStopper without stream_top_logprobs
        def stop_stream(self, sid, reason): ...

        def resume_stream(self, sid): ...

        def seed_stream(self, sid, seed): ...

    fork = type("Fork", (), {"stream_executor": type("E", (), {"backend": StopsButCannotRead()})()})()
    with pytest.raises(TypeError, match="StopsButCannotRead cannot read its branches' tokens while they run"):
        vote([fork], "answer", rule="deepconf")
