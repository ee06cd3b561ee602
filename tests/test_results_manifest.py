"""The committed results and their index (``benchmarks/manifest.py``) agree, and every results
path the READMEs cite exists."""

import glob
import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
manifest = runpy.run_path(str(ROOT / "benchmarks" / "manifest.py"))


@pytest.fixture(scope="module")
def committed():
    return json.loads((ROOT / "benchmarks" / "results" / "manifest.json").read_text())


def test_the_index_lists_every_result_file_once(committed):
    listed = [f for run in committed["runs"] for f in run["files"]]
    on_disk = [p.relative_to(manifest["RESULTS"]).as_posix() for p in manifest["result_files"]()]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(on_disk), "run python benchmarks/manifest.py after adding or removing results"


def test_every_run_names_its_command_commit_machine_and_where_it_is_cited(committed):
    for run in committed["runs"]:
        assert run["command"] and run["command"].split()[0] in ("rksc-sgl", "python"), run["run"]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", run["commit"] or ""), run["run"]
        assert any(run["machine"].get(k) for k in ("cpu", "gpu", "platform", "note")), run["run"]
        assert run["cited_in"], f"{run['run']} is cited by no README: remove it or cite it"


def test_the_index_is_what_the_script_writes_now(committed):
    # Everything but the commit (which needs the git history) is rebuilt from the files.
    def without_commit(runs):
        return [{k: v for k, v in r.items() if k != "commit"} for r in runs]

    assert without_commit(manifest["build"]()["runs"]) == without_commit(committed["runs"]), \
        "the results or the README sections citing them changed: run python benchmarks/manifest.py"


def test_every_results_path_a_readme_cites_exists():
    for readme in manifest["READMES"]:
        text = (ROOT / readme).read_text()
        for cited in set(re.findall(r"benchmarks/results/[A-Za-z0-9_./*-]+", text)):
            cited = cited.rstrip(".,")
            if cited.endswith("bench_"):  # "benchmarks/results/bench_<workload>" in prose
                continue
            assert glob.glob(str(ROOT / cited.rstrip("/"))), f"{readme} cites {cited}, which is not there"


def test_an_older_script_run_gets_its_command_back_from_its_arguments():
    data = {"config": {"problems": 5, "seed": 0, "skip_long": False, "fork_commit": True, "out_dir": "/tmp/x",
                       "name": "bench_engine", "tiny_from": None}}
    assert manifest["rebuilt_command"]("bench_engine", data) == \
        "python benchmarks/bench_engine.py --problems 5 --seed 0 --fork-commit"
    assert manifest["cited_on"]("see `asks_heldout/rc*_seed*/` for", "asks_heldout/rc05_seed1000/x.json")
    assert not manifest["cited_on"]("`benchmarks/results/bench_paraphrase.*`", "asks_tune/rc025/bench_paraphrase.json")
