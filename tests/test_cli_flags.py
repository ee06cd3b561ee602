"""The ``rksc-sgl`` command line as a whole: every flag a command's ``--help`` lists is read by
that command, on/off switches declare their choices, old spellings (``--model``, ``--cache
rksc``, ``--rksc-cache``) still work with a notice, ``bench --help``/``--list`` and the mode
table, ``serve``/``run`` and ``--endpoint``, and the demo.

No test here starts an SGLang server; the demo test runs two small engines."""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from types import SimpleNamespace

import pytest

from rksc_sgl import arg_types, cli
from rksc_sgl.bench import MODES, WORKLOADS, BenchSettings, mode_table

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OPTION_LINE = re.compile(r"^  (?:-\w, )?(--[a-z][\w-]*)", re.MULTILINE)
"""An option's own line in ``--help`` (argparse indents options by two spaces)."""


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """Help texts unwrapped (argparse wraps at hyphens, splitting a flag in two)."""
    monkeypatch.setenv("COLUMNS", "1000")
SUBCOMMANDS = ("run", "demo", "serve", "patch", "bench")
ROUTER_FLAGS = {"--cache-threshold", "--balance-abs-threshold", "--policy"}
"""Flags of SGLang's router that ``bench --help`` cites (``--router-args``)."""


