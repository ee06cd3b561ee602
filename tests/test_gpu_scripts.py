"""The GPU scripts' CPU-checkable parts: the comparison, the smoke model, the cascade timing
loop, and the offline bundle's three device calls."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_bundle  # noqa: E402
import gpu_checks  # noqa: E402


def test_compare_counts_identical_outputs_and_the_first_difference():
    reference = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7]}
    other = {"a": [1, 2, 3], "b": [4, 9, 6]}
    result = gpu_checks.compare(reference, other)
    assert (result["identical"], result["of"]) == (1, 3)
    assert result["per_prompt"]["b"] == {"identical": False, "tokens": 3, "agree_before_first_difference": 1}
    assert result["per_prompt"]["c"] == {"identical": False, "tokens": 1, "agree_before_first_difference": 0}


@pytest.fixture(scope="module")
def tiny_model_dir(radix_engine, tmp_path_factory):
    from rksc_sgl.model.loading import resolve_model_dir

    tokenizer_dir = resolve_model_dir("smollm2-135m", radix_engine.config.resolved_cache_dir)
    return gpu_checks.tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer_dir)


def test_tiny_model_keeps_the_real_head_size_and_tokenizer(tiny_model_dir, radix_engine):
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["head_dim"]) == (2, 64)
    assert config["vocab_size"] == len(radix_engine.tokenizer)


def test_cascade_timings_runs_every_configuration_and_returns_its_slots(tiny_model_dir):
    configs = gpu_checks.CASCADE_CONFIGS[1:3]  # radix with the shared-prefix pass on and off
    result = gpu_checks.cascade_timings(str(tiny_model_dir), repeats=2, branches=3, prefix_words=20, max_tokens=2,
                                        device="cpu", dtype="float32", configs=configs)
    assert list(result["median_s"]) == [label for label, _ in configs]
    assert all(len(times) == 2 for times in result["seconds"].values())
    assert result["x_first"][configs[0][0]] == 1.0


def test_bundle_has_one_device_call_per_part_and_only_the_first_installs(capsys):
    assert len(gpu_bundle.RUN) == 3
    for i, command in enumerate(gpu_bundle.RUN, 1):
        assert f".gpu/part{i}/" in command
        assert all(f".gpu/part{j}/" not in command for j in (1, 2, 3) if j != i)
    assert "pip install" in gpu_bundle.RUN[0] and "pip install" not in gpu_bundle.RUN[2]
    assert "gpu_checks.py --out" in gpu_bundle.RUN[2]
    gpu_bundle.main(["--print-run"])
    assert capsys.readouterr().out.count("# call ") == 3


def test_runtime_check_says_why_it_is_skipped_without_sgl_kernel(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sgl_kernel" else real_find_spec(name, *a))
    assert "needs sglang-kernel" in gpu_checks.runtime_check()["skipped"]


def test_runtime_serves_a_local_folder_unless_told_otherwise(monkeypatch, radix_engine):
    monkeypatch.delenv("RKSC_GPU_RUNTIME_MODEL", raising=False)
    assert (Path(gpu_checks.runtime_model_dir()) / "config.json").is_file()  # the packaged model, converted
    monkeypatch.setenv("RKSC_GPU_RUNTIME_MODEL", "/models/other")
    assert gpu_checks.runtime_model_dir() == "/models/other"


def test_workload_run_records_the_engine_and_a_table():
    result = gpu_checks.workload_run("paper", "radix", "smollm2-135m", problems=1, repeats=1, device="cpu",
                                     branches=2, max_tokens=2, prompt_tokens=100)
    assert result["gpu_engine"] == {"device": "cpu", "dtype": "float32", "attention_backend": "torch"}
    assert "| radix |" in result["table"] and result["config"]["settings"]["problems"] == 1


def test_cascade_sweep_times_the_pass_on_and_off_at_each_size(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(gpu_checks, "CASCADE_SWEEP", ((20, 2), (30, 3)))
    result = gpu_checks.cascade_sweep(str(tiny_model_dir), repeats=1, device="cpu", dtype="float32")
    assert list(result) == ["default_size", "words20_branches2", "words30_branches3"]
    assert len(result["default_size"]["median_s"]) == len(gpu_checks.CASCADE_CONFIGS)
    assert list(result["words30_branches3"]["median_s"]) == ["radix_flashinfer_cascade", "radix_flashinfer_no_cascade"]
    assert result["words30_branches3"]["branches"] == 3


def test_unknown_steps_are_refused_and_the_smoke_call_runs_only_greedy(capsys):
    with pytest.raises(SystemExit):
        gpu_checks.main(["--skip", "greedy,papers"])
    assert "the steps are greedy, paper, asks, cascade, runtime" in capsys.readouterr().err
    smoke_skip = gpu_bundle.RUN[0].split("--skip ")[1].split()[0].split(",")
    assert sorted(smoke_skip) == sorted(set(gpu_checks.STEPS) - {"greedy"})


def test_runtime_smoke_dry_run_plans_every_row_and_checks_its_verdicts(capsys):
    """benchmarks/gpu_runtime_smoke.py --dry-run: what keeps the GPU smoke script from rotting."""
    import gpu_runtime_smoke as smoke

    assert smoke.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 14 and all(line.startswith("PASS") for line in lines)
    assert any("--tp-size 2" in line and "rsbcm" in line for line in lines)
    assert any("RKSC_SEEDED_SAMPLING=1" in line and "--sampling-backend pytorch" in line for line in lines)
