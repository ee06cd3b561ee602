"""Branch stop (``rksc_sgl.vote``): the rules, and stopping on the embedded engine.

The lossless rule is replayed over recorded branches (every finish order of a set of
answers, and random ones): the vote at its stop equals the full vote, always. On the
engine, a stopped branch's request is cancelled, its KV freed, and nothing it decoded is
left in the tree (a later lookup of its tokens hits its prompt only).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time

import pytest
import sglang as sgl

from rksc_sgl.rksc.branch_stop import STOP_RULES, BranchVote, beta_leader_probability, settle, vote
from rksc_sgl.problems import majority_vote

from branch_programs import random_answers, seeded_branches, uneven_branches, uneven_branches_verified


# ---- the rules, without a model -------------------------------------------------------------------
def _vote_at(rule, answers_in_finish_order, order):
    """What vote() answers after ``settle``: the majority of the finished branches in branch order."""
    k = settle(rule, answers_in_finish_order, len(answers_in_finish_order))
    k = len(order) if k is None else k
    finished = sorted(order[:k])
    by_branch = dict(zip(order, answers_in_finish_order))
    return majority_vote(by_branch[i] for i in finished), k


RECORDED = [  # answers of 8-branch self-consistency runs (basic_arithmetic, temperature 0.7)
    ["12", "12", "14", "12", None, "12", "10", "12"],
    ["3", "5", "5", "3", "3", "5", "3", None],
    ["-7", "-7", "-7", "-7", "-7", "-7", "-7", "-7"],
    [None, None, "9", None, "9", "1", None, None],
    ["6", "5", "6", "5", "4", "6", "5", "6"],
]


@pytest.mark.parametrize("answers", RECORDED)
def test_lossless_vote_equals_the_full_vote_in_every_finish_order(answers):
    rule = STOP_RULES.build("lossless")
    full = majority_vote(answers)
    stops = 0
    for order in itertools.islice(itertools.permutations(range(len(answers))), 0, None, 7):
        voted, k = _vote_at(rule, [answers[i] for i in order], list(order))
        assert voted == full, (order, k)
        stops += k < len(answers)
    if answers.count(full) > len(answers) / 2:
        assert stops > 0  # a clear majority does stop early


def test_lossless_vote_equals_the_full_vote_on_random_branches():
    rng = random.Random(0)
    rule = STOP_RULES.build("lossless")
    for _ in range(3000):
        answers = random_answers(rng)
        order = rng.sample(range(len(answers)), len(answers))
        voted, _ = _vote_at(rule, [answers[i] for i in order], order)
        assert voted == majority_vote(answers)


def test_lossless_stops_exactly_when_the_unfinished_cannot_catch_up():
    rule = STOP_RULES.build("lossless")
    assert settle(rule, ["x"] * 8, 8) == 5  # 5 > 0 + 3
    assert settle(rule, ["x", "y", "x", "x", "x", "x", "y", "y"], 8) == 6  # 5 > 1 + 2
    assert settle(rule, ["x", "y"] * 4, 8) is None


def test_beta_probability_is_the_beta_tail():
    for c1, c2 in [(1, 0), (3, 0), (4, 1), (6, 2), (2, 2)]:
        a, b, steps = c1 + 1, c2 + 1, 20000  # midpoint rule on the Beta(a, b) density over (1/2, 1)
        norm = math.gamma(a + b) / (math.gamma(a) * math.gamma(b))
        tail = sum(norm * x ** (a - 1) * (1 - x) ** (b - 1)
                   for x in (0.5 + (k + 0.5) * 0.5 / steps for k in range(steps))) * 0.5 / steps
        assert beta_leader_probability(c1, c2) == pytest.approx(tail, abs=1e-6)
    assert beta_leader_probability(4, 0) == 31 / 32


def test_beta_and_window_rules():
    beta = STOP_RULES.build("beta", confidence=0.95)
    assert settle(beta, ["x"] * 8, 8) == 4  # P = 31/32 after four agree
    assert settle(STOP_RULES.build("beta", confidence=0.99), ["x"] * 8, 8) == 6
    window = STOP_RULES.build("window", window=3)
    assert settle(window, ["x", "y", "y", "y", "x", "x", "x", "x"], 8) == 4
    assert settle(window, ["x", None, "x", "x", "y", "y", "x", "y"], 8) is None


@pytest.mark.parametrize("name, settings, message", [
    ("majority", {}, "unknown stop rule 'majority'; choose from beta, deepconf, lossless, window"),
    ("beta", {"confidence": 1.5}, "confidence must be a number in"),
    ("window", {"window": 1}, "window must be an integer >= 2"),
    ("lossless", {"confidence": 0.9}, "stop rule 'lossless'"),
])
def test_bad_rules_are_refused(name, settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        STOP_RULES.build(name, **settings)


# ---- on the engine ----------------------------------------------------------------------------------
def test_vote_stops_the_unfinished_branch_on_the_engine(checked):
    state = uneven_branches.run(prompt="The numbers are 1, 2, 3 and", long_tokens=400, backend=checked)
    result, metas = state.ret_value
    assert isinstance(result, BranchVote)
    assert result.answer == "same" and result.settled_after == 3 and set(result.order) == {0, 1, 2}
    assert list(result.stopped) == [3] and "lossless" in result.stopped[3]
    assert metas[3]["finish_reason"]["type"] == "abort" and metas[3]["completion_tokens"] < 400
    assert all(m["completion_tokens"] == 3 for m in metas[:3])
    assert checked.stream_controls.active() == 0


def test_vote_needs_a_backend_that_can_stop_and_a_named_gen(checked):
    @sgl.function
    def unnamed(s):
        s += "Hello"
        forks = s.fork(2)
        forks += sgl.gen("other", max_tokens=1)
        vote(forks, "answer")

    with pytest.raises(ValueError, match=r"branches \[0, 1\] have no gen named 'answer'"):
        unnamed.run(backend=checked)

    class PlainBackend:  # any backend without stop_stream/resume_stream
        pass

    fork = type("Fork", (), {"stream_executor": type("E", (), {"backend": PlainBackend()})()})()
    with pytest.raises(TypeError, match="the backend PlainBackend cannot stop or seed branches"):
        vote([fork])


def test_a_stopped_request_frees_its_kv_and_caches_only_its_prompt(checked):
    prompt = checked.encode("Count slowly: one, two, three, four, five,")
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", checked.generate_request(
        input_ids=prompt, sampling_params={"max_new_tokens": 300, "temperature": 0, "ignore_eos": True},
        stream_id="branch-under-test")))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not checked.stream_controls.active():
        time.sleep(0.01)
    time.sleep(0.5)  # let it decode a few tokens
    checked.stop_stream("branch-under-test", "test")
    worker.join(timeout=60)
    assert not worker.is_alive()
    response = out["r"]
    decoded = response["output_ids"]
    assert response["meta_info"]["finish_reason"] == {"type": "abort", "message": "branch stopped: test"}
    assert 0 < len(decoded) < 300
    # A refused next request, until resumed.
    refused = checked.generate_request(input_ids=prompt, sampling_params={"max_new_tokens": 2},
                                       stream_id="branch-under-test")
    assert refused["meta_info"]["finish_reason"]["type"] == "abort" and refused["output_ids"] == []
    checked.resume_stream("branch-under-test")
    assert checked.stream_controls.active() == 0
    checked.check_integrity()
    lookup = checked.generate_request(input_ids=prompt + decoded, sampling_params={"max_new_tokens": 1})
    assert lookup["meta_info"]["cached_tokens"] == len(prompt)


def test_verify_sees_the_stopped_branches_and_the_vote(checked):
    state = uneven_branches_verified.run(prompt="The numbers are 1, 2, 3 and", long_tokens=400, backend=checked)
    voted, checked_result = state.ret_value
    assert checked_result.gates["stopped"] == [3]
    assert checked_result.gates["vote"] == {"rule": "lossless", "answer": "same", "settled_after": 3}
    assert checked_result.answers == ["same", "same", "same", None]
    assert checked_result.scores[3] is None and all(0.0 <= p <= 1.0 for p in checked_result.scores[:3])
    assert checked_result.branch in (0, 1, 2) and checked_result.answer == "same"


def test_seeded_branches_sample_what_their_seed_gives(checked):
    prompt = "My favourite colour is"
    first = seeded_branches.run(prompt=prompt, seed=7, backend=checked).ret_value
    again = seeded_branches.run(prompt=prompt, seed=7, backend=checked).ret_value
    assert first == again and len(set(first)) > 1
    for i, text in enumerate(first):
        direct = checked.generate_request(text=prompt, sampling_params={"max_new_tokens": 8, "temperature": 1.0,
                                                                       "sampling_seed": 7 + i})
        assert direct["text"] == text
    assert checked.stream_controls.active() == 0
    with pytest.raises(TypeError, match="seed must be an integer"):
        seeded_branches.run(prompt=prompt, seed="7", backend=checked)
