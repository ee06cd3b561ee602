"""rksc-sgl: reasoning-aware KV cache sharing for SGLang frontend programs.

``rksc_sgl.Engine`` is an SGLang frontend backend that runs a Hugging Face model
in-process over SGLang's own KV pools and radix tree::

    import sglang as sgl, rksc_sgl
    sgl.set_default_backend(rksc_sgl.Engine(model="smollm2-135m", cache="radix"))

The heavy modules (torch, sglang) load on first use of a name below, so the command
line answers ``--help`` at once.
"""

from importlib import import_module

from rksc_sgl.config import CACHE_MODES, EngineConfig

__version__ = "0.1.0"

_LAZY = {
    "Engine": ".engine.backend",
    "EngineStats": ".engine.scheduler",
    "KVCacheExhausted": ".kv.manager",
    "ModelNotFoundError": ".model.loading",
    "UnsupportedModelError": ".model.loading",
    "verify": ".rksc.cgee",
    "CGEEConfig": ".rksc.cgee",
    "vote": ".rksc.branch_stop",
    "seed_branches": ".rksc.branch_stop",
    "BranchVote": ".rksc.branch_stop",
    "vote_waves": ".rksc.branch_stop",
    "WavesVote": ".rksc.branch_stop",
}

__all__ = ["CACHE_MODES", "EngineConfig", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rksc_sgl' has no attribute {name!r}")
