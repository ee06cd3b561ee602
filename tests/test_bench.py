"""``rksc-sgl bench`` (rksc_sgl/bench/): inputs, statistics, report, and tiny real runs.

The runs use the session engines of conftest.py where a mode allows it, a few problems
and a few tokens per branch (workload parameters are overridable for exactly this). No
test asserts anything about a timing.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics

import numpy as np
import pytest

from rksc_sgl import bench, cli
from rksc_sgl.bench import BenchSettings, Item, WORKLOADS, parse_modes
from rksc_sgl.bench import stats
from rksc_sgl.bench.stats import bootstrap_ratio_ci, ratio_of_medians
from rksc_sgl.problems import Problem

TINY_PAPER = {"prompt_tokens": 96, "branches": 2, "max_tokens": 4}


def _bench_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--workload", "nope"], "unknown workload 'nope'"),
    (["--workload", "paper,paper"], "given twice"),
    (["--modes", "none,fast"], "unknown mode 'fast'"),
    (["--modes", "radix,radix"], "given twice"),
    (["--modes", ""], "no modes"),
    (["--modes", "radix@0.9"], "does not use ASKS"),
    (["--modes", "asks@high"], "not a number"),
    (["--modes", "asks@0.9:4"], ":L<layer>"),
    (["--modes", "radix:L4"], "no key layer"),
    (["--asks-key-layer", "-1"], "asks-key-layer"),
    (["--problems", "0"], "problems must be a positive integer"),
    (["--repeats", "-1"], "repeats must be a positive integer"),
    (["--warmup", "-1"], "warmup must be an integer >= 0"),
    (["--asks-recompute", "1.5"], "asks-recompute"),
    (["--audit-fraction", "2"], "audit-fraction"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--workload", "tot", "--prompt-tokens", "500"], "has no parameter prompt_tokens"),
    (["--branches", "0"], "branches must be a positive integer"),
    (["--workload", "pressure", "--pool-fraction", "0"], "pool-fraction"),
    (["--workload", "paraphrase", "--branches", "99"], "wordings"),
    (["--workload", "cot", "--until-answer", "2"], "until-answer must be 0 or 1"),
    (["--workload", "paper", "--fork-commit", "2"], "fork-commit must be 0 or 1"),
    (["--servers", "one-at-a-time"], "servers one-at-a-time needs --backend runtime"),
    (["--backend", "runtime", "--servers", "all"], "invalid choice: 'all'"),
    (["--workload", "vote", "--difficulty", "hardest"], "difficulty must be one of easy, medium"),
    (["--workload", "paraphrase", "--modes", "radix,stop-lossless"],
     "workload 'paraphrase' does not vote over forks, so mode(s) stop-lossless would stop nothing"),
])
def test_bad_arguments_fail_with_a_clear_message(capsys, args, needle):
    err = _bench_error(capsys, *args)
    assert needle in err and "Traceback" not in err


def test_help_lists_workloads_and_modes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in list(WORKLOADS) + list(bench.MODES):
        assert name in out


def test_settings_refuse_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        BenchSettings(dtype="fp8")


def test_mode_table_maps_modes_to_engines():
    settings = BenchSettings(asks_tau=0.8, asks_recompute=0.25)
    kw = {m.label: m.engine_kwargs(settings)
          for m in parse_modes("none,radix,rksc,asks,cgee,rsbcm,asks@0.7,asks@0.9:L4")}
    assert kw["none"] == {"cache": "none"} and kw["radix"] == {"cache": "radix"} and kw["cgee"] == kw["radix"]
    assert kw["rksc"] == {"cache": "rksc-tree", "asks": {"enabled": True, "tau": 0.8, "recompute_fraction": 0.25,
                                                    "key_layer": 0},
                          "eviction_policy": "rsbcm"}
    assert kw["asks@0.9:L4"]["asks"] == {"enabled": True, "tau": 0.9, "recompute_fraction": 0.25, "key_layer": 4}
    assert kw["rsbcm"] == {"cache": "rksc-tree", "eviction_policy": "rsbcm"}
    assert kw["asks@0.7"]["asks"]["tau"] == 0.7 and kw["asks"]["asks"]["tau"] == 0.8
    assert [m.cgee for m in parse_modes("rksc,cgee,radix,asks")] == [True, True, False, False]
    stock = {m.label: m.engine_kwargs(settings) for m in parse_modes("lfu,slru")}
    assert stock == {"lfu": {"cache": "radix", "eviction_policy": "lfu"},
                     "slru": {"cache": "radix", "eviction_policy": "slru"}}


def test_bench_asks_defaults_are_the_engines():
    from rksc_sgl.rksc.asks_config import ASKSConfig

    settings, asks = BenchSettings(), ASKSConfig()
    assert (settings.asks_tau, settings.asks_recompute, settings.asks_key_layer) == (
        asks.tau, asks.recompute_fraction, asks.key_layer)


def test_paraphrase_and_pressure_targets_read_the_run_totals():
    def result(**modes):
        return {"modes": {name: {"prefill_tokens_total": total, "hit_rate": hit, "agreement_with_radix": agree,
                                 "agreement_with_radix_ci95": [agree, 1.0] if agree >= 0.99 else [0.9, 0.985]}
                          for name, (total, hit, agree) in modes.items()}}

    pressure = bench.get_workload("pressure").targets()
    checked = [t.check(result(radix=(11200, 0.844, 1.0), lfu=(5597, 0.922, 1.0), rsbcm=(5597, 0.922, 1.0)))
               for t in pressure]
    assert [c["ok"] for c in checked] == [True, True] and checked[1]["value"] == 11200 / 5597
    checked = [t.check(result(radix=(5597, 0.922, 1.0), lfu=(5596, 0.9221, 1.0), rsbcm=(5597, 0.922, 1.0)))
               for t in pressure]
    assert [c["ok"] for c in checked] == [False, False]  # LFU's hit rate is higher; no 1.2x
    assert [t.check(result(radix=(1, 0.5, 1.0)))["ok"] for t in pressure] == [None, None]  # rsbcm not run
    paraphrase = bench.get_workload("paraphrase").targets()
    assert [t.check(result(radix=(20539, 0.5, 1.0), asks=(16041, 0.7, 0.99)))["ok"] for t in paraphrase] == [True, True]
    assert [t.check(result(radix=(100, 0.5, 1.0), asks=(100, 0.5, 0.98)))["ok"] for t in paraphrase] == [False, False]


def test_targets_are_judged_on_their_interval_not_their_point():
    from rksc_sgl.bench.stats import wilson

    paper = {t.name: t for t in bench.get_workload("paper").targets()}
    cgee, agree = paper["rksc CGEE error rate (per verify call)"], paper["rksc answer agreement with radix"]
    speed = paper["rksc speedup over radix"]

    def result(errors, calls, same, runs, ratio, ci):
        return {"modes": {"rksc": {"cgee_error_rate": errors / calls, "cgee_error_ci95": list(wilson(errors, calls)),
                                   "agreement_with_radix": same / runs,
                                   "agreement_with_radix_ci95": list(wilson(same, runs))}},
                "speedups": {"radix": {"rksc": {"ratio": ratio, "ci95": ci}}}}

    # 0 errors in 8 calls: the point meets <= 0.0037, the Wilson upper bound (0.32) does not decide it.
    small = result(0, 8, 8, 8, 1.7, [1.2, 2.1])
    assert [(c["ok"], c["verdict"]) for c in (cgee.check(small), agree.check(small), speed.check(small))] == [
        (None, "undecided (n too small)")] * 3
    assert cgee.check(small)["interval"][1] == pytest.approx(0.3244, abs=1e-3)
    large = result(0, 2000, 990, 1000, 1.9, [1.7, 2.1])
    assert [cgee.check(large)["verdict"], speed.check(large)["verdict"]] == ["ok", "ok"]
    assert agree.check(large)["verdict"] == "undecided (n too small)"  # 0.99 point; lower bound 0.98 < 0.99
    missed = result(40, 100, 50, 100, 1.1, [1.0, 1.3])
    assert [(t.check(missed)["ok"], t.check(missed)["verdict"]) for t in (cgee, agree, speed)] == [(False, "MISS")] * 3
    no_interval = {"modes": {"rksc": {"agreement_with_radix": 1.0}}, "speedups": {}}
    assert agree.check(no_interval)["verdict"] == "undecided (n too small)"
    assert speed.check(no_interval)["verdict"] == "not run"


def test_command_line_reproduces_the_settings():
    settings = BenchSettings(problems=3, seed=7, repeats=2, warmup=0, asks_tau=0.9, device="cuda", dtype="float32",
                             params={"branches": 4})
    modes = parse_modes("none,radix,asks@0.8")
    line = bench.command_line("paper", modes, settings)
    args = cli.build_parser().parse_args(shlex.split(line)[1:])
    workloads, parsed_modes, parsed = bench.validate_args(args)
    assert [w.name for w in workloads] == ["paper"] and parsed_modes == modes
    assert parsed == settings
    runtime = BenchSettings(backend="runtime", servers="one-at-a-time", server_args="--schedule-policy lpm")
    args = cli.build_parser().parse_args(shlex.split(bench.command_line("paper", modes, runtime))[1:])
    assert bench.validate_args(args)[2] == runtime


def test_schedule_keeps_a_problems_repeats_together_only_when_flushing():
    items = [Item(i, Problem("q", "1", i)) for i in range(2)]
    flushed = [(it.index, r) for it, r in bench.schedule(items, 2, True)]
    kept = [(it.index, r) for it, r in bench.schedule(items, 2, False)]
    assert flushed == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert kept == [(0, 0), (1, 0), (0, 1), (1, 1)]


# ---- statistics ---------------------------------------------------------------------------------
def test_percentile_and_median_match_numpy():
    rng = random.Random(3)
    for n in (1, 2, 5, 10):
        xs = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 2.5, 25, 50, 75, 97.5, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
        assert stats.median(xs) == pytest.approx(float(np.median(xs)))


def test_bootstrap_ci_of_a_ratio_equals_a_direct_computation():
    base = [10.0, 12.0, 9.0, 30.0, 11.0, 14.0]
    other = [2.0, 3.0, 2.5, 9.0, 2.0, 4.0]
    assert ratio_of_medians(base, other) == pytest.approx(np.median(base) / np.median(other))
    lo, hi = bootstrap_ratio_ci(base, other, samples=500, seed=11)
    rng = random.Random(11)  # the same resamples, computed directly with numpy
    ratios = []
    for _ in range(500):
        idx = rng.choices(range(len(base)), k=len(base))
        ratios.append(np.median(np.take(base, idx)) / np.median(np.take(other, idx)))
    assert (lo, hi) == pytest.approx((np.percentile(ratios, 2.5), np.percentile(ratios, 97.5)))
    assert lo <= ratio_of_medians(base, other) <= hi
    # An exact factor between the modes on every problem leaves no uncertainty; one problem neither.
    assert bootstrap_ratio_ci([4.0, 6.0, 8.0], [2.0, 3.0, 4.0], samples=200) == pytest.approx((2.0, 2.0))
    assert bootstrap_ratio_ci([5.0], [2.0], samples=50) == pytest.approx((2.5, 2.5))
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0, 2.0], [1.0], samples=10)


def test_cgee_error_count_uses_verify_calls():
    def call(skipped, exited, audited, agrees):
        return {"skipped": skipped, "gated": skipped or exited > 0, "exited_early": exited, "layers_run": None
                if skipped else [30, 27], "num_layers": None if skipped else 30, "mean_exit_layer": None,
                "verifier_new_tokens": 0, "verifier_s": 0.01, "audited": audited, "audit_agrees": agrees}
    calls = [call(True, 0, True, True), call(False, 1, True, False), call(False, 0, False, None),
             call(True, 0, True, True)]
    records = [{"problem": i, "repeat": 0, "time_s": 1.0, "wall_s": 1.0, "requests": 1, "prefill_tokens": 5,
                "cached_tokens": 5, "semantic_tokens": 0, "recomputed_tokens": 0, "key_tokens": 0,
                "decode_tokens": 1, "peak_kv_tokens": 9, "correct": True, "verify": c} for i, c in enumerate(calls)]
    s = stats.summarize_mode(records, 4)
    assert (s["verify_calls"], s["verifier_passes_run"], s["verifier_passes_skipped"]) == (4, 2, 2)
    assert s["verifier_passes_exited_early"] == 1 and s["mean_exit_layer"] == pytest.approx(28.5)
    assert (s["cgee_errors"], s["cgee_compared_calls"], s["cgee_error_rate"]) == (1, 4, 0.25)
    assert s["hit_rate"] == pytest.approx(0.5)


def _run(problem, repeat, answer, outputs, correct=False, decode=0):
    return {"problem": problem, "repeat": repeat, "answer": answer, "outputs": outputs, "correct": correct,
            "decode_tokens": decode}


def test_agreement_with_radix_of_a_constructed_case():
    # radix's first repeat is the reference: problem 0 answers "4", problem 1 "7", problem 2 nothing.
    radix = [_run(0, 0, "4", ["a", "b"], True, 10), _run(0, 1, "5", ["x", "y"], False, 99),
             _run(1, 0, "7", ["c", "d"], True, 20), _run(2, 0, None, ["e", "f"], False, 30)]
    mode = [_run(0, 0, "4", ["a", "B"], True, 5), _run(0, 1, "4", ["a", "b"], True, 7),
            _run(1, 0, "8", ["c", "d"], False, 15), _run(2, 0, None, ["e", "f"], False, 20)]
    answers, outputs = stats.agreement(mode, radix)
    assert answers == 3 / 4  # 4 = 4 (both repeats), 8 != 7, no answer = no answer
    assert outputs == 7 / 8  # only "B" != "b"
    paired = stats.paired_with_radix(mode, radix, samples=0, seed=0)
    # First repeats only: 2 of 3 agree; accuracy 1/3 against radix's 2/3; radix decoded 60 tokens to 40.
    z = 1.959964
    centre, half = (2 / 3 + z * z / 6) / (1 + z * z / 3), z * (2 / 9 / 3 + z * z / 36) ** 0.5 / (1 + z * z / 3)
    assert paired["agreement_with_radix_ci95"] == pytest.approx([centre - half, centre + half])
    assert paired["accuracy_change_vs_radix"] == pytest.approx(-1 / 3)
    assert paired["fewer_decode_tokens_than_radix"] == 1.5
    assert stats.agreement(radix, radix) == (0.75, 0.75)  # its second repeat differs from its first


# ---- runs --------------------------------------------------------------------------------------------
def test_paper_run_writes_the_report(radix_engine, none_engine, tmp_path):
    settings = BenchSettings(problems=2, warmup=1, repeats=1, bootstrap=50, params=TINY_PAPER)
    result = bench.run_bench("paper", "none,radix,cgee", settings, progress=False,
                             engines={"none": none_engine, "radix": radix_engine, "cgee": radix_engine})
    paths = bench.save(result, tmp_path)
    for engine in (radix_engine, none_engine):
        engine.check_integrity()
    assert {p.name for p in tmp_path.iterdir()} == {"bench_paper.json", "bench_paper.md", "bench_paper.png"}
    data = json.loads(paths["json"].read_text())
    assert data["config"]["settings"]["problems"] == 2 and data["config"]["params"]["branches"] == 2
    assert data["engine_num_threads"] == 1 and data["torch_num_threads"] == 1 and data["cpu"]
    assert {"torch", "transformers", "sglang", "reasoning-gym"} <= set(data["versions"])
    assert data["command"].startswith("rksc-sgl bench --workload paper --modes none,radix,cgee")
    for label in ("none", "radix", "cgee"):
        m = data["modes"][label]
        for field in ("median_s", "p25_s", "p75_s", "per_problem_s", "prefill_tokens", "exact_hit_tokens",
                      "semantic_hit_tokens", "peak_kv_tokens", "accuracy", "agreement_with_radix",
                      "verify_calls", "verifier_passes_run", "verifier_passes_skipped",
                      "verifier_passes_exited_early", "mean_exit_layer", "cgee_error_rate"):
            assert field in m, (label, field)
        assert len(m["per_problem_s"]) == 2 and m["verify_calls"] == 2
        assert len(data["runs"][label]) == 2
    # Agreement and speedups against radix, recomputed by hand from the runs in the record.
    runs = data["runs"]
    reference = {r["problem"]: r for r in runs["radix"] if r["repeat"] == 0}
    for label in ("none", "cgee"):
        mine = runs[label]
        assert data["modes"][label]["agreement_with_radix"] == \
            sum(r["answer"] == reference[r["problem"]]["answer"] for r in mine) / len(mine)
        pairs = [(a, b) for r in mine for a, b in zip(r["outputs"], reference[r["problem"]]["outputs"], strict=True)]
        assert data["modes"][label]["output_agreement_with_radix"] == sum(a == b for a, b in pairs) / len(pairs)
    per_problem = {label: [statistics.median(r["time_s"] for r in runs[label] if r["problem"] == p) for p in (0, 1)]
                   for label in ("none", "radix", "cgee")}
    for label, times in per_problem.items():
        assert data["modes"][label]["per_problem_s"] == times
        for base in ("none", "radix"):
            assert data["speedups"][base][label]["ratio"] == \
                pytest.approx(statistics.median(per_problem[base]) / statistics.median(times))
    assert data["modes"]["none"]["exact_hit_tokens"] == 0 and data["modes"]["radix"]["exact_hit_tokens"] > 0
    assert set(data["speedups"]) == {"none", "radix"}
    # The full verifier (none, radix) runs every pass; a gated call is audited against it.
    assert data["modes"]["radix"]["verifier_passes_run"] == 2 and data["modes"]["radix"]["cgee_errors"] == 0
    assert data["modes"]["cgee"]["cgee_compared_calls"] == 2
    names = [t["name"] for t in data["targets"]]
    assert "rksc speedup over radix" in names and all(t["value"] is None for t in data["targets"]
                                                      if t["name"].startswith("rksc"))
    md = paths["md"].read_text()
    assert "| mode |" in md and "| radix |" in md and data["command"] in md


def test_modes_build_their_own_engines_and_shut_them_down(monkeypatch, radix_engine):
    import rksc_sgl.engine.backend

    built = []

    class Recording(rksc_sgl.engine.backend.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

        def check_integrity(self, expect_idle=True):
            self.checked = True
            super().check_integrity(expect_idle)

    monkeypatch.setattr(rksc_sgl.engine.backend, "Engine", Recording)
    settings = BenchSettings(problems=1, warmup=0, kv_pool_tokens=2048, max_running_requests=8, asks_tau=0.5,
                             bootstrap=20, params={"branches": 2, "max_tokens": 4})
    result = bench.run_bench("paraphrase", "radix,rksc", settings, progress=False, engines={"radix": radix_engine})
    assert len(built) == 1 and built[0].config.cache == "rksc-tree" and built[0].config.asks.tau == 0.5
    assert built[0].config.eviction_policy == "rsbcm" and built[0].checked
    assert not built[0].scheduler.thread.is_alive()  # shut down
    radix_engine.check_integrity()
    rksc = result["modes"]["rksc"]
    reference = {r["problem"]: r["answer"] for r in result["runs"]["radix"] if r["repeat"] == 0}
    [run] = result["runs"]["rksc"]
    assert rksc["tau"] == 0.5 and rksc["agreement_with_radix"] == float(run["answer"] == reference[run["problem"]])
    # Two wordings' answers, then the two verifier turns that restate them.
    outputs = result["runs"]["rksc"][0]["outputs"]
    assert len(outputs) == 4 and "verify_calls" not in rksc
    assert all(len(radix_engine.encode(o)) <= 1 for o in outputs[2:] if o)


def test_a_given_engine_must_match_its_mode(radix_engine):
    with pytest.raises(ValueError, match="does not match"):
        bench.run_bench("paper", "none", BenchSettings(problems=1, params=TINY_PAPER), progress=False,
                        engines={"none": radix_engine})
    with pytest.raises(ValueError, match="not run"):
        bench.run_bench("paper", "radix", BenchSettings(problems=1, params=TINY_PAPER), progress=False,
                        engines={"rksc": radix_engine})


def test_the_record_names_the_commit_the_run_started_from(monkeypatch, radix_engine):
    """The record is written at the run's end; a commit checked out meanwhile must not be named."""
    from rksc_sgl.bench import report, runner

    monkeypatch.setattr(runner, "source_commit", lambda: "c0ffee-at-start")
    monkeypatch.setattr(report, "source_commit", lambda: "moved-on-during-the-run")
    result = bench.run_bench("paper", "radix", BenchSettings(problems=1, warmup=0, params=TINY_PAPER),
                             progress=False, engines={"radix": radix_engine})
    assert result["commit"] == "c0ffee-at-start"
    assert report.run_record("bench_x")["commit"] == "moved-on-during-the-run"  # no commit given: now's
    radix_engine.check_integrity()


