"""Settings of decode-KV compression (``CompressionConfig``), validated once: plain data, no
torch or SGLang import, so the launchers and SGLang's runtime settings (``RKSC_COMPRESSION``)
read it cheaply. What the settings mean: ``rksc_sgl.rksc.compression``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import List, Optional

__all__ = ["CompressionConfig", "compression_config", "METHODS", "IMPORTANCE", "REDUNDANCY_LAYERS",
           "ATTENTION_METHODS"]

METHODS = ("rkv", "cask", "recent", "attention")
IMPORTANCE = ("cumulative", "window")
REDUNDANCY_LAYERS = ("one", "all")
ATTENTION_METHODS = ("rkv", "cask", "attention")
"""The methods that score candidates by the attention mass they received."""


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """Settings of decode-KV compression (see the module docstring)."""

    method: str = "rkv"
    budget: float = 0.16
    buffer: int = 16
    min_tokens: int = 32
    lam: float = 0.1
    core: float = 0.5
    key_layer: Optional[int] = None  # None: the middle layer
    attention_layer_stride: int = 4
    importance: str = "cumulative"
    redundancy_layers: str = "one"

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("importance", IMPORTANCE),
                              ("redundancy_layers", REDUNDANCY_LAYERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"compression {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        for name, low, high in (("budget", 0.0, 1.0), ("lam", 0.0, 1.0), ("core", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"compression {name} must be a number in [{low:g}, {high:g}], got {value!r}")
        if self.budget <= 0:
            raise ValueError("compression budget must be > 0 (the share of decoded tokens whose KV is kept)")
        for name, low in (("buffer", 1), ("min_tokens", 1), ("attention_layer_stride", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"compression {name} must be an integer >= {low}, got {value!r}")
        if self.min_tokens < self.buffer:
            raise ValueError(f"compression min_tokens ({self.min_tokens}) must be >= buffer ({self.buffer}): "
                             "the kept decode KV includes the recent buffer")
        if self.key_layer is not None and (not isinstance(self.key_layer, int) or isinstance(self.key_layer, bool)
                                           or self.key_layer < 0):
            raise ValueError(f"compression key_layer must be an integer >= 0, got {self.key_layer!r}")

    def target(self, decoded: int) -> int:
        """Decode tokens whose KV is kept after compressing ``decoded`` tokens (buffer included)."""
        return max(math.ceil(self.budget * decoded - 1e-9), self.min_tokens)

    def needs_compression(self, kept: int, decoded: int) -> bool:
        return kept > self.target(decoded) + self.buffer

    def private_cap(self, max_new_tokens: int) -> int:
        """Most decode KV a request can hold at once (for admission)."""
        return min(max_new_tokens, self.target(max_new_tokens) + self.buffer + 1)

    def key_layers(self, num_layers: int) -> List[int]:
        """The layers (0-based) whose keys the redundancy term compares: every layer, or
        ``key_layer`` (default the middle one) within the model's ``num_layers``."""
        if self.redundancy_layers == "all":
            return list(range(num_layers))
        return [min(self.key_layer if self.key_layer is not None else num_layers // 2, num_layers - 1)]

    @property
    def needs_attention(self) -> bool:
        """Whether the method scores candidates by attention mass (all but ``recent``)."""
        return self.method in ATTENTION_METHODS


def compression_config(value) -> Optional[CompressionConfig]:
    """``EngineConfig.compression`` from None, a config or a mapping of its fields."""
    if value is None or isinstance(value, CompressionConfig):
        return value
    if isinstance(value, dict) or hasattr(value, "keys"):
        unknown = set(value) - {f.name for f in dataclasses.fields(CompressionConfig)}
        if unknown:
            raise ValueError(f"compression: unknown field(s) {', '.join(sorted(unknown))}")
        return CompressionConfig(**value)
    raise ValueError(f"compression must be a CompressionConfig or a mapping of its fields, got {type(value).__name__}")
