"""Put on ``PYTHONPATH`` of SGLang server processes on a machine without ``sgl_kernel``.

SGLang's CPU code path (``SGLANG_USE_CPU_ENGINE=1``) imports ``sgl_kernel`` at module
level although, on a CPU without AMX, every layer a Llama-family model uses falls back to
torch code and no ``sgl_kernel`` function is called. Every process SGLang spawns inherits
``PYTHONPATH``, so this module runs first in each of them and installs the import-only
stand-in (``rksc_sgl.gpu_stack.install_sgl_kernel_standin``), which does nothing where
the real ``sgl_kernel`` is installed. ``rksc_sgl.runtime.launch_plan`` puts this folder on
the path only when ``sgl_kernel`` is missing.

A ``sitecustomize`` found later on ``sys.path`` (a distribution's own) still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _install_standin() -> None:
    from rksc_sgl.gpu_stack import install_sgl_kernel_standin

    install_sgl_kernel_standin()


def _run_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_install_standin()
_run_next_sitecustomize()
