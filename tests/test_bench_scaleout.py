"""``rksc-sgl bench --backend runtime --scale-out``: the flag, the workers' and the router's
plans, and the per-worker counters, with no server (fakes stand in for SGLang's processes).

A real scaled-out run is too slow for the suite (two servers per mode here); how to run
one by hand is in docs/runtime-support.md.
"""

from __future__ import annotations

import contextlib
import functools
import shlex

import pytest

from rksc_sgl import bench, cli
from rksc_sgl.bench import MODES, BenchSettings, parse_modes
from rksc_sgl.bench.modes import parse_scale_out
from rksc_sgl.bench.stats import places_summary
from rksc_sgl.bench.tables import table_rows
from rksc_sgl.runtime import bench_servers
from rksc_sgl.runtime.endpoint import RuntimeStats, place_of


def _bench_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- the flag ---------------------------------------------------------------------------------
def test_scale_out_values_parse():
    assert parse_scale_out("single") == ("single", 1)
    assert parse_scale_out("workers:2") == ("workers", 2)
    assert parse_scale_out("dp:4") == ("dp", 4)


@pytest.mark.parametrize("args, needle", [
    (["--scale-out", "workers:2"], "scale-out workers:2 needs --backend runtime"),
    (["--scale-out", "dp:2", "--backend", "engine"], "scale-out dp:2 needs --backend runtime"),
    (["--backend", "runtime", "--scale-out", "workers"], "scale-out must be single, workers:N or dp:N"),
    (["--backend", "runtime", "--scale-out", "tp:2"], "scale-out must be single, workers:N or dp:N"),
    (["--backend", "runtime", "--scale-out", "workers:0"], "N must be a positive integer"),
    (["--backend", "runtime", "--scale-out", "dp:two"], "N must be a positive integer"),
    (["--backend", "runtime", "--router-policy", "round_robin"], "router-policy needs --scale-out workers:N"),
    (["--backend", "runtime", "--scale-out", "dp:2", "--router-policy", "random"],
     "router-policy needs --scale-out workers:N"),
    (["--backend", "runtime", "--scale-out", "workers:2", "--router-policy", "manual"], "invalid choice: 'manual'"),
    (["--backend", "runtime", "--router-args", "--cache-threshold 0.8"], "router-args needs --scale-out workers:N"),
    (["--backend", "runtime", "--scale-out", "workers:2", "--router-args", "--cache-treshold 0.8"],
     "the router does not take --router-args '--cache-treshold 0.8'"),
    (["--backend", "runtime", "--scale-out", "workers:2", "--router-args", "--cache-threshold high"],
     "the router does not take --router-args '--cache-threshold high'"),
    (["--backend", "runtime", "--scale-out", "workers:2", "--router-args", "--policy random"],
     "give the policy once"),
    (["--backend", "runtime", "--scale-out", "workers:2", "--router-args", "--worker-urls http://x:1"],
     "give the workers as worker_urls"),
])
def test_bad_scale_out_arguments_fail_with_a_clear_message(capsys, args, needle):
    err = _bench_error(capsys, *args)
    assert needle in err and "Traceback" not in err


def test_command_line_records_and_reproduces_the_scale_out():
    modes = parse_modes("radix,rksc")
    for settings in (BenchSettings(backend="runtime", scale_out="workers:3", router_policy="round_robin"),
                     BenchSettings(backend="runtime", scale_out="workers:2",
                                   router_args="--cache-threshold 0.8 --balance-abs-threshold 4"),
                     BenchSettings(backend="runtime", scale_out="dp:2")):
        line = bench.command_line("paper", modes, settings)
        assert f"--scale-out {settings.scale_out}" in line
        assert ("--router-policy round_robin" in line) == (settings.router_policy != "cache_aware")
        args = cli.build_parser().parse_args(shlex.split(line)[1:])
        assert bench.validate_args(args)[2] == settings
    assert "--scale-out" not in bench.command_line("paper", modes, BenchSettings(backend="runtime"))


