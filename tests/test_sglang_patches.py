"""The SGLang frontend fixes in patches/: each test fails on the unpatched file."""

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


def test_patch_status_on_a_copy(tmp_path):
    site = sglang_patches.site_dir()
    for rel in (INTERPRETER, ENDPOINT):
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
