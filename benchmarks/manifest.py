"""Index the committed results: for each run, its status, finding, command, commit and machine.

``benchmarks/results/`` holds one folder per run, ``<backend>/<feature-or-workload>/<run>/``
(``backend``: ``engine``, ``runtime`` or ``gpu``), and only runs that README.md, CHANGELOG.md or a
page of ``docs/`` cites. Each run folder has a ``RUN.md`` whose first lines are written by hand:

============================  ================================================================
line                          what it says
============================  ================================================================
``- status: STATUS``          ``current`` (the measurement a page gives now), ``superseded``
                              (a newer run measures the same thing) or ``negative finding``
                              (cited by docs/benchmarks.md's "Negative findings" table)
``- superseded by: RUN``      with ``superseded`` only: the run that replaced it
                              (``engine/asks/bf16-computed-seed0``)
``- finding: TEXT``           what the run showed, one line of at most 100 characters
``- commit: SHA``             only for a run whose JSON recorded no commit: the commit that
                              added its files
============================  ================================================================

This script writes the rest of each ``RUN.md`` (the command that reproduces the run, its commit,
date, machine and files) from the run's JSON, and ``benchmarks/results/manifest.json`` and
``MANIFEST.md`` (one row per run). ``tests/test_results_manifest.py`` checks that they are what
this script writes now, that every run has a status and a finding, and that every run is cited.

The command is the run's recorded ``command`` (``report.run_record``); older scripts did not
record one, and theirs is rebuilt from the recorded arguments (``config``/``settings``). It
always writes to the run's own folder (``--out-dir``, or ``--out`` for ``gpu_checks.py``). A
runtime bench from before ``--servers`` ran its modes one after another: its command gets
``--servers one-at-a-time``, which does that now.

A page cites a run by naming its folder or one of its files, in full
(``benchmarks/results/engine/asks/heldout-rc05-seed1000/``), from its backend
(``engine/asks/heldout-rc05-seed1000/``), or, after such a path in the same paragraph, by the
run's name alone (``heldout-rc05-seed2000/``); ``*`` matches within a name
(``heldout-rc05-seed*/``). Naming a folder that holds several runs cites none of them.

Run ``python benchmarks/manifest.py`` after adding, moving or removing results: a new run folder
gets a ``RUN.md`` to fill in, and the script lists what is still missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX_FILES = ("manifest.json", "MANIFEST.md")
RUN_FILE = "RUN.md"
BACKENDS = ("engine", "runtime", "gpu")
STATUSES = ("current", "superseded", "negative finding")
FINDING_MAX = 100
# The pages whose citations keep a run: the README, the changelog and the docs site.
CITING_PAGES = ("README.md", "CHANGELOG.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
# Every results path these name must exist (the benchmarks' and patches' READMEs name some too).
READMES = (*CITING_PAGES, "benchmarks/README.md", "patches/README.md")
NEGATIVE_FINDINGS = "docs/benchmarks.md § Negative findings"
HAND_KEYS = ("status", "superseded by", "finding", "commit")
GENERATED = "## Command"
# JSON results written by the scripts below recorded their argparse namespace, not a command.
SCRIPT_OF = {"bench_engine": "bench_engine.py", "bench_grammar": "bench_grammar.py", "bench_join": "bench_join.py",
             "bench_compression": "bench_compression.py", "bench_compression --fidelity": "bench_compression.py",
             "bench_cgee": "bench_cgee.py", "calibrate_cgee": "calibrate_cgee.py", "gpu_checks": "gpu_checks.py"}
NOT_ARGUMENTS = {"out", "out_dir", "name"}  # where the run wrote, which the command's own out flag says
OUT_FILE_FLAG = {"benchmarks/gpu_checks.py": "--out"}  # scripts that take a file, not a folder


# ---- the runs on disk ------------------------------------------------------------------------------

def result_files() -> List[Path]:
    """Every committed result file: the index and the runs' RUN.md left out."""
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.name != RUN_FILE
                  and p.relative_to(RESULTS).as_posix() not in INDEX_FILES)


def run_folders() -> List[Path]:
    """Every folder three levels down (``backend/feature/run``) that holds a file."""
    return sorted({p.parent for p in RESULTS.rglob("*") if p.is_file() and len(p.relative_to(RESULTS).parts) == 4})