# ---- the plans --------------------------------------------------------------------------------
@pytest.fixture()
def cpu_plans(monkeypatch):
    """plan_launch as on a 2-core, 1-NUMA-node CPU machine with no sgl_kernel."""
    from rksc_sgl.runtime import launch_plan

    monkeypatch.setattr(launch_plan, "_cpu_cores_by_node", lambda: [[0, 1]])
    monkeypatch.setattr(launch_plan, "plan_launch", functools.partial(
        launch_plan.plan_launch, cuda=False, sgl_kernel_installed=False, environ={}))


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_workers_get_a_core_each_a_port_each_and_a_tag(cpu_plans):
    from rksc_sgl.runtime.launch_plan import CPU_THREADS_BIND

    settings = BenchSettings(backend="runtime", scale_out="workers:3")
    plans = bench_servers.worker_plans(MODES["rksc"], settings, {}, ports=[31001, 31002, 31003], cores=[0, 1])
    assert [p.env[CPU_THREADS_BIND] for p in plans] == ["0", "1", "0"]  # worker i: core i % 2
    assert [_value(p.argv, "--port") for p in plans] == ["31001", "31002", "31003"]
    assert [_value(p.argv, "--weight-version") for p in plans] == ["w0", "w1", "w2"]
    for plan in plans:  # every worker is the mode's server
        assert _value(plan.argv, "--radix-cache-backend") == "rksc" and "--dp-size" not in plan.argv
    two = BenchSettings(backend="runtime", scale_out="workers:2", threads=2)
    assert [p.env[CPU_THREADS_BIND] for p in bench_servers.worker_plans(
        MODES["radix"], two, {}, ports=[1, 2], cores=[0, 1, 2, 3])] == ["0,1", "2,3"]
    assert bench_servers.worker_cores(2, 1, [4, 5]) == "4"
    assert bench_servers.servers_per_mode(settings) == 3


def test_dp_is_one_server_whose_plan_splits_the_cores(cpu_plans):
    from rksc_sgl.runtime.launch_plan import CPU_THREADS_BIND

    [plan] = bench_servers.worker_plans(MODES["radix"], BenchSettings(backend="runtime", scale_out="dp:2"), {},
                                        ports=[31005])
    assert _value(plan.argv, "--dp-size") == "2" and "--weight-version" not in plan.argv
    assert plan.env[CPU_THREADS_BIND] == "0|1"  # the plan's split, one core per rank
    assert bench_servers.servers_per_mode(BenchSettings(backend="runtime", scale_out="dp:2")) == 1
    [single] = bench_servers.worker_plans(MODES["radix"], BenchSettings(backend="runtime"), {}, ports=[31006],
                                          cores=[0, 1])
    assert single.env[CPU_THREADS_BIND] == "0" and "--dp-size" not in single.argv  # as before


class _FakeServer:
    """RuntimeServer's calls mode_server makes, recorded in ``events``."""

    events: list = []
    fail_on: set = set()
    size = 3 << 30

    def __init__(self, plan, log=None):
        self.plan, self.stopped = plan, False
        self.port = _value(plan.argv, "--port")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.events.append(("start", self.port))
        return self

    def launch(self):
        self.events.append(("launch", self.port))
        return self

    def wait_ready(self):
        self.events.append(("ready", self.port))
        if self.port in self.fail_on:
            raise RuntimeError(f"worker {self.port} failed")

    def memory_bytes(self):
        return self.size

    def stop(self):
        self.events.append(("stop", self.port))


class _FakeBackend:
    def __init__(self, url, worker_urls=None):
        self.url, self.worker_urls = url, (tuple(worker_urls) if worker_urls else None)
        _FakeServer.events.append(("backend", url, tuple(worker_urls or ())))

    def check_integrity(self):
        _FakeServer.events.append(("integrity", self.url))


