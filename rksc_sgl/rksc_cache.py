"""The RKSC tree cache: SGLang's ``RadixCache`` plus the hooks RKSC needs.

``RKSCRadixCache`` is a narrow subclass of SGLang's stock ``RadixCache``: the tree, its
matching, splitting, locking and eviction are SGLang's own code. What it adds:

* ``ASKSConfig``: the settings of ASKS (Attention-Similarity KV Sharing), validated once.
  ASKS is off by default. Semantic matching is not implemented yet, so a cache built
  with an *active* ASKS config (``enabled=True`` and ``tau <= 1``) is refused with
  ``NotImplementedError`` instead of silently matching exactly.
* ``RKSCCacheStats``: counters of what the tree did (lookups, exact and semantic match
  tokens, tokens stored and evicted).

With ASKS off the cache behaves exactly like ``RadixCache``: same matches, same slot
indices, same insert results, same eviction order and the same slots freed
(``tests/test_rksc_cache.py`` checks this property against the stock class).

The same class serves the embedded engine (``KVCacheManager(tree_cache_class=...)``) and
the SGLang runtime (``--radix-cache-backend rksc``, see ``rksc_sgl.plugin``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Optional

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.srt.mem_cache.base_prefix_cache import (
        EvictParams,
        EvictResult,
        InsertParams,
        InsertResult,
        MatchPrefixParams,
        MatchResult,
    )
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache

__all__ = ["ASKSConfig", "RKSCCacheStats", "RKSCRadixCache"]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ASKSConfig:
    """Settings of ASKS semantic prefix matching.

    ``enabled``: turn ASKS on (default off: exact token matching only).
    ``tau``: cosine-similarity threshold a cached node's hidden-state key must reach
    for its KV to be reused for a non-identical span; a value above 1 can never be
    reached, so ASKS is then off even when ``enabled``.
    ``key_layer``: the layer whose hidden states form the semantic key (0: token
    embeddings, free; a shallow layer costs a partial forward pass).
    ``recompute_fraction``: share of a reused span's tokens whose KV is recomputed
    (those that deviate most), in [0, 1].
    """

    enabled: bool = False
    tau: float = 0.95
    key_layer: int = 0
    recompute_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"ASKSConfig.enabled must be True or False, got {self.enabled!r}")
        if not _is_real(self.tau) or not math.isfinite(self.tau):
            raise ValueError(f"ASKSConfig.tau must be a finite number, got {self.tau!r}")
        if self.tau < -1.0:
            raise ValueError(
                f"ASKSConfig.tau={self.tau!r} is below -1, the smallest cosine similarity; "
                "use a threshold in [-1, 1] (or above 1 to never match)"
            )
        if not isinstance(self.key_layer, numbers.Integral) or isinstance(self.key_layer, bool):
            raise ValueError(f"ASKSConfig.key_layer must be an integer, got {self.key_layer!r}")
        if self.key_layer < 0:
            raise ValueError(
                f"ASKSConfig.key_layer must be >= 0 (0 = token embeddings), got {self.key_layer}"
            )
        if not _is_real(self.recompute_fraction) or not 0.0 <= self.recompute_fraction <= 1.0:
            raise ValueError(
                f"ASKSConfig.recompute_fraction must be a number in [0, 1], got {self.recompute_fraction!r}"
            )

    @property
    def active(self) -> bool:
        """True when ASKS can match anything: enabled and ``tau`` reachable (<= 1)."""
        return self.enabled and self.tau <= 1.0

    def check_key_layer(self, num_layers: int) -> None:
        """Raise ``ValueError`` if ``key_layer`` does not exist in a model of ``num_layers``.

        Layer 0 is the embedding output; ``num_layers`` is the last block's output.
        """
        if self.key_layer > num_layers:
            raise ValueError(
                f"ASKSConfig.key_layer={self.key_layer} but the model has {num_layers} layers "
                f"(valid key layers: 0..{num_layers})"
            )


@dataclasses.dataclass
class RKSCCacheStats:
    """What the tree did since it was built (or since ``reset_stats``).

    Lookup counters count every ``match_prefix`` call, including a caller's repeated
    lookups of the same request (a scheduler retrying admission, a re-match after
    ``checkpoint``); tokens actually served from the cache are the caller's to count.
    """

    match_calls: int = 0
    match_query_tokens: int = 0
    exact_hit_tokens: int = 0
    semantic_hit_tokens: int = 0
    insert_calls: int = 0
    inserted_tokens: int = 0
    evicted_tokens: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class RKSCRadixCache(RadixCache):
    """SGLang's ``RadixCache`` with RKSC's configuration and statistics.

    ``RKSCRadixCache(params)`` takes the same ``CacheInitParams`` as ``RadixCache``;
    ``asks`` (keyword only) is the ASKS configuration, off by default.
    """

    def __init__(self, params: CacheInitParams, *, asks: Optional[ASKSConfig] = None):
        if asks is None:
            asks = ASKSConfig()
        if not isinstance(asks, ASKSConfig):
            raise TypeError(f"asks must be an ASKSConfig, got {type(asks).__name__}")
        if asks.active:
            raise NotImplementedError(
                "ASKS semantic matching is not implemented yet; build RKSCRadixCache with "
                "ASKSConfig(enabled=False) (or tau > 1) for exact radix matching"
            )
        self.asks = asks
        self.stats = RKSCCacheStats()
        super().__init__(params)

    # ---- statistics -----------------------------------------------------------------
    def reset_stats(self) -> RKSCCacheStats:
        """Start new counters; returns the old ones."""
        old, self.stats = self.stats, RKSCCacheStats()
        return old

    # ---- tree operations (stock behaviour, counted) ------------------------------------
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        stats = self.stats
        stats.match_calls += 1
        # Counted after the call: for EAGLE the key is switched to its bigram view there,
        # the unit ``device_prefix_len`` is in.
        stats.match_query_tokens += len(params.key)
        stats.exact_hit_tokens += result.device_prefix_len
        return result

    def insert(self, params: InsertParams) -> InsertResult:
        # New leaves are the only thing that grows the tree: measure the growth.
        before = self.evictable_size_ + self.protected_size_
        result = super().insert(params)
        if not self.disable:
            self.stats.insert_calls += 1
            self.stats.inserted_tokens += self.evictable_size_ + self.protected_size_ - before
        return result

    def evict(self, params: EvictParams) -> EvictResult:
        result = super().evict(params)
        self.stats.evicted_tokens += result.num_tokens_evicted
        return result
