"""Index the committed results: for each run, its files, the command, the commit and the machine.

``benchmarks/results/`` holds only what the READMEs and docs pages cite. This script writes
``benchmarks/results/manifest.json`` and ``benchmarks/results/MANIFEST.md`` from the result
files themselves (``tests/test_results_manifest.py`` checks that the index and the folder
agree, and that every results path the READMEs and docs cite exists):

============  ==========================================================================
field         where it comes from
============  ==========================================================================
files         every file of the run: ``NAME.json`` with its ``NAME.md``/``NAME.png`` and
              any script kept beside it
command       the run's recorded ``command`` (``report.run_record``); older scripts did not
              record one, and theirs is rebuilt from the recorded arguments (``config``/
              ``settings``), marked ``rebuilt from the recorded arguments``. A runtime
              bench from before ``--servers`` ran its modes one after another: its
              command gets ``--servers one-at-a-time``, which does that now. A recorded
              ``--out-dir`` names the run's committed folder (runs often wrote to a
              scratch folder first)
commit        the recorded ``commit``; for runs from before it was recorded, the commit
              that added the file, marked ``committed in``
machine       CPU model, cores and torch threads, or the GPU card, as the run recorded them
cited_in      the README / docs sections with a line that names the run's folder or files
============  ==========================================================================

Run ``python benchmarks/manifest.py`` after adding or removing results.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from rksc_sgl.bench.report import git_output

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX_FILES = ("manifest.json", "MANIFEST.md")
# Where results are cited: the READMEs, the docs pages and the changelog.
READMES = ("README.md", "benchmarks/README.md", "patches/README.md", "CHANGELOG.md",
           *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
# JSON results written by the scripts below recorded their argparse namespace, not a command.
SCRIPT_OF = {"bench_engine": "bench_engine.py", "bench_grammar": "bench_grammar.py", "bench_join": "bench_join.py",
             "bench_compression": "bench_compression.py", "bench_compression --fidelity": "bench_compression.py",
             "bench_cgee": "bench_cgee.py", "calibrate_cgee": "calibrate_cgee.py", "gpu_checks": "gpu_checks.py"}
NOT_ARGUMENTS = {"out", "out_dir", "name"}  # where the run wrote, which the manifest's paths already say


def result_files() -> List[Path]:
    """Every committed result file, the index itself left out."""
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.relative_to(RESULTS).as_posix() not in INDEX_FILES)


def group(files: List[Path]) -> Dict[Path, List[Path]]:
    """Runs by their JSON: a JSON with its same-named MD/PNG; other files join the run of their
    folder (a script kept beside it)."""
    runs: Dict[Path, List[Path]] = {p: [p] for p in files if p.suffix == ".json"}
    for p in files:
        if p.suffix == ".json":
            continue
        twin = p.with_suffix(".json")
        owner = twin if twin in runs else next((j for j in runs if j.parent == p.parent), None)
        if owner is None:
            owner = next(j for j in sorted(runs) if p.parent in j.parents or j.parent in p.parents)
        runs[owner].append(p)
    return runs


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


def machine_of(data: Dict[str, Any]) -> Dict[str, Any]:
    env = data.get("environment")
    if isinstance(env, dict):
        return {"gpu": env.get("card"), "cpu": env.get("cpu")}
    found = {k: data[k] for k in ("cpu", "cpu_count", "torch_num_threads", "engine_num_threads", "platform")
             if k in data}
    return found or {"note": "not recorded by the run"}


def citations(paths: List[str]) -> List[str]:
    """``FILE § SECTION`` of every README section with a line that names one of ``paths``
    (sections, not line numbers, so that editing a README elsewhere leaves the index valid)."""
    out: List[str] = []
    for readme in READMES:
        file = ROOT / readme
        if not file.exists():
            continue
        section, in_code = "top", False
        for line in file.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            if line.startswith("#") and not in_code:
                section = line.lstrip("#").strip()
            elif any(cited_on(line, p) for p in paths) and f"{readme} § {section}" not in out:
                out.append(f"{readme} § {section}")
    return out


def cited_on(line: str, rel: str) -> bool:
    """Whether a README line names ``rel`` (a path under ``benchmarks/results/``): in full, by a
    glob such as ``rc*_seed*/`` or ``bench_paraphrase.*``, or by its folder's own name."""
    for token in re.findall(r"[A-Za-z0-9_.*/-]+", line):
        full = token.startswith("benchmarks/results/")  # a path from results/ itself
        token = token.rstrip(".,").removeprefix("benchmarks/").removeprefix("results/")
        if not token or "/" not in token and "." not in token and not full:
            continue
        pattern = re.escape(token.rstrip("/")).replace(r"\*", "[^/]*")
        if full and re.match(pattern + r"(/|$)", rel):
            return True
        if "/" in token:  # a folder, named from results/ or from a folder the line named before
            if re.search(r"(^|/)" + pattern + r"(/|$)", rel):
                return True
        elif re.fullmatch(pattern, rel):  # a file of results/ itself
            return True
    return False