@pytest.fixture()
def fakes(monkeypatch, cpu_plans):
    from rksc_sgl.runtime import endpoint, router, server_process

    _FakeServer.events, _FakeServer.fail_on = [], set()
    routers = []

    @contextlib.contextmanager
    def fake_router(worker_urls, argv=(), *, log=None, **plan_kwargs):
        plan = router.plan_router(worker_urls, argv, **plan_kwargs)  # the real plan, checked by the router's parser
        routers.append(plan)
        _FakeServer.events.append(("router", tuple(plan.worker_urls)))

        class Running:
            url = plan.url
        Running.plan = plan
        try:
            yield Running()
        finally:
            _FakeServer.events.append(("router stop",))

    monkeypatch.setattr(server_process, "RuntimeServer", _FakeServer)
    monkeypatch.setattr(server_process, "free_port", iter(range(31100, 31200)).__next__)
    monkeypatch.setattr(router, "running_router", fake_router)
    monkeypatch.setattr(endpoint, "RuntimeBackend", _FakeBackend)
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("M", (), {"available": 64 << 30})())
    return routers


def test_mode_server_starts_n_workers_and_a_router_in_front_and_ends_them(fakes):
    settings = BenchSettings(backend="runtime", scale_out="workers:2", router_policy="round_robin")
    with bench_servers.mode_server(MODES["rksc"], settings, {}, log=None) as (backend, command, first):
        [plan] = fakes
        assert backend.url == plan.url and backend.worker_urls == ("http://127.0.0.1:31100", "http://127.0.0.1:31101")
        assert _value(plan.argv, "--policy") == "round_robin"
        assert command.count("sglang.launch_server") == 2 and "sglang_router.launch_router" in command
        assert first.port == "31100"
    events = _FakeServer.events
    urls = ("http://127.0.0.1:31100", "http://127.0.0.1:31101")
    # the first worker alone (its size says whether the rest fit), then the rest, then the router
    assert events == [("start", "31100"), ("launch", "31101"), ("ready", "31101"), ("router", urls),
                      ("backend", plan.url, urls), ("integrity", plan.url), ("router stop",),
                      ("stop", "31100"), ("stop", "31101")]


def test_the_router_policy_defaults_to_cache_aware(fakes):
    with bench_servers.mode_server(MODES["radix"], BenchSettings(backend="runtime", scale_out="workers:2"), {},
                                   log=None):
        pass
    assert _value(fakes[0].argv, "--policy") == "cache_aware"


def test_router_args_reach_the_router_after_the_policy(fakes):
    settings = BenchSettings(backend="runtime", scale_out="workers:2", router_policy="cache_aware",
                             router_args="--cache-threshold 0.8 --balance-abs-threshold 4")
    with bench_servers.mode_server(MODES["radix"], settings, {}, log=None):
        pass
    argv = fakes[0].argv
    assert _value(argv, "--cache-threshold") == "0.8" and _value(argv, "--balance-abs-threshold") == "4"
    assert _value(argv, "--policy") == "cache_aware"


def test_a_single_or_dp_server_has_no_router(fakes):
    for scale_out in ("single", "dp:2"):
        _FakeServer.events = []
        with bench_servers.mode_server(MODES["radix"], BenchSettings(backend="runtime", scale_out=scale_out), {},
                                       log=None) as (backend, command, server):
            assert backend.worker_urls is None and backend.url == server.url
            assert ("--dp-size 2" in command) == (scale_out == "dp:2")
        assert [e[0] for e in _FakeServer.events] == ["start", "backend", "integrity", "stop"]
    assert fakes == []


def test_a_worker_that_fails_or_does_not_fit_ends_every_worker(fakes, monkeypatch):
    _FakeServer.fail_on = {"31101"}
    settings = BenchSettings(backend="runtime", scale_out="workers:3")
    with pytest.raises(RuntimeError, match="worker 31101 failed"):
        with bench_servers.mode_server(MODES["radix"], settings, {}, log=None):
            pytest.fail("no backend without every worker")
    assert sorted(e[1] for e in _FakeServer.events if e[0] == "stop") == ["31100", "31101", "31102"]
    _FakeServer.events, _FakeServer.fail_on = [], set()
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("M", (), {"available": 4 << 30})())
    with pytest.raises(RuntimeError, match=r"not enough memory .* 2 more would take about 6\.9 GiB"):
        with bench_servers.mode_server(MODES["radix"], settings, {}, log=None):
            pytest.fail("no backend without every worker")
    assert [e[0] for e in _FakeServer.events] == ["start", "stop", "stop", "stop"]  # nothing more started
    assert fakes == []


