"""The RKSC tree cache: SGLang's ``RadixCache`` plus the hooks RKSC needs.

``RKSCRadixCache`` is a narrow subclass of SGLang's stock ``RadixCache``: the tree, its
matching, splitting, locking and eviction are SGLang's own code. What it adds:

* ``ASKSConfig`` (``rksc_sgl.rksc.asks_config``): the settings of ASKS (Attention-Similarity
  KV Sharing), validated once. ASKS is off by default. An *active* config (``enabled=True`` and ``tau <= 1``) needs a
  ``token_features`` function (token ids -> per-token features at the key layer; the
  embedded engine passes the model's token embeddings, ``key_layer=0``).
* Semantic keys: with ASKS active every node carries ``asks_key``, the L2-normalised mean
  of its tokens' features, set when the node is inserted and recomputed for both halves
  when a node is split. ``match_semantic`` is the semantic continuation of an exact match
  (see its docstring); it never changes the tree. Semantic aliases are the caller's to
  hold: donor slots are never stored under another request's tokens.
* Eviction policy ``rsbcm`` (``rksc_sgl.rksc.rsbcm.RSBCMStrategy``), which SGLang's
  ``get_eviction_strategy`` does not know: with ``params.eviction_policy == "rsbcm"`` the
  cache builds it from ``params.eviction_policy_config`` itself. Every other policy is
  SGLang's.
* ``RKSCCacheStats``: counters of what the tree did (lookups, exact and semantic match
  tokens, recomputed tokens, key cost, tokens stored and evicted).

With ASKS off the cache behaves exactly like ``RadixCache``: same matches, same slot
indices, same insert results, same eviction order and the same slots freed
(``tests/test_rksc_cache.py`` checks this property against the stock class).

The same class serves the embedded engine (``KVCacheManager(tree_cache_class=...)``) and
the SGLang runtime (``--radix-cache-backend rksc``, see ``rksc_sgl.runtime.plugin``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from rksc_sgl.gpu_stack import explain_missing_sgl_kernel

with warnings.catch_warnings(), explain_missing_sgl_kernel():
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
    from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

from rksc_sgl.kv.records import SemanticTree
from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.rksc.branch_stop import BRANCH_RID_PREFIX
from rksc_sgl.rksc.semantic_match import SemanticMatch, align_tokens
from rksc_sgl.rksc.rsbcm import POLICY_NAME as RSBCM_POLICY
from rksc_sgl.rksc.rsbcm import RSBCMStrategy

__all__ = ["RKSCCacheStats", "RKSCRadixCache"]

TokenFeatures = Callable[[Sequence[int]], torch.Tensor]
"""Token ids -> (n, hidden) float features at the key layer (layer 0: token embeddings)."""

RecipientFeatures = Callable[[int], torch.Tensor]
"""n -> (n, hidden) features of the recipient's first n span tokens at the key layer."""


REQ_COMPRESSION_ATTR = "rksc_compression"
"""The ``Req`` attribute of a runtime request whose decode KV was compressed
(``rksc_sgl.runtime.compression``); None or absent: exact."""


def is_compressed(req) -> bool:
    """A runtime request whose decode KV was compressed: its row no longer holds the KV of
    every token it generated, so only its exact prefix may enter the tree."""
    return getattr(req, REQ_COMPRESSION_ATTR, None) is not None


def is_stopped_branch(req) -> bool:
    """A runtime request that ended aborted and was named by ``RuntimeBackend`` as a
    frontend gen (``rksc-branch-...``): a branch ``rksc_sgl.vote`` stopped."""
    return (isinstance(req.finished_reason, FINISH_ABORT) and isinstance(req.rid, str)
            and req.rid.startswith(BRANCH_RID_PREFIX))


