"""Typed, frozen configuration for the embedded engine.

Every user-facing knob is parsed and validated here, once; the layers below receive
these objects and never re-check them. Errors are ``ValueError`` with a message that
names the bad field, because they come from user input (CLI flags, keyword arguments).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """A cache mode: what the engine builds for it and what it can host.

    ``prefix_cache``: finished requests stay in a radix tree and later requests reuse their
    exact prefixes (off: SGLang's tree with ``disable=True``, every prompt computed).
    ``rksc_tree``: the tree is ``RKSCRadixCache`` (``rksc_sgl.rksc.tree_cache``): stock
    matching plus semantic keys, so it can host ASKS and the ``rsbcm`` eviction policy, and
    it counts what it did. Modes are registered by name (:func:`register_cache`).
    """

    name: str
    prefix_cache: bool
    rksc_tree: bool
    help: str


CACHE_SPECS: Dict[str, CacheSpec] = {}


def register_cache(spec: CacheSpec) -> CacheSpec:
    """Add a cache mode to :data:`CACHE_SPECS` (its name must be new)."""
    if spec.name in CACHE_SPECS:
        raise ValueError(f"cache mode {spec.name!r} is already registered")
    CACHE_SPECS[spec.name] = spec
    return spec


register_cache(CacheSpec("none", prefix_cache=False, rksc_tree=False,
                         help="no KV reuse between requests"))
register_cache(CacheSpec("radix", prefix_cache=True, rksc_tree=False,
                         help="SGLang's stock RadixCache: exact prefix reuse"))
register_cache(CacheSpec("rksc-tree", prefix_cache=True, rksc_tree=True,
                         help="RKSCRadixCache: matches exactly like radix; hosts ASKS and RSBCM"))

CACHE_MODES = CACHE_SPECS.keys()
"""The registered cache modes' names, for choices and messages: a live view of the
registry, so a mode registered after this import is a ``--cache`` choice too."""

RKSC_TREE = "rksc-tree"
"""The cache mode of RKSC's tree (``RKSCRadixCache``; SGLang's runtime selects the same
class with ``--radix-cache-backend rksc``). Only the tree: ASKS and RSBCM are turned on by
their own settings, and the bench mode ``rksc`` is the tree with every feature on."""

CACHE_ALIASES: Dict[str, str] = {"rksc": RKSC_TREE}
"""Old cache mode names, still accepted (with a notice): ``rksc`` was the tree's name, but
``rksc`` alone names the bench mode with every RKSC feature on."""


def _alias_notice(old: str) -> str:
    return (f"cache {old!r} is now called {CACHE_ALIASES[old]!r} (RKSC's tree alone; the old name still works, "
            "and 'rksc' names the bench mode with every feature on)")


def cache_name(text: str) -> str:
    """An argparse type for ``--cache``: an old name becomes the new one, with a one-line notice
    on stderr."""
    name = str(text).strip()
    if name in CACHE_ALIASES:
        import sys

        print(f"note: {_alias_notice(name)}", file=sys.stderr)
        return CACHE_ALIASES[name]
    return name


def cache_spec(name: str) -> CacheSpec:
    """The registered mode ``name`` (or an old name of one, :data:`CACHE_ALIASES`); ``ValueError``
    that lists the modes otherwise."""
    try:
        return CACHE_SPECS[CACHE_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise ValueError(f"cache={name!r} is not a known cache mode; choose one of {', '.join(CACHE_SPECS)}") \
            from None

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")
"""``torch``: scaled-dot-product attention per item plus the shared-prefix (cascade)
decode in torch; the CPU path. ``flashinfer``: FlashInfer's paged kernels over the same
pool (CUDA only, float16/bfloat16). ``auto``: FlashInfer on CUDA when it is installed."""


def default_cache_dir() -> Path:
    """Where converted models live (``$RKSC_SGL_HOME`` or ``~/.cache/rksc_sgl``)."""
    env = os.environ.get("RKSC_SGL_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rksc_sgl"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Settings of one embedded engine.

    ``kv_pool_tokens`` is the number of KV slots in SGLang's token pool: the hard memory
    budget shared by requests and the radix tree. ``max_running_requests`` bounds the
    decode batch (and the rows of SGLang's ``ReqToTokenPool``). ``max_prefill_tokens``
    bounds the tokens computed in one prefill step; a single longer prompt is still
    admitted alone so nothing can starve.

    ``in_batch_prefix_min_tokens``: when requests admitted together share at least this
    many uncached prefix tokens (the branches of a fork), only the first is prefilled now
    and the others follow one step later, reusing its prefix from the tree (0 = off).
    ``shared_prefix_min_tokens``: decode branches whose rows share at least this many
    prefix slots attend to that prefix together, reading it once per step (0 = off).

    ``eviction_policy``: SGLang's tree eviction policy by name (``lru``, ``lfu``, ``slru``,
    ...) or ``rsbcm`` (``rksc_sgl.rksc.rsbcm``; needs ``cache="rksc-tree"``; it turns on the
    collection of decode attention per KV slot). ``eviction_policy_config``: the policy's
    keyword arguments.

    ``asks``: ASKS settings for ``cache="rksc-tree"`` (an ``ASKSConfig`` or a mapping of its
    fields; default off). Enabling it with another cache mode is an error.

    ``compression``: compression of each request's decode KV (``rksc_sgl.rksc.compression``:
    a ``CompressionConfig`` or a mapping of its fields; default None, off).

    ``device``: ``auto`` picks ``cuda`` when torch sees a CUDA GPU, else ``cpu``.
    ``dtype``: ``auto`` is float32 on the CPU (exact against ``transformers``) and
    bfloat16 on CUDA. ``attention_backend``: see ``ATTENTION_BACKENDS``. The three are
    resolved here, so ``config.device`` etc. always hold the concrete choice.
    """

    model: str = "smollm2-135m"
    cache: str = "radix"
    kv_pool_tokens: int = 65536
    max_running_requests: int = 64
    max_prefill_tokens: int = 8192
    max_context_len: Optional[int] = None
    eviction_policy: str = "lru"
    eviction_policy_config: Optional[Mapping[str, Any]] = None
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    num_threads: Optional[int] = None
    seed: int = 0
    cache_dir: Optional[str] = None
    in_batch_prefix_min_tokens: int = 8
    shared_prefix_min_tokens: int = 64
    queue_timeout_s: float = 600.0
    asks: Any = None
    compression: Any = None

    def __post_init__(self) -> None:
        spec = cache_spec(self.cache)
        if self.cache in CACHE_ALIASES:
            import warnings

            warnings.warn(_alias_notice(self.cache), FutureWarning, stacklevel=3)
            object.__setattr__(self, "cache", spec.name)
        object.__setattr__(self, "asks", _asks_config(self.asks))
        from rksc_sgl.rksc.compression import compression_config

        object.__setattr__(self, "compression", compression_config(self.compression))
        if self.asks.enabled and not spec.rksc_tree:
            raise ValueError(f"asks is enabled but cache={self.cache!r}; ASKS needs cache='rksc-tree'")
        if not isinstance(self.eviction_policy, str):
            raise ValueError(f"eviction_policy must be a string, got {self.eviction_policy!r}")
        object.__setattr__(self, "eviction_policy", self.eviction_policy.lower())
        if self.eviction_policy == "rsbcm":
            if not spec.rksc_tree:
                raise ValueError(
                    f"eviction_policy='rsbcm' needs cache='rksc-tree' (got cache={self.cache!r}): "
                    "the RSBCM policy is built by the RKSC tree cache")
            from rksc_sgl.rksc.rsbcm import RSBCMStrategy

            try:
                RSBCMStrategy(**dict(self.eviction_policy_config or {}))  # validates the settings
            except TypeError as exc:  # an unknown keyword
                raise ValueError(f"eviction_policy_config for 'rsbcm': {exc}") from None
        self._resolve_hardware()
        _require_positive("kv_pool_tokens", self.kv_pool_tokens)
        _require_positive("max_running_requests", self.max_running_requests)
        _require_positive("max_prefill_tokens", self.max_prefill_tokens)
        if self.max_context_len is not None:
            _require_positive("max_context_len", self.max_context_len)
        if self.num_threads is not None:
            _require_positive("num_threads", self.num_threads)
        if self.in_batch_prefix_min_tokens < 0:
            raise ValueError("in_batch_prefix_min_tokens must be >= 0")
        if self.shared_prefix_min_tokens < 0:
            raise ValueError("shared_prefix_min_tokens must be >= 0")
        if self.queue_timeout_s <= 0:
            raise ValueError("queue_timeout_s must be > 0")

    def _resolve_hardware(self) -> None:
        import torch

        from rksc_sgl.model.attention import flashinfer_available

        device, dtype, backend = resolve_hardware(
            self.device, self.dtype, self.attention_backend,
            cuda_available=torch.cuda.is_available(), flashinfer_installed=flashinfer_available,
        )
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "attention_backend", backend)

    @property
    def cache_spec(self) -> CacheSpec:
        return CACHE_SPECS[self.cache]

    @property
    def needs_attention_stats(self) -> bool:
        """Whether decode attention per KV slot is collected: RSBCM evicts by it, compression
        scores tokens by it."""
        return (self.eviction_policy == "rsbcm" and self.cache_spec.prefix_cache) or self.compression is not None

    @property
    def needs_slot_features(self) -> bool:
        """Whether every computed slot's hidden state at the ASKS key layer is kept (ASKS keyed
        above layer 0)."""
        return self.asks.active and self.asks.key_layer > 0

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def resolve_hardware(device: str, dtype: str, attention_backend: str, *, cuda_available: bool,
                     flashinfer_installed) -> tuple:
    """(device, dtype, attention backend) with every ``auto`` decided.

    ``flashinfer_installed`` is a callable, asked only when FlashInfer is in question
    (importing it on a machine without CUDA is slow and pointless).
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; choose one of {', '.join(DEVICES)}")
    if dtype not in DTYPES + ("auto",):
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r} is not supported; "
                         f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device == "cuda" and not cuda_available:
        raise ValueError("device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    if device == "cpu":
        if attention_backend == "flashinfer":
            raise ValueError("attention_backend='flashinfer' needs device='cuda'; the CPU uses 'torch'")
        return device, dtype, "torch"
    if attention_backend == "auto":
        attention_backend = "flashinfer" if dtype != "float32" and flashinfer_installed() else "torch"
    elif attention_backend == "flashinfer":
        if not flashinfer_installed():
            raise ValueError("attention_backend='flashinfer' but the flashinfer package cannot be imported "
                             "(pip install flashinfer-python)")
        if dtype == "float32":
            raise ValueError("attention_backend='flashinfer' needs dtype='bfloat16' or 'float16' "
                             "(FlashInfer has no float32 kernels); use attention_backend='torch' for float32")
    return device, dtype, attention_backend


def _asks_config(value):
    from rksc_sgl.rksc.asks_config import ASKSConfig  # (config stays a leaf: imported where used)

    if value is None:
        return ASKSConfig()
    if isinstance(value, ASKSConfig):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {f.name for f in dataclasses.fields(ASKSConfig)}
        if unknown:
            raise ValueError(f"asks: unknown field(s) {', '.join(sorted(unknown))}")
        return ASKSConfig(**value)
    raise ValueError(f"asks must be an ASKSConfig or a mapping of its fields, got {type(value).__name__}")


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
