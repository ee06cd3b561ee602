"""rksc-sgl: reasoning-aware KV cache sharing for SGLang frontend programs.

``rksc_sgl.Engine`` is an SGLang frontend backend that runs a Hugging Face model
in-process over SGLang's own KV pools and radix tree::

    import sglang as sgl, rksc_sgl
    sgl.set_default_backend(rksc_sgl.Engine(model="smollm2-135m", cache="radix"))
"""

from .config import CACHE_MODES, EngineConfig
from .engine import Engine
from .kv_cache import KVCacheExhausted
from .models import ModelNotFoundError, UnsupportedModelError
from .scheduler import EngineStats

__version__ = "0.1.0"

__all__ = [
    "CACHE_MODES",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "KVCacheExhausted",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "__version__",
]
