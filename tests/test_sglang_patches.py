"""The SGLang fixes in patches/: each test fails on the unpatched file."""

from __future__ import annotations

import importlib.util
import shutil
import time
import types
from pathlib import Path

import pytest
import sglang as sgl
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.ir import SglSamplingParams

from rksc_sgl.runtime import sglang_patches

INTERPRETER = "sglang/lang/interpreter.py"
ENDPOINT = "sglang/lang/backend/runtime_endpoint.py"
PARALLEL_STATE = "sglang/srt/distributed/parallel_state.py"
BOOTSTRAP = "sglang/srt/distributed/bootstrap.py"


def _unpatched_module(tmp_path: Path, relpath: str, name: str) -> types.ModuleType:
    """The installed file with every patch reversed, loaded as a separate module."""
    site = sglang_patches.site_dir()
    copy = tmp_path / relpath
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(site / relpath, copy)
    for pf in sglang_patches.patch_files():
        if relpath in pf.read_text():
            sglang_patches._run(pf, tmp_path, reverse=True)
    assert "rksc-sgl patch" not in copy.read_text()
    spec = importlib.util.spec_from_file_location(name, copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patches_are_installed():
    states = {s.name: s.state for s in sglang_patches.status()}
    assert states and set(states.values()) == {sglang_patches.APPLIED}, states


class _Recorder(BaseBackend):
    """A backend whose first generation is slow, as a real one is."""

    def __init__(self):
        super().__init__()
        self.committed = []

    def generate(self, s, sampling_params):
        time.sleep(0.3)
        return "answer", {}

    def commit_lazy_operations(self, s):
        self.committed.append(s.text_)


def _fork_after_slow_gen(executor_class) -> list:
    backend = _Recorder()
    exe = executor_class(backend, {}, SglSamplingParams(), chat_template=None, stream=False)
    exe.submit(sgl.gen("first", max_tokens=1))
    exe.submit(" then a shared prefix")
    branches = exe.fork(2)
    # StreamExecutor.fork hands back bare executors: each one's worker thread lives until
    # end() (its thread holds it, so garbage collection never does), so end them here.
    for branch in branches + [exe]:
        branch.end()
    return backend.committed


def test_fork_commits_the_shared_prefix(tmp_path):
    from sglang.lang.interpreter import StreamExecutor

    assert _fork_after_slow_gen(StreamExecutor) == ["answer then a shared prefix"]
    unpatched = _unpatched_module(tmp_path, INTERPRETER, "unpatched_interpreter")
    assert _fork_after_slow_gen(unpatched.StreamExecutor) == []  # the bug: prefix never committed


def _endpoint(module, monkeypatch):
    class _Response:
        status_code = 200

        @staticmethod
        def json():
            return {"model_path": "some/model"}

    monkeypatch.setattr(module, "http_request", lambda *a, **k: _Response())
    return module.RuntimeEndpoint("http://127.0.0.1:1")


def test_runtime_endpoint_joins_by_text(tmp_path, monkeypatch):
    import sglang.lang.backend.runtime_endpoint as installed

    assert _endpoint(installed, monkeypatch).support_concate_and_append is False
    unpatched = _unpatched_module(tmp_path, ENDPOINT, "unpatched_runtime_endpoint")
    # The bug: it claims KV concatenation, posting to an endpoint the runtime no longer has.
    assert _endpoint(unpatched, monkeypatch).support_concate_and_append is True


def _communicators(module, *, cpu: bool) -> tuple:
    """What ``init_model_parallel_group`` asks a TP group of two ranks for (pynccl, custom
    all-reduce) on a CPU engine or not, without building the group."""
    asked = {}

    class _Recorder:
        def __init__(self, **kwargs):
            asked.update(kwargs)

    saved = module.GroupCoordinator, module._is_cpu
    module.GroupCoordinator, module._is_cpu = _Recorder, cpu
    try:
        module.init_model_parallel_group([[0, 1]], 0, "gloo", group_name="tp")
    finally:
        module.GroupCoordinator, module._is_cpu = saved
    return asked["use_pynccl"], asked["use_custom_allreduce"]


def test_cpu_tensor_parallel_groups_ask_for_no_cuda_communicator(tmp_path):
    import sglang.srt.distributed.parallel_state as installed

    assert _communicators(installed, cpu=True) == (False, False)
    assert _communicators(installed, cpu=False) == (True, True)  # GPU: unchanged
    unpatched = _unpatched_module(tmp_path, PARALLEL_STATE, "unpatched_parallel_state")
    # The bug: a CPU TP group asked for PyNccl ("Expected a cuda device, but got: cpu" at
    # start-up) and for the custom all-reduce (which fails on `assert _is_hip`).
    assert _communicators(unpatched, cpu=True) == (True, True)


def _rank_threads(module, monkeypatch, bind, cpuid) -> list:
    """The thread counts a CPU rank without AMX sets for itself, given the bind variable and
    its own entry of it."""
    sizes = []
    monkeypatch.setattr(module.torch, "set_num_threads", sizes.append)
    monkeypatch.setattr(module, "_is_cpu_amx_available", False)
    monkeypatch.setattr(module, "_is_cpu_arm64", False)
    if bind is None:
        monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    else:
        monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", bind)
    module._init_cpu_threads_env(local_omp_cpuid=cpuid)
    return sizes


def test_a_cpu_rank_without_amx_takes_the_threads_of_its_bind_entry(tmp_path, monkeypatch):
    import sglang.srt.distributed.bootstrap as installed

    assert _rank_threads(installed, monkeypatch, "0|1", "1") == [1]
    assert _rank_threads(installed, monkeypatch, "0-3,8|4-7,9", "0-3,8") == [5]
    assert _rank_threads(installed, monkeypatch, "0,1|2,3", "2,3") == [2]
    assert _rank_threads(installed, monkeypatch, None, "0,1") == []  # no bind: SGLang's default, unchanged
    unpatched = _unpatched_module(tmp_path, BOOTSTRAP, "unpatched_bootstrap")
    # The bug: the rank keeps one thread per core of the machine, whatever its entry says.
    assert _rank_threads(unpatched, monkeypatch, "0|1", "1") == []


def test_patch_status_on_a_copy(tmp_path):
    site = sglang_patches.site_dir()
    for rel in (INTERPRETER, ENDPOINT, PARALLEL_STATE, BOOTSTRAP):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / rel, tmp_path / rel)
    for pf in sglang_patches.patch_files():
        sglang_patches._run(pf, tmp_path, reverse=True)
    assert {s.state for s in sglang_patches.status(tmp_path)} == {sglang_patches.NOT_APPLIED}
    sglang_patches.apply(tmp_path)
    assert {s.state for s in sglang_patches.status(tmp_path)} == {sglang_patches.APPLIED}
    (tmp_path / INTERPRETER).write_text("something else entirely\n")
    states = {s.name: s.state for s in sglang_patches.status(tmp_path)}
    assert sglang_patches.CONFLICT in states.values()
    with pytest.raises(RuntimeError, match="does not apply"):
        sglang_patches.apply(tmp_path)
