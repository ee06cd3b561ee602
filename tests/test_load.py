"""The open-loop ``load`` workload: its seeded arrivals, its summary, a short run on the engine."""

from __future__ import annotations

import math
import statistics

import pytest

from rksc_sgl import bench
from rksc_sgl.bench import BenchSettings, WORKLOADS
from rksc_sgl.bench.load import arrival_times, load_summary, parse_rates
from rksc_sgl.bench.runner import _tokenizer
from rksc_sgl.bench.tables import load_rows


def test_arrivals_are_a_seeded_poisson_process():
    times = arrival_times(4000, 2.0, "0:3")
    assert times == arrival_times(4000, 2.0, "0:3")  # the same schedule in every mode and run
    assert times != arrival_times(4000, 2.0, "0:4")
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)  # mean gap 1 / rate
    assert statistics.pstdev(gaps) == pytest.approx(0.5, rel=0.08)  # exponential: sd = mean


def test_each_step_has_its_rate_its_jobs_and_the_same_arrivals_every_time():
    w = WORKLOADS["load"]
    params = w.resolve({"rates": "0.1,0.4", "programs": 4, "disconnect_share": 0.5, "malformed_share": 0.25})
    tok = _tokenizer("smollm2-135m")
    items = w.items(tok, params, seed=7, count=4)
    assert [it.inputs["rate"] for it in items] == [0.1, 0.4, 0.1, 0.4]
    again = w.items(tok, params, seed=7, count=4)
    assert [it.inputs["arrivals"] for it in items] == [it.inputs["arrivals"] for it in again]
    assert items[0].inputs["arrivals"] != items[2].inputs["arrivals"]  # same rate, another draw
    kinds = sorted(kind for kind, _ in items[0].inputs["jobs"])
    assert kinds == ["disconnect"] * 2 + ["malformed"] + ["program"] * 4
    assert len(items[0].inputs["arrivals"]) == 7


@pytest.mark.parametrize("rates, message", [("", "positive numbers"), ("0.1,x", "comma-separated numbers"),
                                            ("0.2,0.1", "increasing order"), ("0,1", "positive numbers"),
                                            ("0.1,0.1", "without repeats")])
def test_bad_rates_are_refused(rates, message):
    with pytest.raises(ValueError, match=message):
        parse_rates(rates)
    with pytest.raises(ValueError, match=message):
        WORKLOADS["load"].resolve({"rates": rates})


def test_fewer_problems_than_rates_are_refused():
    settings = BenchSettings(problems=4, params={"rates": "0.1,0.2,0.3,0.4,0.5,0.6"})
    with pytest.raises(ValueError, match="would run only rates 0.1,0.2,0.3,0.4; give --problems a multiple of 6"):
        bench.run_bench("load", "radix", settings, engines={})
    for problems in (6, 8):  # every rate runs (8: the first two twice)
        WORKLOADS["load"].check_settings(BenchSettings(problems=problems),
                                         WORKLOADS["load"].resolve({"rates": "0.1,0.2,0.3,0.4,0.5,0.6"}))


def _record(rate, latencies, window):
    return {"rate": rate, "program_latency_s": latencies, "window_s": window}


def test_summary_counts_against_the_slo_from_radixs_unloaded_p50():
    params = {"rates": "0.5,1,2", "slo_factor": 2.0}
    runs = {
        "radix": [_record(0.5, [1.0, 1.0, 1.0, 3.0], 10.0), _record(1, [1.5, 2.0, 2.5, 2.5], 8.0),
                  _record(2, [2.0, 4.0, 5.0, 6.0], 4.0)],
        "rksc": [_record(0.5, [0.8, 0.9, 1.0, 1.1], 10.0), _record(1, [1.0, 1.0, 1.5, 1.9], 8.0),
                 _record(2, [1.0, 1.2, 1.8, 1.9], 4.0)],
    }
    s = load_summary(runs, params)
    assert s["slo_s"] == pytest.approx(2.0) and s["reference"] == "radix"  # 2 x p50 of [1, 1, 1, 3]
    radix, mine = s["modes"]["radix"], s["modes"]["rksc"]
    assert radix["rates"]["1"]["slo_attainment"] == 0.5 and radix["rates"]["1"]["goodput_per_s"] == 2 / 8.0
    assert radix["rates"]["2"]["goodput_per_s"] == 1 / 4.0
    assert radix["max_rate_at_slo"] is None  # p90 at rate 0.5 is 2.4 s (interpolated): above the 2 s SLO
    assert mine["max_rate_at_slo"] == 2 and mine["rates"]["2"]["slo_attainment"] == 1.0
    assert mine["rates"]["0.5"]["p50_s"] == pytest.approx(0.95)


