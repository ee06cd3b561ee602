"""The deepconf rule on SGLang's runtime (one seeded server with its default cache).

SGLang's plain ``/generate`` returns a request's log-probabilities only when it ends, so
``RuntimeBackend`` posts a gen that asks for top-k log-probabilities streamed and keeps each
chunk's (cumulative) list for the vote to read while the branch decodes. Checked: the same
program as on the engine stops its gibberish branch through SGLang's abort API, at the token
the replay of the branch's own trace names, and a streamed gen returns what a plain post of
the same request returns. The server's processes are gone at the end.
"""

from __future__ import annotations

import pytest
import requests

from branch_programs import LOGPROBS, confident_and_gibberish
from processes import assert_gone, server_pids
from rksc_sgl.rksc.confidence import first_low_group, lowest_group_confidence, token_confidences
from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.launch_plan import plan_launch
from rksc_sgl.runtime.server_process import RuntimeServer, free_port
from test_deepconf import trace_of

STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("deepconf") / "server.log", "w")
    plan = plan_launch(["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
                        "--max-total-tokens", "2048"], rksc_cache=False, seeded_sampling=True)
    started = RuntimeServer(plan, startup_timeout=STARTUP_TIMEOUT_S, log=log)
    pids = set()
    try:
        started.launch()
        started.wait_ready()
        pids = server_pids(started)
        yield started
    finally:
        pids |= server_pids(started) if started.process else set()
        started.stop()
        log.close()
    assert_gone(pids)


def test_deepconf_stops_a_low_confidence_branch_on_the_runtime(server):
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    backend = RuntimeBackend(server.url)
    result, metas = confident_and_gibberish.run(long_tokens=300, backend=backend).ret_value
    assert result.rule == "deepconf" and result.order == [0] and result.answers == ["counted", None]
    assert list(result.stopped) == [1] and metas[1]["finish_reason"]["type"] == "abort"
    assert 0 < metas[1]["completion_tokens"] < 300
    threshold = lowest_group_confidence(token_confidences(trace_of(metas[0]), 5), 4)
    token, mean = first_low_group(token_confidences(trace_of(metas[1]), 5), 4, threshold)
    assert result.stopped[1] == (f"deepconf: group confidence {mean:.3f} < threshold {threshold:.3f} "
                                 f"at token {token} (window 4)")
    assert backend.stream_controls.active() == 0 and backend.stream_top_logprobs("any") is None
    # The streamed gen returned what a plain post of branch 0's request returns.
    plain = requests.post(server.url + "/generate", timeout=120, json={
        "text": "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", **LOGPROBS,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}).json()
    assert len(trace_of(plain["meta_info"])) == metas[0]["completion_tokens"] == 8
    flat = [[lp for step in trace_of(meta) for lp in step] for meta in (plain["meta_info"], metas[0])]
    assert flat[0] == pytest.approx(flat[1], abs=1e-3)
    assert backend.stats().requests >= 3  # the fork's commit and both branches, counted once each
    assert RuntimeClient(server.url).healthy()
