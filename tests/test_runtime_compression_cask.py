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

from rksc_sgl.rksc.compression_config import CompressionConfig
from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.server_process import free_port, running_server

from compression_replay import engine_continuation, replay_decisions
from processes import left_nothing

SETTINGS = {"method": "cask", "budget": 0.25, "buffer": 4, "min_tokens": 8}
CONFIG = CompressionConfig(**SETTINGS)
PROMPT = "Question: Tom has 3 apples and buys 5 more, then gives 2 away. How many apples are left?\nAnswer:"
STEPS = 40
STARTUP_TIMEOUT_S = 600  # (a loaded 2-core machine has taken over 300 s)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    argv = ["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()), "--max-total-tokens",
            "2048"]
    with open(tmp_path_factory.mktemp("cask") / "server.log", "w") as log, \
            left_nothing(running_server(argv, startup_timeout=STARTUP_TIMEOUT_S, log=log, compression=CONFIG)) as running:
        yield RuntimeClient(running.url)


def test_cask_continuation_equals_the_engines_with_the_same_decisions(client, monkeypatch):
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
    used = replay_decisions(monkeypatch, events, len(ids), CONFIG.buffer)
    assert engine_continuation(ids, SETTINGS, STEPS) == out["output_ids"]
    assert len(used) >= len(events) - 1
    # every slot free or in the tree once; the tree holds the prompt only
    report = client.idle_integrity()
    assert report["ok"], report
    again = client.generate(input_ids=ids + out["output_ids"], sampling_params={"max_new_tokens": 1, "temperature": 0})
    assert again["meta_info"]["cached_tokens"] == len(ids)
    after = client.rksc_state()["compression"]
    assert after["running_compressed"] == 0 and after["compactions"] >= len(events)
    assert torch.tensor([len(e["kept"]) for e in events]).gt(0).all()
