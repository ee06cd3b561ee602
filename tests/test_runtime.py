"""SGLang's own server runtime on this CPU, with the stock cache and with RKSC's.

Three servers start once for the module, one after another (about 90 s): ``stock`` is SGLang's
server exactly as a user gets it with no cache flag (``rksc_cache=False``); ``rksc`` is
started from the README's plain SGLang command (so every flag there is exercised), with a
small KV pool. Every wait is bounded; each server's process group is ended at the end of
the module and the test checks that none of its processes is left.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import sglang as sgl
import torch

from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.launch_plan import LaunchError, plan_launch
from rksc_sgl.runtime.server_process import RuntimeServer, free_port
from aborting import stream_then_abort
from branch_programs import hinted_branches
from processes import left_nothing

ROOT = Path(__file__).resolve().parents[1]
RKSC_POOL = 1536
STARTUP_TIMEOUT_S = 300
PROMPTS = ["The capital of France is", "Question: What is 15 + 27?\nAnswer: Let's think step by step.",
           "def fibonacci(n):\n"]
NEW_TOKENS = 16


def readme_runtime_flags() -> list:
    """The flags of the README's plain SGLang command (after ``--model-path MODEL``)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- runtime-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "sglang.launch_server"], words[:3]
    rest = words[3:]
    at = rest.index("--model-path")
    return rest[:at] + rest[at + 2:]


def _server(tmp_path_factory, name: str, argv: list, **plan_kwargs) -> RuntimeServer:
    log = open(tmp_path_factory.mktemp(name) / "server.log", "w")
    plan = plan_launch(["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
                        *argv], **plan_kwargs)
    return RuntimeServer(plan, startup_timeout=STARTUP_TIMEOUT_S, log=log)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = {
        "stock": _server(tmp_path_factory, "stock", ["--max-total-tokens", "4096"], rksc_cache=False),
        "rksc": _server(tmp_path_factory, "rksc", [*readme_runtime_flags(), "--max-total-tokens", str(RKSC_POOL)]),
        # The control: the same RSBCM, without the attention hook; it also honours sampling seeds.
        "no_stats": _server(tmp_path_factory, "no_stats", ["--max-total-tokens", str(RKSC_POOL)],
                            attention_stats=False, seeded_sampling=True),
    }
    with contextlib.ExitStack() as stack:
        # Side by side; a start-up that fails fails the tests with the server's last lines (no
        # retry: a flaky start must show). An earlier silent scheduler death here was the
        # server watch taking a scheduler's short-lived fork for the scheduler (fixed).
        for server in started.values():
            stack.enter_context(server.log)  # closed last, after its server has ended
            stack.callback(server.stop)  # ended whatever happens while the others start
            server.launch()
        for server in started.values():
            server.wait_ready()
            # Ready: its processes are seen now and at the end; on leaving it is ended and checked gone.
            stack.enter_context(left_nothing(server))
        yield started


@pytest.fixture(scope="module")
def stock(servers):
    return RuntimeClient(servers["stock"].url)


