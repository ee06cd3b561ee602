"""SGLang's own server with ``--tp-size 2`` on this CPU (patches/0003 and 0004).

One server starts for the module (about 40-60 s on two idle cores), from the launcher's plan
with RKSC's defaults (``--radix-cache-backend rksc --radix-eviction-policy rsbcm``), decode-KV
compression (``--kv-compression rkv``, default settings: nothing is compressed before 48 decode
tokens) and a small pool; its greedy token ids must equal a ``transformers`` argmax loop's,
the first time and again when the prompt comes from the tree; both ranks evict, and compress,
alike. A server that does not start fails the module
with its last log lines (no retry). Its process group is ended when the module ends and the
test checks that none of its processes is left (``processes.left_nothing``).
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from rksc_sgl.rksc.compression_config import CompressionConfig
from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.compression import DECISION_LOG_VAR
from rksc_sgl.runtime.launch_plan import LaunchError, plan_launch
from rksc_sgl.runtime.plugin import EVICTION_LOG_VAR
from rksc_sgl.runtime.server_process import RuntimeServer, free_port
from compression_replay import transformers_with_entries_deleted
from processes import left_nothing
from test_runtime import argmax_loop

TP = 2
POOL = 1024
STARTUP_TIMEOUT_S = 300
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "Question: What is 15 + 27?\nAnswer: Let's think step by step.",
           "def fibonacci(n):\n"]
BIND = "SGLANG_CPU_OMP_THREADS_BIND"
COMPRESSION = CompressionConfig(method="rkv")  # --kv-compression rkv's default settings
COMPRESSED_STEPS = 80


def _bind(ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each rank its share of this process's CPUs (SGLang's
    CPU path asserts ranks <= NUMA nodes without it; patches/0004 sizes each rank's threads by it)."""
    cpus = sorted(os.sched_getaffinity(0))
    groups = [cpus[i * len(cpus) // ranks:(i + 1) * len(cpus) // ranks] or cpus[:1] for i in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in groups)


def _plan(argv: list):
    """The launcher's plan, with the thread binding where neither it nor the shell set one."""
    plan = plan_launch(["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
                        "--tp-size", str(TP), "--max-total-tokens", str(POOL), *argv], compression=COMPRESSION)
    if BIND not in plan.env and BIND not in os.environ:
        plan = dataclasses.replace(plan, env={**plan.env, BIND: _bind(TP)})
    return plan


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    evictions = tmp_path_factory.mktemp("evictions")
    try:
        plan = _plan([])
    except LaunchError as exc:
        # The launcher may refuse RSBCM's per-rank attention statistics with tp > 1 (each rank
        # sees its own heads, so the ranks' trees could evict differently): LRU then.
        if "rsbcm" not in str(exc).lower():
            raise
        plan = _plan(["--radix-eviction-policy", "lru"])
    plan = dataclasses.replace(plan, env={**plan.env, EVICTION_LOG_VAR: str(evictions),
                                          DECISION_LOG_VAR: str(evictions)})
    with open(tmp_path_factory.mktemp("tp2") / "server.log", "w") as log:
        server = RuntimeServer(plan, startup_timeout=STARTUP_TIMEOUT_S, log=log)
        started = time.monotonic()
        try:
            server.start()  # one that fails is ended before this raises
        except LaunchError as exc:  # its message ends with the server's last lines
            pytest.fail(f"--tp-size {TP} server did not start: {exc}", pytrace=False)
        server.startup_s = time.monotonic() - started
        server.evictions = evictions
        with left_nothing(server) as running:  # started: the context ends it and checks its processes are gone
            yield running


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    folder = resolve_model_dir("smollm2-135m", default_cache_dir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_the_server_runs_two_tp_ranks_with_the_rksc_cache(tp_server):
    info = RuntimeClient(tp_server.url).server_info()
    assert info["tp_size"] == TP and info["device"] == "cpu"
    state = info["internal_states"][0]
    assert state["radix_cache_backend"] == "rksc"
    argv = tp_server.plan.argv
    assert state["radix_eviction_policy"] == argv[argv.index("--radix-eviction-policy") + 1]
    schedulers = sorted(name for name in tp_server._watched.values() if "scheduler" in name)
    assert len(schedulers) == TP, tp_server._watched


def test_greedy_token_ids_equal_a_transformers_argmax_loop(tp_server, hf):
    model, tokenizer = hf
    client = RuntimeClient(tp_server.url)
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        reference = argmax_loop(model, ids, NEW_TOKENS, tokenizer.eos_token_id)
        assert client.generate(input_ids=ids, sampling_params=params)["output_ids"] == reference, prompt
        # Again: both ranks' trees now hold the prompt, and the tokens stay the same.
        again = client.generate(input_ids=ids, sampling_params=params)
        assert again["output_ids"] == reference, prompt
        assert again["meta_info"]["cached_tokens"] > 0
    report = client.idle_integrity()
    assert report["ok"], report["problems"]


def test_under_pressure_both_ranks_evict_the_same_nodes_in_the_same_order(tp_server, hf):
    """RSBCM on two ranks, each with its own heads' attention and its own clock: the pool
    (1024 slots) fills with prompts that share a prefix and diverge, and every rank's tree
    writes the nodes it evicts (``RKSC_EVICTION_LOG``); the two lists must be equal."""
    tokenizer = hf[1]
    client = RuntimeClient(tp_server.url)
    shared = "You are a careful assistant. Answer briefly and show your reasoning. " * 6
    params = {"max_new_tokens": 8, "temperature": 0}
    for i in range(8):
        batch = [tokenizer(f"{shared} Question {i}.{j}: " + " ".join(f"item{i * 7 + j * 3 + k}" for k in range(60)))[
            "input_ids"] for j in range(3)]
        client.generate(input_ids=batch, sampling_params=params)
    report = client.idle_integrity()
    assert report["ok"], report["problems"]
    logs = sorted(tp_server.evictions.glob("evictions.tp*.log"))
    assert [p.name.split(".")[1] for p in logs] == ["tp0", "tp1"], logs
    rank0, rank1 = (p.read_text().splitlines() for p in logs)
    assert len(rank0) >= 5 and rank0 == rank1


def test_both_ranks_compress_alike_and_decode_as_transformers_with_the_kept_entries(tp_server, hf):
    """``rkv`` on two ranks, each scoring with its own heads' attention and keys averaged over
    the ranks: both write the same compactions (``RKSC_COMPACTION_LOG``), and the greedy tokens
    equal ``transformers``' decode that deletes the cache entries the server dropped."""
    model, tokenizer = hf
    client = RuntimeClient(tp_server.url)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    out = client.generate(input_ids=ids, rid="tp-kvc", sampling_params={
        "max_new_tokens": COMPRESSED_STEPS, "temperature": 0, "ignore_eos": True})
    events = client.rksc_state()["compression"]["decisions"]["tp-kvc"]["events"]
    assert len(events) >= 2
    logs = sorted(tp_server.evictions.glob("compactions.tp*.log"))
    assert [p.name.split(".")[1] for p in logs] == ["tp0", "tp1"], logs
    rank0, rank1 = ([line for line in p.read_text().splitlines() if line.startswith("tp-kvc ")] for p in logs)
    assert rank0 == rank1 == [f"tp-kvc {e['decoded']} {e['kept']}" for e in events]
    tokens, replayed = transformers_with_entries_deleted(model, ids, events, COMPRESSED_STEPS, COMPRESSION)
    assert replayed == len(events) and tokens == out["output_ids"]
    report = client.idle_integrity()
    assert report["ok"], report["problems"]
