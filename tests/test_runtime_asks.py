"""ASKS in SGLang's own runtime (``RKSC_ASKS`` with ``--radix-cache-backend rksc``).

The first half needs no server: the plan of a recipient's rows and rounds, the settings, the
launch plan and the key rotation. The second half starts one ASKS server for the module
(about 40 s) and one embedded engine with the same ASKS settings, and checks that a
recipient's greedy tokens and token accounting equal the engine's for the same donor and
recipient, that an exact lookup afterwards sees only exact KV, and that a mixed run
(concurrent recipients, plain requests, an abort) leaves the tree intact with no lock left.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.rksc.semantic_match import SemanticMatch
from rksc_sgl.runtime.asks_plan import ASKSPlan, key_rotation, subtract_positions
from rksc_sgl.runtime.asks_settings import ENV_VAR, ASKSSettingsError, asks_config_from_env, env_value
from rksc_sgl.runtime.launch_plan import LaunchError, plan_launch
from rksc_sgl.runtime.server_process import free_port, running_server

from aborting import stream_then_abort
from processes import left_nothing

TAU, RECOMPUTE = 0.8, 0.2
STARTUP_TIMEOUT_S = 300


# ---- the plan, without a server --------------------------------------------------------------------
def _match(donor_offsets, recompute):
    slots = torch.tensor([100 + j if j is not None else -1 for j in donor_offsets])
    return SemanticMatch(node=None, start=0, length=len(donor_offsets), similarity=0.9, slots=slots,
                         recompute=recompute, donor_offsets=donor_offsets)


def test_plan_splits_the_span_into_reused_positions_and_computed_runs():
    # Exact prefix of 10. Span offsets: 0 unaligned, 1-3 in place, 4 shifted (donor offset 3),
    # 5 unaligned, 6 in place but recomputed, 7 in place. The tail starts at 18.
    match = _match([None, 1, 2, 3, 3, None, 6, 7], recompute=[0, 5, 6])
    plan = ASKSPlan.build(match, exact_len=10, shift=True)
    assert plan.in_place == {11: 1, 12: 2, 13: 3, 17: 7}  # span offsets into match.slots
    assert plan.copies == {14: (4, 1)}
    assert plan.reused_slots(11, 14).tolist() == [101, 102, 103]
    assert plan.reused == [11, 12, 13, 14, 17] and plan.reused_tokens == 5 == match.reused_tokens
    # Runs: [10], [15, 16], [18, end): three prefill passes.
    assert plan.next_computed(10) == 10 and plan.run_end(10) == 11
    assert plan.next_computed(11) == 15 and plan.run_end(15) == 17
    assert plan.next_computed(17) == 18 and plan.run_end(18) is None
    assert plan.rounds == 3


def test_plan_without_shift_computes_shifted_tokens():
    match = _match([None, 1, 2, 3, 3, None, 6, 7], recompute=[0, 5, 6])
    plan = ASKSPlan.build(match, exact_len=10, shift=False)
    assert plan.copies == {} and plan.next_computed(11) == 14 and plan.run_end(14) == 17


def test_plan_whose_reuse_all_comes_first_is_one_round():
    plan = ASKSPlan.build(_match([0, 1, 2, None], recompute=[3]), exact_len=4, shift=True)
    assert plan.next_computed(4) == 7 and plan.rounds == 1


def test_subtract_leaves_the_reused_positions_out_of_what_is_freed():
    assert subtract_positions([(10, 20)], [11, 12, 15, 19]) == [(10, 11), (13, 15), (16, 19)]
    assert subtract_positions([(10, 12), (20, 22)], [10, 11, 21]) == [(20, 21)]
    assert subtract_positions([(0, 5)], []) == [(0, 5)]


# ---- settings and the launch plan ------------------------------------------------------------------
def test_settings_come_from_the_environment_and_are_checked():
    assert not asks_config_from_env({}).active
    config = asks_config_from_env({ENV_VAR: '{"tau": 0.9, "recompute_fraction": 0.25}'})
    assert (config.enabled, config.tau, config.recompute_fraction) == (True, 0.9, 0.25)
    assert asks_config_from_env({ENV_VAR: env_value(config)}) == config
    for raw, message in (("tau=0.9", "must be a JSON object"), ('{"tua": 0.9}', "unknown setting(s) tua"),
                         ('{"tau": 0.9, "recompute_fraction": 2}', "recompute_fraction must be a number in"),
                         ('{"key_layer": 4}', "key layer 0 only")):
        with pytest.raises(ASKSSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            asks_config_from_env({ENV_VAR: raw})


def _plan(*argv, **kwargs):
    return plan_launch(["--model-path", "smollm2-135m", *argv], cuda=False, sgl_kernel_installed=False,
                       environ={}, **kwargs)


def test_launch_plan_puts_asks_in_the_schedulers_environment_and_turns_chunking_on():
    plan = _plan(asks=ASKSConfig(enabled=True, tau=0.9))
    assert asks_config_from_env(plan.env).tau == 0.9
    assert plan.argv[plan.argv.index("--chunked-prefill-size") + 1] == "4096"
    kept = _plan("--chunked-prefill-size", "512", asks=ASKSConfig(enabled=True))
    assert kept.argv.count("--chunked-prefill-size") == 1 and "512" in kept.argv
    assert ENV_VAR not in _plan().env and "--chunked-prefill-size" not in _plan().argv


@pytest.mark.parametrize("argv, kwargs, message", [
    ([], {"rksc_cache": False}, "ASKS runs in --radix-cache-backend rksc"),
    (["--page-size", "4"], {}, "ASKS needs --page-size 1"),
    (["--chunked-prefill-size", "-1"], {}, "ASKS needs chunked prefill"),
])
def test_launch_plan_refuses_what_asks_cannot_run_with(argv, kwargs, message):
    with pytest.raises(LaunchError, match=message):
        _plan(*argv, asks=ASKSConfig(enabled=True), **kwargs)


def test_launcher_flags_need_asks_tau(capsys):
    from rksc_sgl.cli import main

    assert main(["launch-server", "--model-path", "smollm2-135m", "--asks-recompute", "0.3"]) == 2
    assert "--asks-recompute and --asks-shifted need --asks-tau" in capsys.readouterr().err


# ---- key rotation --------------------------------------------------------------------------------------
class RotaryEmbedding:
    """The attributes of SGLang's ``RotaryEmbedding`` that ``key_rotation`` reads (building the
    real one on this CPU needs vLLM's kernels; the server tests below use the real one)."""

    def __init__(self, head_dim: int, base: float, neox: bool):
        self.rotary_dim, self.base, self.is_neox_style = head_dim, base, neox

    def _compute_inv_freq(self, base):
        return 1.0 / (base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim))

    def at(self, keys, positions):
        """Apply RoPE at ``positions`` (the reference)."""
        angle = positions[:, None].float() * self._compute_inv_freq(self.base)[None, :]
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        if self.is_neox_style:
            x1, x2 = keys.chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x1, x2 = keys[..., 0::2], keys[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("delta", [3, -2])
def test_rotated_keys_equal_keys_computed_at_the_new_position(neox, delta):
    rope = RotaryEmbedding(head_dim=64, base=100000.0, neox=neox)
    raw = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([7, 8, 9, 20, 31])
    moved = key_rotation(rope)(rope.at(raw, positions), delta)
    torch.testing.assert_close(moved, rope.at(raw, positions + delta), atol=1e-4, rtol=1e-4)


def test_unknown_rotary_embeddings_are_not_rotated():
    class YaRNScalingRotaryEmbedding(RotaryEmbedding):
        pass

    assert key_rotation(YaRNScalingRotaryEmbedding(64, 10000.0, True)) is None


# ---- one ASKS server, against the embedded engine ---------------------------------------------------------
PAIRS = [  # (donor, recipient): a same-length substitution, a shorter paraphrase (shifted copies), a longer one
    ("Question: Tom has 3 apples and buys 5 more. How many apples does Tom have?\nAnswer: Let's think step by step.",
     "Problem: Tom has 3 apples and buys 5 more. How many apples does Tom have?\nAnswer: Let's think step by step."),
    ("Solve this problem. Anna reads 12 pages a day for 4 days. How many pages does she read in total? Answer: She",
     "Answer this problem. Anna reads 12 pages a day for 4 days. How many pages does she read in total? Answer: She"),
    ("Please work out the following. A shop sells 7 pens for 2 dollars each. What do the pens cost? The pens",
     "Work out the following, showing each step. A shop sells 7 pens for 2 dollars each. What do the pens cost? The pens"),
]
GREEDY = {"max_new_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def asks_server(tmp_path_factory):
    argv = ["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
            "--max-total-tokens", "2048", "--radix-eviction-policy", "lru"]
    # A start-up that fails fails the tests, with the server's last lines (no retry).
    with open(tmp_path_factory.mktemp("asks") / "server.log", "w") as log, \
            left_nothing(running_server(argv, startup_timeout=STARTUP_TIMEOUT_S, log=log,
                                        asks=ASKSConfig(enabled=True, tau=TAU, recompute_fraction=RECOMPUTE))) as server:
        yield server


@pytest.fixture(scope="module")
def client(asks_server):
    from rksc_sgl.runtime.client import RuntimeClient

    return RuntimeClient(asks_server.url)


@pytest.fixture(scope="module")
def engine():
    import rksc_sgl

    eng = rksc_sgl.Engine(model="smollm2-135m", num_threads=1, kv_pool_tokens=2048, cache="rksc",
                          asks={"enabled": True, "tau": TAU, "recompute_fraction": RECOMPUTE})
    yield eng
    eng.shutdown()


def _generate(client, ids, params=GREEDY, **extra):
    import requests

    response = requests.post(client.url + "/generate", json={"input_ids": ids, "sampling_params": params, **extra},
                             timeout=120)
    response.raise_for_status()
    return response.json()


def _wait_released(client, timeout: float = 30.0) -> None:
    """The scheduler releases a request just after its last output is sent: wait (bounded)."""
    deadline = time.monotonic() + timeout
    while client.rksc_state()["asks"]["recipients_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.rksc_state()["asks"]["recipients_running"] == 0


def _asks_counters(client) -> dict:
    state = client.rksc_state()
    return {**state["cache"], **state["asks"]}


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_recipient_output_equals_the_engines_asks_output(client, engine, pair):
    donor, recipient = (engine.encode(text) for text in PAIRS[pair])
    client.flush_cache()
    assert engine.flush_cache()
    # The donor leaves its prompt in both trees (one new token: no decode KV is cached).
    _generate(client, donor, {"max_new_tokens": 1, "temperature": 0})
    engine.generate_request(input_ids=donor, sampling_params={"max_new_tokens": 1, "temperature": 0})
    before, engine_before = _asks_counters(client), engine.stats()
    out = _generate(client, recipient)
    expected = engine.generate_request(input_ids=recipient, sampling_params=GREEDY)
    after, engine_stats = _asks_counters(client), engine.stats().since(engine_before)
    assert engine_stats.semantic_tokens > 0  # the pair is one ASKS reuses
    assert out["output_ids"] == expected["output_ids"]
    assert after["semantic_hit_tokens"] - before["semantic_hit_tokens"] == engine_stats.semantic_tokens
    assert after["recomputed_tokens"] - before["recomputed_tokens"] == engine_stats.recomputed_tokens
    assert after["recipients"] - before["recipients"] == 1
    assert after["prefill_rounds"] - before["prefill_rounds"] >= 2  # the rounds really ran
    # SGLang's cached_tokens: every prompt token not computed (exact prefix + the donor's).
    exact = next(i for i, (a, b) in enumerate(zip(donor, recipient)) if a != b)
    assert out["meta_info"]["cached_tokens"] == exact + engine_stats.semantic_tokens
    assert out["meta_info"]["prompt_tokens"] - out["meta_info"]["cached_tokens"] == engine_stats.prefill_tokens
    assert client.idle_integrity()["ok"]
    engine.check_integrity()


def test_a_chat_program_prompts_the_runtime_as_it_prompts_the_engine(asks_server, client, engine):
    # The bench's paraphrase program through sgl.RuntimeEndpoint: its prompts must be the
    # engine's (the model's own chat template, not SGLang's name-based default), so the
    # same donor/recipient pair reaches both and the answers match.
    from rksc_sgl.bench import PARAPHRASES, program
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    backend = RuntimeBackend(asks_server.url)
    assert backend.chat_template.role_prefix_and_suffix == engine.chat_template.role_prefix_and_suffix
    client.flush_cache()
    assert engine.flush_cache()
    before, engine_before = backend.stats(), engine.stats()
    for instruction in PARAPHRASES[:2]:  # the second wording's prompt takes the first's KV
        texts = [program("paraphrased_question").run(question="Calculate 2 + 6.", instruction=instruction,
                                                     max_tokens=12, backend=b)["answer"] for b in (backend, engine)]
        assert texts[0] == texts[1]
    runtime, embedded = backend.stats().since(before), engine.stats().since(engine_before)
    assert runtime.semantic_tokens == embedded.semantic_tokens > 0
    assert runtime.prefill_tokens == embedded.prefill_tokens
    _wait_released(client)


def test_exact_lookup_after_an_asks_request_never_returns_donor_kv(client, engine):
    donor, recipient = (engine.encode(text) for text in PAIRS[1])
    exact = next(i for i, (a, b) in enumerate(zip(donor, recipient)) if a != b)
    client.flush_cache()
    # A request that returns logprobs is never planned: it is the exact lookup.
    cold = _generate(client, recipient, return_logprob=True)
    assert cold["meta_info"]["cached_tokens"] == 0
    client.flush_cache()
    _generate(client, donor, {"max_new_tokens": 1, "temperature": 0})
    semantic = _generate(client, recipient)
    assert semantic["meta_info"]["cached_tokens"] > exact  # served partly from the donor
    again = _generate(client, recipient, return_logprob=True)
    assert again["meta_info"]["cached_tokens"] == exact  # the recipient inserted nothing
    assert again["output_ids"] == cold["output_ids"]
    assert client.idle_integrity()["ok"]


def test_a_prefill_only_request_is_computed_exactly_and_cached(client, engine):
    # The frontend's commit before a fork (max_new_tokens 0) is never planned: it is cached
    # exactly, so the branches after it reuse the whole prompt.
    donor, recipient = (engine.encode(text) for text in PAIRS[1])
    exact = next(i for i, (a, b) in enumerate(zip(donor, recipient)) if a != b)
    client.flush_cache()
    _generate(client, donor, {"max_new_tokens": 1, "temperature": 0})
    before = _asks_counters(client)
    _generate(client, recipient, {"max_new_tokens": 0})
    assert _asks_counters(client)["recipients"] == before["recipients"]
    again = _generate(client, recipient, return_logprob=True)
    assert again["meta_info"]["cached_tokens"] > exact
    assert client.idle_integrity()["ok"]


def test_donor_stays_locked_while_its_recipient_runs(client, engine):
    donor, recipient = (engine.encode(text) for text in PAIRS[0])
    client.flush_cache()
    _generate(client, donor, {"max_new_tokens": 1, "temperature": 0})
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("out", _generate(
        client, recipient, {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True})))
    worker.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and worker.is_alive():
        state = client.rksc_state()["asks"]
        if state["recipients_running"]:
            seen = state
            break
        time.sleep(0.05)
    worker.join(timeout=180)
    assert not worker.is_alive()
    assert seen is not None and seen["donor_tokens_locked"] > 0, seen
    _wait_released(client)
    assert client.idle_integrity()["ok"]


def test_a_mixed_run_with_an_abort_leaves_the_tree_intact(client, engine):
    client.flush_cache()
    _generate(client, engine.encode(PAIRS[2][0]), {"max_new_tokens": 1, "temperature": 0})
    _generate(client, engine.encode(PAIRS[0][0]), {"max_new_tokens": 1, "temperature": 0})
    jobs = [(PAIRS[2][1], {"max_new_tokens": 16, "temperature": 0}, {}),
            (PAIRS[0][1], {"max_new_tokens": 16, "temperature": 0}, {}),
            ("The capital of France is", {"max_new_tokens": 16, "temperature": 0}, {}),
            (PAIRS[0][1] + " First,", None, {"rid": "asks-abort"})]
    results = {}

    def run(k, text, params, extra):
        ids = engine.encode(text)
        results[k] = (_generate(client, ids, params, **extra) if params is not None
                      else stream_then_abort(client, ids, extra["rid"], before_abort=8))

    workers = [threading.Thread(target=run, args=(k, *job)) for k, job in enumerate(jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=180)
    assert not any(w.is_alive() for w in workers)
    assert results[3]["meta_info"]["finish_reason"]["type"] == "abort"
    assert all(results[k]["meta_info"]["completion_tokens"] > 0 for k in range(3))
    _wait_released(client)
    report = client.idle_integrity()
    assert report["ok"], report
    assert client.healthy()  # SGLang's own strict idle memory check