def test_tot_and_pressure_workloads_run(radix_engine):
    settings = BenchSettings(problems=1, warmup=0, bootstrap=20,
                             params={"branches": 2, "keep": 1, "expand": 2, "max_tokens": 6})
    tot = bench.run_bench("tot", "radix", settings, progress=False, engines={"radix": radix_engine})
    [tot_run] = tot["runs"]["radix"]
    assert tot["modes"]["radix"]["exact_hit_tokens"] == tot_run["cached_tokens"] > 0
    settings = BenchSettings(problems=2, warmup=0, bootstrap=20,
                             params={"programs": 2, "branches": 2, "max_tokens": 4, "prompt_tokens": 96})
    pressure = bench.run_bench("pressure", "radix", settings, progress=False, engines={"radix": radix_engine})
    runs = pressure["runs"]["radix"]
    assert len(runs) == 2 and len(runs[0]["outputs"]) == 4
    assert runs[1]["cached_tokens"] > 0  # the cache is kept between problems: the shared block is a hit
    radix_engine.check_integrity()


def test_fork_commit_sends_the_shared_prompt_once_before_the_branches(radix_engine):
    def run(fork_commit):
        settings = BenchSettings(problems=1, warmup=0, bootstrap=20, params={
            "branches": 2, "max_tokens": 4, "prompt_tokens": 96, "temperature": 0.0, "fork_commit": fork_commit})
        return bench.run_bench("cot", "radix", settings, progress=False, engines={"radix": radix_engine})["runs"]["radix"][0]

    along, first = run(0), run(1)
    assert first["outputs"] == along["outputs"]
    assert first["requests"] == along["requests"] + 1  # the prompt's own prefill-only request
    assert first["cached_tokens"] > 0 and along["cached_tokens"] > 0  # the engine shares the prompt either way
    radix_engine.check_integrity()


