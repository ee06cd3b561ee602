"""RSBCM (Reasoning-Selective Block Cache Manager): an attention-aware eviction policy.

``RSBCMStrategy`` is an SGLang ``EvictionStrategy``: SGLang's ``RadixCache.evict`` keeps
its leaf-first heap and pops the smallest ``get_priority(node)`` first, exactly as for
``lru``, ``lfu`` or ``slru``. The policy is selected by name, ``rsbcm``, and its settings
are keyword arguments (``eviction_policy_config``, the runtime's
``--radix-eviction-policy-config``). SGLang's own ``get_eviction_strategy`` does not know
the name; ``RKSCRadixCache`` builds the strategy itself, so ``rsbcm`` needs the ``rksc``
tree cache (``cache="rksc-tree"`` in the embedded engine, ``--radix-cache-backend rksc`` in
the runtime).

Priority (smaller = evicted first)::

    retain(node) = w_recency   * last_access_time / recency_scale_s
                 + w_attention * log(1 + a(node) / a_ref)
                 + w_branches  * log2(1 + B(node))
                 - w_depth     * log2(1 + D(node) / depth_scale)

    get_priority(node) = (retain(node), node.last_access_time)        # one process
                       = (retain(node), node_ops(node), node.id)       # tensor-parallel ranks

* ``a(node)``: attention mass the node's tokens received, per token:
  ``slot_attention[node.value].sum() / len(node.value)``. ``slot_attention`` (one float
  per KV slot, on the pool's device) is filled by the embedded engine's model runner, or in
  SGLang's runtime by the ``rksc_attention`` forward hook
  (``rksc_sgl.runtime.attention_stats``, which also counts each prefill's last query): on
  every ``attention_layer_stride``-th layer of every decode step, each decode query's
  attention weights over its keys (averaged over heads, divided by the number of sampled
  layers, so one decode token adds a total mass of 1) are added to the keys' slots. A
  slot's mass is reset when the slot is allocated again. ``begin_evict`` reads the sums of
  every node the eviction can reach (the evictable leaves and the unlocked nodes above them)
  in one gather on the table's device and one copy to the host (:func:`to_host`), not one
  read per node. ``a_ref`` is the mean per-token mass over the slots of the evictable
  leaves when the eviction starts, so the term is scale free: 0 for an unread node, log 2
  for an average one.
* ``B(node)``: branches that went through the node: ``max(node.hit_count,
  len(node.children))``. ``hit_count`` counts the sequences inserted through the node (a
  fork's branches all pass through their shared prefix); an evictable node is a leaf,
  so its live children are gone and ``hit_count`` is the proxy for them.
* ``D(node)``: depth in tokens, the length of the path from the root to the node's first
  token. Deep nodes (a branch's private tail) go before shallow shared prefixes.
* recency: ``last_access_time`` (wall clock, ``recency_scale_s`` seconds of age weigh as
  much as one unit of the other terms), and the tie-break. On tensor-parallel ranks
  (``use_ranks``; ``recency_clock`` ``auto`` chooses it there, ``ops`` always) recency is the
  tree's operation clock instead: ``node_ops``, the tree operation that last went through
  the node (``recency_scale_ops`` operations weigh one unit), the tie-breaks are that and
  ``node.id``, and the mass sums are combined over the ranks, so every rank computes the
  same priorities (``rksc_sgl.runtime.rank_consistency``).

Missing statistics: when no ``slot_attention`` is attached, the runtime runs without the
``rksc_attention`` hook, or nothing was collected yet, the attention term
is 0 and the proxies ``hit_count`` (branches) and depth rank the nodes, with recency.

LRU reduction: with ``w_attention = w_branches = w_depth = 0`` the order is exactly
``lru``'s: ``retain`` is then a non-decreasing function of ``last_access_time`` and the
tie-break is ``last_access_time`` itself (``tests/test_rsbcm.py`` checks it against
SGLang's ``LRUStrategy`` on the same tree).

``attention_layer_stride`` is read by the embedded engine and by ``rksc-sgl launch-server`` (for
the hook's ``layer_stride``): which layers are sampled; it
does not change the priority.

``collect_above_usage`` (runtime): the hook collects only while more than this share of the
KV pool is allocated (requests and tree; 0: always). Far from full nothing is evicted, so
nothing reads the statistics and the hook costs nothing; statistics start again before an
eviction needs them (``rksc_sgl.runtime.attention_stats``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from rksc_sgl.gpu_stack import explain_missing_sgl_kernel

with warnings.catch_warnings(), explain_missing_sgl_kernel():
    warnings.simplefilter("ignore")
    from sglang.srt.mem_cache.evict_policy import EvictionStrategy

__all__ = ["POLICY_NAME", "RSBCMStrategy"]

POLICY_NAME = "rsbcm"


def _number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"rsbcm: {name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"rsbcm: {name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The one copy an eviction makes from the statistics' device to the host."""
    return tensor.cpu()


