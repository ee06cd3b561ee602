"""The records of KV bookkeeping: the KV layout, a request's row state, a semantic alias.

A request's row is ``[tree-owned prefix (locked) | slots the request owns]``, split at
``protected_len``; with an ASKS alias, ``[exact prefix | span | slots it owns]`` where span
positions read donor slots in place, hold rotated copies, or are recomputed
(``rksc_sgl.kv.manager`` explains the whole layout).
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from array import array
from typing import Any, List, Optional, Tuple

import torch

from rksc_sgl.gpu_stack import explain_missing_sgl_kernel

with warnings.catch_warnings(), explain_missing_sgl_kernel():
    warnings.simplefilter("ignore")  # sglang's quantization modules warn at import without CUDA
    from sglang.srt.mem_cache.radix_cache import RadixKey


class SemanticTree(abc.ABC):
    """A tree cache that can continue an exact match semantically (ASKS); the KV manager
    asks only such a tree for continuations (``rksc_sgl.rksc.tree_cache.RKSCRadixCache`` is
    one, SGLang's ``RadixCache`` is not)."""

    @property
    @abc.abstractmethod
    def semantic_active(self) -> bool:
        """Whether a continuation can be found now (ASKS on, the tree enabled)."""

    @abc.abstractmethod
    def match_semantic(self, token_ids, node, start: int, recipient_features=None, shift: bool = True,
                       count: bool = True):
        """The best semantic continuation of ``node`` for ``token_ids``, or None."""


class KVCacheExhausted(RuntimeError):
    """The KV pool cannot hold what a request needs, even after evicting everything."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shape of the per-layer KV the model writes (from the model config)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclasses.dataclass
class ReqKV:
    """The KV state of one request: its row and how much of it the tree owns."""

    row: int
    token_ids: List[int]
    kv_len: int = 0
    protected_len: int = 0
    lock: Any = None
    alias: Optional["Alias"] = None
    pending: int = 0  # slots extended past kv_len whose KV is not committed yet
    namespace: Optional[str] = None  # the tree namespace (``extra_key``) it matches and inserts in
    dropped: int = 0  # decode tokens whose KV compression dropped (positions run on past the row)
    merged: dict = dataclasses.field(default_factory=dict)  # CASK: slot -> tokens it stands for
    kept_origins: List[int] = dataclasses.field(default_factory=list)  # original positions of compressed-kept tokens
    attention_seen: dict = dataclasses.field(default_factory=dict)  # slot -> its mass at the last compression


@dataclasses.dataclass
class Alias:
    """A request's read-only use of a donor node's slots for row positions
    ``start .. start + length - 1`` (except ``recompute``: absolute positions the request
    computes into its own slots). ``lock`` holds the donor node while the request runs."""

    start: int
    length: int
    recompute: List[int]
    similarity: float
    lock: Any = None
    allocated: bool = False  # recompute, copy and tail slots allocated (the prefill's extend ran)
    positions: List[int] = dataclasses.field(default_factory=list)  # what the prefill computes
    # (row position, donor slot, delta): aligned tokens at another position than in the
    # donor; their KV is copied into owned slots, keys rotated by delta positions.
    copies: List[Tuple[int, int, int]] = dataclasses.field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def copied(self) -> List[int]:
        return [pos for pos, _, _ in self.copies]

    def shared_positions(self) -> List[int]:
        """Span positions that read the donor's own slot in place."""
        own = set(self.recompute) | set(self.copied)
        return [p for p in range(self.start, self.end) if p not in own]

    @property
    def reused_tokens(self) -> int:
        return self.length - len(self.recompute)


def radix_key(token_ids, namespace: Optional[str] = None) -> RadixKey:
    """SGLang's tree key; ``namespace`` is its ``extra_key``: paths under different
    namespaces never match each other (used for joined fork KV, see ``concatenate``)."""
    return RadixKey(array("q", token_ids), extra_key=namespace)