def test_a_short_run_on_the_engine_writes_its_table(radix_engine, tmp_path):
    settings = BenchSettings(problems=2, warmup=0, repeats=1, seed=1000,
                             params={"rates": "0.5,2", "programs": 2, "branches": 2, "max_tokens": 8,
                                     "disconnect_share": 0.5, "malformed_share": 0.5})
    result = bench.run_bench("load", "radix,stop-lossless", settings, progress=False,
                             engines={m: radix_engine for m in ("radix", "stop-lossless")})
    load = result["load"]
    assert load["reference"] == "radix" and load["slo_s"] > 0
    for label in ("radix", "stop-lossless"):
        rates = load["modes"][label]["rates"]
        assert sorted(rates) == ["0.5", "2"] and all(r["programs"] == 2 for r in rates.values())
        assert [r["rate"] for r in result["runs"][label]] == [0.5, 2.0]
    assert result["modes"]["radix"]["errors"]["malformed_refused"] == 2
    paths = bench.save(result, tmp_path)
    text = paths["md"].read_text() if "md" in paths else (tmp_path / "bench_load.md").read_text()
    assert "highest rate at SLO" in text and "x radix's p50 at rate 0.5" in text


def _sustaining(radix, mine):
    """A load result whose modes sustain ``(highest rate at the SLO, first rate over it)``."""
    return {"load": {"modes": {"radix": dict(zip(("max_rate_at_slo", "first_rate_over_slo"), radix)),
                               "rksc": dict(zip(("max_rate_at_slo", "first_rate_over_slo"), mine))}}}


@pytest.mark.parametrize("radix, mine, ratio, bracket, verdict", [
    ((0.1, 0.5), (0.5, 0.6), 5.0, (1.0, 6.0), "undecided (rate grid too coarse)"),  # seed 400's grid
    ((0.4, 0.8), (0.4, 0.8), 1.0, (0.5, 2.0), "undecided (rate grid too coarse)"),
    ((0.2, 0.3), (0.6, 0.7), 3.0, (2.0, 3.5), "ok"),
    ((0.4, 0.5), (0.4, 0.5), 1.0, (0.8, 1.25), "MISS"),
    ((0.4, None), (0.8, None), 2.0, (0.0, math.inf), "undecided (rate grid too coarse)"),
    ((0.4, 0.5), (None, 0.1), 0.0, (0.0, 0.25), "MISS"),
])
def test_the_sustained_rate_target_is_judged_on_the_grids_bracket(radix, mine, ratio, bracket, verdict):
    rate_target = WORKLOADS["load"].targets()[0]
    checked = rate_target.check(_sustaining(radix, mine))
    assert checked["value"] == pytest.approx(ratio) and checked["interval"] == pytest.approx(list(bracket))
    assert checked["verdict"] == verdict


def test_a_mode_sustains_only_up_to_its_first_step_over_the_slo():
    params = {"rates": "0.1,0.5,0.6,0.7", "slo_factor": 1.0}
    lat = {0.1: [1.0] * 10, 0.5: [0.5] * 10, 0.6: [3.0] * 10, 0.7: [0.9] * 10}  # 0.7 is under again: noise
    s = load_summary({"radix": [_record(r, v, 10.0) for r, v in lat.items()]}, params)
    assert s["slo_s"] == 1.0
    assert (s["modes"]["radix"]["max_rate_at_slo"], s["modes"]["radix"]["first_rate_over_slo"]) == (0.5, 0.6)
    rows = load_rows({"load": s})
    assert [r[-1] for r in rows[1:]] == ["0.5 (< 0.6)"] * 4 and rows[1][:3] == ("radix", "0.1", "10")