def misplaced() -> List[str]:
    """Files that are not in a run folder of a known backend."""
    out = []
    for p in RESULTS.rglob("*"):
        rel = p.relative_to(RESULTS)
        if not p.is_file() or rel.as_posix() in INDEX_FILES:
            continue
        if len(rel.parts) != 4 or rel.parts[0] not in BACKENDS:
            out.append(rel.as_posix())
    return sorted(out)


def read_hand_lines(folder: Path) -> Dict[str, str]:
    """The hand-written ``- key: value`` lines of a run's RUN.md (before its generated part)."""
    path = folder / RUN_FILE
    if not path.exists():
        return {}
    found: Dict[str, str] = {}
    for line in path.read_text().split(GENERATED)[0].splitlines():
        match = re.fullmatch(r"- ([a-z ]+): (.*)", line.strip())
        if match and match.group(1) in HAND_KEYS:
            found[match.group(1)] = match.group(2).strip()
    return found


# ---- commands, commits, machines -------------------------------------------------------------------

def benchmark_of(path: Path, data: Dict[str, Any]) -> str:
    if data.get("benchmark"):
        return data["benchmark"]
    if "environment" in data:
        return "gpu_checks"
    return path.stem


def rebuilt_command(benchmark: str, data: Dict[str, Any]) -> Optional[str]:
    """``python benchmarks/SCRIPT ...`` from the arguments a script recorded."""
    script = SCRIPT_OF.get(benchmark)
    args = data.get("config") if "config" in data else data.get("settings")
    if script is None or not isinstance(args, dict):
        return None
    words = ["python", f"benchmarks/{script}"] + (["--fidelity"] if benchmark.endswith("--fidelity") else [])
    for key, value in args.items():
        if key in NOT_ARGUMENTS or key == "fidelity" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def with_out_dir(command: str, json_path: Path) -> str:
    """``command`` writing to the run's folder: a recorded ``--out-dir`` named where the run wrote
    (often a scratch folder) before its files were moved here, and a command without one would
    write to the default scratch folder."""
    words = shlex.split(command)
    folder = json_path.parent.relative_to(ROOT).as_posix()
    script = next((w for w in words[1:3] if w.startswith("benchmarks/")), None)
    flag = OUT_FILE_FLAG.get(script or "", "--out-dir")
    value = f"{folder}/{json_path.name}" if flag == "--out" else folder
    if flag in words[:-1]:
        words[words.index(flag) + 1] = value
    else:
        words += [flag, value]
    return shlex.join(words)


def machine_of(data: Dict[str, Any]) -> Dict[str, Any]:
    env = data.get("environment")
    if isinstance(env, dict):
        return {"gpu": env.get("card"), "cpu": env.get("cpu")}
    found = {k: data[k] for k in ("cpu", "cpu_count", "torch_num_threads", "engine_num_threads", "platform")
             if k in data}
    return found or {"note": "not recorded by the run"}


def machine_text(machine: Dict[str, Any]) -> str:
    if machine.get("gpu"):
        return str(machine["gpu"])
    if machine.get("cpu"):
        parts = [str(machine["cpu"])]
        if machine.get("cpu_count"):
            parts.append(f"{machine['cpu_count']} cores")
        if machine.get("torch_num_threads"):
            parts.append(f"{machine['torch_num_threads']} torch thread(s)")
        return ", ".join(parts)
    return str(machine.get("platform") or machine.get("note"))


# ---- citations -------------------------------------------------------------------------------------

def glob_regex(path: str) -> str:
    return re.escape(path).replace(r"\*", "[^/]*")


