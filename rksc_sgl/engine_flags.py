"""The engine flags of every command that builds an engine (``rksc-sgl run/serve``, the
programs): ``--cache/--model-path/--kv-pool-tokens/--threads/--asks-*/--kv-compression`` and
the engine, or server endpoint, they describe. ``--model`` is accepted as an old spelling of
``--model-path`` (with a notice), as ``--cache rksc`` is of ``--cache rksc-tree``.

If ``rksc-sgl run`` already installed an :class:`~rksc_sgl.Engine` as SGLang's default
backend, a program reuses it (and says which of its flags are then ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Dict, Iterator, Tuple

from rksc_sgl.arg_types import add_model_path, fraction, positive_int
from rksc_sgl.config import CACHE_MODES, EngineConfig, cache_name

DEFAULT_MODEL = EngineConfig.model
DEFAULT_CACHE = EngineConfig.cache
DEFAULT_THREADS = 1


def add_engine_args(parser: argparse.ArgumentParser, *, endpoint: bool = True) -> argparse.ArgumentParser:
    """Engine flags. Their defaults are ``None`` so that an explicit flag can be told
    apart from a default when an already-installed engine is reused. ``endpoint=False``
    leaves out ``--endpoint`` (``rksc-sgl serve``: it always serves its own engine)."""
    group = parser.add_argument_group("engine")
    if endpoint:
        group.add_argument("--endpoint", metavar="URL", default=None,
                           help="run on a running SGLang server (rksc-sgl launch-server, python -m "
                                "sglang.launch_server, rksc-sgl serve) instead of an embedded engine; "
                                "the engine flags below then do not apply")
    group.add_argument("--cache", type=cache_name, choices=CACHE_MODES, default=None,
                       help=f"KV cache of the engine: none (no reuse), radix (SGLang's RadixCache), rksc-tree "
                            f"(RKSC's tree: exact matching like radix, hosts ASKS and RSBCM; old name: rksc) "
                            f"(default: {DEFAULT_CACHE})")
    add_model_path(group, None, f"packaged model alias or local Hugging Face folder (default: {DEFAULT_MODEL})")
    group.add_argument("--kv-pool-tokens", type=positive_int, default=None,
                       help=f"KV slots in the token pool (default: {EngineConfig.kv_pool_tokens})")
    group.add_argument("--max-running", type=positive_int, default=None,
                       help=f"largest decode batch (default: {EngineConfig.max_running_requests})")
    group.add_argument("--threads", type=positive_int, default=None,
                       help=f"torch CPU threads of the engine (default: {DEFAULT_THREADS})")
    group.add_argument("--engine-seed", type=int, default=None,
                       help="sampling seed of the engine (default: 0)")
    group.add_argument("--asks-tau", type=float, default=None,
                       help="turn ASKS on (needs --cache rksc): reuse KV of cached spans whose "
                            "key has cosine similarity >= this threshold")
    group.add_argument("--asks-recompute", type=float, default=None,
                       help="ASKS: fraction of the aligned (reusable) tokens of a span to compute anyway "
                            "(default: 0.5)")
    group.add_argument("--asks-key-layer", type=int, default=None,
                       help="ASKS: layer of the semantic keys (0: token embeddings, free; L: hidden states "
                            "after L blocks, stored per slot at prefill; default: 0)")
    group.add_argument("--kv-compression", choices=("rkv", "cask", "recent"), default=None,
                       help="compress each request's decode KV (R-KV scoring, the CASK-style core/scratch "
                            "variant, or the newest-tokens baseline 'recent'); the prompt stays exact and shared")
    group.add_argument("--kv-budget", type=fraction, default=None,
                       help="share of decoded tokens whose KV is kept with --kv-compression (default: 0.16)")
    return parser


ENGINE_ONLY_FLAGS = ("cache", "model", "kv_pool_tokens", "max_running", "threads", "engine_seed", "asks_tau",
                     "asks_recompute", "asks_key_layer", "kv_compression", "kv_budget")
"""Engine flags a server given with ``--endpoint`` does not take from the program."""


def _flag(dest: str) -> str:
    """The flag of an engine flag's ``dest``, as ``--help`` spells it."""
    return "--model-path" if dest == "model" else f"--{dest.replace('_', '-')}"