@pytest.fixture(scope="module")
def rksc(servers):
    return RuntimeClient(servers["rksc"].url)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    folder = resolve_model_dir("smollm2-135m", default_cache_dir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def argmax_loop(model, ids: list, steps: int, eos: int) -> list:
    """Greedy decoding by hand: the argmax of each step's logits, stopping after EOS."""
    out, past, step_ids = [], None, torch.tensor([ids])
    for _ in range(steps):
        result = model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        step_ids = torch.tensor([[token]])
    return out


# ---- the launch plan (no server) ---------------------------------------------------------------
def _plan(*argv, **kwargs):
    return plan_launch(["--model-path", "smollm2-135m", *argv], cuda=False, sgl_kernel_installed=False,
                       environ={}, **kwargs)


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_plan_adds_the_rksc_cache_and_the_cpu_defaults():
    plan = _plan()
    assert _value(plan.argv, "--radix-cache-backend") == "rksc"
    assert _value(plan.argv, "--radix-eviction-policy") == "rsbcm"
    hooks = json.loads(_value(plan.argv, "--forward-hooks"))
    assert [h["hook_factory"] for h in hooks] == ["rksc_sgl.runtime.attention_stats:attention_hook"]
    assert hooks[0]["config"] == {"layer_stride": 4}
    assert _value(plan.argv, "--dtype") == "float32" and _value(plan.argv, "--max-total-tokens") == "16384"
    assert "--sleep-on-idle" in plan.argv
    assert plan.env["SGLANG_USE_CPU_ENGINE"] == "1" and plan.env["PYTHONPATH"].endswith("cpu_site")
    assert Path(_value(plan.argv, "--model-path")).joinpath("config.json").is_file()  # the alias, resolved


def test_plan_keeps_what_the_user_said():
    plan = _plan("--dtype", "bfloat16", "--max-total-tokens", "999", "--radix-eviction-policy", "lfu",
                 "--radix-cache-backend", "rksc", "--radix-eviction-policy-config", '{"attention_layer_stride": 2}')
    assert plan.argv.count("--dtype") == 1 and _value(plan.argv, "--dtype") == "bfloat16"
    assert _value(plan.argv, "--max-total-tokens") == "999"
    assert _value(plan.argv, "--radix-eviction-policy") == "lfu" and "--forward-hooks" not in plan.argv
    stride2 = _plan("--radix-eviction-policy-config", '{"attention_layer_stride": 2}')
    assert '"layer_stride":2' in _value(stride2.argv, "--forward-hooks")
    assert "--radix-cache-backend" not in _plan("--disable-radix-cache").argv
    stock = _plan(rksc_cache=False)
    assert "--radix-cache-backend" not in stock.argv and "--radix-eviction-policy" not in stock.argv
    assert "--forward-hooks" not in _plan(attention_stats=False).argv


def test_plan_merges_the_users_own_forward_hooks():
    mine = '[{"name": "mine", "target_modules": ["model.norm"], "hook_factory": "x:y"}]'
    hooks = json.loads(_value(_plan("--forward-hooks", mine).argv, "--forward-hooks"))
    assert [h["name"] for h in hooks] == ["mine", "rksc_attention"]


def test_plan_on_a_gpu_machine_with_sgl_kernel_adds_no_cpu_setting():
    plan = plan_launch(["--model-path", "smollm2-135m"], cuda=True, sgl_kernel_installed=True, environ={})
    assert plan.env == {}
    assert "--dtype" not in plan.argv and "--sleep-on-idle" not in plan.argv
    assert _value(plan.argv, "--radix-cache-backend") == "rksc"


def test_plan_turns_seeded_sampling_on_and_checks_the_sampler():
    plan = _plan(seeded_sampling=True)
    assert plan.env["RKSC_SEEDED_SAMPLING"] == "1" and "--sampling-backend" not in plan.argv  # CPU: pytorch
    gpu = plan_launch(["--model-path", "smollm2-135m"], cuda=True, sgl_kernel_installed=True, environ={},
                      seeded_sampling=True)
    assert _value(gpu.argv, "--sampling-backend") == "pytorch"
    with pytest.raises(LaunchError, match="pytorch sampler; it cannot run with --sampling-backend flashinfer"):
        _plan("--sampling-backend", "flashinfer", seeded_sampling=True)
    assert "RKSC_SEEDED_SAMPLING" not in _plan().env
    inherit = dict(cuda=False, sgl_kernel_installed=False)
    inherited = plan_launch(["--model-path", "smollm2-135m"], environ={"RKSC_SEEDED_SAMPLING": "1"}, **inherit)
    assert "RKSC_SEEDED_SAMPLING" not in inherited.env and any("from the environment" in a for a in inherited.added)
    off = plan_launch(["--model-path", "smollm2-135m"], environ={"RKSC_SEEDED_SAMPLING": "1"},
                      seeded_sampling=False, **inherit)
    assert off.env["RKSC_SEEDED_SAMPLING"] == "0"
    with pytest.raises(LaunchError, match="RKSC_SEEDED_SAMPLING='maybe': expected 1/on/true"):
        plan_launch(["--model-path", "smollm2-135m"], environ={"RKSC_SEEDED_SAMPLING": "maybe"}, **inherit)


# ---- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["stock", "rksc"])
def test_greedy_token_ids_equal_a_transformers_argmax_loop(servers, hf, which):
    model, tokenizer = hf
    client = RuntimeClient(servers[which].url)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        reference = argmax_loop(model, ids, NEW_TOKENS, tokenizer.eos_token_id)
        got = client.generate(input_ids=ids, sampling_params={"max_new_tokens": NEW_TOKENS, "temperature": 0})
        assert got["output_ids"] == reference, prompt
        # Again: now the prompt is served from the tree, and the tokens stay the same.
        again = client.generate(input_ids=ids, sampling_params={"max_new_tokens": NEW_TOKENS, "temperature": 0})
        assert again["output_ids"] == reference
        assert again["meta_info"]["cached_tokens"] > 0


def _run_fork_program(url: str) -> list:
    backend = sgl.RuntimeEndpoint(url)
    backend.flush_cache()
    out: list = []
    state = hinted_branches.run(question="A farmer has 17 sheep and buys 25 more. How many sheep now?",
                                hints=["First, ", "Let's add: ", "Count: "], out=out, max_tokens=12, backend=backend)
    state.sync()
    second: list = []  # the same program again on a warm cache
    hinted_branches.run(question="A farmer has 17 sheep and buys 25 more. How many sheep now?",
                        hints=["First, ", "Let's add: ", "Count: "], out=second, max_tokens=12, backend=backend).sync()
    return out + second


def test_fork_program_gives_identical_texts_and_cached_tokens_on_stock_and_rksc(servers):
    on_stock = _run_fork_program(servers["stock"].url)
    on_rksc = _run_fork_program(servers["rksc"].url)
    assert on_rksc == on_stock
    assert all(cached > 0 for _, cached in on_stock[3:]), on_stock  # the warm run really hit the tree


@sgl.function
def _committed_fork(s, prompt):
    s += prompt
    s.sync()
    forks = s.fork(2)  # the interpreter commits the prompt as one prefill-only request
    forks += sgl.gen("x", max_tokens=2)
    forks.join()


def test_a_forks_prefill_only_commit_is_counted(servers, hf):
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    prompt = "Question: A farmer has 17 sheep and buys 25 more. How many sheep does the farmer have now?\n"
    backend = RuntimeBackend(servers["stock"].url)
    assert backend.flush_cache()
    before = backend.stats()
    _committed_fork.run(prompt=prompt, backend=backend).sync()
    done = backend.stats()
    assert done.requests - before.requests == 3  # the commit and the two branches
    # the commit computed the whole prompt (the branches then hit it): counted, as on the engine
    assert done.prefill_tokens - before.prefill_tokens >= len(hf[1](prompt).input_ids)
    assert done.cached_tokens - before.cached_tokens >= 2 * (len(hf[1](prompt).input_ids) - 1)


# ---- what the servers say about themselves -----------------------------------------------
def test_server_info_names_backend_and_policy(stock, rksc):
    mine, theirs = rksc.scheduler_state(), stock.scheduler_state()
    assert (mine["radix_cache_backend"], mine["radix_eviction_policy"]) == ("rksc", "rsbcm")
    assert theirs["radix_cache_backend"] is None and "rksc" not in theirs
    info = mine["rksc"]
    assert (info["backend"], info["eviction_policy"]) == ("rksc", "rsbcm")
    stats = info["attention"]
    assert stats["passes"] + stats["skipped_passes"] > 0 and stats["seconds"] >= 0
    assert stats["watch_free"] == RKSC_POOL // 2  # RSBCM's default: collect above half the pool in use
    hooks = rksc.server_info()["forward_hooks"]
    assert [h["hook_factory"] for h in hooks] == ["rksc_sgl.runtime.attention_stats:attention_hook"]
    assert rksc.server_info()["radix_eviction_policy_config"] == {"attention_layer_stride": 4}


# ---- eviction with attention statistics ----------------------------------------------------
def _prompt(word: str, tokenizer, length: int) -> list:
    ids = tokenizer(f"{word}: " + " ".join([word.lower()] * length))["input_ids"]
    return ids[:length]


@pytest.mark.parametrize("which, kept", [("rksc", "A"), ("no_stats", "B")])
def test_small_pool_keeps_serving_and_keeps_the_attended_node(servers, hf, which, kept):
    """A and B are root children alike in depth and branches; B is more recent (LRU would
    evict A) but A's tokens received far more attention (32 decode steps against one
    prefill query), so RSBCM with the hook's statistics evicts B when C needs room. The
    control server runs the same RSBCM without the hook: it evicts A, as recency says.
    F, older than both, first fills more than half the pool, so the hook collects (RSBCM's
    ``collect_above_usage`` 0.5) while A decodes; C needs F's room and one node's more."""
    _, tokenizer = hf
    rksc = RuntimeClient(servers[which].url)
    rksc.flush_cache()
    filler = _prompt("Foxtrot", tokenizer, RKSC_POOL // 2 + 40)
    rksc.generate(input_ids=filler, sampling_params={"max_new_tokens": 1, "temperature": 0})
    a, b = _prompt("Alpha", tokenizer, 200), _prompt("Bravo", tokenizer, 200)
    rksc.generate(input_ids=a, sampling_params={"max_new_tokens": 32, "temperature": 0, "ignore_eos": True})
    rksc.generate(input_ids=b, sampling_params={"max_new_tokens": 1, "temperature": 0})
    report = rksc.idle_integrity()
    assert report["ok"], report
    free = report["slots"]["free"]
    evicted_before = rksc.rksc_state()["cache"]["evicted_tokens"]
    c = _prompt("Charlie", tokenizer, free + len(filler) + 40)  # F and one more node must go
    rksc.generate(input_ids=c, sampling_params={"max_new_tokens": 1, "temperature": 0})
    assert rksc.rksc_state()["cache"]["evicted_tokens"] > evicted_before
    first, second = (a, b) if kept == "A" else (b, a)
    kept_one = rksc.generate(input_ids=first, sampling_params={"max_new_tokens": 1, "temperature": 0})
    assert kept_one["meta_info"]["cached_tokens"] == len(first) - 1  # all but the token it must compute
    evicted = rksc.generate(input_ids=second, sampling_params={"max_new_tokens": 1, "temperature": 0})
    assert evicted["meta_info"]["cached_tokens"] == 0
    report = rksc.idle_integrity()
    assert report["ok"], report


# ---- faults: a client that goes away, an aborted request -------------------------------------
def test_disconnected_and_aborted_requests_free_their_kv_and_locks(rksc, hf):
    rksc.flush_cache()
    body = {"text": "Tell me a long story about a dragon.",
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}, "stream": True}
    with requests.post(rksc.url + "/generate", json=body, stream=True, timeout=60) as response:
        chunks = response.iter_lines()
        for _ in range(3):
            next(chunks)
    # Closed mid-stream: SGLang aborts the request when it sees the disconnect.
    stream_then_abort(rksc, hf[1].encode("Write a poem about the moon."), "to-abort")
    report = rksc.idle_integrity()
    assert report["ok"], report
    assert rksc.healthy()  # SGLang's own idle memory check (strict by default) would have killed it


# ---- branch stop (rksc_sgl.vote) through SGLang's abort API ------------------------------------
@pytest.mark.parametrize("rid, caches_output", [("rksc-branch-test-0", False), ("an-ordinary-abort", True)])
def test_an_aborted_branch_caches_only_its_prompt_and_other_aborts_stay_stock(rksc, hf, rid, caches_output):
    rksc.flush_cache()
    prompt = hf[1].encode(f"Request {rid}: list the planets of the solar system, slowly.")
    decoded = stream_then_abort(rksc, prompt, rid)["output_ids"]
    lookup = rksc.generate(input_ids=prompt + decoded, sampling_params={"max_new_tokens": 1, "temperature": 0})
    cached = lookup["meta_info"]["cached_tokens"]
    assert cached == len(prompt) if not caches_output else cached > len(prompt)
    report = rksc.idle_integrity()
    assert report["ok"], report


def test_vote_stops_branches_through_sglangs_abort_api(servers, rksc):
    from branch_programs import uneven_branches

    from rksc_sgl.runtime.endpoint import RuntimeBackend

    rksc.flush_cache()
    backend = RuntimeBackend(servers["rksc"].url)
    state = uneven_branches.run(prompt="The numbers are 1, 2, 3 and", long_tokens=400, backend=backend)
    result, metas = state.ret_value
    assert result.answer == "same" and result.settled_after == 3 and list(result.stopped) == [3]
    assert metas[3]["finish_reason"]["type"] == "abort" and metas[3]["completion_tokens"] < 400
    assert all(m["completion_tokens"] == 3 for m in metas[:3])
    assert backend.stream_controls.active() == 0
    report = rksc.idle_integrity()
    assert report["ok"], report
    assert rksc.healthy()


def test_serve_window_on_the_runtime_counts_faults_and_leaves_it_healthy(servers, rksc, hf):
    # One window of the bench's serve workload through SGLang's HTTP API: programs with
    # lossless branch stop and best-of-N verification, a client that goes away mid-stream,
    # requests with bad sampling parameters (SGLang refuses them with a 4xx).
    from rksc_sgl.bench import WORKLOADS
    from rksc_sgl.rksc.cgee import AuditLog, CGEEConfig
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    serve = WORKLOADS["serve"]
    params = serve.resolve({"programs": 2, "clients": 2, "branches": 3, "max_tokens": 8,
                            "disconnect_share": 0.5, "malformed_share": 1.0})
    item = serve.items(hf[1], params, seed=1000, count=1)[0]
    outcome = serve.run(RuntimeBackend(servers["rksc"].url), item, params, CGEEConfig(), AuditLog(), stop="lossless")
    assert outcome.extra["errors"] == {"disconnected": 1, "malformed_refused": 2, "malformed_accepted": 0,
                                       "program_failed": 0}
    assert outcome.extra["integrity_error"] is None and len(outcome.extra["program_answers"]) == 2
    report = rksc.idle_integrity()
    assert report["ok"], report
    assert rksc.healthy()


# ---- per-request sampling seeds (--seeded-sampling on) -------------------------------------------
def test_a_seeded_server_samples_a_seed_the_same_alone_and_in_any_batch(servers):
    client = RuntimeClient(servers["no_stats"].url)
    prompt = "Once upon a time"

    def params(seed):
        return {"max_new_tokens": 16, "temperature": 1.0, "sampling_seed": seed}

    alone = client.generate(prompt, sampling_params=params(7))["output_ids"]
    assert client.generate(prompt, sampling_params=params(7))["output_ids"] == alone
    batch = client.generate([prompt, "The capital of France is", prompt],
                            sampling_params=[params(9), params(3), params(7)])
    assert batch[2]["output_ids"] == alone
    assert batch[0]["output_ids"] != alone  # another seed, another sample
    # A greedy and a top-p request in the batch: stock SGLang then sends every row through its
    # sorted sampler, whose noise follows token ranks, not ids; the plugin keeps each row's draw.
    mixed = client.generate([prompt, "The capital of France is", prompt, "Two plus two"],
                            sampling_params=[params(7), {"max_new_tokens": 16, "temperature": 0},
                                             params(9), {**params(3), "top_p": 0.8}])
    assert mixed[0]["output_ids"] == alone and mixed[2]["output_ids"] == batch[0]["output_ids"]
    refused = requests.post(servers["no_stats"].url + "/generate", timeout=60, json={
        "text": prompt, "sampling_params": {"max_new_tokens": 2, "temperature": 1.0, "min_p": 0.1}})
    assert refused.status_code == 400 and "min_p > 0 cannot be sampled with per-request seeds" in refused.text
    assert client.healthy()


def test_seed_branches_reproduce_a_programs_branches_on_a_seeded_server(servers):
    from branch_programs import seeded_branches

    from rksc_sgl.runtime.endpoint import RuntimeBackend

    backend = RuntimeBackend(servers["no_stats"].url)
    first = seeded_branches.run(prompt="A list of fruits:", seed=11, backend=backend).ret_value
    again = seeded_branches.run(prompt="A list of fruits:", seed=11, backend=backend).ret_value
    other = seeded_branches.run(prompt="A list of fruits:", seed=500, backend=backend).ret_value
    assert first == again and len(set(first)) > 1  # each branch its own seed, each seed the same sample
    assert other != first


# ---- waves (rksc_sgl.vote_waves) on a seeded server ----------------------------------------------
def test_waves_vote_equals_the_full_seeded_vote_on_a_seeded_server(servers):
    from branch_programs import WAVES_PROMPT, first_word, seeded_all, seeded_waves

    from rksc_sgl.problems import majority_vote
    from rksc_sgl.rksc.branch_stop import STOP_RULES, settle_waves
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    backend = RuntimeBackend(servers["no_stats"].url)
    texts = seeded_all.run(prompt=WAVES_PROMPT, branches=8, seed=1, backend=backend).ret_value
    answers = [first_word(t) for t in texts]
    result, launched_texts = seeded_waves.run(prompt=WAVES_PROMPT, branches=8, seed=1, first=2, step=2,
                                              backend=backend).ret_value
    assert result.answer == majority_vote(answers)
    assert all(launched_texts[i] == texts[i] for i in result.order)  # the same sample in whichever wave
    rest = [i for i in range(8) if i not in result.order]
    replay = settle_waves(STOP_RULES.build("lossless"), answers, result.order + rest, 2, 2)
    assert (result.launched, result.waves, result.order) == (replay.launched, replay.waves, replay.order)
    assert backend.stream_controls.active() == 0
    assert RuntimeClient(servers["no_stats"].url).healthy()


# ---- configurations that must fail, fast and cleanly -----------------------------------------
def _launch_cli(capsys, *args: str):
    """``rksc-sgl launch-server ARGS`` in this process: (exit status, stderr)."""
    from rksc_sgl.cli import main

    code = main(["launch-server", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--rksc-cache", "off", "--radix-eviction-policy", "rsbcm"],
     "--radix-eviction-policy rsbcm needs --radix-cache-backend rksc; it cannot run with SGLang's default cache"),
    (["--radix-cache-backend", "rksc", "--enable-hierarchical-cache"],
     "--radix-cache-backend rksc does not support --enable-hierarchical-cache"),
    (["--radix-eviction-policy-config", '{"w_depth": -1}'], "rsbcm: w_depth must be >= 0.0, got -1"),
    (["--radix-cache-backend", "rksc", "--disable-radix-cache"], "--disable-radix-cache turns the radix cache off"),
])
def test_rejected_configuration_exits_at_once_with_one_message(capsys, flags, message):
    code, stderr = _launch_cli(capsys, "--model-path", "smollm2-135m", *flags)
    assert code == 2
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr


def test_unknown_model_is_refused_before_anything_starts(capsys):
    code, stderr = _launch_cli(capsys, "--model-path", "org/not-a-local-model")
    assert code == 2
    assert "not a local folder and not a packaged model" in stderr


def test_a_scheduler_that_dies_ends_the_launch_and_leaves_no_process(tmp_path, tmp_path_factory):
    """Weights SGLang cannot read: the scheduler dies while loading; the launcher must not hang."""
    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    folder = resolve_model_dir("smollm2-135m", default_cache_dir())
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in folder.iterdir():
        if item.suffix != ".safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    plan = plan_launch(["--model-path", str(broken), "--port", str(free_port())])
    with open(tmp_path / "server.log", "w") as log, \
            left_nothing(RuntimeServer(plan, startup_timeout=STARTUP_TIMEOUT_S, log=log).launch()) as server:
        with pytest.raises(LaunchError, match="failed during start-up"):
            server.wait_ready()


def test_port_in_use_is_refused(servers):
    plan = plan_launch(["--model-path", "smollm2-135m", "--port", str(servers["stock"].plan.port)])
    with pytest.raises(LaunchError, match="already in use"):
        RuntimeServer(plan).start()


# ---- the programs, unchanged, against the server ------------------------------------------------
@pytest.mark.parametrize("program", sorted(p.name for p in (ROOT / "programs").glob("*.py")))
def test_every_program_runs_unchanged_against_the_server(servers, capsys, monkeypatch, program):
    import runpy

    monkeypatch.setattr(sys, "argv", [program, "--endpoint", servers["rksc"].url, "--problems", "1",
                                      "--branches", "2", "--max-tokens", "16"])
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "programs" / program), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "accuracy:" in out and "server statistics (cache=rksc):" in out, out
    requests_line = next(line for line in out.splitlines() if line.strip().startswith("requests:"))
    assert int(requests_line.split(":")[1]) > 0