@dataclasses.dataclass
class RKSCCacheStats:
    """What the tree did since it was built (or since ``reset_stats``).

    Lookup counters count every ``match_prefix`` (and ``match_semantic``) call, including a
    caller's repeated lookups of the same request (a scheduler retrying admission, a
    re-match after ``checkpoint``); tokens actually served from the cache are the
    caller's to count. ``semantic_hit_tokens`` are span tokens served with a donor's KV (read in
    place or copied to a shifted position), ``recomputed_tokens`` the span tokens the
    recipient computes (those with no identical donor token, plus the selective recompute); ``key_tokens``
    counts the tokens keyed at lookup time (the recipients' spans, plus a donor's first
    tokens when the span covers only part of the donor node), ``node_key_tokens`` the
    tokens keyed for nodes (inserts and both halves of every split).
    """

    match_calls: int = 0
    match_query_tokens: int = 0
    exact_hit_tokens: int = 0
    semantic_hit_tokens: int = 0
    semantic_matches: int = 0
    recomputed_tokens: int = 0
    key_tokens: int = 0
    node_key_tokens: int = 0
    insert_calls: int = 0
    inserted_tokens: int = 0
    evicted_tokens: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class RKSCRadixCache(RadixCache, SemanticTree):
    """SGLang's ``RadixCache`` with RKSC's configuration and statistics.

    ``RKSCRadixCache(params)`` takes the same ``CacheInitParams`` as ``RadixCache``;
    ``asks`` (keyword only) is the ASKS configuration, off by default; ``token_features``
    (keyword only, required when ASKS is active) maps token ids to their (n, hidden)
    features at ``asks.key_layer``.

    ``slot_features`` (keyword only, for ``key_layer > 0``): a ``(pool size + 1, hidden)``
    tensor indexed by KV slot that holds each slot's hidden state at the key layer, written
    by the model while it computed the slot's KV (so node keys cost no extra pass). Node
    keys then come from the slots; the recipient's features come from the caller of
    ``match_semantic`` (its span must pass through the key layer). Without it (the SGLang
    runtime), keys are ``token_features`` of the node's token ids.

    ``slot_attention`` (keyword only, with ``rsbcm`` eviction): the per-slot decode attention
    mass RSBCM ranks leaves by (the engine's table; SGLang's runtime attaches its own after
    building the cache).
    """

    def __init__(self, params: CacheInitParams, *, asks: Optional[ASKSConfig] = None,
                 token_features: Optional[TokenFeatures] = None, slot_features: Optional[torch.Tensor] = None,
                 slot_attention: Optional[torch.Tensor] = None):
        if asks is None:
            asks = ASKSConfig()
        if not isinstance(asks, ASKSConfig):
            raise TypeError(f"asks must be an ASKSConfig, got {type(asks).__name__}")
        if asks.active and token_features is None:
            raise ValueError(
                "active ASKS needs token_features (token ids -> features at the key layer) "
                "to key the tree's nodes; build RKSCRadixCache with ASKSConfig(enabled=False) "
                "(or tau > 1) for exact radix matching"
            )
        self.asks = asks
        self.token_features = token_features
        self.slot_features = slot_features
        self.stats = RKSCCacheStats()
        rsbcm = params.eviction_policy.lower() == RSBCM_POLICY and not params.disable
        if rsbcm:
            # SGLang's get_eviction_strategy does not know "rsbcm": build the stock tree
            # with its default policy, then install RSBCM (it validates its own settings).
            strategy = RSBCMStrategy(**(params.eviction_policy_config or {}))
            params = dataclasses.replace(params, eviction_policy="lru", eviction_policy_config=None)
        self.eviction_log = None  # a text file: every evicted node, in order (the runtime's RKSC_EVICTION_LOG)
        self.op_clock = 0  # tree operations so far (stamped only for RSBCM on the operation clock)
        super().__init__(params)
        if rsbcm:
            self.eviction_policy = RSBCM_POLICY
            self.eviction_strategy = strategy
            strategy.attach(slot_attention)

    @property
    def slot_attention(self) -> Optional[torch.Tensor]:
        """RSBCM's per-slot attention table (``None`` under another policy, or before the
        runtime plugin attaches the pool's); whoever writes new KV into a slot zeroes it."""
        strategy = self.eviction_strategy
        return strategy.slot_attention if isinstance(strategy, RSBCMStrategy) else None

    @property
    def semantic_active(self) -> bool:
        """True when semantic matching can happen (ASKS active and the tree enabled)."""
        return self.asks.active and not self.disable

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
            grown = self.evictable_size_ + self.protected_size_ - before
            self.stats.inserted_tokens += grown
            if grown and self.semantic_active:
                # Only a new leaf grows the tree: it is the node the insert ended at.
                self._set_key(result.last_device_node)
        return result

    def checkpoint(self, req, *, up_to: int):
        """SGLang's runtime caches a request's computed KV here. A stopped branch
        (:func:`rksc_sgl.vote` aborted it) caches its prompt only: its partial answer is
        freed, not left for later lookups. So does a request whose decode KV was compressed
        (its prompt, or the exact prefix it held): the true tokens past it no longer have
        their KV in the row, so inserting them would map tokens to the wrong KV."""
        if is_stopped_branch(req) or is_compressed(req):
            up_to = max(req.kv.cache_protected_len, min(up_to, len(req.origin_input_ids)))
        return super().checkpoint(req, up_to=up_to)

    # ---- the operation clock (RSBCM's recency on tensor-parallel ranks) ------------------------
    def _match_prefix_helper(self, node, key):
        value, last = super()._match_prefix_helper(node, key)
        self._stamp(last)
        return value, last

    def _insert_helper(self, node, key, value, *args, **kwargs):
        prefix_len, last = super()._insert_helper(node, key, value, *args, **kwargs)
        self._stamp(last)
        return prefix_len, last

    def _stamp(self, node) -> None:
        """Count one tree operation and mark the path it went through (``rksc_op``): the same
        numbers on every rank that runs the same operations, unlike wall-clock time."""
        strategy = self.eviction_strategy
        if not (isinstance(strategy, RSBCMStrategy) and strategy.clock == "ops"):
            return
        self.op_clock += 1
        while node is not None:
            node.rksc_op = self.op_clock
            node = node.parent

    def _split_node(self, key, child, split_len: int):
        new_node = super()._split_node(key, child, split_len)
        if self.semantic_active:
            self._set_key(new_node)
            self._set_key(child)
        return new_node

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        if self.eviction_log is not None:  # one line per evicted node: id, length, first tokens
            self.eviction_log.write(f"{node.id} {len(node.key)} {list(node.key.token_ids[:4])}\n")

    def evict(self, params: EvictParams) -> EvictResult:
        if isinstance(self.eviction_strategy, RSBCMStrategy) and not self.disable:
            self.eviction_strategy.begin_evict(self.evictable_leaves)  # the attention reference of this eviction
        result = super().evict(params)
        self.stats.evicted_tokens += result.num_tokens_evicted
        return result

    # ---- ASKS: semantic keys and matching --------------------------------------------------
    def _features(self, token_ids) -> torch.Tensor:
        return self.token_features(list(token_ids)).float()

    @staticmethod
    def _pool(features: torch.Tensor) -> torch.Tensor:
        """Mean-pool (n, hidden) features into one L2-normalised key."""
        return torch.nn.functional.normalize(features.mean(dim=0), dim=0)

    def _node_features(self, node: TreeNode, length: Optional[int] = None) -> torch.Tensor:
        """Features of the node's first ``length`` tokens: its slots' stored hidden states,
        or (layer 0, no slot features) the features of its token ids."""
        length = len(node.key) if length is None else length
        if self.slot_features is not None:
            slots = node.value[:length].to(self.slot_features.device, torch.int64)
            return self.slot_features[slots].float().cpu()
        return self._features(node.key.token_ids[:length])

    def _set_key(self, node: TreeNode) -> None:
        """Key ``node`` from its own tokens (at layer 0 the same lookup a prefill does; at a
        deeper layer the hidden states its prefill stored per slot)."""
        node.asks_key = self._pool(self._node_features(node))
        self.stats.node_key_tokens += len(node.key)

    def node_key(self, node: TreeNode) -> torch.Tensor:
        key = getattr(node, "asks_key", None)
        if key is None:  # a node from before ASKS keyed it (not expected; kept safe)
            self._set_key(node)
            key = node.asks_key
        return key

    def match_semantic(self, token_ids: Sequence[int], node: TreeNode, start: int,
                       recipient_features: Optional[RecipientFeatures] = None,
                       shift: bool = True, count: bool = True) -> Optional["SemanticMatch"]:
        """Continue an exact match semantically: the best donor child of ``node``, or None.

        ``node`` is where the exact match of the request stopped (``start`` tokens from
        the root) and ``token_ids`` are the request's next tokens that could be served
        from the cache (its prompt up to the caller's cap, after the exact part). Every
        child of ``node`` starts with a token other than ``token_ids[0]`` (else the exact
        match would have gone on), so each child is a candidate donor.

        Donor choice: the key of the child's first ``L = min(len(child), len(token_ids))``
        tokens (its stored node key when ``L`` is the whole child) is compared by cosine
        with the key of the recipient's first ``L`` tokens; the most similar child with
        cosine >= ``tau`` is the donor.

        Span rule (what is reused): the donor's and the recipient's tokens are aligned
        (``difflib``'s longest matching blocks, in order). Only a recipient token aligned
        with an *identical* donor token reuses that token's KV, which was computed in the
        donor's context (the approximation, as in CacheBlend); a token with no identical
        counterpart is always computed: reusing another token's KV would feed the model
        the donor's words. An aligned token may sit at another position than in the donor
        (a paraphrase of a different token length shifts what follows): its KV is then
        copied with its keys rotated to the new position (``shift=True``; the caller must
        be able to rotate, else shifted tokens are computed). The span is the recipient's
        tokens up to its last aligned one.

        Selective recompute: ``ceil(recompute_fraction * aligned)`` of the aligned tokens
        are computed too. Above layer 0 (``slot_features``), those whose hidden state at
        the key layer deviates most from the donor token's (``1 - cos``; the recipient's
        states are the ones its key was made of), CacheBlend's criterion measured at the
        key layer; at layer 0 identical tokens do not differ, and those closest after a
        token that differs go first (their KV is the most context-dependent; ties: earlier
        first).

        The tree is not changed (no split, no lock): the caller locks ``SemanticMatch.node``
        while it reads the donor slots and never inserts them under its own tokens.

        ``count=False`` leaves the semantic counters to the caller (``count_semantic``): the
        SGLang runtime plans a waiting request's match at every admission attempt and counts
        only the one it admits.

        ``recipient_features(n)`` gives the features of the first ``n`` tokens at the key
        layer (needed above layer 0, where they depend on the prefix: the caller runs the
        span through the first layers); default: ``token_features`` of the token ids.
        """
        stats = self.stats
        if not self.semantic_active or not token_ids or not node.children:
            return None
        if node is not self.root_node and node.evicted:
            return None
        n = len(token_ids)
        longest = min(n, max(len(child.key) for child in node.children.values()))
        if recipient_features is not None:
            recipient = recipient_features(longest)
            if recipient is None:  # the caller could not key the span (no room): exact only
                return None
            recipient = recipient.float().cpu()
        else:
            recipient = self._features(token_ids[:longest])
        stats.key_tokens += longest  # the recipient's span passes through the key layer
        prefix_sums = recipient.cumsum(dim=0)
        best, best_sim = None, None
        for child in node.children.values():
            if child.evicted or child.key.extra_key is not None or getattr(child.key, "cache_salt", None):
                continue  # (a namespaced path, e.g. joined fork KV or a salted one, is never a donor)
            length = min(len(child.key), n)
            if length == len(child.key):
                donor_key = self.node_key(child)
            else:
                donor_key = self._pool(self._node_features(child, length))
                stats.key_tokens += length
            recipient_key = torch.nn.functional.normalize(prefix_sums[length - 1], dim=0)
            sim = float(torch.dot(donor_key, recipient_key))
            if sim >= self.asks.tau and (best_sim is None or sim > best_sim):
                best, best_sim = child, sim
        if best is None:
            return None
        donor_offsets = align_tokens(list(best.key.token_ids), list(token_ids), shift=shift)
        aligned = [i for i, j in enumerate(donor_offsets) if j is not None]
        if not aligned:
            return None
        length = aligned[-1] + 1
        donor_offsets = donor_offsets[:length]
        recompute = self._recompute_offsets(donor_offsets, self._deviation(best, donor_offsets, recipient))
        # Gathered where the tree keeps its slots (the pool's device): nothing read back.
        slots = torch.full((length,), -1, dtype=best.value.dtype, device=best.value.device)
        slots[torch.tensor(aligned, device=slots.device)] = best.value[
            torch.tensor([donor_offsets[i] for i in aligned], device=best.value.device)]
        match = SemanticMatch(node=best, start=start, length=length, similarity=best_sim, slots=slots,
                              recompute=recompute, donor_offsets=donor_offsets)
        if count:
            self.count_semantic(match)
        return match

    def count_semantic(self, match: "SemanticMatch") -> None:
        """Count a semantic match that is used (reused and recomputed span tokens)."""
        self.stats.semantic_matches += 1
        self.stats.semantic_hit_tokens += match.reused_tokens
        self.stats.recomputed_tokens += len(match.recompute)

    def _deviation(self, donor: TreeNode, donor_offsets: List[Optional[int]],
                   recipient: torch.Tensor) -> Dict[int, float]:
        """Per aligned span offset, ``1 - cos`` of the recipient's and the donor token's
        features at the key layer, where the recipient's are known (its first
        ``len(recipient)`` tokens). Above layer 0 this is how far the changed context moved
        the token's hidden state (CacheBlend's KV deviation, measured at the key layer);
        at layer 0 identical tokens have identical embeddings, so it is 0 there."""
        pairs = [(i, j) for i, j in enumerate(donor_offsets) if j is not None and i < len(recipient)]
        if self.slot_features is None or not pairs or self.asks.recompute_fraction == 0.0:
            return {}  # (layer 0: token features, equal for identical tokens)
        donor_features = self._node_features(donor, max(j for _, j in pairs) + 1)
        rows = torch.tensor([i for i, _ in pairs])
        cos = torch.nn.functional.cosine_similarity(recipient[rows], donor_features[[j for _, j in pairs]], dim=-1)
        return {i: float(1.0 - c) for (i, _), c in zip(pairs, cos)}

    def _recompute_offsets(self, donor_offsets: List[Optional[int]], deviation: Dict[int, float]) -> List[int]:
        """Span offsets the recipient computes: the unaligned ones, plus the share of the
        aligned ones whose features deviate most from the donor token's (``deviation``),
        ties (all of them at layer 0) broken towards those closest after a differing token."""
        unaligned = [i for i, j in enumerate(donor_offsets) if j is None]
        aligned = [i for i, j in enumerate(donor_offsets) if j is not None]
        count = min(len(aligned), math.ceil(self.asks.recompute_fraction * len(aligned) - 1e-9))
        since_change, last = {}, None
        for i, j in enumerate(donor_offsets):
            if j is None:
                last = i
            else:
                since_change[i] = len(donor_offsets) if last is None else i - last
        # Deviations are rounded so that float noise between equal features stays a tie.
        order = sorted(aligned, key=lambda i: (-round(deviation.get(i, 0.0), 6), since_change[i], i))
        return sorted(unaligned + order[:max(count, 0)])
