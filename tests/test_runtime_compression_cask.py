"""``cask`` on SGLang's runtime, live: one server (started once for this module; the other
compression tests share ``tests/test_runtime_compression.py``'s ``rkv`` server, whose method is
fixed at start-up by ``RKSC_COMPRESSION``).

A greedy 40-token generation compresses several times and merges dropped tokens into kept
ones; the embedded engine, given the runtime's own decisions (kept and merged original
positions, read from ``/server_info``), continues with the same tokens; after it every slot is
free or in the tree once, and the tree holds nothing past the prompt. The runtime's
decisions and merges against the engine's for the same inputs are checked without a server in
``tests/test_runtime_compression.py``.
"""

from __future__ import annotations

import pytest
import torch

from rksc_sgl.rksc import compression as compression_module
from rksc_sgl.rksc.compression_config import CompressionConfig
from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.launch_plan import plan_launch
from rksc_sgl.runtime.server_process import RuntimeServer, free_port

from processes import assert_gone, server_pids

SETTINGS = {"method": "cask", "budget": 0.25, "buffer": 4, "min_tokens": 8}
CONFIG = CompressionConfig(**SETTINGS)
PROMPT = "Question: Tom has 3 apples and buys 5 more, then gives 2 away. How many apples are left?\nAnswer:"
STEPS = 40
STARTUP_TIMEOUT_S = 600  # (a loaded 2-core machine has taken over 300 s)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("cask") / "server.log", "w")
    launch = plan_launch(["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
                          "--max-total-tokens", "2048"], compression=CONFIG)
    running = RuntimeServer(launch, startup_timeout=STARTUP_TIMEOUT_S, log=log)
    pids = set()
    try:
        running.start()
        pids = server_pids(running)
        yield RuntimeClient(running.url)
    finally:
        pids |= server_pids(running) if running.process else set()
        running.stop()
        log.close()
    assert_gone(pids)


def _candidates(events, k, prompt):
    """Original positions of event ``k``'s candidates (the kept ones of the event before, then
    the run up to ``buffer`` before the newest token)."""
    before = events[k - 1] if k else {"decoded": CONFIG.buffer, "kept": []}
    return before["kept"] + list(range(prompt + before["decoded"] - CONFIG.buffer,
                                       prompt + events[k]["decoded"] - CONFIG.buffer))


def test_cask_continuation_equals_the_engines_with_the_same_decisions(client, monkeypatch):
    import rksc_sgl
    from transformers import AutoTokenizer

    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m", default_cache_dir()),
                                              local_files_only=True)
    ids = tokenizer(PROMPT)["input_ids"]
    client.flush_cache()
    out = client.generate(input_ids=ids, rid="cask-greedy",
                          sampling_params={"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True})
    state = client.rksc_state()["compression"]
    assert state["settings"]["method"] == "cask"
    events = state["decisions"]["cask-greedy"]["events"]
    assert len(events) >= 3 and sum(len(e["merged"]) for e in events) > 0
    used = []

    def replay(config, importance, keys, keep_count):
        k = len(used)
        if k == len(events):  # (after the last forward: no effect on the tokens)
            return compression_module.Plan(list(range(importance.shape[0] - keep_count, importance.shape[0])))
        origins = _candidates(events, k, len(ids))
        assert len(origins) == importance.shape[0] and keep_count == len(events[k]["kept"])
        used.append(k)
        index = {o: i for i, o in enumerate(origins)}
        kept = set(events[k]["kept"])
        return compression_module.Plan([i for i, o in enumerate(origins) if o in kept],
                                       [(index[d], index[t]) for d, t in events[k]["merged"]])

    monkeypatch.setattr(compression_module, "plan", replay)
    engine = rksc_sgl.Engine(model="smollm2-135m", cache="radix", num_threads=1, device="cpu", kv_pool_tokens=1024,
                             max_running_requests=2, compression=SETTINGS)
    try:
        got = engine.generate_request(input_ids=ids, sampling_params={"max_new_tokens": STEPS, "temperature": 0,
                                                                      "ignore_eos": True})
        engine.check_integrity()
    finally:
        engine.shutdown()
    assert len(used) >= len(events) - 1
    assert got["output_ids"] == out["output_ids"]
    # every slot free or in the tree once; the tree holds the prompt only
    report = client.idle_integrity()
    assert report["ok"], report
    again = client.generate(input_ids=ids + out["output_ids"], sampling_params={"max_new_tokens": 1, "temperature": 0})
    assert again["meta_info"]["cached_tokens"] == len(ids)
    after = client.rksc_state()["compression"]
    assert after["running_compressed"] == 0 and after["compactions"] >= len(events)
    assert torch.tensor([len(e["kept"]) for e in events]).gt(0).all()
