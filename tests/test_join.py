"""``join(mode="concate_and_append")`` by KV concatenation (rksc_sgl/kv/join.py)."""

from __future__ import annotations

import pytest
import sglang as sgl
import torch

from rksc_sgl.kv.join import JoinRegistry, concatenate, join_namespace, split_segments

PREFIX = "Write one fact about each animal.\n"
BRANCHES = ["- cats: They purr.", "- dogs: They bark loudly.", "- owls: Night birds."]
TAIL = "\nSummary:"


@sgl.function
def _facts(s, topics):
    s += PREFIX
    forks = s.fork(len(topics))
    for fork, topic in zip(forks, topics):
        fork += f"- {topic}:" + sgl.gen("fact", max_tokens=8, temperature=0, stop="\n")
    forks.join(mode="concate_and_append")
    s += TAIL + sgl.gen("summary", max_tokens=6, temperature=0)


def _finish(state):
    state.sync()
    state.stream_executor.end()
    state.stream_executor.worker.join(timeout=30)


def _joined(engine, prefix, branches):
    """Commit every branch as the interpreter does, then concatenate: (tokens, namespace)."""
    for branch in branches:
        engine.generate_request(text=prefix + branch, sampling_params={"max_new_tokens": 0})
    prefix_ids, segments = split_segments(engine.encode, prefix, branches)
    namespace = join_namespace(prefix_ids, segments)
    built = engine.scheduler.call(
        lambda: concatenate(engine.kv, prefix_ids, segments, engine.runner.rotate_keys, namespace))
    assert built
    return prefix_ids, segments, namespace


def _kv_rows(engine, token_ids, namespace, layer):
    def read():
        slots, _ = engine.kv.match(token_ids, len(token_ids), namespace)
        assert len(slots) == len(token_ids)
        return (engine.kv.kv_pool.get_key_buffer(layer)[slots].clone(),
                engine.kv.kv_pool.get_value_buffer(layer)[slots].clone())
    return engine.scheduler.call(read)


def test_program_after_join_reads_the_concatenated_kv(checked, use_backend):
    use_backend(checked)
    assert checked.support_concate_and_append
    state = _facts.run(topics=["cats", "dogs", "owls"])
    _finish(state)
    text = state.text()
    assert text.startswith(PREFIX) and text.index("- cats:") < text.index("- dogs:") < text.index("- owls:")
    assert text.index("- owls:") < text.index(TAIL)
    meta = state.get_meta_info("summary")
    # Everything before the tail came from the joined KV: only the tail was prefilled.
    assert meta["cached_tokens"] == meta["prompt_tokens"] - len(checked.encode(TAIL))
    assert len(checked.joins) == 0  # the executor ended: nothing remembered


def test_text_join_prefills_the_branches_again(checked, use_backend, monkeypatch):
    use_backend(checked)
    monkeypatch.setattr(checked, "support_concate_and_append", False)
    state = _facts.run(topics=["cats", "dogs", "owls"])
    _finish(state)
    meta = state.get_meta_info("summary")
    assert meta["cached_tokens"] < meta["prompt_tokens"] - len(checked.encode(TAIL)) - 5


def test_joined_kv_is_exact_where_it_can_be(checked):
    prefix_ids, segments, namespace = _joined(checked, PREFIX, BRANCHES)
    tokens = prefix_ids + [t for seg in segments for t in seg]
    # A plain prefill of the joined tokens is the reference (it lands in the plain tree).
    checked.generate_request(input_ids=tokens + checked.encode(TAIL), sampling_params={"max_new_tokens": 0})
    exact = len(prefix_ids) + len(segments[0])
    for layer in (0, 1, checked.kv.layout.num_layers - 1):
        k_join, v_join = _kv_rows(checked, tokens, namespace, layer)
        k_ref, v_ref = _kv_rows(checked, tokens, None, layer)
        # The prefix and the first branch: copied, bit for bit.
        assert torch.equal(k_join[:exact], k_ref[:exact]) and torch.equal(v_join[:exact], v_ref[:exact])
        if layer == 0:
            # Layer 0 depends on the token and its position only: the moved keys of the
            # later branches must be what a plain prefill puts at their new positions.
            torch.testing.assert_close(k_join, k_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v_join, v_ref, atol=1e-6, rtol=1e-6)
        else:
            # Deeper, later branches never saw the earlier ones: approximate, and it shows.
            assert (k_join[exact:] - k_ref[exact:]).abs().max() > 1e-2