def engine_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments of ``Engine(...)`` from the parsed engine flags."""
    kwargs: Dict[str, Any] = {
        "model": getattr(args, "model", None) or DEFAULT_MODEL,
        "cache": getattr(args, "cache", None) or DEFAULT_CACHE,
        "num_threads": getattr(args, "threads", None) or DEFAULT_THREADS,
    }
    for flag, field in (("kv_pool_tokens", "kv_pool_tokens"), ("max_running", "max_running_requests"),
                        ("engine_seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[field] = value
    tau = getattr(args, "asks_tau", None)
    recompute = getattr(args, "asks_recompute", None)
    layer = getattr(args, "asks_key_layer", None)
    if tau is not None or recompute is not None or layer is not None:
        kwargs["asks"] = {"enabled": tau is not None, **({"tau": tau} if tau is not None else {}),
                          **({"recompute_fraction": recompute} if recompute is not None else {}),
                          **({"key_layer": layer} if layer is not None else {})}
    method = getattr(args, "kv_compression", None)
    budget = getattr(args, "kv_budget", None)
    if budget is not None and method is None:
        raise ValueError("--kv-budget needs --kv-compression rkv|cask")
    if method is not None:
        kwargs["compression"] = {"method": method, **({"budget": budget} if budget is not None else {})}
    return kwargs


def installed_engine():
    """The :class:`~rksc_sgl.Engine` installed as SGLang's default backend, if any."""
    from sglang.lang.global_config import global_config

    from rksc_sgl.engine.backend import Engine

    backend = getattr(global_config, "default_backend", None)
    return backend if isinstance(backend, Engine) else None


def endpoint_backend(args: argparse.Namespace):
    """A :class:`~rksc_sgl.runtime.endpoint.RuntimeBackend` on ``--endpoint``'s server; the
    engine flags also given are named in a note (the server was started with its own)."""
    from rksc_sgl.runtime.endpoint import RuntimeBackend

    given = [_flag(name) for name in ENGINE_ONLY_FLAGS if getattr(args, name, None) is not None]
    if given:
        print(f"note: --endpoint {args.endpoint}: the server decides; ignoring {', '.join(given)}", file=sys.stderr)
    return RuntimeBackend(args.endpoint)


def engine_from_args(args: argparse.Namespace) -> Tuple[Any, bool]:
    """``(engine, owned)``: the installed default engine (``owned=False``), or a new one.

    A new engine is the caller's to shut down (:func:`program_engine` does that).
    """
    if getattr(args, "endpoint", None):
        return endpoint_backend(args), True
    engine = installed_engine()
    if engine is not None:
        _warn_ignored_flags(args, engine)
        return engine, False
    from rksc_sgl.engine.backend import Engine

    return Engine(**engine_kwargs(args)), True


@contextlib.contextmanager
def program_engine(args: argparse.Namespace) -> Iterator[Any]:
    """The engine a program runs on, installed as SGLang's default backend meanwhile.

    An engine built here is integrity-checked and shut down afterwards, and the previous
    default backend restored; an engine installed by ``rksc-sgl run`` is left alone.
    """
    import sglang as sgl
    from sglang.lang.global_config import global_config

    engine, owned = engine_from_args(args)
    if not owned:
        yield engine
        return
    previous = global_config.default_backend
    sgl.set_default_backend(engine)
    try:
        yield engine
        engine.check_integrity()
    finally:
        sgl.set_default_backend(previous)
        engine.shutdown()


def _warn_ignored_flags(args: argparse.Namespace, engine) -> None:
    cfg = engine.config
    actual = {"cache": cfg.cache, "model": cfg.model, "kv_pool_tokens": cfg.kv_pool_tokens,
              "max_running": cfg.max_running_requests, "threads": cfg.num_threads, "engine_seed": cfg.seed,
              "asks_tau": cfg.asks.tau if cfg.asks.enabled else None,
              "asks_recompute": cfg.asks.recompute_fraction, "asks_key_layer": cfg.asks.key_layer,
              "kv_compression": cfg.compression.method if cfg.compression is not None else None,
              "kv_budget": cfg.compression.budget if cfg.compression is not None else None}
    ignored = [_flag(flag) for flag, value in actual.items()
               if getattr(args, flag, None) is not None and getattr(args, flag) != value]
    if ignored:
        print(f"note: using the engine installed by `rksc-sgl run` (cache={cfg.cache}, model={cfg.model}); "
              f"ignoring {', '.join(ignored)}", file=sys.stderr)
