"""Decode-KV compression in the bench (issue #37, throughput): compressed modes
(``radix+rkv@0.25``), their servers' ``RKSC_COMPRESSION``, the ``long-branches`` workload's
peak-running poller, its summary and its table. In-process: no SGLang server is started (the
poller reads a stub ``/v1/loads``); one short run on embedded engines at the end."""

from __future__ import annotations

import functools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rksc_sgl import cli
from rksc_sgl.bench import BenchSettings, WORKLOADS, parse_modes
from rksc_sgl.bench.longbranch import RunningPoller, base_label, compression_counters, compression_summary
from rksc_sgl.bench.tables import compression_rows, markdown_report
from rksc_sgl.rksc.compression_config import CompressionConfig


# ---- modes -------------------------------------------------------------------------------------------
def test_a_compressed_mode_is_its_base_mode_plus_method_and_budget():
    radix, rkv, asks, default = parse_modes("radix,radix+rkv@0.25,asks@0.9:L4+recent@0.5,rksc+rkv")
    assert (rkv.name, rkv.kv_method, rkv.kv_budget, rkv.label, rkv.base_label) == \
        ("radix", "rkv", 0.25, "radix+rkv@0.25", "radix")
    assert (asks.label, asks.base_label, asks.tau, asks.key_layer) == ("asks@0.9:L4+recent@0.5", "asks@0.9:L4", 0.9, 4)
    assert default.label == "rksc+rkv@0.16"  # no budget: CompressionConfig's
    settings = BenchSettings()
    assert rkv.engine_kwargs(settings) == {"cache": "radix", "compression": {"method": "rkv", "budget": 0.25}}
    assert "compression" not in radix.engine_kwargs(settings) and radix.compression_config() is None
    assert rkv.compression_config() == CompressionConfig(method="rkv", budget=0.25)
    assert [base_label(m.label) for m in (radix, rkv, asks)] == ["radix", "radix", "asks@0.9:L4"]


@pytest.mark.parametrize("spec, message", [
    ("radix+zip@0.2", "mode 'radix\\+zip@0.2': compression method 'zip'; choose one of"),
    ("radix+rkv@1.5", "compression budget must be a number in \\[0, 1\\], got 1.5"),
    ("radix+rkv@0", "compression budget must be > 0"),
    ("radix+rkv@half", "mode 'radix\\+rkv@half': budget 'half' is not a number"),
    ("radix+rkv@0.25,radix+rkv@0.250", "mode 'radix\\+rkv@0.25' is given twice"),
    ("nope+rkv@0.25", "unknown mode 'nope'"),
])
def test_a_bad_compressed_mode_is_refused_naming_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_modes(spec)


# ---- the runtime's servers -------------------------------------------------------------------------
def _plan(spec, monkeypatch):
    from rksc_sgl.runtime import bench_servers, launch_plan

    monkeypatch.setattr(launch_plan, "plan_launch", functools.partial(
        launch_plan.plan_launch, cuda=False, sgl_kernel_installed=True, environ={}))
    [plan] = bench_servers.worker_plans(parse_modes(spec)[0], BenchSettings(backend="runtime"), {},
                                        ports=[31000], cores=[0])
    return plan


def test_a_compressed_modes_server_gets_rksc_compression_in_the_rksc_tree(monkeypatch):
    from rksc_sgl.runtime.compression_settings import ENV_VAR, env_value

    plan = _plan("radix+rkv@0.25", monkeypatch)
    assert plan.env[ENV_VAR] == env_value(CompressionConfig(method="rkv", budget=0.25))
    argv = plan.argv
    assert argv[argv.index("--radix-cache-backend") + 1] == "rksc"
    assert argv[argv.index("--radix-eviction-policy") + 1] == "lru"
    assert "rksc_attention" in argv[argv.index("--forward-hooks") + 1]  # rkv scores by attention
    recent = _plan("radix+recent@0.5", monkeypatch)
    assert json.loads(recent.env[ENV_VAR])["method"] == "recent" and "--forward-hooks" not in recent.argv
    rksc = _plan("rksc+rkv@0.5", monkeypatch)  # its own tree and eviction
    assert rksc.argv[rksc.argv.index("--radix-eviction-policy") + 1] == "rsbcm" and ENV_VAR in rksc.env
    plain = _plan("radix", monkeypatch)
    assert ENV_VAR not in plain.env and "--radix-cache-backend" not in plain.argv


def test_the_runtimes_methods_are_read_when_the_server_is_planned(monkeypatch):
    """The bench keeps no list of its own: a method the runtime adds is taken at once."""
    from rksc_sgl.runtime import compression_settings
    from rksc_sgl.runtime.bench_servers import server_flags

    mode, settings = parse_modes("radix+cask@0.2")[0], BenchSettings(backend="runtime")
    monkeypatch.setattr(compression_settings, "RUNTIME_METHODS", ("rkv",))
    with pytest.raises(ValueError, match="does not run compression method 'cask'; it runs rkv"):
        server_flags(mode, settings, {}, 0)
    monkeypatch.setattr(compression_settings, "RUNTIME_METHODS", ("rkv", "cask"))
    _, plan_kwargs = server_flags(mode, settings, {}, 0)
    assert plan_kwargs["compression"] == CompressionConfig(method="cask", budget=0.2)