def with_out_dir(command: str, folder: Path) -> str:
    """``command`` writing where its files are committed: a recorded ``--out-dir`` named where
    the run wrote (often a scratch folder) before its files were moved here."""
    words = shlex.split(command)
    if "--out-dir" not in words[:-1]:
        return command
    at = words.index("--out-dir") + 1
    words[at] = folder.relative_to(ROOT).as_posix()
    return shlex.join(words)


def entry(json_path: Path, files: List[Path]) -> Dict[str, Any]:
    data = json.loads(json_path.read_text())
    benchmark = benchmark_of(json_path, data)
    command, command_source = data.get("command"), "recorded by the run"
    if not command:
        command, command_source = rebuilt_command(benchmark, data), "rebuilt from the recorded arguments"
    if command:
        command = with_out_dir(command, json_path.parent)
    if benchmark.startswith("bench_runtime_") and command and "servers" not in data["config"]["settings"]:
        command += " --servers one-at-a-time"
        command_source += ("; --servers one-at-a-time added: the run predates the flag, and its modes ran "
                           "one after another, as that flag now asks")
    commit, commit_source = data.get("commit"), "recorded by the run"
    if not commit:
        commit = git_output(ROOT, "log", "--diff-filter=A", "--format=%H", "-1", "--", str(json_path)) or None
        commit_source = "committed in (the run's own commit was not recorded then)"
    rels = [p.relative_to(RESULTS).as_posix() for p in sorted(files)]
    folder = json_path.parent.relative_to(RESULTS).as_posix()
    return {"run": json_path.relative_to(RESULTS).as_posix(), "files": rels, "benchmark": benchmark,
            "command": command, "command_source": command_source, "commit": commit, "commit_source": commit_source,
            "date_utc": data.get("date_utc") or data.get("date"), "machine": machine_of(data),
            "cited_in": citations(rels + ([folder] if folder != "." else []))}


def build() -> Dict[str, Any]:
    runs = group(result_files())
    return {"about": "benchmarks/results: one entry per run (python benchmarks/manifest.py writes this)",
            "runs": [entry(j, files) for j, files in sorted(runs.items())]}


def markdown(manifest: Dict[str, Any]) -> str:
    lines = ["# Committed results", "",
             "Written by `python benchmarks/manifest.py` (the same entries as `manifest.json`). A commit",
             "marked `added` is the commit that added the file: the run itself recorded none.", "",
             "| run | files | command | commit | machine | cited in |", "|---|---:|---|---|---|---|"]
    for run in manifest["runs"]:
        commit = (run["commit"] or "?")[:12] + ("" if run["commit_source"] == "recorded by the run" else " (added)")
        machine = run["machine"].get("gpu") or run["machine"].get("cpu") or run["machine"].get("platform") \
            or run["machine"]["note"]
        command = (run["command"] or "?").replace("|", "\\|")
        lines.append(f"| `{run['run']}` | {len(run['files'])} | `{command}` | {commit} | {machine} | "
                     f"{', '.join(run['cited_in']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    manifest = build()
    (RESULTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (RESULTS / "MANIFEST.md").write_text(markdown(manifest))
    uncited = [r["run"] for r in manifest["runs"] if not r["cited_in"]]
    print(f"{len(manifest['runs'])} runs, {sum(len(r['files']) for r in manifest['runs'])} files"
          + (f"; not cited by a README: {', '.join(uncited)}" if uncited else ""))
    return 1 if uncited else 0


if __name__ == "__main__":
    sys.exit(main())
