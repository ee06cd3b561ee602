"""The committed results explain themselves (``benchmarks/manifest.py``): every run is a folder
``benchmarks/results/<backend>/<feature>/<run>/`` with a ``RUN.md`` giving its status and finding,
every run is cited by README.md, CHANGELOG.md or a docs page, the index and each RUN.md are what
the script writes now, and every results path the READMEs name exists."""

import glob
import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
manifest = runpy.run_path(str(ROOT / "benchmarks" / "manifest.py"))
RESULTS = manifest["RESULTS"]


@pytest.fixture(scope="module")
def committed():
    return json.loads((RESULTS / "manifest.json").read_text())


@pytest.fixture(scope="module")
def built():
    return manifest["build"]()


def test_the_index_lists_every_result_file_once(committed):
    listed = [f for run in committed["runs"] for f in run["files"]]
    on_disk = [p.relative_to(RESULTS).as_posix() for p in manifest["result_files"]()]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(on_disk), "run python benchmarks/manifest.py after adding or removing results"


def test_every_run_has_a_status_a_finding_a_command_and_a_citation(built):
    found = manifest["problems"](built)
    assert not found, "python benchmarks/manifest.py lists these:\n" + "\n".join(found)


def test_the_index_and_every_run_md_are_what_the_script_writes_now(committed, built):
    assert built["runs"] == committed["runs"], \
        "the results, their RUN.md or the pages citing them changed: run python benchmarks/manifest.py"
    assert (RESULTS / "MANIFEST.md").read_text() == manifest["markdown"](built)
    for run in built["runs"]:
        path = RESULTS / run["run"] / manifest["RUN_FILE"]
        assert path.read_text() == manifest["run_markdown"](run), f"{path}: run python benchmarks/manifest.py"


def test_manifest_rows_are_short():
    for line in (RESULTS / "MANIFEST.md").read_text().splitlines():
        assert len(line) <= 200, line


def test_every_results_path_a_readme_cites_exists():
    for readme in manifest["READMES"]:
        text = (ROOT / readme).read_text()
        for cited in set(re.findall(r"benchmarks/results/[A-Za-z0-9_./*-]+", text)):
            cited = cited.rstrip(".,")
            if cited.endswith("bench_"):  # "benchmarks/results/bench_<workload>" in prose
                continue
            assert glob.glob(str(ROOT / cited.rstrip("/"))), f"{readme} cites {cited}, which is not there"


def test_a_citation_names_the_run_not_a_folder_above_it():
    run, files = "runtime/asks/heldout-rc05-seed1000", ["runtime/asks/heldout-rc05-seed1000/bench_runtime_paraphrase.json"]
    paths, base = manifest["cited_paths"]("see `benchmarks/results/runtime/asks/heldout-rc05-seed1000/`", None)
    assert paths == [run] and base == "runtime/asks" and manifest["cites"](paths[0], run, files)
    assert manifest["cites"]("runtime/asks/heldout-rc05-seed*", run, files)
    assert manifest["cites"]("runtime/asks/heldout-rc05-seed1000/bench_runtime_paraphrase.*", run, files)
    assert not manifest["cites"]("runtime/asks", run, files)  # a folder of several runs cites none
    assert not manifest["cites"]("runtime", run, files)
    # a run's name alone, after a path of the same backend and feature in the paragraph
    assert manifest["cited_paths"]("and `heldout-rc05-seed2000/`", "runtime/asks")[0] == ["runtime/asks/heldout-rc05-seed2000"]
    assert manifest["cited_paths"]("and `heldout-rc05-seed2000/`", None)[0] == []
    assert manifest["cited_paths"]("`engine/cot/seed0/` and `runtime/cot/seed0/`", None)[0] == \
        ["engine/cot/seed0", "runtime/cot/seed0"]


def test_an_uncited_or_unexplained_run_is_reported(built):
    run = dict(built["runs"][0], cited_in=[])
    found = manifest["problems"]({"runs": [run]})
    assert any("cited by no page" in line for line in found)
    run = dict(built["runs"][0], status="TODO: current, superseded or negative finding", finding=None)
    found = manifest["problems"]({"runs": [run]})
    assert any("'- status:'" in line for line in found) and any("'- finding:'" in line for line in found)
    run = dict(built["runs"][0], status="superseded", superseded_by="engine/no/such-run")
    assert any("'- superseded by:'" in line for line in manifest["problems"]({"runs": [run]}))


def test_a_command_writes_to_its_run_folder():
    folder = RESULTS / "engine" / "paper" / "seed0"
    rel = folder.relative_to(ROOT).as_posix()
    assert manifest["with_out_dir"]("rksc-sgl bench --workload paper", folder / "bench_paper.json") == \
        f"rksc-sgl bench --workload paper --out-dir {rel}"
    assert manifest["with_out_dir"]("python benchmarks/bench_cgee.py --out-dir /tmp/x --problems 2",
                                    folder / "bench_cgee.json") == \
        f"python benchmarks/bench_cgee.py --out-dir {rel} --problems 2"
    assert manifest["with_out_dir"]("python benchmarks/gpu_checks.py --skip ''", folder / "gpu_checks.json") == \
        f"python benchmarks/gpu_checks.py --skip '' --out {rel}/gpu_checks.json"


def test_an_older_script_run_gets_its_command_back_from_its_arguments():
    data = {"config": {"problems": 5, "seed": 0, "skip_long": False, "fork_commit": True, "out_dir": "/tmp/x",
                       "name": "bench_engine", "tiny_from": None}}
    assert manifest["rebuilt_command"]("bench_engine", data) == \
        "python benchmarks/bench_engine.py --problems 5 --seed 0 --fork-commit"