RankReducer = Callable[[torch.Tensor, List[int]], torch.Tensor]
"""(per-node mass sums on the host, the nodes' ids) -> the sums every tensor-parallel rank
uses, equal on all of them (``rksc_sgl.runtime.rank_consistency``)."""

RECENCY_CLOCKS = ("auto", "wall", "ops")


class RSBCMStrategy(EvictionStrategy):
    """Attention-, depth-, branch- and recency-aware eviction priority (see the module doc)."""

    def __init__(
        self,
        w_attention: float = 1.0,
        w_depth: float = 1.0,
        w_branches: float = 1.0,
        w_recency: float = 1.0,
        recency_scale_s: float = 60.0,
        depth_scale: float = 64.0,
        attention_layer_stride: int = 4,
        recency_clock: str = "auto",
        recency_scale_ops: float = 256.0,
        collect_above_usage: float = 0.5,
    ):
        self.w_attention = _number("w_attention", w_attention)
        self.w_depth = _number("w_depth", w_depth)
        self.w_branches = _number("w_branches", w_branches)
        self.w_recency = _number("w_recency", w_recency)
        self.recency_scale_s = _number("recency_scale_s", recency_scale_s, strict=True)
        self.recency_scale_ops = _number("recency_scale_ops", recency_scale_ops, strict=True)
        self.depth_scale = _number("depth_scale", depth_scale, strict=True)
        if (not isinstance(attention_layer_stride, numbers.Integral) or isinstance(attention_layer_stride, bool)
                or attention_layer_stride < 1):
            raise ValueError(f"rsbcm: attention_layer_stride must be an integer >= 1, got {attention_layer_stride!r}")
        if recency_clock not in RECENCY_CLOCKS:
            raise ValueError(f"rsbcm: recency_clock must be one of {', '.join(RECENCY_CLOCKS)}, got {recency_clock!r}")
        self.attention_layer_stride = int(attention_layer_stride)
        self.collect_above_usage = _number("collect_above_usage", collect_above_usage)
        if self.collect_above_usage > 1.0:
            raise ValueError(f"rsbcm: collect_above_usage must be in [0, 1], got {collect_above_usage!r}")
        self.recency_clock = recency_clock
        self.clock = "wall" if recency_clock == "auto" else recency_clock
        self.slot_attention: Optional[torch.Tensor] = None
        self.reduce: Optional[RankReducer] = None
        self.attention_ref = 0.0
        self._mass: Dict[int, float] = {}  # id(node) -> mass per token, for this eviction's candidates

    # ---- statistics ---------------------------------------------------------------------
    def watch_free(self, pool_slots: int) -> Optional[int]:
        """Collect statistics while fewer than this many of ``pool_slots`` are free (more than
        ``collect_above_usage`` of the pool allocated), or ``None``: always."""
        if self.collect_above_usage <= 0.0:
            return None
        return max(1, pool_slots - int(self.collect_above_usage * pool_slots))

    def collects(self, free_slots: int, pool_slots: int) -> bool:
        """Whether statistics are collected with ``free_slots`` of ``pool_slots`` free."""
        watch_free = self.watch_free(pool_slots)
        return watch_free is None or free_slots < watch_free

    def attach(self, slot_attention: Optional[torch.Tensor]) -> None:
        """Use ``slot_attention`` (one float per KV slot, index = slot) as attention mass."""
        self.slot_attention = slot_attention

    def use_ranks(self, reduce: Optional[RankReducer]) -> None:
        """Tensor-parallel ranks: combine each eviction's mass sums with ``reduce`` (equal on
        every rank) and count recency on the tree's operation clock (``recency_clock``
        ``auto`` or ``ops``; ``wall`` is refused: wall-clock ages differ from rank to rank)."""
        if self.recency_clock == "wall":
            raise ValueError("rsbcm: recency_clock 'wall' differs between tensor-parallel ranks; "
                             "use 'ops' (or 'auto') in --radix-eviction-policy-config")
        self.reduce, self.clock = reduce, "ops"

    def begin_evict(self, leaves) -> None:
        """Read the attention mass of ``leaves`` and of the unlocked nodes above them (those
        this eviction may reach) in one gather on the table's device and one copy to the
        host, and set ``a_ref``, the mean per-token mass over the leaves' slots (0 if none).

        Candidates are ordered by ``node.id``, which every tensor-parallel rank assigns alike."""
        self.attention_ref, self._mass = 0.0, {}
        if self.slot_attention is None or self.w_attention == 0.0:
            return
        nodes, seen = [], set()
        for leaf in leaves:
            node = leaf
            while node is not None and node.parent is not None and node.lock_ref == 0 and id(node) not in seen:
                seen.add(id(node))
                if node.value is not None and len(node.value):
                    nodes.append(node)
                node = node.parent
        if not nodes:
            return
        nodes.sort(key=lambda n: n.id)
        sums = self._mass_sums(nodes)
        leaf_ids = {id(n) for n in leaves}
        leaf_mass = leaf_tokens = 0.0
        for node, total in zip(nodes, sums):
            self._mass[id(node)] = total / len(node.value)
            if id(node) in leaf_ids:
                leaf_mass += total
                leaf_tokens += len(node.value)
        if leaf_tokens:
            self.attention_ref = leaf_mass / leaf_tokens

    def _mass_sums(self, nodes) -> List[float]:
        """Mass summed over each node's slots: one gather and one copy to the host."""
        table = self.slot_attention
        lengths = [len(n.value) for n in nodes]
        slots = torch.cat([n.value for n in nodes]).to(device=table.device, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(nodes), device=table.device),
                                        torch.tensor(lengths, device=table.device), output_size=sum(lengths))
        sums = torch.zeros(len(nodes), dtype=torch.float32, device=table.device).index_add_(0, owner, table[slots])
        sums = to_host(sums)
        if self.reduce is not None:
            sums = self.reduce(sums, [n.id for n in nodes])
        return sums.tolist()

    def node_attention(self, node) -> float:
        """Mean attention mass per token of ``node`` (0 without statistics): read by
        ``begin_evict`` for the nodes an eviction can reach, else read now (one copy)."""
        if self.slot_attention is None or node.value is None or not len(node.value):
            return 0.0
        mass = self._mass.get(id(node))
        if mass is None:
            mass = self._mass_sums([node])[0] / len(node.value)
        return mass

    @staticmethod
    def node_depth(node) -> int:
        """Tokens from the root to the node's first token."""
        depth, parent = 0, node.parent
        while parent is not None and parent.key is not None and parent.parent is not None:
            depth += len(parent.key)
            parent = parent.parent
        return depth

    @staticmethod
    def node_branches(node) -> int:
        return max(node.hit_count, len(node.children))

    @staticmethod
    def node_ops(node) -> int:
        """The tree operation that last went through ``node`` (``RKSCRadixCache`` stamps it)."""
        return getattr(node, "rksc_op", 0)

    # ---- priority -----------------------------------------------------------------------
    def retain_score(self, node) -> float:
        score = 0.0
        if self.w_recency:
            age = (self.node_ops(node) / self.recency_scale_ops if self.clock == "ops"
                   else node.last_access_time / self.recency_scale_s)
            score = self.w_recency * age
        if self.w_attention and self.attention_ref > 0.0:
            score += self.w_attention * math.log1p(self.node_attention(node) / self.attention_ref)
        if self.w_branches:
            score += self.w_branches * math.log2(1 + self.node_branches(node))
        if self.w_depth:
            score -= self.w_depth * math.log2(1 + self.node_depth(node) / self.depth_scale)
        return score

    def get_priority(self, node) -> Tuple:
        if self.clock == "ops":
            return (self.retain_score(node), self.node_ops(node), node.id)
        return (self.retain_score(node), node.last_access_time)