@pytest.mark.parametrize("spec, message", [
    ("none+rkv@0.25", "compression runs with the radix cache on, and mode 'none' turns it off"),
    ("radix-stock+rkv@0.25", "compression runs in --radix-cache-backend rksc, and mode 'radix-stock' uses radix-stock"),
])
def test_the_runtime_refuses_compression_without_its_tree(spec, message):
    from rksc_sgl.runtime.bench_servers import server_flags

    with pytest.raises(ValueError, match=message):
        server_flags(parse_modes(spec)[0], BenchSettings(backend="runtime"), {}, 0)


def test_the_command_line_takes_compressed_modes_and_refuses_before_starting(capsys):
    from rksc_sgl.bench.cli import validate_args

    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--workload", "long-branches", "--modes", "radix,radix+rkv@0.25",
                              "--backend", "runtime", "--max-tokens", "64"])
    workloads, modes, settings = validate_args(args)
    assert [m.label for m in modes] == ["radix", "radix+rkv@0.25"] and workloads[0].name == "long-branches"
    with pytest.raises(SystemExit):
        cli.main(["bench", "--workload", "long-branches", "--modes", "radix,none+rkv@0.25", "--backend", "runtime"])
    assert "mode 'none' turns it off" in capsys.readouterr().err


# ---- the peak of running requests ----------------------------------------------------------------------
class _Loads(BaseHTTPRequestHandler):
    """A stub ``/v1/loads``: each read answers the next of ``script`` (two DP ranks), the last one
    again once it runs out."""

    script = [[1, 0], [3, 2], [2, 1]]
    reads = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        assert self.path == "/v1/loads?include=core"
        cls = type(self)
        running = cls.script[min(cls.reads, len(cls.script) - 1)]
        cls.reads += 1
        body = json.dumps({"loads": [{"dp_rank": r, "num_running_reqs": n, "num_waiting_reqs": 1,
                                      "num_used_tokens": 100 * n} for r, n in enumerate(running)]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def loads_url():
    _Loads.reads = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Loads)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_the_poller_keeps_the_peaks_summed_over_ranks(loads_url):
    poller = RunningPoller([loads_url])
    for _ in range(4):
        poller.sample()
    assert poller.record() == {"peak_running": 5, "peak_waiting": 2, "peak_used_tokens": 500, "load_samples": 4,
                               "load_sample_failures": 0}


def test_the_poller_thread_samples_while_the_block_runs_and_ends_with_it(loads_url):
    import time

    with RunningPoller([loads_url], interval=0.01) as poller:
        deadline = time.monotonic() + 10
        while poller.samples < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert poller.samples >= 3 and poller.record()["peak_running"] == 5
    assert not poller._thread.is_alive()
    reads = _Loads.reads
    time.sleep(0.05)
    assert _Loads.reads == reads  # nothing reads after the block


def test_a_failed_read_is_counted_and_an_engine_is_not_polled():
    with RunningPoller(["http://127.0.0.1:9"], interval=0.01, timeout=0.5) as poller:
        import time

        deadline = time.monotonic() + 10
        while poller.failures < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert poller.failures >= 1 and poller.record()["peak_running"] is None
    with RunningPoller([]) as idle:
        pass
    assert idle._thread is None and idle.record()["load_samples"] == 0


def test_compression_counters_sum_the_schedulers_and_are_none_without_compression():
    class Client:
        def __init__(self, states):
            self.states = states

        def rksc_states(self):
            return self.states

    class Backend:
        def __init__(self, states):
            self.client = Client(states)

    on = {"compactions": 3, "dropped_tokens": 40, "compressed_requests": 2, "decisions": {}}
    assert compression_counters(Backend([{"compression": on}, {"compression": dict(on, compactions=1)}])) == \
        {"compactions": 4, "dropped_tokens": 80, "compressed_requests": 4}
    assert compression_counters(Backend([{"compression": None}, None])) is None
    assert compression_counters(object()) is None  # an embedded engine


# ---- the summary and its table ---------------------------------------------------------------------------
def _run(problem, time_s, peak, answers, texts, *, prefill=300, cached=900, decode=2048, kv=None, repeat=0):
    record = {"problem": problem, "repeat": repeat, "time_s": time_s, "programs_run": 2, "prefill_tokens": prefill,
              "cached_tokens": cached, "semantic_tokens": 0, "decode_tokens": decode, "peak_running": peak,
              "peak_waiting": 6 - peak, "peak_used_tokens": 900, "load_samples": 40,
              "branch_answers": answers, "program_answers": answers[:2], "outputs": texts}
    record.update(kv or {"compactions": None, "dropped_tokens": None, "compressed_requests": None})
    return record


def _result():
    kv = {"compactions": 30, "dropped_tokens": 1200, "compressed_requests": 8}
    runs = {
        "radix": [_run(0, 40.0, 2, ["1", "2", "3", None], ["a", "b", "c", "d"]),
                  _run(1, 60.0, 3, ["4", "5", "6", "7"], ["e", "f", "g", "h"])],
        "radix+rkv@0.25": [_run(0, 20.0, 4, ["1", "9", "3", None], ["a", "x", "c", "y"], kv=kv),
                           _run(1, 40.0, 5, ["4", "5", "6", "8"], ["e", "f", "z", "w"], kv=kv)],
    }
    modes = {label: {"per_problem_s": [r["time_s"] for r in records]} for label, records in runs.items()}
    return {"runs": runs, "modes": modes, "compression": compression_summary(runs, modes, bootstrap=200, seed=0)}


def test_the_summary_compares_each_compressed_mode_with_its_uncompressed_one():
    summary = _result()["compression"]
    radix, rkv = summary["radix"], summary["radix+rkv@0.25"]
    assert radix["base"] is None and radix["vs_base"] is None and rkv["base"] == "radix"
    assert radix["programs_per_s"] == 4 / 100.0 and rkv["programs_per_s"] == 4 / 60.0
    assert (radix["peak_running"], radix["peak_running_median"], rkv["peak_running"], rkv["peak_running_median"]) == \
        (3, 2.5, 5, 4.5)
    assert (rkv["prompt_tokens"], rkv["computed_prompt_tokens"], rkv["cached_prompt_tokens"]) == (2400, 600, 1800)
    assert (rkv["decode_tokens"], rkv["compactions"], rkv["dropped_tokens"], radix["compactions"]) == (4096, 60, 2400, None)
    vs = rkv["vs_base"]
    assert vs["throughput_ratio"] == 50.0 / 30.0 and vs["peak_running_ratio"] == 4.5 / 2.5
    assert {k: vs["branch_answers"][k] for k in ("k", "n", "share")} == {"k": 6, "n": 8, "share": 0.75}
    assert {k: vs["program_answers"][k] for k in ("k", "n")} == {"k": 3, "n": 4}  # the first two of each run
    assert {k: vs["identical_texts"][k] for k in ("k", "n")} == {"k": 4, "n": 8}
    lo, hi = vs["branch_answers"]["ci95"]
    assert lo < 0.75 < hi


def test_the_table_shows_the_measured_numbers():
    result = _result()
    rows = compression_rows(result)
    assert rows[0][:5] == ("mode", "programs/s", "x uncompressed [95% CI]", "peak running (median)", "x peak running")
    assert rows[1] == ("radix", "0.0400", "reference", "3 (2.5)", "reference", "4096", "2400", "600", "1800", "-", "-",
                       "reference", "reference", "reference")
    rkv = rows[2]
    assert rkv[0] == "radix+rkv@0.25" and rkv[1] == "0.0667" and rkv[2].startswith("1.67 [")
    assert rkv[3:11] == ("5 (4.5)", "1.80", "4096", "2400", "600", "1800", "60", "2400")
    assert rkv[11].startswith("6/8 0.75 [") and rkv[12].startswith("3/4 0.75 [") and rkv[13].startswith("4/8 0.50 [")


# ---- the workload -------------------------------------------------------------------------------------------
def test_the_workload_puts_its_branches_on_a_pool_below_their_working_set():
    from rksc_sgl.bench.runner import _tokenizer

    workload = WORKLOADS["long-branches"]
    params = workload.resolve({"max_tokens": 128}, "runtime")
    assert params["fork_commit"] == 1 and workload.flush_between_problems
    tokenizer = _tokenizer("smollm2-135m")
    items = workload.items(tokenizer, params, 0, 2)
    assert items[0].inputs["block"] != items[1].inputs["block"]  # a few-shot block per problem
    need = workload.working_set(params, items, tokenizer)
    pool = workload.engine_overrides(tokenizer, params, items)["kv_pool_tokens"]
    longest = max(n for it in items for n in it.inputs["prompt_tokens"])
    assert longest + 128 < pool < need  # one branch fits, not all of them


def test_a_short_run_on_engines_reports_compression_against_radix(tmp_path):
    """The whole path on embedded engines (no server): the compressed mode drops tokens, the
    report has the table; nothing about speed is asserted."""
    from rksc_sgl.bench import run_bench, save

    settings = BenchSettings(problems=1, warmup=0, bootstrap=50,
                             params={"programs": 1, "branches": 2, "max_tokens": 72, "prompt_tokens": 120})
    result = run_bench("long-branches", "radix,radix+rkv@0.25", settings, progress=False)
    summary = result["compression"]
    decoded = summary["radix"]["decode_tokens"]  # the engine counts a branch's first token as prefill's
    assert decoded == summary["radix+rkv@0.25"]["decode_tokens"] and 2 * 71 <= decoded <= 2 * 72
    assert summary["radix"]["peak_running"] is None  # the engine has no /v1/loads
    assert summary["radix+rkv@0.25"]["vs_base"]["branch_answers"]["n"] == 2
    assert result["runs"]["radix+rkv@0.25"][0]["dropped_tokens"] > 0
    save(result, tmp_path)
    assert "x uncompressed" in (tmp_path / "bench_long-branches.md").read_text()
