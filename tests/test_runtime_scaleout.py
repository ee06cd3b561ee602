"""Scale-out on SGLang's runtime: ``--dp-size 2`` and SGLang's router in front of two workers.

The module starts, side by side (80-160 s here): two servers, ``dp2`` from the plan
``rksc-sgl launch-server --dp-size 2`` runs (two schedulers, each with its own RKSC tree) and
``w1``, one rksc scheduler, both honouring sampling seeds; and two routers, ``cache_aware``
(the router's default policy) and ``round_robin``, each in front of both servers: two
workers, three trees. The dp-2 server is
one of the router's workers because a third server would not fit beside them here (about
3 GB each, 2 cores): the router sees two servers either way, and its tests cover the
aggregation over servers and over DP ranks at once.

Every wait is bounded; a process that fails to start fails the module with its last lines
(no retry); every process group is ended at the end and the module checks that none of
its processes is left.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from rksc_sgl.runtime.client import RuntimeClient, _combined
from rksc_sgl.runtime.endpoint import UNKNOWN, RuntimeBackend
from rksc_sgl.runtime import launch_plan
from rksc_sgl.runtime.launch_plan import CPU_THREADS_BIND, LaunchError, plan_launch, split_cores
from rksc_sgl.runtime.router import RuntimeRouter, plan_router
from rksc_sgl.runtime.server_process import RuntimeServer, free_port
from branch_programs import hinted_branches
from processes import assert_gone, server_pids

ROOT = Path(__file__).resolve().parents[1]
POOL = 4096
STARTUP_TIMEOUT_S = 300
ROUTER_TIMEOUT_S = 90
# Health checks send a one-token request to each worker's scheduler; one every 10 minutes
# keeps them out of the per-worker counters these tests compare.
ROUTER_TEST_FLAGS = ["--health-check-interval-secs", "600", "--worker-startup-check-interval", "1"]


# ---- the launch plan: CPU cores for each rank (no server) ----------------------------------------
def _plan(*argv, cores=((0, 1),), environ=None, monkeypatch):
    monkeypatch.setattr(launch_plan, "_cpu_cores_by_node", lambda: [list(n) for n in cores])
    return plan_launch(["--model-path", "smollm2-135m", *argv], cuda=False, sgl_kernel_installed=False,
                       environ=environ or {})


def test_plan_splits_the_cores_among_dp_ranks_on_a_cpu(monkeypatch):
    plan = _plan("--dp-size", "2", monkeypatch=monkeypatch)
    assert plan.env[CPU_THREADS_BIND] == "0|1"
    assert any(a.startswith(f"{CPU_THREADS_BIND}=0|1  (CPU: 2 ranks, 1 NUMA node(s)") for a in plan.added)
    assert "--max-total-tokens" in plan.argv  # SGLang cannot size a rank's pool once the cores are given
    wide = _plan("--dp-size", "3", cores=((0, 1, 2, 3), (4, 5, 6, 7)), monkeypatch=monkeypatch)
    assert wide.env[CPU_THREADS_BIND] == "0,1,2|3,4,5|6,7"
    shared = _plan("--dp-size", "3", monkeypatch=monkeypatch)
    assert shared.env[CPU_THREADS_BIND] == "0|1|0"
    assert any("3 ranks on 2 cores: ranks share cores" in a for a in shared.added)
    # DP attention keeps the DP ranks inside the TP group's processes.
    assert _plan("--dp-size", "2", "--tp-size", "2", "--enable-dp-attention",
                 monkeypatch=monkeypatch).env[CPU_THREADS_BIND] == "0|1"


def test_plan_leaves_the_cores_to_sglang_when_it_can_place_the_ranks(monkeypatch):
    assert CPU_THREADS_BIND not in _plan(monkeypatch=monkeypatch).env  # one rank
    assert CPU_THREADS_BIND not in _plan("--dp-size", "2", cores=((0, 1), (2, 3)), monkeypatch=monkeypatch).env
    mine = _plan("--dp-size", "2", environ={CPU_THREADS_BIND: "1|0"}, monkeypatch=monkeypatch)
    assert CPU_THREADS_BIND not in mine.env and not any(CPU_THREADS_BIND in a for a in mine.added)
    gpu = plan_launch(["--model-path", "smollm2-135m", "--dp-size", "2"], cuda=True, sgl_kernel_installed=True,
                      environ={})
    assert CPU_THREADS_BIND not in gpu.env
    with pytest.raises(LaunchError, match="--base-gpu-id/--gpu-id-step: set SGLANG_CPU_OMP_THREADS_BIND yourself"):
        _plan("--dp-size", "2", "--base-gpu-id", "1", monkeypatch=monkeypatch)


def test_split_cores_gives_every_rank_cores():
    assert split_cores(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    assert split_cores(4, [0, 1]) == [[0], [1], [0], [1]]
    with pytest.raises(ValueError):
        split_cores(0, [0])


def test_sglang_accepts_the_planned_cores_for_every_rank(monkeypatch):
    from sglang.srt.utils import numa_utils

    value = plan_launch(["--model-path", "smollm2-135m", "--dp-size", "2"], cuda=False,
                        sgl_kernel_installed=False, environ={}).env.get(CPU_THREADS_BIND)
    if value is None:
        pytest.skip("this machine has a NUMA node per rank: SGLang places them itself")
    monkeypatch.setenv(CPU_THREADS_BIND, value)
    assert [numa_utils.init_threads_binding(numa_index=r, world_size=2) for r in range(2)] == value.split("|")


# ---- the router's plan and the client's combined report (no server) -------------------------------
def test_router_plan_adds_a_port_of_its_own_and_a_patient_health_check():
    plan = plan_router(["http://127.0.0.1:1/", "http://127.0.0.1:2"], policy="round_robin")
    argv = plan.argv
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--worker-urls") + 1:] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert argv[argv.index("--prometheus-port") + 1] != "29000"
    assert argv[argv.index("--health-check-timeout-secs") + 1] == "60"
    mine = plan_router(["http://127.0.0.1:1"], ["--prometheus-port", "1234", "--port", "4321"])
    assert mine.argv.count("--prometheus-port") == 1 and mine.port == 4321
    with pytest.raises(SystemExit):
        plan_router(["http://127.0.0.1:1"], ["--policy", "nearest"])  # the router's own parser says why


def test_integrity_reports_of_several_schedulers_combine():
    good = {"checked": True, "ok": True, "problems": [], "slots": {"total": 8, "free": 6, "tree": 2}}
    bad = {"checked": True, "ok": False, "problems": ["slots lost"], "slots": {"total": 8, "free": 5, "tree": 2}}
    both = _combined([{"url": "a", "dp_rank": 0, **good}, {"url": "a", "dp_rank": 1, **bad}])
    assert both["ok"] is False and both["problems"] == ["[a DP rank 1] slots lost"]
    assert both["slots"] == {"total": 16, "free": 11, "tree": 4} and len(both["schedulers"]) == 2
    busy = _combined([{"url": "a", "dp_rank": 0, **good}, {"url": "a", "dp_rank": 1, "checked": False, "ok": None,
                                                           "problems": []}])
    assert busy["checked"] is False and busy["ok"] is None
    one = _combined([{"url": "a", "dp_rank": 0, **bad}])
    assert one["problems"] == ["slots lost"]  # one scheduler: its report as before


def test_a_router_whose_workers_never_answer_fails_with_its_last_lines():
    dead = f"http://127.0.0.1:{free_port()}"
    router = RuntimeRouter(plan_router([dead], ROUTER_TEST_FLAGS), startup_timeout=5, log=open("/dev/null", "w"))
    with pytest.raises(LaunchError, match=rf"(?s)not ready after 5 s \(workers not yet listed healthy: {dead}\)"
                                          r".*(last router output|no router output)"):
        router.start()
    pids = server_pids(router)
    assert router.process.poll() is not None
    assert_gone(pids)


@dataclasses.dataclass
class StandIn:
    """A launch plan whose server is a Python snippet (``code``) on ``port``."""

    port: int
    code: str
    host: str = "127.0.0.1"
    env: dict = dataclasses.field(default_factory=dict)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def command(self):
        return [sys.executable, "-c", self.code]


def test_a_server_whose_port_is_taken_fails_at_once_with_the_bind_error(tmp_path):
    port = free_port()
    line = f"ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {port})"
    # uvicorn's message, then up until ended, as SGLang's launcher stays
    plan = StandIn(port, f"import time; print({line!r}, flush=True); time.sleep(120)")
    server = RuntimeServer(plan, startup_timeout=60, log=open(tmp_path / "log", "w"))
    started = time.monotonic()
    with pytest.raises(LaunchError, match="could not bind port .*Errno 98"):
        server.start()
    assert time.monotonic() - started < 30
    pids = server_pids(server)
    assert_gone(pids)


def test_free_port_never_hands_out_a_port_twice_whatever_seeds_random():
    state = random.getstate()
    try:
        random.seed(0)
        first = free_port()
        random.seed(0)  # as a library or test may: the picker does not draw from this state
        assert free_port() != first
    finally:
        random.setstate(state)
    assert len({free_port() for _ in range(200)}) == 200  # none bound yet, all still remembered


def test_a_server_whose_port_another_server_answers_fails_naming_that_process(tmp_path):
    """Another process binds the port after launch (its check passed) and answers /health:
    start-up fails with that process, instead of passing for ready."""

    port = free_port()
    server = RuntimeServer(StandIn(port, "import time; time.sleep(120)"),  # never binds its port
                           startup_timeout=60, log=open(tmp_path / "log", "w"))
    server.launch()
    stranger = subprocess.Popen([sys.executable, "-c", STRANGER.format(port=port)], start_new_session=True)
    try:
        with pytest.raises(LaunchError, match=rf"port {port} answers, but from process {stranger.pid} "
                                              r"\(.*python.*\), not from this server"):
            server.wait_ready()
    finally:
        pids = server_pids(server)
        server.stop()
        stranger.kill()
        stranger.wait(timeout=30)
    assert_gone(pids)


STRANGER = """
import http.server
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", {port}), Health).serve_forever()
"""


# ---- the servers ---------------------------------------------------------------------------------
def _server(tmp_path_factory, name: str, argv: list, threads_bind=None, **plan_kwargs) -> RuntimeServer:
    log = open(tmp_path_factory.mktemp(name) / "server.log", "w")
    plan = plan_launch(["--model-path", "smollm2-135m", "--host", "127.0.0.1", "--port", str(free_port()),
                        "--max-total-tokens", str(POOL), *argv], **plan_kwargs)
    if threads_bind is not None:  # as the bench does: the scheduler's torch threads, one per core given
        plan = dataclasses.replace(plan, env={**plan.env, CPU_THREADS_BIND: threads_bind})
    return RuntimeServer(plan, startup_timeout=STARTUP_TIMEOUT_S, log=log)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    servers = {
        "dp2": _server(tmp_path_factory, "dp2", ["--dp-size", "2"], seeded_sampling=True),
        # One thread, as each of dp2's ranks has (0|1): two threads beside them on two shared
        # cores made its requests 5-10x slower here than dp2's.
        "w1": _server(tmp_path_factory, "w1", [], threads_bind="1", seeded_sampling=True),
    }
    workers = [servers["dp2"].url, servers["w1"].url]
    routers = {policy: RuntimeRouter(plan_router(workers, ROUTER_TEST_FLAGS, policy=policy),
                                     startup_timeout=STARTUP_TIMEOUT_S + ROUTER_TIMEOUT_S,
                                     log=open(tmp_path_factory.mktemp(policy) / "router.log", "w"))
               for policy in ("cache_aware", "round_robin")}
    started, pids, startup = {**servers, **routers}, {}, {}
    try:
        t0 = time.monotonic()
        # The routers start with the servers (their import takes a while here) and register
        # them once they answer (--worker-startup-check-interval 1).
        for process in started.values():
            process.launch()
        for name, process in started.items():
            process.wait_ready()  # a LaunchError carries the process's last lines; no retry
            startup[name] = time.monotonic() - t0
            pids[name] = server_pids(process)
        print("\n[scale-out] ready after (s): " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))
        yield started
    finally:
        for name, server in started.items():
            pids.setdefault(name, server_pids(server) if server.process else set())
        stopping = [threading.Thread(target=server.stop) for server in started.values()]  # side by side
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join(timeout=60)
        for server in started.values():
            server.log.close()
    for name, held in pids.items():
        assert_gone(held)


def _url(cluster, target: str) -> str:
    return cluster[target].url


# ---- a fork program, unchanged ------------------------------------------------------------------------
QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep now?"
HINTS = ["First, ", "Let's add: ", "Count: "]


def _looked_up(backend: RuntimeBackend) -> dict:
    """Prompt tokens each server's schedulers have looked up in their trees so far:
    ``{url: [per DP rank]}``."""
    return {url: [s["rksc"]["cache"]["match_query_tokens"] for s in info["internal_states"]]
            for url, info in backend.client.server_infos()}


def _saw(looked_up: int) -> bool:
    """Whether a scheduler looked up a program's prompts, not only a health check's one token
    (the router's, or /health's) nor a flush resetting its counters."""
    return looked_up > 16


def _run(backend: RuntimeBackend, question: str = QUESTION):
    """The program's branches (text, cached tokens) and the prompt tokens each scheduler
    looked up meanwhile (``{url: [per DP rank]}``)."""
    before, out = _looked_up(backend), []
    hinted_branches.run(question=question, hints=HINTS, out=out, max_tokens=8, backend=backend).sync()
    after = _looked_up(backend)
    return out, {url: [a - b for a, b in zip(after[url], before[url])] for url in after}


@pytest.fixture(scope="module")
def dp2_run(cluster):
    """The program on the dp-2 server, on fresh trees: (branches, looked up per rank, the backend)."""
    backend = RuntimeBackend(_url(cluster, "dp2"))
    backend.flush_cache()
    out, looked_up = _run(backend)
    return out, looked_up[_url(cluster, "dp2")], backend


def test_dp2_server_lists_both_schedulers_and_the_backend_reads_them_all(cluster):
    info = requests.get(_url(cluster, "dp2") + "/server_info", timeout=60).json()
    assert info["dp_size"] == 2 and len(info["internal_states"]) == 2
    assert all(state["rksc"]["backend"] == "rksc" for state in info["internal_states"])
    backend = RuntimeBackend(_url(cluster, "dp2"))
    config = backend.config
    assert (config.cache, config.eviction_policy, config.schedulers, config.dp_size) == ("rksc", "rsbcm", 2, 2)
    report = backend.client.idle_integrity()
    assert report["ok"] and len(report["schedulers"]) == 2 and report["slots"]["total"] == 2 * POOL


def test_dp2_keeps_a_programs_branches_on_one_rank_and_reads_every_tree(cluster, dp2_run):
    first, on_ranks, backend = dp2_run
    assert sorted(map(_saw, on_ranks)) == [False, True], on_ranks  # one rank saw the whole program
    assert all(cached > 0 for _, cached in first)  # each branch found the committed prompt there
    _, looked_up = _run(backend, "Tom reads 12 pages a day for 5 days. How many pages?")
    on_other = looked_up[_url(cluster, "dp2")]
    # The next program stays on one rank too. (Which rank is not asserted: programs take ranks
    # in turn, but in one CI run the second program's rank also came back, with the other
    # rank's lookup counter lower than before: not understood yet, see the session note.)
    assert sorted(map(_saw, on_other)) == [False, True], on_other
    trees = backend.tree_stats()  # one entry per DP rank's tree
    assert len(trees) == 2 and any(_saw(t["inserted_tokens"]) for t in trees), trees
    # SGLang's own choice (each request to the next rank) splits the branches over both trees.
    free = RuntimeBackend(_url(cluster, "dp2"), pin_programs=False)
    free.flush_cache()
    split, looked_up = _run(free)
    split_ranks = looked_up[_url(cluster, "dp2")]
    assert all(map(_saw, split_ranks)), split_ranks
    assert sum(c for _, c in split) < sum(c for _, c in first), (split, first)
    print(f"\n[scale-out] dp2 pinned: cached tokens per branch {[c for _, c in first]}, looked up per rank "
          f"{on_ranks}; SGLang's round robin: {[c for _, c in split]}, {split_ranks}")
    backend.check_integrity()


def test_dp2_stats_and_integrity_come_from_every_scheduler(cluster, monkeypatch):
    backend = RuntimeBackend(_url(cluster, "dp2"))
    fake = [{"cache": {"semantic_hit_tokens": 3, "recomputed_tokens": 1, "key_tokens": 5}},
            {"cache": {"semantic_hit_tokens": 4, "recomputed_tokens": 2, "key_tokens": 6}}]
    monkeypatch.setattr(backend.client, "rksc_states", lambda: fake)
    stats = backend.stats()
    assert (stats.semantic_tokens, stats.recomputed_tokens, stats.key_tokens) == (7, 3, 11)
    failing = {"checked": True, "ok": False, "problems": ["[x DP rank 1] slots lost"]}
    monkeypatch.setattr(backend.client, "idle_integrity", lambda: failing)
    with pytest.raises(RuntimeError, match="DP rank 1"):
        backend.check_integrity()


# ---- the router ---------------------------------------------------------------------------------------
def test_what_the_router_carries(cluster):
    router, worker = _url(cluster, "cache_aware"), _url(cluster, "w1")
    # 0.3.2: no /server_info and no /abort_request (so the client goes to the workers for those).
    assert requests.get(router + "/server_info", timeout=30).status_code == 404
    assert requests.post(router + "/abort_request", json={"rid": "x"}, timeout=30).status_code == 404
    assert requests.get(router + "/get_server_info", timeout=30).json().get("router_manager") is True
    assert requests.get(router + "/get_model_info", timeout=30).json()["model_path"].endswith("smollm2-135m")
    assert requests.post(router + "/flush_cache", timeout=60).json()["workers_flushed"] == 2
    # A request's id and its sampling seed reach the worker: the same sample as sent to a worker directly.
    params = {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 7}
    direct = RuntimeClient(worker).generate("Once upon a time", sampling_params=params)
    routed = RuntimeClient(router).generate("Once upon a time", sampling_params=params, rid="rksc-test-rid-1")
    assert routed["text"] == direct["text"] and routed["meta_info"]["id"] == "rksc-test-rid-1"
    other = RuntimeClient(router).generate("Once upon a time", sampling_params={**params, "sampling_seed": 8})
    assert other["text"] != direct["text"]
    client = RuntimeClient(router)
    assert client.is_router() and set(client.router_workers()) == {_url(cluster, "dp2"), worker}


def test_backend_through_a_router_reads_the_workers_lazily(cluster):
    router = _url(cluster, "cache_aware")
    backend = RuntimeBackend(router)  # would have failed on the router's 404 /server_info
    assert (backend.config.cache, backend.config.schedulers, backend.config.dp_size) == ("rksc", 3, 1)
    report = backend.client.idle_integrity()  # both servers, three schedulers
    assert report["ok"] and len(report["schedulers"]) == 3 and report["slots"]["total"] == 3 * POOL
    blind = RuntimeBackend(router, worker_urls=[f"http://127.0.0.1:{free_port()}"])
    assert blind.config.cache == UNKNOWN and "answered /server_info" in blind.config.unknown
    assert blind.stats().requests == 0  # counting still works; the trees' counters are not read
    with pytest.raises(RuntimeError, match="not healthy"):
        blind.check_integrity()


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_router_policy_decides_where_a_programs_branches_go(cluster, dp2_run, policy):
    backend = RuntimeBackend(_url(cluster, policy))
    backend.flush_cache()
    out, looked_up = _run(backend)
    servers = {url: _saw(sum(ranks)) for url, ranks in looked_up.items()}
    if policy == "cache_aware":  # every request of the program where its prompt went
        assert sorted(servers.values()) == [False, True], looked_up
    else:  # the prompt on one server, the branches on both in turn
        assert all(servers.values()), looked_up
    assert [t for t, _ in out] == [t for t, _ in dp2_run[0]]  # the texts the dp-2 server gave
    print(f"\n[scale-out] router {policy}: looked up per server {looked_up}, cached tokens per branch "
          f"{[c for _, c in out]}")
    backend.check_integrity()


@pytest.mark.parametrize("target", ["dp2", "round_robin"])
def test_vote_stops_a_branch_wherever_it_runs(cluster, target):
    from branch_programs import uneven_branches

    backend = RuntimeBackend(_url(cluster, target))
    backend.flush_cache()
    state = uneven_branches.run(prompt="The numbers are 1, 2, 3 and", long_tokens=400, backend=backend)
    result, metas = state.ret_value
    assert result.answer == "same" and result.settled_after == 3 and list(result.stopped) == [3]
    assert metas[3]["finish_reason"]["type"] == "abort" and metas[3]["completion_tokens"] < 400
    assert all(m["completion_tokens"] == 3 for m in metas[:3])
    assert backend.stream_controls.active() == 0
    backend.check_integrity()  # every scheduler behind the URL idle, nothing locked


def test_a_program_runs_unchanged_through_the_router(cluster, capsys, monkeypatch):
    import runpy

    program = "self_consistency.py"
    monkeypatch.setattr(sys, "argv", [program, "--endpoint", _url(cluster, "cache_aware"), "--problems", "1",
                                      "--branches", "2", "--max-tokens", "8"])
    monkeypatch.syspath_prepend(str(ROOT / "programs"))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "programs" / program), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "server statistics (cache=rksc):" in out, out
