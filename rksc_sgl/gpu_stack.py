"""SGLang's GPU kernels (``sgl_kernel``) and the embedded engine.

When torch has CUDA, SGLang's memory-pool and quantization modules import ``sgl_kernel``
at import time, although the embedded engine calls none of its kernels (it writes the
pool's tensors itself and runs attention in torch or FlashInfer). Installing SGLang with
``--no-deps`` (the CPU recipe) on a GPU machine therefore fails deep inside SGLang with
"No module named 'sgl_kernel'". This module turns that into an error that says what to
do, and offers the way out as an explicit opt-in: an import-only stand-in.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

SGL_KERNEL_HELP = (
    "SGLang's memory-pool modules import sgl_kernel when torch has CUDA, and it is not installed. "
    "Install SGLang's GPU stack (pip install sglang==0.5.23 brings sglang-kernel and the torch it is "
    "built for), or, to run only rksc-sgl's embedded engine (which calls none of sgl_kernel's kernels), "
    "call rksc_sgl.gpu_stack.install_sgl_kernel_standin() before using rksc_sgl: an import-only "
    "stand-in whose every call raises."
)


@contextlib.contextmanager
def explain_missing_sgl_kernel():
    """Around SGLang imports: a missing ``sgl_kernel`` becomes an ``ImportError`` that says why."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "sgl_kernel":
            raise ImportError(SGL_KERNEL_HELP) from exc
        raise


class _Missing:
    """A stand-in name: attribute chains resolve (import-time tables), calls raise."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} called: sgl_kernel is an import-only stand-in here "
                           "(rksc_sgl.gpu_stack.install_sgl_kernel_standin)")


class SglKernelStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import sgl_kernel[.x]`` succeed with modules whose every attribute raises when called."""

    def find_spec(self, name, path=None, target=None):
        if name == "sgl_kernel" or name.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Missing(f"{spec.name}.{attr}")

        module.__getattr__ = missing
        return module

    def exec_module(self, module):
        pass


def standin_active() -> bool:
    """Whether ``install_sgl_kernel_standin`` put the stand-in in place in this process."""
    return any(isinstance(finder, SglKernelStandIn) for finder in sys.meta_path)


def install_sgl_kernel_standin() -> str:
    """Put the import-only stand-in in place unless a real ``sgl_kernel`` is installed.

    Returns what ``import sgl_kernel`` now gives: ``"installed"`` (the real package) or
    ``"stand-in (import only; every call raises)"``. Idempotent.
    """
    if standin_active():
        return "stand-in (import only; every call raises)"
    if importlib.util.find_spec("sgl_kernel") is not None:
        return "installed"
    sys.meta_path.insert(0, SglKernelStandIn())
    return "stand-in (import only; every call raises)"
