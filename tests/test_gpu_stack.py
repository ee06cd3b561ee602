"""A missing sgl_kernel on a CUDA machine: a clear error, and the opt-in import-only stand-in."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from rksc_sgl.gpu_stack import SGL_KERNEL_HELP, explain_missing_sgl_kernel


def test_a_missing_sgl_kernel_becomes_an_error_that_says_what_to_do():
    with pytest.raises(ImportError, match="pip install sglang==0.5.23") as info:
        with explain_missing_sgl_kernel():
            raise ModuleNotFoundError("No module named 'sgl_kernel'", name="sgl_kernel.kvcacheio")
    assert str(info.value) == SGL_KERNEL_HELP and isinstance(info.value.__cause__, ModuleNotFoundError)


def test_other_missing_modules_pass_through_unchanged():
    with pytest.raises(ModuleNotFoundError) as info:
        with explain_missing_sgl_kernel():
            raise ModuleNotFoundError("No module named 'sgl_kernels_extra'", name="sgl_kernels_extra")
    assert info.value.name == "sgl_kernels_extra"


@pytest.mark.skipif(importlib.util.find_spec("sgl_kernel") is not None, reason="a real sgl_kernel is installed")
def test_standin_imports_resolve_and_every_call_raises():
    # A child process: the stand-in changes sys.meta_path, which must not leak into the suite.
    code = """
from rksc_sgl.gpu_stack import install_sgl_kernel_standin, standin_active
print(install_sgl_kernel_standin(), install_sgl_kernel_standin(), standin_active())
from sgl_kernel import int8_scaled_mm
from sgl_kernel.kvcacheio import transfer_kv_per_layer
print(type(transfer_kv_per_layer.some.attribute).__name__)
try:
    int8_scaled_mm(1, 2)
except RuntimeError as exc:
    print("raises:", exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "stand-in (import only; every call raises) stand-in (import only; every call raises) True"
    assert lines[1] == "_Missing"
    assert lines[2].startswith("raises: sgl_kernel.int8_scaled_mm called: sgl_kernel is an import-only stand-in")
