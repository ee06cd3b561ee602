"""ASKS settings (``ASKSConfig``), validated once: plain data, no SGLang import, so
``rksc_sgl.config`` and the launchers read it cheaply. The tree that uses them is
``rksc_sgl.rksc.tree_cache.RKSCRadixCache``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

__all__ = ["ASKSConfig"]


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
    ``recompute_fraction``: share of the aligned (reusable) span tokens whose KV is
    computed anyway (those that deviate most at the key layer; at layer 0 those closest
    after a differing token), in [0, 1]; tokens with no identical donor token are always
    computed.
    ``shifted``: also reuse identical donor tokens that sit at another position (copied,
    keys RoPE-rotated). ``None`` (default): only where the KV pool is float32. In bfloat16
    the rotated copies changed 2 to 5 in 100 answers of the paraphrase benchmark (95 to
    98/100 on the CPU, 76/80 on an H100); computing them instead kept 97 to 100/100 over
    five seeds (README, "ASKS in bfloat16").
    """

    enabled: bool = False
    tau: float = 0.95
    key_layer: int = 0
    recompute_fraction: float = 0.5  # (the default setting: see the README's held-out runs)
    shifted: Optional[bool] = None

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
        if self.shifted is not None and not isinstance(self.shifted, bool):
            raise ValueError(f"ASKSConfig.shifted must be True, False or None (float32 only), got {self.shifted!r}")

    @property
    def active(self) -> bool:
        """True when ASKS can match anything: enabled and ``tau`` reachable (<= 1)."""
        return self.enabled and self.tau <= 1.0

    def reuses_shifted(self, dtype: str) -> bool:
        """Whether donor tokens at another position are reused, for a KV pool of ``dtype``."""
        return self.shifted if self.shifted is not None else dtype == "float32"

    def check_key_layer(self, num_layers: int) -> None:
        """Raise ``ValueError`` if ``key_layer`` does not exist in a model of ``num_layers``.

        Layer 0 is the embedding output; ``num_layers`` is the last block's output.
        """
        if self.key_layer > num_layers:
            raise ValueError(
                f"ASKSConfig.key_layer={self.key_layer} but the model has {num_layers} layers "
                f"(valid key layers: 0..{num_layers})"
            )