def cited_paths(line: str, base: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """The results paths (relative to ``benchmarks/results/``) a line names, and the
    ``backend/feature`` folder a later run name in the same paragraph is taken from."""
    found = []
    for token in re.findall(r"[A-Za-z0-9_.*/-]+", line):
        token = token.rstrip(".,:;")
        if token.startswith("benchmarks/results/"):
            rel = token.removeprefix("benchmarks/results/")
        elif token.startswith("results/") and token.split("/")[1:2] and token.split("/")[1] in BACKENDS:
            rel = token.removeprefix("results/")
        elif token.split("/")[0] in BACKENDS and "/" in token:
            rel = token
        elif "/" in token and base and not token.startswith(("/", ".")):
            rel = f"{base}/{token}"
        else:
            continue
        rel = rel.strip("/")
        parts = rel.split("/")
        if parts[0] in BACKENDS and len(parts) >= 2:
            base = "/".join(parts[:2])
        found.append(rel)
    return found, base


def cites(path: str, run: str, files: List[str]) -> bool:
    """Whether the results path ``path`` (``*`` allowed) names the run folder ``run`` or one of
    its ``files``; a folder above the run cites nothing."""
    pattern = glob_regex(path)
    return bool(re.fullmatch(pattern, run) or any(re.fullmatch(pattern, f) for f in files))


def citations(runs: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """``FILE § SECTION`` of every section of the citing pages with a line that names each run
    (sections, not line numbers, so that editing a page elsewhere leaves the index valid)."""
    out: Dict[str, List[str]] = {run: [] for run in runs}
    for page in CITING_PAGES:
        file = ROOT / page
        if not file.exists():
            continue
        section, in_code, base = "top", False, None
        for line in file.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            if not line.strip() or (line.startswith("#") and not in_code):
                base = None
            if line.startswith("#") and not in_code:
                section = line.lstrip("#").strip()
                continue
            paths, base = cited_paths(line, base)
            for path in paths:
                for run, files in runs.items():
                    where = f"{page} § {section}"
                    if where not in out[run] and cites(path, run, files):
                        out[run].append(where)
    return out


# ---- the index -------------------------------------------------------------------------------------

def entry(folder: Path, cited_in: List[str]) -> Dict[str, Any]:
    run = folder.relative_to(RESULTS).as_posix()
    files = sorted(p.relative_to(RESULTS).as_posix() for p in folder.iterdir() if p.is_file() and p.name != RUN_FILE)
    hand = read_hand_lines(folder)
    jsons = sorted(folder.glob("*.json"))
    record: Dict[str, Any] = {"run": run, "status": hand.get("status"), "superseded_by": hand.get("superseded by"),
                              "finding": hand.get("finding"), "files": files}
    data = json.loads(jsons[0].read_text()) if len(jsons) == 1 else {}
    benchmark = benchmark_of(jsons[0], data) if len(jsons) == 1 else None
    command, command_source = data.get("command"), "recorded by the run"
    if not command and benchmark:
        command, command_source = rebuilt_command(benchmark, data), "rebuilt from the recorded arguments"
    if command:
        command = with_out_dir(command, jsons[0])
    if benchmark and benchmark.startswith("bench_runtime_") and command and "servers" not in data["config"]["settings"]:
        command += " --servers one-at-a-time"
        command_source += ("; --servers one-at-a-time added: the run predates the flag, and its modes ran "
                           "one after another, as that flag now asks")
    commit, commit_source = data.get("commit"), "recorded by the run"
    if not commit:
        commit, commit_source = hand.get("commit"), "the commit that added the run's files (the run recorded none)"
    record.update({"benchmark": benchmark, "command": command, "command_source": command_source, "commit": commit,
                   "commit_source": commit_source, "date_utc": data.get("date_utc") or data.get("date"),
                   "machine": machine_of(data) if data else {}, "cited_in": cited_in})
    return record


def build() -> Dict[str, Any]:
    folders = run_folders()
    files = {f.relative_to(RESULTS).as_posix(): sorted(p.relative_to(RESULTS).as_posix() for p in f.iterdir()
                                                        if p.is_file()) for f in folders}
    cited = citations(files)
    return {"about": "benchmarks/results: one entry per run (python benchmarks/manifest.py writes this)",
            "runs": [entry(f, cited[f.relative_to(RESULTS).as_posix()]) for f in folders]}


def problems(manifest: Dict[str, Any]) -> List[str]:
    """What is missing or inconsistent, one line each (the test wants none)."""
    out = [f"{path}: not in a run folder benchmarks/results/<{'|'.join(BACKENDS)}>/<feature>/<run>/"
           for path in misplaced()]
    runs = {r["run"]: r for r in manifest["runs"]}
    for name, run in runs.items():
        where = f"{name}/{RUN_FILE}"
        if not (RESULTS / where).exists():
            out.append(f"{where}: missing (python benchmarks/manifest.py writes one to fill in)")
        if run["benchmark"] is None:
            out.append(f"{name}: needs exactly one .json result file")
        if run["status"] not in STATUSES:
            out.append(f"{where}: '- status:' must be one of {', '.join(STATUSES)}, not {run['status']!r}")
        finding = run["finding"] or ""
        if not finding or finding.upper().startswith("TODO") or len(finding) > FINDING_MAX:
            out.append(f"{where}: '- finding:' must be one line of at most {FINDING_MAX} characters")
        if run["status"] == "superseded":
            target = runs.get(run["superseded_by"] or "")
            if target is None or target["status"] == "superseded":
                out.append(f"{where}: '- superseded by:' must name a run of benchmarks/results/ that is not "
                           f"itself superseded, not {run['superseded_by']!r}")
        elif run["superseded_by"]:
            out.append(f"{where}: '- superseded by:' goes with '- status: superseded' only")
        if not run["cited_in"]:
            out.append(f"{name}: cited by no page ({', '.join(CITING_PAGES[:2])}, docs/*.md): cite it or remove it")
        negative = NEGATIVE_FINDINGS in run["cited_in"]
        if negative != (run["status"] == "negative finding"):
            out.append(f"{where}: the status is 'negative finding' exactly when {NEGATIVE_FINDINGS} cites the run"
                       f" ({'it does' if negative else 'it does not'})")
        if not run["command"] or not run["command"].split()[0] in ("rksc-sgl", "python"):
            out.append(f"{name}: no command (the JSON recorded neither a command nor a known script's arguments)")
        if not re.fullmatch(r"[0-9a-f]{40}(-dirty)?", run["commit"] or ""):
            out.append(f"{where}: the JSON records no commit, so '- commit:' must give the commit that added it")
    return out


def status_text(run: Dict[str, Any]) -> str:
    if run["status"] != "superseded":
        return run["status"] or "?"
    target = run["superseded_by"] or "?"
    same_folder = target.rsplit("/", 1)[0] == run["run"].rsplit("/", 1)[0]
    return f"superseded by `{target.rsplit('/', 1)[-1] if same_folder else target}`"


def run_markdown(run: Dict[str, Any]) -> str:
    """A run's RUN.md: the hand-written lines, then what this script knows about the run."""
    hand = [f"- status: {run['status'] or 'TODO: current, superseded or negative finding'}"]
    if run["superseded_by"]:
        hand.append(f"- superseded by: {run['superseded_by']}")
    hand.append(f"- finding: {run['finding'] or 'TODO: what the run showed, in one line'}")
    if run["commit_source"] != "recorded by the run":
        hand.append(f"- commit: {run['commit'] or 'TODO: the commit that added this run'}")
    files = ", ".join(f"`{Path(f).name}`" for f in run["files"])
    lines = [f"# {run['run']}", "", *hand, "", GENERATED, "",
             "Written by `python benchmarks/manifest.py` from the run's JSON; the lines above are written "
             "by hand.", "", "```bash", run["command"] or "?", "```", "",
             f"- command: {run['command_source']}",
             f"- commit: `{run['commit'] or '?'}`" + ("" if run["commit_source"] == "recorded by the run"
                                                       else " (the commit that added the files)"),
             f"- date (UTC): {run['date_utc'] or 'not recorded'}",
             f"- machine: {machine_text(run['machine']) if run['machine'] else 'not recorded'}",
             f"- files: {files}", ""]
    return "\n".join(lines)


def markdown(manifest: Dict[str, Any]) -> str:
    lines = ["# Committed results", "",
             "One row per run, written by `python benchmarks/manifest.py` (`manifest.json` has the same entries",
             "and the pages citing each run). A run's folder is `<backend>/<feature-or-workload>/<run>/`; its",
             "link opens its `RUN.md`: the command that reproduces it, its commit, date, machine and files.",
             "Status: `current` (the measurement a page gives now), `superseded by` a newer run of the same",
             "measurement, or `negative finding` (in the Negative findings table of docs/benchmarks.md).", ""]
    counts = {s: sum(r["status"] == s for r in manifest["runs"]) for s in STATUSES}
    lines += [f"{len(manifest['runs'])} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
    group = None
    for run in manifest["runs"]:
        backend, feature, name = run["run"].split("/")
        if (backend, feature) != group:
            group = (backend, feature)
            lines += ["", f"## {backend}/{feature}", "", "| run | status | finding |", "|---|---|---|"]
        finding = (run["finding"] or "?").replace("|", "\\|")
        lines.append(f"| [{name}]({run['run']}/{RUN_FILE}) | {status_text(run)} | {finding} |")
    return "\n".join(line for i, line in enumerate(lines) if line or lines[i - 1]) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    manifest = build()
    for run in manifest["runs"]:
        (RESULTS / run["run"] / RUN_FILE).write_text(run_markdown(run))
    (RESULTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (RESULTS / "MANIFEST.md").write_text(markdown(manifest))
    found = problems(manifest)
    print(f"{len(manifest['runs'])} runs, {sum(len(r['files']) for r in manifest['runs'])} files")
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