def test_pressure_pool_is_a_fraction_of_the_working_set(radix_engine):
    w = WORKLOADS["pressure"]
    params = w.resolve({"programs": 2, "branches": 2, "max_tokens": 8, "prompt_tokens": 200, "pool_fraction": 0.5})
    tok = radix_engine.tokenizer
    items = w.items(tok, params, seed=0, count=3)
    need = w.working_set(params, items, tok)
    shared = items[0].inputs["shared_tokens"]
    assert shared > 0 and all(n > shared for it in items for n in it.inputs["prompt_tokens"])
    assert need > shared + 3 * 2 * 2 * 8
    pool = w.engine_overrides(tok, params, items)["kv_pool_tokens"]
    longest = max(n for it in items for n in it.inputs["prompt_tokens"])
    assert pool == max(int(need * 0.5), 2 * (longest + 32 + 8))


def test_pressure_problems_cycle_through_their_few_shot_blocks(radix_engine):
    """Problem i uses block i % prefixes; the working set counts each block once and every
    program's own tokens (question, branches' hints and new tokens) once per problem."""
    w = WORKLOADS["pressure"]
    params = w.resolve({"programs": 2, "branches": 2, "max_tokens": 8, "prompt_tokens": 200, "prefixes": 2})
    tok = radix_engine.tokenizer
    items = w.items(tok, params, seed=0, count=4)
    assert [it.inputs["block"] for it in items] == [0, 1, 0, 1]
    block = [it.inputs["prompts"][0][: it.inputs["prompts"][0].rindex("Question: ")] for it in items]
    assert block[0] == block[2] != block[1] == block[3]
    hint = max(len(tok.encode(h + "\n")) for h in bench.hints_for(2))
    own = sum(n - it.inputs["shared_tokens"] + 2 * (hint + 8) for it in items for n in it.inputs["prompt_tokens"])
    blocks = items[0].inputs["shared_tokens"] + items[1].inputs["shared_tokens"]
    assert w.working_set(params, items, tok) == blocks + own
    with pytest.raises(ValueError, match="prefixes must be a positive integer"):
        w.resolve({"prefixes": 0})


