"""The package works from an installed wheel: nothing it needs lives only in the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys
import rksc_sgl
from rksc_sgl.runtime import sglang_patches
from rksc_sgl.programs import best_of_n, best_of_n_cgee, self_consistency, tree_of_thought
from rksc_sgl.bench import WORKLOADS
import importlib.metadata as md
print(json.dumps({
    "package": rksc_sgl.__file__,
    "patches": [p.name for p in sglang_patches.patch_files()],
    "programs": [m.__name__ for m in (best_of_n, best_of_n_cgee, self_consistency, tree_of_thought)],
    "workloads": sorted(WORKLOADS),
    "plugin": [e.value for e in md.entry_points(group="sglang.srt.plugins") if e.name == "rksc"],
}))
"""


def _source_copy(dst: Path) -> Path:
    """What the build reads, copied (links kept), so that setuptools' build/ is not written
    into the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "rksc_sgl", dst / "rksc_sgl", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "patches", dst / "patches")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    return dst


def test_a_wheel_carries_the_programs_and_patches_and_runs_outside_the_checkout(tmp_path):
    source = _source_copy(tmp_path / "source")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("rksc_sgl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"rksc_sgl/patches/0001-fork-sync-before-lazy-commit.patch",
            "rksc_sgl/programs/tree_of_thought.py"} <= set(names)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # Run from elsewhere, the wheel's copy first on the path (the checkout's editable install
    # is only a fallback finder, after it).
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).resolve().is_relative_to(target.resolve()), got["package"]
    assert got["patches"] == sorted(p.name for p in (ROOT / "patches").glob("*.patch"))
    assert "tot" in got["workloads"] and len(got["programs"]) == 4
    assert "rksc_sgl.runtime.plugin:register" in got["plugin"]
