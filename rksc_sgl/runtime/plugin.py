"""SGLang runtime plugin: makes ``--radix-cache-backend rksc`` select ``RKSCRadixCache``.

SGLang 0.5.23 discovers general plugins through the entry-point group
``sglang.srt.plugins`` (``sglang.srt.plugins.load_plugins``), and calls each one, with no
arguments, early in every process it starts: the launcher (``sglang serve`` /
``launch_server``, ``sglang.Engine``), the data-parallel controller, the detokenizer and
each spawned scheduler process. The scheduler builds its tree cache with
``sglang.srt.mem_cache.registry.create_tree_cache``, which looks ``--radix-cache-backend``
up in the registry this plugin fills. A monkeypatch in the launching process would not
reach the spawned schedulers; the entry point does. ``pyproject.toml`` declares it::

    [project.entry-points."sglang.srt.plugins"]
    rksc = "rksc_sgl.runtime.plugin:register"

If ``SGLANG_PLUGINS`` is set (a comma-separated allow-list), it must name ``rksc``.

In the runtime the backend runs with ASKS off unless ``RKSC_ASKS`` is set (a JSON object of
ASKS settings, inherited by the scheduler processes; ``rksc_sgl.runtime.asks``): off, it is
exact token matching, the stock ``RadixCache`` behaviour, plus RKSC's statistics. It replaces SGLang's default
``UnifiedRadixCache``, so features that need the unified tree (hierarchical cache,
sliding-window or Mamba hybrid models, session radix cache, streaming sessions, the
``tlru`` policy) are refused at startup, by this factory or by SGLang.

``register`` also adds ``rsbcm`` to ``--radix-eviction-policy``'s choices
(``add_radix_eviction_policy_choices``); ``RKSCRadixCache`` builds it from
``--radix-eviction-policy-config``. With ``rsbcm`` the factory attaches the KV pool's
per-slot attention table (``rksc_sgl.runtime.attention_stats``), which the
``--forward-hooks`` entry ``rksc_attention`` fills from the model's attention layers
(``rksc-sgl launch-server`` adds it); without that hook the table stays empty and RSBCM
ranks nodes by its proxies (``hit_count`` branches, depth) and recency.

With ``RKSC_COMPRESSION`` set (a JSON object of ``CompressionConfig`` fields) it adds decode-KV
compression's hooks (``rksc_sgl.runtime.compression_hooks``) and the cache factory attaches
its state to each scheduler (``rksc_sgl.runtime.compression``).

With ``RKSC_SEEDED_SAMPLING=1`` it adds two AFTER hooks that make SGLang honour each
request's ``sampling_seed`` (``rksc_sgl.runtime.seeded_sampling``).

Finally ``register`` adds an AFTER hook (SGLang's plugin ``HookRegistry``) on the
scheduler's ``get_internal_state``, so ``/server_info`` carries an ``rksc`` entry per
scheduler: the cache counters, the attention statistics and an idle integrity check
(``rksc_sgl.runtime.server_state``).

This module imports nothing heavy at import time: every SGLang process loads it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "rksc"
"""The ``--radix-cache-backend`` value that selects ``RKSCRadixCache``."""

STOCK_BACKEND_NAME = "radix-stock"
"""The ``--radix-cache-backend`` value that selects SGLang's own ``RadixCache`` class (the
embedded engine's ``radix``): the runtime's default is ``UnifiedRadixCache``, so comparisons
with the stock class need a name for it."""

EVICTION_POLICY_NAME = "rsbcm"
"""The ``--radix-eviction-policy`` value of RSBCM (``rksc_sgl.rksc.rsbcm``); only the ``rksc``
backend builds it (SGLang's own caches reject the name)."""


def rksc_cache_factory(ctx):
    """Build the RKSC tree cache from SGLang's ``TreeCacheBuildContext``."""
    from rksc_sgl.rksc.asks_config import ASKSConfig
    from rksc_sgl.rksc.tree_cache import RKSCRadixCache

    unsupported = []
    if ctx.is_hybrid_swa:
        unsupported.append("sliding-window (hybrid SWA) models")
    if ctx.is_hybrid_ssm:
        unsupported.append("Mamba / state-space hybrid models")
    if ctx.enable_hierarchical_cache:
        unsupported.append("--enable-hierarchical-cache")
    if unsupported:
        raise ValueError(
            f"--radix-cache-backend={BACKEND_NAME} is a RadixCache (full-attention KV, one device tier) "
            f"and does not support {', '.join(unsupported)}; omit --radix-cache-backend to use "
            "SGLang's default cache"
        )
    from rksc_sgl.runtime.asks import build_cache
    from rksc_sgl.runtime.asks_settings import asks_config_from_env

    asks = asks_config_from_env()
    if asks.active and not ctx.disable_radix_cache:
        cache = build_cache(ctx, asks)
    else:
        cache = RKSCRadixCache(ctx.params, asks=ASKSConfig(enabled=False))
    _set_up_rsbcm(ctx, cache)
    _set_up_compression(ctx, cache)
    _open_eviction_log(ctx, cache)
    logger.info(
        "rksc tree cache built (page_size=%s, eviction_policy=%s, %s)",
        ctx.params.page_size,
        cache.eviction_policy,
        f"ASKS on: tau={asks.tau}, recompute={asks.recompute_fraction}" if cache.semantic_active
        else "ASKS off: exact matching",
    )
    return cache


def _set_up_rsbcm(ctx, cache) -> None:
    """RSBCM's statistics for a built tree: the pool's attention table, slots reset as they
    are handed out, tensor-parallel ranks combined, and the start-up caveats. A tree SGLang
    disabled (PD decode, deterministic inference on most backends, embedding models) keeps
    SGLang's placeholder policy: it never evicts."""
    from rksc_sgl.rksc.rsbcm import RSBCMStrategy

    strategy = cache.eviction_strategy
    if not isinstance(strategy, RSBCMStrategy):
        if cache.eviction_policy == EVICTION_POLICY_NAME:
            logger.info("rsbcm: the radix cache is disabled on this server, so nothing is evicted or ranked")
        return
    from rksc_sgl.runtime.attention_stats import register_alloc_reset, rksc_hook_strides, slot_attention_of, watch_usage
    from rksc_sgl.runtime.support import caveats

    allocator = ctx.params.token_to_kv_pool_allocator
    table = slot_attention_of(allocator.get_kvcache())
    strategy.attach(table.mass)
    watch_usage(table, strategy.watch_free(allocator.size), allocator.available_size())
    register_alloc_reset()
    if ctx.tp_size > 1:
        from rksc_sgl.runtime.rank_consistency import rank_reducer

        group = ctx.params.tp_cache_group
        import torch.distributed as dist

        strategy.use_ranks(rank_reducer(group, dist.get_world_size(group=group)))
        logger.info("rsbcm: %d tensor-parallel ranks rank with their combined attention and the tree's "
                    "operation clock", ctx.tp_size)
    hooked = bool(rksc_hook_strides(getattr(ctx.server_args, "forward_hooks", None)))
    device = str(getattr(allocator.get_kvcache(), "device", "cpu"))
    for line in caveats(ctx.server_args, device=device.split(":")[0], attention_hook=hooked):
        logger.warning(line)
    if not hooked:
        logger.info("rsbcm: no rksc_attention hook in --forward-hooks; nodes are ranked by branches, depth "
                    "and recency")


def _set_up_compression(ctx, cache) -> None:
    """Decode-KV compression for this scheduler when ``RKSC_COMPRESSION`` is set
    (``rksc_sgl.runtime.compression``); after RSBCM's set-up, whose near-full switch it turns off."""
    from rksc_sgl.runtime.compression_settings import compression_config_from_env

    config = compression_config_from_env()
    if config is not None:
        from rksc_sgl.runtime.compression import attach

        attach(ctx, cache, config)


EVICTION_LOG_VAR = "RKSC_EVICTION_LOG"
"""A folder: each scheduler writes the nodes its tree evicts, in order, to
``evictions.tp<rank>.pid<pid>.log`` there (checking that tensor-parallel ranks evict alike)."""


def _open_eviction_log(ctx, cache) -> None:
    from rksc_sgl.runtime.rank_consistency import rank_log

    cache.eviction_log = rank_log(EVICTION_LOG_VAR, "evictions", ctx.tp_rank)


def stock_radix_cache_factory(ctx):
    """SGLang's ``RadixCache`` itself, built from SGLang's ``TreeCacheBuildContext``."""
    from sglang.srt.mem_cache.radix_cache import RadixCache

    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.enable_hierarchical_cache:
        raise ValueError(f"--radix-cache-backend={STOCK_BACKEND_NAME} is SGLang's RadixCache (full attention, "
                         "one device tier); omit --radix-cache-backend to use SGLang's default cache")
    return RadixCache(ctx.params)


def _add_eviction_policy_choice() -> None:
    """Let ``--radix-eviction-policy`` accept ``rsbcm`` (once per process)."""
    from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES, add_radix_eviction_policy_choices

    if EVICTION_POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([EVICTION_POLICY_NAME])


def _add_server_state_hook() -> None:
    """``/server_info``'s ``rksc`` entry (applied by ``load_plugins``; once per process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from rksc_sgl.runtime.server_state import INTERNAL_STATE_TARGET, add_rksc_state

    if not any(hook is add_rksc_state for _, hook, _ in HookRegistry._hooks.get(INTERNAL_STATE_TARGET, ())):
        HookRegistry.register(INTERNAL_STATE_TARGET, add_rksc_state, HookType.AFTER)


def _add_asks_hooks() -> None:
    """ASKS's two ``PrefillAdder`` hooks, only in processes that have ``RKSC_ASKS`` set:
    a server without ASKS runs SGLang's scheduler untouched."""
    import os

    from rksc_sgl.runtime.asks import register_hooks
    from rksc_sgl.runtime.asks_settings import ENV_VAR

    if os.environ.get(ENV_VAR, "").strip():
        register_hooks()


def _add_compression_hooks() -> None:
    """Decode-KV compression's hooks (``rksc_sgl.runtime.compression_hooks``), only in processes
    that have ``RKSC_COMPRESSION`` set (read and checked here, once): otherwise SGLang's
    scheduler, forward batch and pools run untouched."""
    from rksc_sgl.runtime.compression_settings import compression_config_from_env

    try:
        config = compression_config_from_env()
    except ValueError as exc:
        raise ValueError(f"rksc plugin: {exc}") from None
    if config is not None:
        from rksc_sgl.runtime.compression_hooks import register_hooks

        register_hooks()


def _add_seeded_sampling_hooks() -> None:
    """The per-request seed hooks (``rksc_sgl.runtime.seeded_sampling``), only in processes
    that have ``RKSC_SEEDED_SAMPLING`` on: otherwise SGLang samples as it always does."""
    from rksc_sgl.runtime.seeded_sampling import register_hooks, seeded_sampling_from_env

    try:
        on = seeded_sampling_from_env()
    except ValueError as exc:
        raise ValueError(f"rksc plugin: {exc}") from None
    if on:
        register_hooks()


def _add_configuration_check() -> None:
    """Refuse unsupported configurations when SGLang checks its arguments (the launching
    process, before any scheduler starts; ``rksc_sgl.runtime.support``)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from rksc_sgl.runtime.support import CHECK_TARGET, check_server_args_hook

    if not any(hook is check_server_args_hook for _, hook, _ in HookRegistry._hooks.get(CHECK_TARGET, ())):
        HookRegistry.register(CHECK_TARGET, check_server_args_hook, HookType.AFTER)


def _add_dp_controller_hook() -> None:
    """``--sleep-on-idle`` reaches SGLang's data-parallel controller (``rksc_sgl.runtime.dp_controller``)."""
    from rksc_sgl.runtime.dp_controller import register_hook

    register_hook()


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the ``rksc`` radix cache backend
    (and ``radix-stock``, SGLang's own ``RadixCache``, for comparisons).

    Also adds ``rsbcm`` to the eviction policy choices. Idempotent: calling it again in
    the same process is a no-op. Raises ``ValueError`` if
    another factory already took the name.
    """
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    _add_eviction_policy_choice()
    _add_configuration_check()
    _add_dp_controller_hook()
    _add_server_state_hook()
    _add_asks_hooks()
    _add_seeded_sampling_hooks()
    _add_compression_hooks()
    for name, factory in ((BACKEND_NAME, rksc_cache_factory), (STOCK_BACKEND_NAME, stock_radix_cache_factory)):
        existing = get_radix_cache_factory(name)
        if existing is factory:
            continue
        if existing is not None:
            raise ValueError(
                f"radix cache backend {name!r} is already registered by "
                f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)!s}"
            )
        register_radix_cache_backend(name, factory)
        logger.debug("registered radix cache backend %r", name)