@pytest.mark.parametrize("name", ["paper", "cot", "pressure"])
def test_runtime_workloads_commit_the_prefix_before_the_fork_by_default(name):
    """As SGLang's own fork does; the engine keeps its default (its figures' commands), and a
    given --fork-commit wins on either backend."""
    w = WORKLOADS[name]
    assert w.resolve({})["fork_commit"] == 0 and w.resolve({}, "runtime")["fork_commit"] == 1
    assert w.resolve({"fork_commit": 0}, "runtime")["fork_commit"] == 0
    with pytest.raises(ValueError, match="fork-commit must be 0 or 1"):
        w.resolve({"fork_commit": 2}, "runtime")


def test_vote_workload_stops_branches_and_reports_against_radix(radix_engine, tmp_path):
    # Seeded branches: radix and stop-lossless sample the same chains; lossless never
    # changes the voted answer.
    settings = BenchSettings(problems=3, warmup=0, repeats=1, seed=1000,
                             params={"branches": 6, "max_tokens": 24, "difficulty": "easy"})
    result = bench.run_bench("vote", "radix,stop-lossless,stop-beta", settings, progress=False,
                             engines={m: radix_engine for m in ("radix", "stop-lossless", "stop-beta")})
    bench.save(result, tmp_path)
    lossless, radix = result["modes"]["stop-lossless"], result["modes"]["radix"]
    assert lossless["agreement_with_radix"] == 1.0 and lossless["accuracy_change_vs_radix"] == 0.0
    assert lossless["stop_rule"] == "lossless" and "stop_rule" not in radix
    decoded = {m: sum(r["decode_tokens"] for r in result["runs"][m]) for m in ("radix", "stop-lossless", "stop-beta")}
    for m in ("stop-lossless", "stop-beta"):
        assert result["modes"][m]["fewer_decode_tokens_than_radix"] == pytest.approx(decoded["radix"] / decoded[m])
    for run_l, run_r in zip(result["runs"]["stop-lossless"], result["runs"]["radix"]):
        kept = [i for i in range(6) if i not in run_l["vote"]["stopped"]]
        assert all(run_l["outputs"][i] == run_r["outputs"][i] for i in kept)  # same seeds, same samples
    assert "branches stopped (runs)" in (tmp_path / "bench_vote.md").read_text()