def _subparsers(parser: argparse.ArgumentParser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _listed_actions(parser: argparse.ArgumentParser):
    """The actions ``--help`` lists (an option, not ``--help``/``--version``, not hidden)."""
    return [a for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@functools.lru_cache(maxsize=None)
def _sglang_flags() -> frozenset:
    from rksc_sgl.runtime.launch_plan import sglang_parser

    return frozenset(s for a in sglang_parser()._actions for s in a.option_strings)


# ---- every flag in --help is honoured ---------------------------------------------------------------
class Recording(argparse.Namespace):
    """A namespace that remembers which attributes were read after parsing."""

    def __init__(self, **kwargs):
        object.__setattr__(self, "_reads", set())
        super().__init__(**kwargs)

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_reads").add(name)
        return object.__getattribute__(self, name)


@pytest.fixture()
def reads(monkeypatch):
    """Every parse gives a :class:`Recording`; reads during parsing are forgotten. Yields the
    set of names read afterwards, over every namespace parsed."""
    spies = []
    real = argparse.ArgumentParser.parse_known_args

    def spying(self, args=None, namespace=None):
        namespace = Recording() if namespace is None else namespace
        result = real(self, args, namespace)
        if isinstance(namespace, Recording):
            object.__getattribute__(namespace, "_reads").clear()
            spies.append(namespace)
        return result

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", spying)
    yield lambda: set().union(*(object.__getattribute__(s, "_reads") for s in spies))


class FakeEngine:
    """What ``run``/``serve`` ask of an engine."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.config = SimpleNamespace(cache=kwargs.get("cache", "radix"), model=kwargs.get("model"))

    def stats(self, reset_peak=False):
        from rksc_sgl.engine.request import EngineStats

        return EngineStats()

    def check_integrity(self):
        pass

    def shutdown(self):
        pass


def _fake_result(branches=2):
    """A ``run_bench`` result with what the demo reads."""
    def runs(answers, decode, time_s):
        return [{"problem": i, "answer": a, "time_s": time_s, "prefill_tokens": 20, "cached_tokens": 40,
                 "decode_tokens": decode, "correct": a == "4"} for i, a in enumerate(answers)]

    return {"runs": {"radix": runs(["4", "7"], 30, 2.0), "rksc": runs(["4", "7"], 20, 1.0)},
            "modes": {"radix": {}, "rksc": {"branches_stopped": 3}}, "backend": "engine",
            "config": {"params": {"branches": branches, "max_tokens": 16, "dataset": "basic_arithmetic"},
                       "settings": {"problems": 2, "model": "smollm2-135m"}},
            "command": "rksc-sgl bench --workload vote --modes radix,rksc"}


@pytest.fixture()
def stubbed(monkeypatch, tmp_path):
    """Each command's heavy work replaced by a stub that records what it was given."""
    import rksc_sgl.bench.cli as bench_cli
    import rksc_sgl.bench.runner as runner
    import rksc_sgl.engine.backend as backend
    import rksc_sgl.runtime.endpoint as endpoint
    import rksc_sgl.runtime.launcher as launcher
    import rksc_sgl.runtime.sglang_patches as patches
    import rksc_sgl.serving.server as server

    seen = {}
    monkeypatch.setattr(backend, "Engine", FakeEngine)
    monkeypatch.setattr(endpoint, "RuntimeBackend", lambda url: FakeEngine(cache="rksc", url=url))
    monkeypatch.setattr(server, "serve", lambda engine, **kw: seen.setdefault("serve", kw))
    monkeypatch.setattr(patches, "status", lambda: [])
    monkeypatch.setattr(patches, "apply", lambda: [])

    def fake_run_bench(workload, modes, settings, **kw):
        seen.setdefault("bench", []).append((workload, modes, settings, kw))
        return _fake_result()

    monkeypatch.setattr(bench_cli, "run_bench", fake_run_bench)
    monkeypatch.setattr(runner, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench_cli, "save", lambda result, out_dir: seen.setdefault("saved", out_dir))

    class FakeServer:
        def __init__(self, plan, startup_timeout):
            seen["startup_timeout"] = startup_timeout
            self.url = "http://127.0.0.1:1"

        def start(self):
            pass

        def wait(self):
            return "stopped in a test"

        def stop(self):
            pass

    def fake_plan(argv, **kwargs):
        seen["plan"] = (argv, kwargs)
        return SimpleNamespace(added=[], shell_command=lambda: "python -m sglang.launch_server")

    monkeypatch.setattr(launcher, "plan_launch", fake_plan)
    monkeypatch.setattr(launcher, "RuntimeServer", FakeServer)
    program = tmp_path / "program.py"
    program.write_text("pass\n")
    seen["program"] = str(program)
    return seen


RUNS = {
    "run": lambda seen: ["run", seen["program"]],
    "demo": lambda seen: ["demo", "--no-progress"],
    "serve": lambda seen: ["serve"],
    "patch": lambda seen: ["patch", "--check"],
    "bench": lambda seen: ["bench", "--problems", "1", "--no-progress"],
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_flag_in_a_commands_help_is_read_by_the_command(command, stubbed, reads, capsys):
    """Parse the command's ``--help``; run the command (its work stubbed) and check that it read
    every flag listed there, so no flag is accepted and then ignored."""
    parser = _subparsers(cli.build_parser())[command]
    listed = set(OPTION_LINE.findall(parser.format_help())) - {"--help"}
    actions = {a.dest: a for a in _listed_actions(parser)}
    assert listed == {a.option_strings[0] for a in actions.values()} and listed
    cli.main(RUNS[command](stubbed))
    capsys.readouterr()
    unread = sorted(a.option_strings[0] for dest, a in actions.items() if dest not in reads())
    assert not unread, f"rksc-sgl {command} lists {unread} in --help but never reads them"


def test_launch_server_reads_every_flag_of_its_own(stubbed, reads, capsys):
    from rksc_sgl.runtime.launcher import launch_server_main, launcher_parser

    actions = {a.dest: a for a in _listed_actions(launcher_parser())}
    assert launch_server_main(["--model-path", "smollm2-135m"]) == 1  # the fake server "stopped"
    capsys.readouterr()
    unread = sorted(a.option_strings[0] for dest, a in actions.items() if dest not in reads())
    assert not unread, f"rksc-sgl launch-server lists {unread} but never reads them"
    assert stubbed["startup_timeout"] > 0 and stubbed["plan"][1]["rksc_cache"] is True


@pytest.mark.parametrize("command", ("",) + SUBCOMMANDS)
def test_every_flag_a_help_text_names_exists(command):
    """A flag named anywhere in a help text (prose included) is an option of rksc-sgl, of
    SGLang's server or of SGLang's router: no help names a flag that is gone."""
    parser = cli.build_parser()
    subs = _subparsers(parser)
    text = (subs[command] if command else parser).format_help()
    ours = {s for p in [parser, *subs.values()] for a in p._actions for s in a.option_strings
            if a.help != argparse.SUPPRESS}
    from rksc_sgl.runtime.launcher import launcher_parser

    ours |= {s for a in launcher_parser()._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
    unknown = sorted(set(FLAG.findall(text)) - ours - _sglang_flags() - ROUTER_FLAGS)
    assert not unknown, f"`rksc-sgl {command} --help` names {unknown}, which no parser takes"


# ---- on/off switches ---------------------------------------------------------------------------------
def _all_parsers():
    from rksc_sgl.program_runner import program_parser
    from rksc_sgl.programs import best_of_n_cgee
    from rksc_sgl.runtime.launcher import launcher_parser

    parser = cli.build_parser()
    yield from _subparsers(parser).items()
    yield "launch-server", launcher_parser()
    yield "program", program_parser("best_of_n_cgee", best_of_n_cgee.cli_options())


def test_every_switch_declares_its_choices():
    """A flag whose values are on/off (or 0/1) lists them; no switch takes a free string."""
    switches = 0
    for name, parser in _all_parsers():
        for action in _listed_actions(parser):
            kind = getattr(action.type, "__name__", "")
            if action.type is arg_types.on_off:
                switches += 1
                assert action.choices == (True, False) and action.metavar == "{on,off}", (name, action.dest)
            elif kind in ("until_answer", "fork_commit", "restate"):
                switches += 1
                assert tuple(action.choices) == (0, 1), (name, action.dest)
            if isinstance(action.default, bool) and not isinstance(action, (argparse._StoreTrueAction,
                                                                           argparse._StoreFalseAction)):
                assert action.choices, f"{name} {action.option_strings}: a boolean default with no choices"
    assert switches >= 7  # launch-server's three, bench's three workload switches, ...
    from rksc_sgl.runtime.launcher import launcher_parser

    assert launcher_parser().parse_known_args(["--attention-stats", "off"])[0].attention_stats is False
    with pytest.raises(SystemExit):
        launcher_parser().parse_known_args(["--attention-stats", "maybe"])


def test_program_switches_list_on_off(capsys):
    from rksc_sgl.program_runner import program_main
    from rksc_sgl.programs import best_of_n_cgee

    with pytest.raises(SystemExit):
        program_main(best_of_n_cgee.solve, argv=["--help"], options=best_of_n_cgee.cli_options())
    out = capsys.readouterr().out
    assert "--skip-gate {on,off}" in out and "--exit-gate {on,off}" in out and "(default: off)" in out


# ---- old spellings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "serve", "bench", "demo"])
def test_model_path_everywhere_and_model_still_works_with_a_notice(command, capsys):
    parser = _subparsers(cli.build_parser())[command]
    text = parser.format_help()
    assert "--model-path" in text and not re.search(r"--model(?![-\w])", text)
    prefix = ["x.py"] if command == "run" else []
    assert parser.parse_args(prefix + ["--model-path", "m1"]).model == "m1"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(prefix + ["--model", "m2"]).model == "m2"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model is deprecated, use --model-path" in err


def test_the_bench_command_line_records_model_path():
    from rksc_sgl.bench import command_line, parse_modes, validate_args

    settings = BenchSettings(model="smollm2-135m", problems=2)
    line = command_line("vote", parse_modes("radix,rksc"), settings)
    assert "--model-path smollm2-135m" in line and not re.search(r"--model(?![-\w])", line)
    assert validate_args(cli.build_parser().parse_args(shlex.split(line)[1:]))[2] == settings


def test_the_tree_alone_is_rksc_tree_and_rksc_still_works_with_a_notice(capsys):
    import warnings

    from rksc_sgl import engine_flags
    from rksc_sgl.config import CACHE_MODES, EngineConfig

    assert "rksc-tree" in CACHE_MODES and "rksc" not in CACHE_MODES
    parser = engine_flags.add_engine_args(argparse.ArgumentParser())
    assert parser.parse_args(["--cache", "rksc-tree"]).cache == "rksc-tree"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["--cache", "rksc"]).cache == "rksc-tree"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'rksc' is now called 'rksc-tree'" in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = EngineConfig(cache="rksc", eviction_policy="rsbcm", asks={"enabled": True})
    assert config.cache == "rksc-tree" and config.cache_spec.rksc_tree
    assert [w.category for w in caught if "rksc-tree" in str(w.message)] == [FutureWarning]
    with pytest.raises(ValueError, match="ASKS needs cache='rksc-tree'"):
        EngineConfig(cache="radix", asks={"enabled": True})


def test_launch_server_rksc_tree_flag_and_its_old_spelling(capsys):
    from rksc_sgl.runtime.launcher import launcher_parser

    parser = launcher_parser()
    assert parser.parse_known_args(["--rksc-tree", "off"])[0].rksc_cache is False
    assert parser.parse_known_args([])[0].rksc_cache is True
    assert capsys.readouterr().err == ""
    ours, rest = parser.parse_known_args(["--rksc-cache", "off", "--model-path", "m"])
    assert ours.rksc_cache is False and rest == ["--model-path", "m"]
    assert "--rksc-cache is deprecated, use --rksc-tree" in capsys.readouterr().err
    assert "--rksc-cache" not in parser.format_help()


# ---- --endpoint: honoured by run, refused by serve --------------------------------------------------
def test_serve_refuses_endpoint_with_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--endpoint", "http://127.0.0.1:30000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "serve runs its own embedded engine, so it takes no --endpoint" in err
    assert "--endpoint" not in _subparsers(cli.build_parser())["serve"].format_help()


def test_run_endpoint_runs_the_program_on_that_server(stubbed, capsys):
    assert cli.main(["run", stubbed["program"], "--endpoint", "http://127.0.0.1:9", "--cache", "radix"]) == 0
    captured = capsys.readouterr()
    assert "ignoring --cache" in captured.err
    assert "cache=rksc" in captured.out  # the server's cache, reported by its backend


# ---- help texts -------------------------------------------------------------------------------------
def test_top_level_help_describes_both_backends():
    text = cli.build_parser().format_help()
    for needle in ("launch-server", "embedded engine", "SGLang's runtime", "sgl.RuntimeEndpoint", "--backend",
                   "ASKS", "RSBCM", "CGEE"):
        assert needle in text


def test_bench_help_lists_workloads_and_modes_one_line_each(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = _subparsers(cli.build_parser())["bench"]
    text = parser.format_help()
    lines = text.splitlines()
    for name, summary in [(w.name, w.summary) for w in WORKLOADS.values()] + [(m.name, m.help) for m in
                                                                             MODES.values()]:
        assert summary and any(re.match(rf"\s+{re.escape(name)}\s+{re.escape(summary)}$", line) for line in lines)
    assert all(len(line) <= 140 for line in lines)
    assert "one CPU thread" not in text and "--backend runtime" in text and "bench --list" in text
    workload_help = next(a.help for a in parser._actions if a.dest == "workload")
    assert len(workload_help) < 100


def test_bench_list_describes_every_workload_and_mode(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for w in WORKLOADS.values():
        assert f"{w.name}: {w.help.split()[0]}" in out
    for row in mode_table():
        assert f"\n{row['mode']}: {row['summary']}\n" in out
    assert "Engine(cache='rksc-tree', asks=" in out and "--radix-cache-backend radix-stock" in out
    assert "(fixed)" in out and "--fork-commit 0 (runtime 1)" in out


# ---- the mode table ---------------------------------------------------------------------------------
def test_mode_table_gives_each_modes_flags_on_both_backends():
    from rksc_sgl.runtime.bench_servers import RUNTIME_FLAGS, server_flags

    settings = BenchSettings(asks_tau=0.9)
    rows = {row["mode"]: row for row in mode_table(settings)}
    assert list(rows) == list(MODES)
    for name, row in rows.items():
        mode = MODES[name]
        assert row["engine"] == mode.engine_kwargs(settings)
        argv, plan_kwargs = server_flags(mode, settings, {}, 0)
        mode_flags = RUNTIME_FLAGS[name][0]
        at = argv.index("--sleep-on-idle") + 1
        assert argv[at:at + len(mode_flags)] == mode_flags == row["sglang_flags"][:len(mode_flags)]
        assert ("RKSC_ASKS" in row["env"]) == mode.asks == ("asks" in plan_kwargs)
        assert bool(row["client"]) == bool(mode.cgee or mode.stop)
    assert rows["rksc"]["engine"]["cache"] == "rksc-tree" and '"tau": 0.9' in rows["rksc"]["env"]["RKSC_ASKS"]
    assert rows["radix"]["sglang_flags"] == [] and rows["radix"]["launch_server"] == ["--rksc-tree", "off"]
    assert rows["rsbcm"]["launch_server"] == []  # launch-server's defaults
    assert rows["rksc"]["launch_server"] == ["--asks-tau", "0.9", "--asks-recompute", "0.5"]


@pytest.mark.parametrize("name", list(MODES))
def test_the_launch_server_column_starts_the_benchs_server(name, monkeypatch):
    """``rksc-sgl launch-server`` with the table's flags plans the same cache flags and ASKS
    environment as the server ``bench --backend runtime`` starts for the mode."""
    from rksc_sgl.runtime import bench_servers, launch_plan
    from rksc_sgl.runtime.launcher import _asks_from_flags, launcher_parser

    plan = functools.partial(launch_plan.plan_launch, cuda=False, sgl_kernel_installed=True, environ={})
    monkeypatch.setattr(launch_plan, "plan_launch", plan)
    settings = BenchSettings()
    row = next(r for r in mode_table(settings) if r["mode"] == name)
    bench_plan = bench_servers.worker_plans(MODES[name], settings, {}, ports=[31000], cores=[0])[0]
    ours, sglang_argv = launcher_parser().parse_known_args(["--model-path", settings.model, *row["launch_server"]])
    launched = plan(sglang_argv, rksc_cache=ours.rksc_cache, attention_stats=ours.attention_stats,
                    asks=_asks_from_flags(ours))

    def cache_flags(argv):
        keep = ("--radix-cache-backend", "--radix-eviction-policy", "--forward-hooks", "--chunked-prefill-size")
        out = {f: argv[argv.index(f) + 1] for f in keep if f in argv}
        out["--disable-radix-cache"] = "--disable-radix-cache" in argv
        return out

    assert cache_flags(launched.argv) == cache_flags(bench_plan.argv) == cache_flags(row["sglang_flags"])
    assert launched.env.get("RKSC_ASKS") == bench_plan.env.get("RKSC_ASKS") == row["env"].get("RKSC_ASKS")


# ---- the demo ---------------------------------------------------------------------------------------
def test_demo_runtime_builds_the_benchs_runtime_settings():
    from rksc_sgl.demo import demo_settings

    parser = _subparsers(cli.build_parser())["demo"]
    workload, modes, settings = demo_settings(parser.parse_args(["--backend", "runtime", "--problems", "2",
                                                                 "--model-path", "smollm2-135m"]))
    assert workload.name == "vote" and [m.label for m in modes] == ["radix", "rksc"]
    assert (settings.backend, settings.problems, settings.model, settings.servers) == ("runtime", 2, "smollm2-135m",
                                                                                      "together")
    assert settings.params == {"branches": 8, "max_tokens": 128}


def test_demo_report_shape():
    from rksc_sgl.demo import demo_report

    text = demo_report(_fake_result())
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode"))
    for needle in ("wall time s", "prompt tok computed", "prompt tok cached", "decode tok", "answers = radix"):
        assert needle in lines[header]
    assert lines[header + 2].split()[:6] == ["radix", "4.0", "40", "80", "60", "(reference)"]
    assert lines[header + 3].split()[:6] == ["rksc", "2.0", "40", "80", "40", "2/2"]
    assert "2.00x the speed; 20 fewer decode tokens (3 branches stopped" in text
    assert "the same voted answer on 2 of 2 problems" in text
    assert text.splitlines()[-1].startswith("The same run with every statistic: rksc-sgl bench --workload vote")


def test_demo_on_the_engine_prints_the_side_by_side_table(capsys):
    """The real thing, small: one problem, two branches, a few tokens, both modes on engines."""
    assert cli.main(["demo", "--problems", "1", "--branches", "2", "--max-tokens", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("rksc-sgl demo: self-consistency (2 sampled branches of at most 8 tokens")
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 4]}
    assert set(rows) == {"radix", "rksc"} and not lines[header + 4].strip()
    assert rows["radix"][5] == "(reference)" and rows["rksc"][5] in ("0/1", "1/1")
    assert int(rows["radix"][3]) > 0  # the branches reuse the question's KV
    assert "--backend engine --branches 2 --max-tokens 8" in out
