"""Adaptive branching in the bench (issue #35 item 4): the ``waves-*`` modes run the voting
workloads' seeded branches through ``rksc_sgl.vote_waves``.

A short ``vote`` run on the engine: on a problem with a clear majority, waves-lossless votes
what radix votes and decodes fewer tokens, because the branches after the first wave are
never launched. No timing is asserted.
"""

from __future__ import annotations

import pytest

from rksc_sgl import bench, cli
from rksc_sgl.bench import BenchSettings, WORKLOADS, parse_modes
from rksc_sgl.bench.workload import StopPlan, check_modes


# ---- the plan, without a model -------------------------------------------------------------------
def test_a_waves_mode_plans_waves_with_the_workloads_schedule():
    radix, waves, stop = parse_modes("radix,waves-beta,stop-window")
    assert StopPlan.of(radix) is None
    assert StopPlan.of(stop) == StopPlan("window")
    params = WORKLOADS["vote"].resolve({"branches": 6, "waves_first": 2, "waves_step": 3})
    assert StopPlan.of(waves).with_params(params) == StopPlan("beta", waves=True, first=2, step=3)
    # 0 is the default first wave: n // 2 + 1, chosen by vote_waves
    assert StopPlan.of(waves).with_params(WORKLOADS["load"].resolve({})) == StopPlan("beta", True, None, 2)
    assert StopPlan.of(stop).with_params(params) == StopPlan("window")  # no waves: no schedule


@pytest.mark.parametrize("params, message", [
    ({"branches": 4, "waves_first": 5}, r"waves-first must be an integer from 0 \(branches // 2 \+ 1\) to branches "
                                        r"\(4\), got 5"),
    ({"waves_first": -1}, "waves-first must be an integer"),
    ({"waves_step": 0}, "waves-step must be a positive integer, got 0"),
])
def test_bad_wave_parameters_are_refused(params, message):
    for name in ("vote", "serve", "load"):
        with pytest.raises(ValueError, match=message):
            WORKLOADS[name].resolve(params)


def test_waves_modes_run_only_where_the_program_launches_waves(capsys):
    with pytest.raises(ValueError, match="workload 'paper' does not launch seeded branches in waves, so mode"
                                         r"\(s\) waves-lossless cannot run on it; they run with vote, serve, load"):
        check_modes(WORKLOADS["paper"], parse_modes("radix,waves-lossless"))
    check_modes(WORKLOADS["vote"], parse_modes("radix,waves-lossless"))
    with pytest.raises(SystemExit):
        cli.main(["bench", "--workload", "cot", "--modes", "radix,waves-window"])
    assert "does not launch seeded branches in waves" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not launch seeded branches in waves"):  # before anything loads
        bench.run_bench("paper", "waves-lossless", BenchSettings(problems=1), progress=False)


@pytest.mark.parametrize("name", ["waves-lossless", "waves-beta", "waves-window", "stop-deepconf"])
def test_the_runtime_runs_the_adaptive_modes_on_its_default_cache_with_seeded_sampling(name):
    from rksc_sgl.runtime.bench_servers import server_flags

    settings = BenchSettings(backend="runtime")
    waves, radix = parse_modes(f"{name},radix")
    argv, plan = server_flags(waves, settings, {}, 0, seeded=True)
    assert argv == server_flags(radix, settings, {}, 0, seeded=True)[0]
    assert plan["seeded_sampling"] is True and plan["rksc_cache"] is False


# ---- on the engine -----------------------------------------------------------------------------------
def test_waves_lossless_votes_as_radix_with_fewer_decode_tokens(radix_engine):
    # Seed 1000's first easy problem (6 + 5): the first wave of 4 (of 6) answers 11, 11, 11 and
    # nothing, which settles the lossless vote (3 > 0 + 2 unfinished), so branches 4 and 5
    # are never launched. Seeded branches: the launched ones sample radix's texts.
    settings = BenchSettings(problems=1, warmup=0, repeats=1, seed=1000,
                             params={"branches": 6, "max_tokens": 24, "difficulty": "easy"})
    result = bench.run_bench("vote", "radix,waves-lossless", settings, progress=False,
                             engines={m: radix_engine for m in ("radix", "waves-lossless")})
    waves, radix = result["modes"]["waves-lossless"], result["modes"]["radix"]
    assert waves["agreement_with_radix"] == 1.0 and waves["accuracy_change_vs_radix"] == 0.0
    assert waves["stop_rule"] == "lossless" and waves["branches_launched"] == 4
    assert waves["decode_tokens_total"] < radix["decode_tokens_total"]
    decoded = {m: sum(r["decode_tokens"] for r in result["runs"][m]) for m in ("radix", "waves-lossless")}
    assert waves["fewer_decode_tokens_than_radix"] == pytest.approx(decoded["radix"] / decoded["waves-lossless"])
    assert waves["fewer_decode_tokens_than_radix"] > 1.0
    run_w, run_r = result["runs"]["waves-lossless"][0], result["runs"]["radix"][0]
    assert run_w["vote"] == {"rule": "lossless", "stopped": [], "settled_after": 4, "launched": 4, "waves": 1}
    assert run_w["outputs"] == run_r["outputs"][:4] and run_w["answer"] == run_r["answer"] == "11"
    assert result["config"]["params"]["waves_first"] == 0
    radix_engine.check_integrity()


def test_stop_deepconf_runs_the_vote_workload_with_the_branches_logprobs(radix_engine):
    # An approximate rule: what it stops depends on the traces. Checked here: it runs in the
    # bench, each run records its vote, and the branches it counted sampled radix's texts.
    settings = BenchSettings(problems=1, warmup=0, repeats=1, seed=1000,
                             params={"branches": 6, "max_tokens": 24, "difficulty": "easy"})
    result = bench.run_bench("vote", "radix,stop-deepconf", settings, progress=False,
                             engines={m: radix_engine for m in ("radix", "stop-deepconf")})
    deepconf = result["modes"]["stop-deepconf"]
    assert deepconf["stop_rule"] == "deepconf" and deepconf["runs_settled_early"] == 0  # it never settles a vote
    run_d, run_r = result["runs"]["stop-deepconf"][0], result["runs"]["radix"][0]
    for i in range(6):
        if i not in run_d["vote"]["stopped"]:
            assert run_d["outputs"][i] == run_r["outputs"][i]
    radix_engine.check_integrity()
    assert radix_engine.stream_controls.active() == 0