def test_plain_lookup_never_returns_joined_kv(checked):
    prefix_ids, segments, namespace = _joined(checked, "Two facts.\n", ["- sun: It is hot.", "- moon: It is cold."])
    tokens = prefix_ids + [t for seg in segments for t in seg]
    extra = checked.encode(" Done")
    plain = checked.generate_request(input_ids=tokens + extra, sampling_params={"max_new_tokens": 0})
    assert plain["meta_info"]["cached_tokens"] == len(prefix_ids) + len(segments[0])
    joined = checked.generate_request(input_ids=tokens + extra, sampling_params={"max_new_tokens": 0},
                                      extra_key=namespace)
    assert joined["meta_info"]["cached_tokens"] == len(tokens) + len(extra) - 1  # all but the last token
    # Building the same join again reuses what the namespace holds.
    before = checked.scheduler.call(lambda: checked.kv.allocator.available_size())
    _joined(checked, "Two facts.\n", ["- sun: It is hot.", "- moon: It is cold."])
    assert checked.scheduler.call(lambda: checked.kv.allocator.available_size()) == before


def test_join_falls_back_when_branch_kv_is_gone(checked):
    prefix_ids, segments = split_segments(checked.encode, "Gone.\n", ["- a: one.", "- b: two."])
    checked.flush_cache()
    built = checked.scheduler.call(
        lambda: concatenate(checked.kv, prefix_ids, segments, checked.runner.rotate_keys, "ns"))
    assert built is False


def test_rotate_keys_composes_positions(checked):
    runner = checked.runner
    keys = torch.randn(5, runner.num_kv_heads, runner.head_dim)
    twice = runner.rotate_keys(runner.rotate_keys(keys, 7), 11)
    torch.testing.assert_close(twice, runner.rotate_keys(keys, 18), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.rotate_keys(keys, 0), keys)


def test_split_segments_refuses_a_token_across_the_fork_point(checked):
    prefix_ids, segments = split_segments(checked.encode, "Count:", [" one", " two"])
    assert prefix_ids == checked.encode("Count:")
    assert [prefix_ids + seg for seg in segments] == [checked.encode("Count: one"), checked.encode("Count: two")]
    # "hel" + "lo" tokenizes as one word: the branch's tokens do not start with the prefix's.
    assert split_segments(checked.encode, "hel", ["lo world"]) is None


def test_none_engine_joins_by_text(none_engine, use_backend):
    assert not none_engine.support_concate_and_append
    use_backend(none_engine)
    state = _facts.run(topics=["cats", "dogs"])
    _finish(state)
    assert state.text().startswith(PREFIX + "- cats:")
    none_engine.check_integrity()


def test_registry_forgets_ended_executors():
    import threading

    registry = JoinRegistry(max_entries=2)
    registry.record_branch("b1", "p", "x")
    registry.end("b1", None)
    assert registry.branch("b1") is None
    gate = threading.Event()
    worker = threading.Thread(target=gate.wait)
    worker.start()
    from rksc_sgl.kv.join import JoinedContext
    registry.set_context("p1", JoinedContext("t", (1,), "ns"))
    registry.end("p1", worker)  # its worker still runs queued work: keep the context
    assert registry.context("p1") is not None
    gate.set()
    worker.join()
    assert registry.context("p1") is None
    for sid in ("a", "b", "c"):
        registry.set_context(sid, JoinedContext("t", (1,), "ns"))
    assert registry.context("a") is None and len(registry) == 2  # bounded


def test_extra_key_must_be_a_string(checked):
    with pytest.raises(ValueError, match="extra_key"):
        checked.generate_request(text="Hi", sampling_params={"max_new_tokens": 1}, extra_key=["a", "b"])