def test_serve_workload_counts_programs_faults_and_integrity(radix_engine):
    settings = BenchSettings(problems=1, warmup=0, repeats=1, seed=1000,
                             params={"programs": 2, "clients": 2, "branches": 2, "max_tokens": 8,
                                     "disconnect_share": 0.5, "malformed_share": 1.0})
    result = bench.run_bench("serve", "radix,stop-lossless", settings, progress=False,
                             engines={m: radix_engine for m in ("radix", "stop-lossless")})
    for label in ("radix", "stop-lossless"):
        m = result["modes"][label]
        assert m["errors"] == {"disconnected": 1, "malformed_refused": 2, "malformed_accepted": 0,
                               "program_failed": 0}
        assert m["integrity_failures"] == [] and m["programs_per_s"] > 0
        assert m["program_latency_p50_s"] <= m["program_latency_p90_s"]
        run = result["runs"][label][0]
        assert len(run["program_answers"]) == 2 and len(run["program_latency_s"]) == 2
    assert result["modes"]["stop-lossless"]["program_agreement_with_radix"] == 1.0
    radix_engine.check_integrity()


@pytest.mark.parametrize("params, message", [({"clients": 0}, "clients must be a positive integer"),
                                             ({"malformed_share": 1.5}, "malformed-share must be in [0, 1]")])
def test_serve_parameters_are_checked(params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WORKLOADS["serve"].resolve(params)


def test_serve_counts_a_failed_program_as_its_error_class(radix_engine):
    problems = [Problem(question="Calculate 1 + 1.", answer="2"), Problem(question="Calculate 2 + 2.", answer="4")]
    ok = {"answer": "2", "texts": ["1 + 1 = 2"], "vote": None, "verify": None}
    done = [("program", 0, ok, 1.0), ("program", 1, RuntimeError("boom"), 0.5), ("malformed", 0, True, 0.0)]
    outcome = WORKLOADS["serve"]._outcome(radix_engine, problems, done)
    assert outcome.extra["errors"] == {"disconnected": 0, "malformed_refused": 1, "malformed_accepted": 0,
                                       "program_failed": 1}
    assert outcome.extra["program_failures"] == ["program 1: RuntimeError('boom')"]
    assert outcome.extra["program_answers"] == ["2", None] and outcome.extra["program_correct"] == [True, False]