# ---- per-worker counters ----------------------------------------------------------------------
def test_each_answer_names_its_worker_and_rank():
    assert place_of({"weight_version": "w1", "dp_rank": 0}) == "w1.r0"
    assert place_of({"weight_version": "default", "dp_rank": 1}) == "r1"
    assert place_of({}) == "server"


def test_runtime_stats_count_per_place_and_subtract_per_run():
    earlier = RuntimeStats(requests=1, prefill_tokens=10, cached_tokens=0,
                           places={"w0.r0": {"requests": 1, "prompt_tokens": 10, "cached_tokens": 0}})
    now = RuntimeStats(requests=4, prefill_tokens=25, cached_tokens=45,
                       places={"w0.r0": {"requests": 3, "prompt_tokens": 70, "cached_tokens": 40},
                               "w1.r0": {"requests": 1, "prompt_tokens": 10, "cached_tokens": 5}})
    run = now.since(earlier)
    assert (run.requests, run.cached_tokens) == (3, 45)
    assert run.places == {"w0.r0": {"requests": 2, "prompt_tokens": 60, "cached_tokens": 40},
                          "w1.r0": {"requests": 1, "prompt_tokens": 10, "cached_tokens": 5}}
    idle = now.since(now)
    assert idle.places == {}  # a place with nothing in this run is left out
    assert run.as_dict()["places"] == run.places


def test_the_backend_counts_each_answer_where_it_ran():
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    backend = RuntimeBackend.__new__(RuntimeBackend)  # no server: only the counting
    import threading

    backend._lock, backend._stats = threading.Lock(), RuntimeStats()
    for meta in ({"prompt_tokens": 100, "cached_tokens": 0, "weight_version": "w0", "dp_rank": 0},
                 {"prompt_tokens": 110, "cached_tokens": 100, "weight_version": "w0", "dp_rank": 0},
                 {"prompt_tokens": 110, "cached_tokens": 0, "weight_version": "w1", "dp_rank": 0}):
        backend._count(meta)
    assert backend._stats.places == {"w0.r0": {"requests": 2, "prompt_tokens": 210, "cached_tokens": 100},
                                     "w1.r0": {"requests": 1, "prompt_tokens": 110, "cached_tokens": 0}}
    assert (backend._stats.prefill_tokens, backend._stats.cached_tokens) == (220, 100)


def test_the_run_summary_and_table_show_each_workers_hits():
    runs = [{"places": {"w1.r0": {"requests": 2, "prompt_tokens": 50, "cached_tokens": 20}}},
            {"places": {"w0.r0": {"requests": 1, "prompt_tokens": 30, "cached_tokens": 0},
                        "w1.r0": {"requests": 1, "prompt_tokens": 25, "cached_tokens": 10}}}]
    summary = places_summary(runs)
    assert list(summary) == ["w0.r0", "w1.r0"]
    assert summary["w1.r0"] == {"requests": 3, "prompt_tokens": 75, "cached_tokens": 30}
    mode = {"median_s": 1.0, "p25_s": 1.0, "p75_s": 1.0, "prefill_tokens": 1, "exact_hit_tokens": 1,
            "semantic_hit_tokens": 0, "peak_kv_tokens": None, "accuracy": 1.0, "agreement_with_radix": None,
            "cgee": False, "places": summary}
    result = {"modes": {"radix": mode}, "speedups": {},
              "config": {"settings": {"scale_out": "workers:2"}}}
    header, row = table_rows(result)
    assert header[-2:] == ("cached/prompt tok per worker (run total)", "requests per worker")
    assert row[-2:] == ("w0.r0 0/30; w1.r0 30/75", "w0.r0 1; w1.r0 3")
    single = {**result, "config": {"settings": {"scale_out": "single"}},
              "modes": {"radix": {**mode, "places": {"r0": summary["w0.r0"]}}}}
    assert len(table_rows(single)[0]) == len(header) - 2  # one server: no per-worker columns