# ---- rksc-sgl bench --backend runtime ---------------------------------------------------------------
def _scheduler_cpu_percent(url: str, seconds: float = 2.0) -> float:
    """CPU use of the SGLang scheduler behind ``url`` (the server process's busiest child)."""
    port = int(url.rsplit(":", 1)[1])
    owner = next(c.pid for c in psutil.net_connections("tcp")
                 if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN)
    children = psutil.Process(owner).children(recursive=True)
    for child in children:
        child.cpu_percent(None)
    time.sleep(seconds)
    return max(child.cpu_percent(None) for child in children)


def test_runtime_bench_runs_each_mode_as_a_server_on_the_same_problems(tmp_path, monkeypatch):
    """Every mode's server up together (``one-at-a-time`` differs only in which servers are up
    when: ``test_bench_scaleout.py`` checks that schedule without SGLang)."""
    import rksc_sgl.bench.runner as runner
    from rksc_sgl.bench import BenchSettings, run_bench, save

    calls, firsts, idle_cpu = [], [], []
    real_run_once, real_take_turns = runner.run_once, runner._take_turns

    def recording_run_once(backend, *args, **kwargs):
        calls.append(backend.base_url)
        return real_run_once(backend, *args, **kwargs)

    def take_turns(workload, modes, settings, params, backends, *rest):
        # the servers of the modes taking turns are up before their first run; the idle ones sleep
        idle_cpu.extend(_scheduler_cpu_percent(b.base_url) for b in backends.values())
        firsts.append([backends[m.label].base_url for m in modes])
        return real_take_turns(workload, modes, settings, params, backends, *rest)

    monkeypatch.setattr(runner, "run_once", recording_run_once)
    monkeypatch.setattr(runner, "_take_turns", take_turns)
    settings = BenchSettings(problems=2, warmup=0, backend="runtime", servers="together",
                             params={"branches": 2, "max_tokens": 4, "prompt_tokens": 200})
    result = run_bench("paper", "radix-stock,rsbcm", settings, progress=False)
    configs = result["engine_configs"]
    assert configs["radix-stock"]["radix_cache_backend"] == "radix-stock"
    assert (configs["rsbcm"]["radix_cache_backend"], configs["rsbcm"]["radix_eviction_policy"]) == ("rksc", "rsbcm")
    stock, mine = result["runs"]["radix-stock"], result["runs"]["rsbcm"]
    # The rksc backend with ASKS off: SGLang's stock results (the hits of a later problem can
    # differ by how its branches' arrivals fell into batches, which is timing).
    assert [r["outputs"] for r in mine] == [r["outputs"] for r in stock]
    assert mine[0]["cached_tokens"] == stock[0]["cached_tokens"] > 0
    assert result["modes"]["rsbcm"]["peak_kv_tokens"] is None  # the runtime reports none
    [[first, second]] = firsts  # the modes take turns, the first of each problem rotating, as on the engine
    assert calls == [first, second, second, first], (calls, firsts)
    assert len(idle_cpu) == 2 and max(idle_cpu) < 50, idle_cpu  # --sleep-on-idle: no core spent polling
    paths = save(result, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["bench_runtime_paper.json", "bench_runtime_paper.md",
                                                       "bench_runtime_paper.png"]


def test_runtime_bench_refuses_asks_above_layer_0_before_starting_anything():
    from rksc_sgl.bench import BenchSettings, run_bench

    with pytest.raises(ValueError, match="keys ASKS above layer 0, which SGLang's runtime cannot"):
        run_bench("paper", "radix,asks@0.9:L4", BenchSettings(problems=1, backend="runtime"), progress=False)


def test_servers_together_refuse_what_memory_cannot_hold():
    from rksc_sgl.runtime.bench_servers import check_room

    gib = 1 << 30
    check_room(0, 1000 * gib, available_bytes=1)  # nothing more to start
    check_room(3, gib, available_bytes=4 * gib)  # 3 x 1 GiB and the margin fit
    with pytest.raises(RuntimeError, match=r"3 more would take about 5\.2 GiB \(1\.5 GiB each\), and 4\.0 GiB is "
                                           r"available; run them one after another with --servers one-at-a-time"):
        check_room(3, int(1.5 * gib), available_bytes=4 * gib)


def test_a_servers_memory_counts_its_processes(servers):
    size = servers["stock"].memory_bytes()
    assert 256 << 20 < size < 16 << 30, size  # the model, its KV pool and three Python processes


def test_runtime_modes_map_to_sglang_flags():
    from rksc_sgl.bench import MODES, BenchSettings
    from rksc_sgl.runtime.bench_servers import server_flags

    settings = BenchSettings(backend="runtime", server_args="--schedule-policy lpm")
    flags = {name: server_flags(MODES[name], settings, {"kv_pool_tokens": 777}, 1234)
             for name in ("none", "radix", "radix-stock", "rksc", "asks", "lfu")}
    assert "--disable-radix-cache" in flags["none"][0]
    assert "--radix-cache-backend" not in flags["radix"][0] and flags["radix"][1] == {"rksc_cache": False,
                                                                                      "seeded_sampling": False}
    assert server_flags(MODES["radix"], settings, {}, 1234, seeded=True)[1]["seeded_sampling"] is True
    assert _value(flags["radix-stock"][0], "--radix-cache-backend") == "radix-stock"
    assert _value(flags["rksc"][0], "--radix-eviction-policy") == "rsbcm" and flags["rksc"][1]["rksc_cache"]
    assert _value(flags["lfu"][0], "--radix-eviction-policy") == "lfu"
    assert _value(flags["asks"][0], "--radix-eviction-policy") == "lru"
    for name in ("rksc", "asks"):  # ASKS with the run's settings, through plan_launch's RKSC_ASKS
        asks = flags[name][1]["asks"]
        assert (asks.tau, asks.recompute_fraction) == (settings.asks_tau, settings.asks_recompute)
    assert "asks" not in flags["radix"][1]
    for argv, _ in flags.values():
        assert _value(argv, "--max-total-tokens") == "777" and argv[-2:] == ["--schedule-policy", "lpm"]
        assert "--sleep-on-idle" in argv  # the servers of a run are up at once, taking turns


# ---- the deepconf rule reads a running branch's log-probabilities (streamed) ---------------------
def test_deepconf_stops_a_low_confidence_branch_on_the_runtime(servers):
    """SGLang's plain /generate returns log-probabilities only when a request ends, so
    RuntimeBackend posts a gen that asks for top-k log-probabilities streamed and keeps each
    chunk's list for the vote to read while the branch decodes: the same program as on the
    engine stops its gibberish branch through SGLang's abort API, at the token the replay of
    the branch's own trace names, and the streamed gen returns what a plain post returns
    (the seeded server)."""
    from branch_programs import LOGPROBS, confident_and_gibberish
    from rksc_sgl.rksc.confidence import first_low_group, lowest_group_confidence, token_confidences
    from rksc_sgl.runtime.endpoint import RuntimeBackend
    from test_deepconf import trace_of

    server = servers["no_stats"]
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
