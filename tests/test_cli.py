"""The rksc-sgl command, the shared program helpers, and the reasoning programs end to end."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rksc_sgl import arg_types, cli, engine_flags, program_runner
from rksc_sgl.problems import load_problems
from rksc_sgl.engine.request import EngineStats

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "programs"
TINY = ["--problems", "1", "--branches", "2", "--max-tokens", "16"]


def _load_program(name: str):
    """Import ``programs/NAME.py`` (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"rksc_program_{name}", PROGRAMS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed ``rksc-sgl`` console script (or ``python -m rksc_sgl.cli`` without one)."""
    script = Path(sys.executable).with_name("rksc-sgl")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rksc_sgl.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ))


# ---- command line ---------------------------------------------------------------------------
def test_help_works(capsys):
    top = _cli("--help")
    assert top.returncode == 0, top.stderr
    assert "run" in top.stdout and "demo" in top.stdout
    for sub, flags in (("run", ("--cache", "--kv-pool-tokens")), ("demo", ("--backend", "--problems"))):
        with pytest.raises(SystemExit) as exc:
            cli.main([sub, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags)
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_run_missing_program_fails_clearly():
    out = _cli("run", "missing.py")
    assert out.returncode != 0
    assert "missing.py" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_rejects_program_args_before_separator(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", str(PROGRAMS / "best_of_n.py"), "--problems", "1"])
    assert exc.value.code == 2
    assert "after `--`" in capsys.readouterr().err


def test_run_directory_is_not_a_program(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_engine_kwargs_defaults_and_flags():
    parser = engine_flags.add_engine_args(argparse.ArgumentParser())
    assert engine_flags.engine_kwargs(parser.parse_args([])) == {"model": "smollm2-135m", "cache": "radix", "num_threads": 1}
    got = engine_flags.engine_kwargs(parser.parse_args(["--cache", "none", "--kv-pool-tokens", "2048", "--threads", "2",
                                               "--max-running", "8", "--engine-seed", "5"]))
    assert got == {"model": "smollm2-135m", "cache": "none", "num_threads": 2, "kv_pool_tokens": 2048,
                   "max_running_requests": 8, "seed": 5}
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-pool-tokens", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache", "bogus"])


def test_installed_engine_reused_and_each_differing_flag_named(monkeypatch, capsys):
    """A program under ``rksc-sgl run`` reuses its engine; every engine flag the program was
    given that differs from that engine (the compression flags too) is named in one note."""
    from types import SimpleNamespace

    from rksc_sgl.config import EngineConfig

    installed = SimpleNamespace(config=EngineConfig(cache="rksc-tree", num_threads=1,
                                                   compression={"method": "rkv", "budget": 0.2}))
    monkeypatch.setattr(engine_flags, "installed_engine", lambda: installed)
    parser = engine_flags.add_engine_args(argparse.ArgumentParser())

    same = parser.parse_args(["--cache", "rksc-tree", "--kv-compression", "rkv", "--kv-budget", "0.2"])
    assert engine_flags.engine_from_args(same) == (installed, False)
    assert capsys.readouterr().err == ""

    differing = parser.parse_args(["--cache", "radix", "--kv-compression", "cask", "--kv-budget", "0.5",
                                   "--threads", "1"])
    assert engine_flags.engine_from_args(differing) == (installed, False)
    err = capsys.readouterr().err
    assert "ignoring --cache, --kv-compression, --kv-budget\n" in err

    installed.config = EngineConfig(cache="radix")
    assert engine_flags.engine_from_args(parser.parse_args(["--kv-compression", "recent"])) == (installed, False)
    assert "ignoring --kv-compression\n" in capsys.readouterr().err


def test_format_stats_names_every_counter():
    stats = EngineStats(requests=3, prefill_tokens=30, cached_tokens=90, decode_tokens=12, forward_passes=7,
                        peak_kv_tokens=140, busy_time_s=1.5)
    text = program_runner.format_stats(stats, 2.0, per_problem=[1.0, 3.0], cache="radix")
    for needle in ("prefill tokens computed:  30", "tokens served from cache: 90 (75.0% of prompt tokens)",
                   "decode tokens:", "peak KV tokens:", "wall time:", "2.00 s", "cache=radix", "median"):
        assert needle in text


# ---- the programs on the session engine ----------------------------------------------------------------
def test_best_of_n_program_end_to_end(checked, use_backend, capsys):
    """programs/best_of_n.py's command line, reusing the engine installed as default backend."""
    use_backend(checked)
    program = _load_program("best_of_n")
    assert program_runner.program_main(program.solve, argv=TINY + ["--cache", "radix"]) == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "reference=" in out and "verdicts" in out
    for needle in ("prefill tokens computed:", "tokens served from cache:", "decode tokens:", "peak KV tokens:",
                   "wall time:"):
        assert needle in out
    served = int(out.split("tokens served from cache:")[1].split()[0])
    assert served > 0  # the branches and the verifier reuse the shared prompt


def _majority_by_hand(answers):
    """The most common answer (None does not vote; a tie goes to the one seen first) and its votes."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None, 0
    best = max(valid.count(a) for a in valid)
    winner = next(a for a in valid if valid.count(a) == best)
    return winner, best


class _GivenAnswers:
    """Stands in for the SGLang program: ``run`` returns a state whose branches answered ``answers``."""

    def __init__(self, answers):
        self.answers = answers

    def run(self, **kwargs):
        return argparse.Namespace(ret_value=list(self.answers))


def test_self_consistency_is_importable_and_votes(checked, monkeypatch):
    import rksc_sgl.programs.self_consistency as package_program
    from rksc_sgl.problems import ANSWER_INSTRUCTION, SYSTEM_PROMPT, extract_answer

    program = _load_program("self_consistency")
    problem = load_problems(count=1, seed=0)[0]
    # Sampled branches share the prompt's KV, and the answer is their majority.
    before = checked.stats()
    solution = program.solve(problem, num_branches=2, max_tokens=16, backend=checked)
    stats = checked.stats().since(before)
    assert len(solution.candidates) == 2
    answer, votes = _majority_by_hand(solution.candidates)
    assert solution.answer == answer and solution.detail == f"majority {votes}/2"
    assert stats.cached_tokens > 0
    # Greedy branches: each is the greedy continuation of the program's prompt, generated here
    # directly on the engine from the prompt written out in the chat template's markup.
    prompt = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{problem.question.strip()} "
              f"{ANSWER_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    direct = checked.generate_request(text=prompt, sampling_params={"max_new_tokens": 16, "temperature": 0,
                                                                    "stop": ["\n\n"]})
    expected = extract_answer(direct["text"])
    greedy = program.solve(problem, num_branches=2, max_tokens=16, sample_temperature=0.0, backend=checked)
    assert greedy.candidates == [expected, expected]
    assert greedy.answer == expected and greedy.detail == f"majority {2 if expected is not None else 0}/2"
    # The vote over given branch answers.
    for answers, want in ((["4", None, "5", "5", "4", "5"], ("5", "majority 3/6")),
                          (["3", "4"], ("3", "majority 1/2")),
                          ([None, None], (None, "majority 0/2"))):
        monkeypatch.setattr(package_program, "self_consistency", _GivenAnswers(answers))
        voted = program.solve(problem, num_branches=len(answers), backend=checked)
        assert (voted.answer, voted.detail) == want and voted.candidates == answers


def test_tree_of_thought_nested_forks(checked):
    program = _load_program("tree_of_thought")
    problem = load_problems(count=1, seed=1)[0]
    state = program.tree_of_thought.run(question=problem.question, num_branches=3, max_tokens=12, keep=2,
                                        expand=2, backend=checked)
    result = state.ret_value
    assert len(result["approaches"]) == 3 and len(result["expanded"]) == 2
    margins = [a["margin"] for a in result["approaches"]]
    assert [margins[i] for i in result["expanded"]] == sorted(margins, reverse=True)[:2]
    assert len(result["leaves"]) == 4 and {i for i, _ in result["leaves"]} == set(result["expanded"])


def test_best_of_n_pick_prefers_verified_then_votes():
    program = _load_program("best_of_n")
    verified = program.pick([
        {"answer": "3", "verdict": "NO", "yes_logprob": -0.1, "no_logprob": -0.05},
        {"answer": "4", "verdict": "YES", "yes_logprob": -0.9, "no_logprob": -1.5},
        {"answer": "5", "verdict": "YES", "yes_logprob": -0.4, "no_logprob": -1.5},
        {"answer": None, "verdict": "YES", "yes_logprob": -0.01, "no_logprob": -3.0},
    ])
    assert verified.answer == "5"
    fallback = program.pick([
        {"answer": "3", "verdict": "NO", "yes_logprob": -2.0, "no_logprob": -0.1},
        {"answer": "4", "verdict": "NO", "yes_logprob": -2.0, "no_logprob": -0.1},
        {"answer": "4", "verdict": "NO", "yes_logprob": -2.0, "no_logprob": -0.1},
    ])
    assert fallback.answer == "4" and "majority" in fallback.detail


# ---- rksc-sgl run, the whole path (own engine in a subprocess) -------------------------------------
def test_rksc_sgl_run_program_end_to_end():
    out = _cli("run", str(PROGRAMS / "self_consistency.py"), "--cache", "radix", "--threads", "1",
               "--kv-pool-tokens", "4096", "--", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy:" in out.stdout
    assert "== rksc-sgl run: self_consistency.py (exit 0) ==" in out.stdout
    assert out.stdout.count("prefill tokens computed:") == 2  # the program's report and the run's
    assert "cache=radix" in out.stdout


def test_asks_flags_build_the_asks_config():
    import argparse

    from rksc_sgl.engine_flags import add_engine_args, engine_kwargs

    parser = add_engine_args(argparse.ArgumentParser())
    kwargs = engine_kwargs(parser.parse_args(["--cache", "rksc", "--asks-tau", "0.9", "--asks-recompute", "0.25"]))
    assert kwargs["asks"] == {"enabled": True, "tau": 0.9, "recompute_fraction": 0.25}
    assert "asks" not in engine_kwargs(parser.parse_args(["--cache", "rksc"]))
    config = __import__("rksc_sgl").EngineConfig(**kwargs)
    assert config.asks.enabled and config.asks.tau == 0.9
    layered = engine_kwargs(parser.parse_args(["--cache", "rksc", "--asks-tau", "0.9", "--asks-key-layer", "4"]))
    assert layered["asks"] == {"enabled": True, "tau": 0.9, "key_layer": 4}
    compressed = engine_kwargs(parser.parse_args(["--kv-compression", "cask", "--kv-budget", "0.1"]))
    assert compressed["compression"] == {"method": "cask", "budget": 0.1}
    with pytest.raises(ValueError, match="--kv-compression"):
        engine_kwargs(parser.parse_args(["--kv-budget", "0.1"]))


def test_on_off_and_fraction_flags():
    assert [arg_types.on_off(v) for v in ("on", "OFF", "yes", "0")] == [True, False, True, False]
    assert arg_types.fraction("0.25") == 0.25
    for bad, kind in (("maybe", arg_types.on_off), ("1.5", arg_types.fraction), ("x", arg_types.fraction)):
        with pytest.raises(argparse.ArgumentTypeError):
            kind(bad)


def test_best_of_n_cgee_gate_flags_reach_verify(checked, use_backend, capsys):
    """--exit-gate / --audit-fraction become the CGEEConfig that verify runs with."""
    use_backend(checked)
    program = _load_program("best_of_n_cgee")
    import rksc_sgl

    seen = []
    real_verify = rksc_sgl.verify  # what the program (rksc_sgl/programs/best_of_n_cgee.py) calls

    def spy(forks, **kwargs):
        seen.append(kwargs["config"])
        return real_verify(forks, **kwargs)

    rksc_sgl.verify = spy
    try:
        argv = TINY + ["--cache", "radix", "--exit-gate", "on", "--audit-fraction", "0.5", "--skip-gate", "off"]
        assert program_runner.program_main(program.solve, argv=argv, options=program.cli_options()) == 0
    finally:
        rksc_sgl.verify = real_verify
    assert len(seen) == 1
    assert (seen[0].exit_gate, seen[0].audit_fraction, seen[0].skip_gate) == (True, 0.5, False)
    assert "verified, mean exit layer" in capsys.readouterr().out