def test_a_batch_request_through_the_router_goes_one_prompt_at_a_time(monkeypatch):
    """sglang-router 0.3.2 refuses a batch /generate (select's scoring posts one): the backend
    posts each prompt alone through a router, and a batch as it is to a server."""
    import threading

    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    from rksc_sgl.runtime.client import RuntimeClient
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    posted = []

    def post(self, s, data):
        posted.append(data)
        answer = lambda i: {"meta_info": {"prompt_tokens": 5, "cached_tokens": i, "weight_version": "w0", "dp_rank": 0}}
        key = "text" if "text" in data else "input_ids"
        return [answer(i) for i in range(len(data[key]))] if isinstance(data[key], list) and (
            key == "text" or isinstance(data[key][0], list)) else answer(3)

    monkeypatch.setattr(RuntimeEndpoint, "_generate_http_request", post)
    for router in (True, False):
        backend = RuntimeBackend.__new__(RuntimeBackend)  # no server: only the posting
        backend._lock, backend._stats = threading.Lock(), RuntimeStats()
        backend.client = RuntimeClient("http://127.0.0.1:1", worker_urls=["http://127.0.0.1:2"] if router else None)
        backend.client._router = router
        posted.clear()
        data = {"text": ["a b", "a c"], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
        obj = backend._generate_http_request(None, data)
        assert len(obj) == 2 and backend._stats.requests == 2
        if router:
            assert [d["text"] for d in posted] == ["a b", "a c"] and all(d["return_logprob"] for d in posted)
            posted.clear()
            assert len(backend._generate_http_request(None, {"input_ids": [[1, 2], [1, 3]],
                                                             "sampling_params": {}})) == 2
            assert [d["input_ids"] for d in posted] == [[1, 2], [1, 3]]
        else:
            assert posted == [data]


# ---- which servers are up while the modes run (no SGLang) ---------------------------------------
@pytest.mark.parametrize("servers, expected", [
    ("together", ["start radix", "start rsbcm", "turns radix,rsbcm", "stop rsbcm", "stop radix"]),
    ("one-at-a-time", ["start radix", "turns radix", "stop radix", "start rsbcm", "turns rsbcm", "stop rsbcm"]),
])
def test_the_servers_schedule_decides_which_servers_are_up_while_modes_run(monkeypatch, servers, expected):
    """``--servers together``: every mode's server up, the modes taking turns; ``one-at-a-time``:
    each mode's server alone through every problem, ended before the next starts."""
    import rksc_sgl.bench.runner as runner

    events = []

    class Backend:
        def __init__(self, label):
            self.label = label
            self.client = type("C", (), {"rksc_state": staticmethod(lambda: {})})()

    @contextlib.contextmanager
    def fake_mode_server(mode, settings, overrides, log, seeded=False):
        events.append(f"start {mode.label}")
        try:
            yield Backend(mode.label), f"launch {mode.label}", type("S", (), {"memory_bytes": lambda self: 1})()
        finally:
            events.append(f"stop {mode.label}")

    def fake_take_turns(workload, modes, settings, params, backends, warm, items, bar):
        assert [b.label for b in backends.values()] == [m.label for m in modes]
        events.append("turns " + ",".join(m.label for m in modes))
        return {m.label: [] for m in modes}, {m.label: [] for m in modes}

    monkeypatch.setattr(bench_servers, "mode_server", fake_mode_server)
    monkeypatch.setattr(bench_servers, "check_room", lambda *a, **k: None)
    monkeypatch.setattr(bench_servers, "server_config", lambda backend, command: {"command": command})
    monkeypatch.setattr(runner, "_take_turns", fake_take_turns)
    settings = BenchSettings(problems=1, warmup=0, backend="runtime", servers=servers,
                             params={"branches": 2, "max_tokens": 4, "prompt_tokens": 200})
    workload = bench.get_workload("paper")
    modes = parse_modes("radix,rsbcm")
    _, _, configs, _, _ = runner._run_on_runtime(workload, modes, settings, workload.resolve(settings.params),
                                                 progress=False)
    assert events == expected
    assert {label: c["command"] for label, c in configs.items()} == {"radix": "launch radix",
                                                                      "rsbcm": "launch rsbcm"}
